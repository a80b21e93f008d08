//! score_samples: rewards, and time limits calibrated from the reference solution.
//! Needs the Python runner built by scripts/setup; skipped with a message without it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use prefloop_core::{Finish, Problem, ProblemSource, Sample, TestCase, Verdict};
use prefloop_sandbox::{Calibration, Language, ScoreOptions, TimePolicy, score_samples};

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

/// A stdin/stdout problem "slow" with one test and no stated time limit.
fn problem(input: &str, output: &str, reference_solution: Option<String>) -> Problem {
    Problem {
        problem_id: "slow".into(),
        source: ProblemSource::CodeContests,
        prompt: String::new(),
        tests: vec![TestCase {
            input: input.into(),
            output: output.into(),
        }],
        fn_name: None,
        starter_code: String::new(),
        reference_solution,
        difficulty: String::new(),
        time_limit_ms: None,
        memory_limit_bytes: None,
    }
}

#[test]
fn calibration_times_limits_from_the_reference_once_per_problem() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    let problem = problem("", "done", Some(busy(3_000_000)));
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
    assert!(calibration.uncalibrated().is_empty());
}

#[test]
fn a_reference_slower_than_the_per_test_limit_is_still_calibrated_and_failures_are_listed() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    // The reference takes far longer than the 20 ms every test gets otherwise.
    let slow = problem("", "done", Some(busy(3_000_000)));
    let mut broken = problem("", "done", Some("print('wrong')".into()));
    broken.problem_id = "broken".into();
    let problems = HashMap::from([
        (slow.problem_id.clone(), slow),
        (broken.problem_id.clone(), broken),
    ]);
    let mut samples = vec![sample(busy(3_000_000), 0)];
    samples.push(Sample {
        problem_id: "broken".into(),
        ..sample("print('done')".into(), 0)
    });
    let mut options = ScoreOptions {
        time: TimePolicy {
            default: Duration::from_millis(20),
            floor: Duration::from_millis(10),
            ..TimePolicy::default()
        },
        calibrate: true,
        ..ScoreOptions::default()
    };
    options.judge.limits.time = Duration::from_millis(20);
    let calibration = Calibration::default();
    let scores = score_samples(sandbox, &problems, &samples, &options, &calibration).unwrap();
    let measured = calibration
        .measured("slow")
        .expect("timed under its own ceiling");
    assert!(measured > Duration::from_millis(20), "{measured:?}");
    assert_eq!(scores[0].verdict, Verdict::Ok, "4× the reference's time");
    assert_eq!(calibration.uncalibrated(), ["broken"]);
}

#[test]
fn completions_run_in_the_language_their_fence_names() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    let problem = problem("2 3\n", "5", None);
    let problems = HashMap::from([(problem.problem_id.clone(), problem)]);
    let python = "a, b = map(int, input().split())\nprint(a + b)\n";
    let cpp = "#include <bits/stdc++.h>\nint main() { int a, b; std::cin >> a >> b; \
               std::cout << a + b; }\n";
    let mut samples = vec![
        sample(format!("Here:\n```python\n{python}```\n"), 0),
        sample(python.into(), 1),
        sample(format!("```java\n{python}```"), 2),
    ];
    let mut expected = vec![Verdict::Ok, Verdict::Ok, Verdict::CompileError];
    if sandbox.check_language(Language::Cpp).is_ok() {
        samples.push(sample(format!("```cpp\n{cpp}```"), 3));
        // C++ read as Python does not compile.
        samples.push(sample(format!("```python\n{cpp}```"), 4));
        expected.extend([Verdict::Ok, Verdict::CompileError]);
    } else {
        eprintln!("C++ part skipped: the toolchain is not installed (scripts/setup)");
    }
    let scores = score_samples(
        sandbox,
        &problems,
        &samples,
        &ScoreOptions::default(),
        &Calibration::default(),
    )
    .unwrap();
    let verdicts: Vec<Verdict> = scores.iter().map(|s| s.verdict).collect();
    assert_eq!(verdicts, expected);
    assert_eq!(
        scores[2].total, 1,
        "an unsupported language still counts its tests"
    );
}
