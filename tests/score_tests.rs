//! End-to-end: `prefloop score-tests` scores a samples stage against the unit tests of an
//! imported problems stage, in the sandbox. Skipped with a message when scripts/setup has not
//! built the sandbox runtime.

mod common;

use std::path::Path;

use prefloop_core::{Finish, Sample, Score, Verdict};
use prefloop_data::{StageReader, StageWriter, WriterOptions};

use common::{prefloop, text};

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
