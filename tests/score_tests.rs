//! End-to-end: `prefloop score-tests` scores a samples stage against the unit tests of an
//! imported problems stage, in the sandbox, and `prefloop score-program` scores one with a
//! reward program there. Skipped with a message when scripts/setup has not built the sandbox
//! runtime.

mod common;

use std::path::Path;

use prefloop_core::{Finish, Sample, Score, Verdict};
use prefloop_data::{StageReader, StageWriter, WriterOptions};

use common::{prefloop, text, venv_python};

fn sample(problem_id: &str, sample_idx: u32, completion: &str) -> Sample {
    Sample {
        problem_id: problem_id.into(),
        prompt: "solve it".into(),
        completion: completion.into(),
        sample_idx,
        round: 0,
        policy: "test".into(),
        seed: 0,
        num_tokens: 1,
        logprob_sum: -1.0,
        finish: Finish::Stop,
    }
}

fn runtime_present() -> bool {
    let dir = prefloop_sandbox::default_runtime_dir();
    let present = dir.join(prefloop_sandbox::PYTHON_RUNNER).is_file();
    if !present {
        eprintln!(
            "skipping: no sandbox runtime in {}; run scripts/setup",
            dir.display()
        );
    }
    present
}

/// Imports the APPS fixture into `dir/problems` and writes `samples` as `dir/samples`.
fn problems_and_samples(dir: &Path, samples: &[Sample]) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/apps_hf.jsonl");
    let problems = dir.join("problems");
    let out = prefloop(&[
        "import",
        "apps",
        fixture.to_str().unwrap(),
        "--out",
        problems.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut writer =
        StageWriter::<Sample>::open(dir.join("samples"), WriterOptions::default()).unwrap();
    writer.write(samples).unwrap();
    writer.finish().unwrap();
}

#[test]
fn score_tests_rewards_passing_programs_and_names_verdicts() {
    if !runtime_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();

    let samples = [
        // Call-based sum_even: right, fenced in a chat answer.
        sample(
            "apps/4184",
            0,
            "Sure:\n```python\ndef sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)\n```",
        ),
        // Wrong answer.
        sample("apps/4184", 1, "def sum_even(xs):\n    return sum(xs)\n"),
        // Standard input: right, wrong, loops forever, does not parse.
        sample("apps/17", 0, "n = int(input())\nprint(n * n)\n"),
        sample("apps/17", 1, "n = int(input())\nprint(n + n)\n"),
        sample("apps/17", 2, "while True:\n    pass\n"),
        sample("apps/17", 3, "print(\n"),
    ];
    problems_and_samples(dir.path(), &samples);

    let out = prefloop(&[
        "score-tests",
        "--problems",
        &path("problems"),
        "--samples",
        &path("samples"),
        "--out",
        &path("scores"),
        "--time-limit-ms",
        "1000",
        "--time-floor-ms",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("scored 6 samples"),
        "{}",
        text(&out.stdout)
    );

    let scores: Vec<Score> = StageReader::open(dir.path().join("scores"))
        .unwrap()
        .flat_map(Result::unwrap)
        .collect();
    let summary: Vec<(&str, u32, f32, Verdict, u32, u32)> = scores
        .iter()
        .map(|s| {
            (
                s.problem_id.as_str(),
                s.sample_idx,
                s.reward,
                s.verdict,
                s.passed,
                s.total,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("apps/4184", 0, 10.0, Verdict::Ok, 2, 2),
            ("apps/4184", 1, 0.0, Verdict::WrongAnswer, 0, 2),
            ("apps/17", 0, 10.0, Verdict::Ok, 2, 2),
            ("apps/17", 1, 0.0, Verdict::WrongAnswer, 0, 2),
            ("apps/17", 2, 0.0, Verdict::TimeLimit, 0, 2),
            ("apps/17", 3, 0.0, Verdict::CompileError, 0, 2),
        ]
    );
}

#[test]
fn score_tests_names_a_sample_whose_problem_is_missing() {
    if !runtime_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    problems_and_samples(dir.path(), &[sample("apps/999", 0, "print(1)")]);
    let out = prefloop(&[
        "score-tests",
        "--problems",
        &path("problems"),
        "--samples",
        &path("samples"),
        "--out",
        &path("scores"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("\"apps/999\""),
        "{}",
        text(&out.stderr)
    );
}

/// `sandbox run` with `program` on stdin `input`: exit code and stderr.
fn sandbox_run(dir: &Path, program: &str, input: &str, extra: &[&str]) -> (Option<i32>, String) {
    let file = dir.join("prog.py");
    std::fs::write(&file, program).unwrap();
    let out = common::output_with_stdin(
        std::process::Command::new(env!("CARGO_BIN_EXE_prefloop"))
            .args(["sandbox", "run"])
            .args(extra)
            .arg(&file),
        input,
    );
    (out.status.code(), text(&out.stderr))
}

#[test]
fn sandbox_run_of_a_program_that_raises_says_re_and_exits_non_zero() {
    if !runtime_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = sandbox_run(dir.path(), "print(1 // int(input()))\n", "0\n", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("[sandbox] RE") && stderr.contains("ZeroDivisionError"),
        "{stderr}"
    );

    let (code, stderr) = sandbox_run(dir.path(), "print(1 // int(input()))\n", "1\n", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("[sandbox] OK"), "{stderr}");

    // Against an expected output: the same program is WA where it prints something else.
    let expected = dir.path().join("expected.txt");
    std::fs::write(&expected, "2\n").unwrap();
    let args = ["--expected", expected.to_str().unwrap()];
    let (code, stderr) = sandbox_run(dir.path(), "print(1 // int(input()))\n", "1\n", &args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("[sandbox] WA"), "{stderr}");

    let (code, stderr) = sandbox_run(
        dir.path(),
        "while True:\n    pass\n",
        "",
        &["--time-limit-ms", "500"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("[sandbox] TLE"), "{stderr}");
}

#[test]
fn score_tests_reads_samples_that_pyarrow_wrote_without_a_manifest() {
    if !runtime_present() {
        return;
    }
    let Some(python) = venv_python() else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set to a venv with pyarrow (run scripts/setup)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    problems_and_samples(dir.path(), &[]);
    let plain = dir.path().join("plain.parquet");
    // What a vLLM or pandas script writes: pyarrow's defaults, int64 and float64 columns.
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
pq.write_table(pa.table({
    "problem_id": ["apps/17", "apps/17"],
    "prompt": ["square n", "square n"],
    "completion": ["n = int(input())\nprint(n * n)\n", "print(0)\n"],
    "sample_idx": [0, 1],
    "round": [0, 0],
    "policy": ["vllm", "vllm"],
    "seed": [1, 2],
    "num_tokens": [12, 3],
    "logprob_sum": [-3.5, -1.0],
    "finish": ["stop", "stop"],
}), sys.argv[1])
"#;
    let status = std::process::Command::new(python)
        .args(["-c", script, plain.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let out = prefloop(&[
        "score-tests",
        "--problems",
        &path("problems"),
        "--samples",
        &path("plain.parquet"),
        "--out",
        &path("scores"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut scores: Vec<(u32, Verdict)> = StageReader::<Score>::open(dir.path().join("scores"))
        .unwrap()
        .flat_map(Result::unwrap)
        .map(|s| (s.sample_idx, s.verdict))
        .collect();
    scores.sort_by_key(|(idx, _)| *idx);
    assert_eq!(scores, [(0, Verdict::Ok), (1, Verdict::WrongAnswer)]);
    assert!(!dir.path().join("plain.parquet/MANIFEST.json").exists());

    // A file that is not Parquet is an error that names it.
    let err = prefloop(&[
        "score-tests",
        "--problems",
        &path("problems"),
        "--samples",
        &path("problems/MANIFEST.json"),
        "--out",
        &path("scores2"),
    ]);
    assert!(!err.status.success());
    assert!(
        text(&err.stderr).contains("MANIFEST.json"),
        "{}",
        text(&err.stderr)
    );
}

/// Scores of `dir` by (problem, sample): reward and verdict.
fn scores_of(dir: &Path) -> Vec<(String, u32, f32, Verdict)> {
    let mut scores: Vec<_> = StageReader::<Score>::open(dir)
        .unwrap()
        .flat_map(Result::unwrap)
        .map(|s| (s.problem_id, s.sample_idx, s.reward, s.verdict))
        .collect();
    scores.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    scores
}

#[test]
fn score_program_scores_a_samples_stage_with_each_prompts_fields() {
    if !runtime_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let samples = [
        sample("a", 0, "5"),
        sample("a", 1, "six"),
        sample("b", 0, "7"),
        sample("b", 1, "70"),
        sample("c", 0, "anything"),
    ];
    let mut writer =
        StageWriter::<Sample>::open(path("samples"), WriterOptions::default()).unwrap();
    writer.write(&samples).unwrap();
    writer.finish().unwrap();
    std::fs::write(
        path("prompts.jsonl"),
        "{\"problem_id\": \"a\", \"prompt\": \"2 + 3?\", \"answer\": 5}\n\
         {\"problem_id\": \"b\", \"prompt\": \"3 + 4?\", \"answer\": 7, \"unit\": \"apples\"}\n",
    )
    .unwrap();
    // Problem c has no prompt row: its call lacks `answer` and raises.
    std::fs::write(
        path("reward.py"),
        "def reward(prompt, completion, answer, **rest):\n    \
         return 1.0 if completion.strip() == str(answer) else 0.25 * len(rest)\n",
    )
    .unwrap();
    let score = |prompts: &str, out: &str| {
        prefloop(&[
            "score-program",
            "--program",
            &path("reward.py"),
            "--samples",
            &path("samples"),
            "--prompts",
            prompts,
            "--out",
            &path(out),
            "--failure-reward",
            "-1",
        ])
    };
    let out = score(&path("prompts.jsonl"), "scores");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("scored 5 samples"),
        "{}",
        text(&out.stdout)
    );
    let expected = vec![
        ("a".to_string(), 0, 1.0, Verdict::Ok),
        ("a".to_string(), 1, 0.0, Verdict::Ok),
        ("b".to_string(), 0, 1.0, Verdict::Ok),
        ("b".to_string(), 1, 0.25, Verdict::Ok),
        ("c".to_string(), 0, -1.0, Verdict::RuntimeError),
    ];
    assert_eq!(scores_of(&dir.path().join("scores")), expected);

    // The same fields from a Parquet file's columns.
    let Some(python) = venv_python() else {
        eprintln!("skipped the Parquet prompts: no venv python with pyarrow");
        return;
    };
    let made = std::process::Command::new(python)
        .args([
            "-c",
            "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
             pq.write_table(pa.table({'problem_id': ['a', 'b'], 'prompt': ['2 + 3?', '3 + 4?'], \
             'answer': [5, 7], 'unit': [None, 'apples']}), sys.argv[1])",
            &path("prompts.parquet"),
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let out = score(&path("prompts.parquet"), "scores-parquet");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // a's `unit` is null there: passed as None, so it counts among the extra fields.
    let mut expected = expected;
    expected[1].2 = 0.25;
    assert_eq!(scores_of(&dir.path().join("scores-parquet")), expected);
}
