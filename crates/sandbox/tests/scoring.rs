//! score_samples: rewards, and time limits calibrated from the reference solution.
//! Needs the Python runner built by scripts/setup; skipped with a message without it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use prefloop_core::{Finish, Problem, ProblemSource, Sample, TestCase, Verdict};
use prefloop_sandbox::{Calibration, ScoreOptions, TimePolicy, score_samples};

use common::sandbox;

/// A program that counts to `n` and prints "done".
fn busy(n: u64) -> String {
    format!("s = 0\nfor i in range({n}):\n    s += i\nprint('done')\n")
}

fn sample(completion: String, sample_idx: u32) -> Sample {
    Sample {
        problem_id: "slow".into(),
        prompt: String::new(),
        completion,
        sample_idx,
        round: 0,
        policy: "test".into(),
        seed: 0,
        num_tokens: 1,
        logprob_sum: 0.0,
        finish: Finish::Stop,
    }
}

#[test]
fn calibration_times_limits_from_the_reference_once_per_problem() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    let problem = Problem {
        problem_id: "slow".into(),
        source: ProblemSource::CodeContests,
        prompt: String::new(),
        tests: vec![TestCase {
            input: String::new(),
            output: "done".into(),
        }],
        fn_name: None,
        starter_code: String::new(),
        reference_solution: Some(busy(3_000_000)),
        difficulty: String::new(),
        time_limit_ms: None,
        memory_limit_bytes: None,
    };
    let problems = HashMap::from([(problem.problem_id.clone(), problem)]);
    // Twice the reference's work: too slow for a 50 ms default, well within 4× the reference.
    let samples = [
        sample(busy(6_000_000), 0),
        sample("print('done')".into(), 1),
    ];
    let mut options = ScoreOptions {
        time: TimePolicy {
            default: Duration::from_millis(50),
            floor: Duration::from_millis(10),
            ..TimePolicy::default()
        },
        ..ScoreOptions::default()
    };
    let verdicts = |options: &ScoreOptions, calibration: &Calibration| -> Vec<Verdict> {
        score_samples(sandbox, &problems, &samples, options, calibration)
            .unwrap()
            .iter()
            .map(|s| s.verdict)
            .collect()
    };
    let calibration = Calibration::default();
    assert_eq!(
        verdicts(&options, &calibration),
        [Verdict::TimeLimit, Verdict::Ok]
    );
    options.calibrate = true;
    assert_eq!(verdicts(&options, &calibration), [Verdict::Ok, Verdict::Ok]);
    // A second batch reuses the measured time.
    assert_eq!(
        calibration.measured("slow").map(|t| t > Duration::ZERO),
        Some(true)
    );
    assert_eq!(verdicts(&options, &calibration), [Verdict::Ok, Verdict::Ok]);
}
