//! Fuel limits: a program's fuel use is the same on every run, so a verdict under a fuel
//! limit does not depend on how busy the machine is; running out is TLE, found without
//! waiting for the time limit. Python always; C++ when scripts/setup installed its toolchain.

mod common;

use std::time::{Duration, Instant};

use prefloop_core::{TestCase, Verdict};
use prefloop_sandbox::{Compare, Exit, JudgeOptions, Language, Limits, Program, TestStyle};

/// Sums 0..n: work proportional to n.
const PYTHON_SUM: &str = "n = int(input())\nprint(sum(i * i for i in range(n)))\n";
const CPP_SUM: &str = "#include <bits/stdc++.h>\nint main() { long long n, s = 0; std::cin >> n;\n\
for (long long i = 0; i < n; i++) s += i * i ^ (s >> 3); std::cout << s << std::endl; }\n";

fn options(time: Duration, fuel: Option<u64>) -> JudgeOptions {
    JudgeOptions {
        limits: Limits {
            time,
            fuel,
            ..Limits::default()
        },
        compare: Compare::Tokens,
        all_tests: false,
    }
}

fn program(language: Language, source: &str) -> Program {
    Program {
        language,
        source: source.into(),
        style: TestStyle::Stdio,
    }
}

fn test(input: &str) -> TestCase {
    TestCase {
        input: input.into(),
        output: String::new(),
    }
}

/// Runs `program` on `input` three times with a generous fuel limit and returns what it used,
/// after checking every run used exactly as much.
fn fuel_used(program: &Program, input: &str) -> u64 {
    let sandbox = common::sandbox().expect("checked by the caller");
    let options = options(Duration::from_secs(60), Some(u64::MAX / 2));
    let used: Vec<u64> = (0..3)
        .map(|_| {
            let run = sandbox
                .run_program(program, &test(input), &options)
                .unwrap();
            assert_eq!(run.exit, Exit::Code(0), "{run:?}");
            run.fuel_used.expect("a fuel-limited run reports its fuel")
        })
        .collect();
    assert!(
        used.iter().all(|&u| u == used[0]),
        "fuel used varies: {used:?}"
    );
    used[0]
}

/// Below what the program needs it is TLE on every run, and the verdict comes from the fuel,
/// not the (distant) time limit; with what it needs it passes.
fn check_deterministic_limit(program: &Program, input: &str, expected: &str) {
    let sandbox = common::sandbox().unwrap();
    let needed = fuel_used(program, input);
    let tests = [TestCase {
        input: input.into(),
        output: expected.into(),
    }];
    for _ in 0..3 {
        let short = sandbox.judge(
            program,
            &tests,
            &options(Duration::from_secs(60), Some(needed - needed / 20)),
        );
        assert_eq!(short.verdict, Verdict::TimeLimit, "{:?}", short.tests);
        assert_eq!(short.tests[0].detail, "ran out of fuel");
        let enough = sandbox.judge(
            program,
            &tests,
            &options(Duration::from_secs(60), Some(needed)),
        );
        assert_eq!(enough.verdict, Verdict::Ok, "{:?}", enough.tests);
    }
}

#[test]
fn a_python_program_uses_the_same_fuel_on_every_run_and_more_for_more_work() {
    if common::sandbox().is_none() {
        return;
    }
    let python = program(Language::Python, PYTHON_SUM);
    let small = fuel_used(&python, "1000\n");
    let large = fuel_used(&python, "100000\n");
    // The interpreter's start is shared; the loop's cost grows with n.
    assert!(
        large > small + 50 * (small / 1000).max(1),
        "{small} vs {large}"
    );
    check_deterministic_limit(&python, "100000\n", "333328333350000");
}

#[test]
fn a_cpp_program_uses_the_same_fuel_on_every_run() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    if let Err(e) = sandbox.check_language(Language::Cpp) {
        eprintln!("skipping: {e}");
        return;
    }
    let cpp = program(Language::Cpp, CPP_SUM);
    let run = sandbox
        .run_program(
            &cpp,
            &test("300000\n"),
            &options(Duration::from_secs(60), None),
        )
        .unwrap();
    let expected = String::from_utf8(run.stdout).unwrap();
    check_deterministic_limit(&cpp, "300000\n", expected.trim());
}

#[test]
fn an_infinite_loop_runs_out_of_fuel_long_before_its_time_limit() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    let spin = program(Language::Python, "while True:\n    pass\n");
    // Warm the fuel-counting engines up, so the timing below is the run's alone.
    fuel_used(&program(Language::Python, "print(input())\n"), "1\n");
    let started = Instant::now();
    let judgement = sandbox.judge(
        &spin,
        &[test("")],
        &options(Duration::from_secs(120), Some(50_000_000)),
    );
    assert_eq!(
        judgement.verdict,
        Verdict::TimeLimit,
        "{:?}",
        judgement.tests
    );
    assert_eq!(judgement.tests[0].detail, "ran out of fuel");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn runs_without_a_fuel_limit_report_no_fuel() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    let echo = program(Language::Python, "print(input())\n");
    let run = sandbox
        .run_program(&echo, &test("7\n"), &options(Duration::from_secs(10), None))
        .unwrap();
    assert_eq!((run.exit, run.fuel_used), (Exit::Code(0), None));
}
