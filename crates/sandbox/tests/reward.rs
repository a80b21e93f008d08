//! Reward programs in the sandbox: a correct one scores as the same function run natively
//! by CPython on the same rows; one that raises, loops or returns a string gives each sample
//! the failure reward and a verdict, and scoring goes on.

mod common;

use std::path::Path;
use std::time::Duration;

use prefloop_core::{Finish, Sample, Scorer, Verdict};
use prefloop_sandbox::{Limits, RewardOptions, RewardProgram};
use serde_json::{Map, Value, json};

/// Exact answers for arithmetic, partial credit for a number in the right ballpark, a length
/// penalty; prints on the way, as user code does (the print must not disturb the reward).
const CORRECT: &str = r#"
import re

def reward(prompt, completion, answer, tolerance=0):
    print("judging", prompt)
    numbers = re.findall(r"-?\d+", completion)
    if not numbers:
        return -1.0
    got = int(numbers[-1])
    if got == answer:
        return 1.0 - 0.001 * len(completion)
    return 0.5 if abs(got - answer) <= tolerance else 0.0
"#;

fn samples() -> Vec<Sample> {
    [
        ("add", "2 + 3 = 5"),
        ("add", "I think it is 6"),
        ("add", "no idea"),
        ("mul", "7 * 6 = 42"),
        ("mul", "about 40"),
        ("neg", "-4"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (id, completion))| Sample {
        problem_id: (*id).into(),
        prompt: format!("What is {id}?"),
        completion: (*completion).into(),
        sample_idx: i as u32,
        round: 0,
        policy: "test".into(),
        seed: i as u64,
        num_tokens: 3,
        logprob_sum: -1.0,
        finish: Finish::Stop,
    })
    .collect()
}

fn fields(id: &str) -> Option<Map<String, Value>> {
    let value = match id {
        "add" => json!({"answer": 5}),
        "mul" => json!({"answer": 42, "tolerance": 3}),
        "neg" => json!({"answer": -4}),
        _ => return None,
    };
    value.as_object().cloned()
}

fn program(dir: &Path, source: &str) -> RewardProgram {
    let path = dir.join("reward.py");
    std::fs::write(&path, source).unwrap();
    RewardProgram::read(&path).unwrap()
}

fn options() -> RewardOptions {
    RewardOptions {
        limits: Limits {
            time: Duration::from_millis(1500),
            ..Limits::default()
        },
        failure_reward: -2.0,
    }
}

/// The rewards CPython gives the same function on the same rows, outside any sandbox (the
/// function is this test's own, trusted code).
fn native_rewards(dir: &Path, samples: &[Sample]) -> Option<Vec<f32>> {
    let python = std::env::var_os("PREFLOOP_PYTHON").unwrap_or_else(|| "python3".into());
    let rows: Vec<Value> = samples
        .iter()
        .map(|s| json!([s.prompt, s.completion, fields(&s.problem_id).unwrap()]))
        .collect();
    let script = dir.join("native.py");
    std::fs::write(
        &script,
        format!(
            "{CORRECT}\nimport json, sys\nrows = json.loads(sys.argv[1])\n\
             print(json.dumps([reward(p, c, **f) for p, c, f in rows]))\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(serde_json::to_string(&rows).unwrap())
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last()?;
    let rewards: Vec<f64> = serde_json::from_str(last).unwrap();
    Some(rewards.into_iter().map(|r| r as f32).collect())
}

#[test]
fn a_correct_program_scores_as_the_same_function_run_natively() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let program = program(dir.path(), CORRECT);
    let samples = samples();
    let scores = program
        .score(sandbox, &samples, &fields, &options())
        .unwrap();
    assert!(
        scores.iter().all(|s| s.verdict == Verdict::Ok),
        "{scores:?}"
    );
    assert!(scores.iter().all(|s| s.scorer == Scorer::Program));
    assert!(
        scores.iter().all(|s| (s.passed, s.total) == (0, 0)),
        "no tests ran"
    );
    let ours: Vec<f32> = scores.iter().map(|s| s.reward).collect();
    assert_eq!(ours[2], -1.0, "no number at all");
    assert_eq!(ours[4], 0.5, "within the tolerance field");
    let Some(native) = native_rewards(dir.path(), &samples) else {
        eprintln!("skipped the native comparison: no python");
        return;
    };
    assert_eq!(ours, native);
    // The same sample ids and rounds, in order.
    for (score, sample) in scores.iter().zip(&samples) {
        assert_eq!(
            (&score.problem_id, score.sample_idx),
            (&sample.problem_id, sample.sample_idx)
        );
    }
}

#[test]
fn raising_looping_and_lying_programs_give_failures_and_never_stop_the_scoring() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "def reward(prompt, completion, answer):\n    return 1 / 0\n",
            Verdict::RuntimeError,
        ),
        (
            "def reward(prompt, completion, answer):\n    while True:\n        pass\n",
            Verdict::TimeLimit,
        ),
        (
            "def reward(prompt, completion, answer):\n    return str(answer)\n",
            Verdict::RuntimeError,
        ),
        (
            "def reward(prompt, completion, answer):\n    return True\n",
            Verdict::RuntimeError,
        ),
        (
            "def reward(prompt, completion, answer):\n    return float('nan')\n",
            Verdict::RuntimeError,
        ),
        // No `reward` at all, and a program that does not compile.
        (
            "def score(prompt, completion):\n    return 1\n",
            Verdict::RuntimeError,
        ),
        ("def reward(prompt, completion:\n", Verdict::CompileError),
    ];
    let samples = &samples()[..2];
    for (source, verdict) in cases {
        let scores = program(dir.path(), source)
            .score(sandbox, samples, &fields, &options())
            .unwrap();
        for score in &scores {
            assert_eq!(score.verdict, verdict, "{source}");
            assert_eq!(score.reward, -2.0, "the failure reward: {source}");
        }
    }
}

/// A reward program's prints were kept in guest memory: one printing without end ran out of
/// memory (MLE) or time. They go to the capped stderr pipe now, so it is cut at the output
/// limit, as score-tests cuts a program's output.
#[test]
fn a_program_that_prints_without_end_is_judged_ole() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let source =
        "def reward(prompt, completion, answer):\n    while True:\n        print('x' * 100000)\n";
    let options = RewardOptions {
        limits: Limits {
            time: Duration::from_secs(20),
            ..Limits::default()
        },
        failure_reward: -2.0,
    };
    let scores = program(dir.path(), source)
        .score(sandbox, &samples()[..1], &fields, &options)
        .unwrap();
    assert_eq!(scores[0].verdict, Verdict::OutputLimit);
    assert_eq!(scores[0].reward, -2.0);
}

#[test]
fn a_program_is_read_once_and_known_by_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let first = program(dir.path(), CORRECT);
    let again = program(dir.path(), CORRECT);
    let changed = program(dir.path(), &format!("{CORRECT}\n# edited\n"));
    assert_eq!(first.sha256(), again.sha256());
    assert_ne!(first.sha256(), changed.sha256());
    assert_eq!(first.sha256().len(), 64);
    let missing = RewardProgram::read(&dir.path().join("nope.py")).unwrap_err();
    assert!(missing.to_string().contains("nope.py"), "{missing}");
}
