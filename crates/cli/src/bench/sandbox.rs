//! `prefloop bench sandbox`: every reference solution of a problems stage run against all its
//! tests in the sandbox, and — in the same run, as APPS and LiveCodeBench evaluate — by a
//! native `python3` process per test. Reports tests/s of both, the pass rates, every failure,
//! and the per-test overhead of a trivial program.
//!
//! The native baseline executes the dataset's reference solutions on the host: use it on
//! datasets you trust (the published references), never on generated code.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prefloop_core::{Problem, TestCase, Verdict};
use prefloop_data::StageReader;
use prefloop_sandbox::{
    Compare, JudgeOptions, Language, Limits, Sandbox, TestStyle, TimePolicy, apps_match,
    compare_for, program_for, tokens_match,
};
use rayon::prelude::*;

/// Run every reference solution of a problems stage in the sandbox and natively; compare.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A problems stage with stdin/stdout tests (e.g. prefloop import codecontests …).
    #[arg(long)]
    problems: PathBuf,
    /// The native interpreter for the baseline; "none" to skip it.
    #[arg(long, default_value = "python3")]
    native: String,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Runs of the trivial program for the overhead figure.
    #[arg(long, default_value_t = 200)]
    trivial_runs: u32,
    /// Run the references with this fuel limit per test as well as the time limit (what
    /// counting fuel costs: compare with a run without it).
    #[arg(long)]
    fuel: Option<u64>,
}

/// The outcome of one problem's reference under one runner.
struct Outcome {
    verdict: Verdict,
    tests: u32,
    detail: String,
    /// Wall time of the problem's tests, end to end (a worker's busy time).
    busy: Duration,
}

pub fn run(args: &Args) -> Result<()> {
    let mut problems: Vec<Problem> = Vec::new();
    for rows in StageReader::<Problem>::open(&args.problems)? {
        problems.extend(rows?.into_iter().filter(|p| p.reference_solution.is_some()));
    }
    problems.truncate(args.limit.unwrap_or(problems.len()));
    let started = Instant::now();
    let sandbox = Sandbox::open_default()?;
    println!(
        "sandbox ready in {:.2} s (runner compiled or loaded from cache); {} problems, {} threads",
        started.elapsed().as_secs_f64(),
        problems.len(),
        rayon::current_num_threads()
    );

    let trivial = TestCase {
        input: "7\n".into(),
        output: "7".into(),
    };
    let echo = prefloop_sandbox::Program {
        language: prefloop_sandbox::Language::Python,
        source: "print(input())\n".into(),
        style: TestStyle::Stdio,
    };
    let options = JudgeOptions::default();
    let started = Instant::now();
    for _ in 0..args.trivial_runs {
        let judgement = sandbox.judge(&echo, std::slice::from_ref(&trivial), &options);
        anyhow::ensure!(
            judgement.verdict == Verdict::Ok,
            "trivial program: {judgement:?}"
        );
    }
    let sandbox_trivial = started.elapsed() / args.trivial_runs;
    let native_trivial = if args.native == "none" {
        None
    } else {
        let started = Instant::now();
        for _ in 0..args.trivial_runs {
            let (ok, _) = run_native(
                &args.native,
                "print(input())\n",
                &trivial,
                Duration::from_secs(10),
            )?;
            anyhow::ensure!(
                ok == Some("7\n".into()),
                "native trivial program printed {ok:?}"
            );
        }
        Some(started.elapsed() / args.trivial_runs)
    };
    println!(
        "trivial program (print(input())), per test: sandbox {:.2} ms{}",
        sandbox_trivial.as_secs_f64() * 1e3,
        native_trivial.map_or(String::new(), |t| format!(
            ", native {} process {:.2} ms",
            args.native,
            t.as_secs_f64() * 1e3
        ))
    );

    if sandbox.check_language(Language::Cpp).is_ok() {
        cpp_overhead(&sandbox, &trivial, args.trivial_runs)?;
    }

    let time = TimePolicy::default();
    if let Some(fuel) = args.fuel {
        // The fuel-counting engines are built (their runner compiled) on first use: not timed.
        let options = JudgeOptions {
            limits: Limits {
                fuel: Some(fuel),
                ..Limits::default()
            },
            ..JudgeOptions::default()
        };
        let judgement = sandbox.judge(&echo, std::slice::from_ref(&trivial), &options);
        anyhow::ensure!(
            judgement.verdict == Verdict::Ok,
            "trivial program under fuel: {judgement:?}"
        );
    }
    let started = Instant::now();
    let in_sandbox: Vec<Outcome> = problems
        .par_iter()
        .map(|problem| {
            let started = Instant::now();
            let options = JudgeOptions {
                limits: Limits {
                    time: time.limit(problem.time_limit_ms, None),
                    fuel: args.fuel,
                    ..Limits::default()
                },
                compare: compare_for(problem),
                all_tests: true,
            };
            let reference = problem.reference_solution.as_deref().unwrap_or_default();
            let judgement = sandbox.judge(
                &program_for(problem, Language::Python, reference),
                &problem.tests,
                &options,
            );
            let detail = judgement
                .tests
                .iter()
                .position(|t| t.verdict != Verdict::Ok)
                .map(|i| format!("test {i}: {}", judgement.tests[i].detail))
                .unwrap_or_default();
            Outcome {
                verdict: judgement.verdict,
                tests: judgement.tests.len() as u32,
                detail,
                busy: started.elapsed(),
            }
        })
        .collect();
    let sandbox_wall = started.elapsed();
    let runner = match args.fuel {
        Some(fuel) => format!("sandbox, fuel {fuel}"),
        None => "sandbox".into(),
    };
    report(&runner, &problems, &in_sandbox, sandbox_wall);

    if args.native != "none" {
        let started = Instant::now();
        let native: Vec<Outcome> = problems
            .par_iter()
            .map(|problem| native_outcome(&args.native, problem, &time))
            .collect::<Result<_>>()?;
        let native_wall = started.elapsed();
        report(
            &format!("native {}", args.native),
            &problems,
            &native,
            native_wall,
        );
        println!(
            "wall time, sandbox / native: {:.2}",
            sandbox_wall.as_secs_f64() / native_wall.as_secs_f64()
        );
    }
    Ok(())
}

fn report(runner: &str, problems: &[Problem], outcomes: &[Outcome], wall: Duration) {
    let tests: u32 = outcomes.iter().map(|o| o.tests).sum();
    let passed = outcomes.iter().filter(|o| o.verdict == Verdict::Ok).count();
    // How much of the pool's time went to problems: the rest is the tail, workers idle
    // while the last problems finish.
    let busy: Duration = outcomes.iter().map(|o| o.busy).sum();
    let slowest = outcomes.iter().map(|o| o.busy).max().unwrap_or_default();
    println!(
        "{runner}: {passed}/{} references pass; {tests} tests in {:.1} s = {:.1} tests/s; \
         workers busy {:.0}%, slowest problem {:.1} s",
        problems.len(),
        wall.as_secs_f64(),
        f64::from(tests) / wall.as_secs_f64(),
        100.0 * busy.as_secs_f64() / (wall.as_secs_f64() * rayon::current_num_threads() as f64),
        slowest.as_secs_f64()
    );
    for (problem, outcome) in problems.iter().zip(outcomes) {
        if outcome.verdict != Verdict::Ok {
            println!(
                "  {runner} {} {}: {}",
                problem.problem_id,
                outcome.verdict,
                outcome.detail.lines().next().unwrap_or_default()
            );
        }
    }
}

/// C++'s costs on a trivial program: a compile (the first sight of a source), a program's
/// preparation once compiled (the cached module loaded and linked), and a test.
fn cpp_overhead(sandbox: &Sandbox, trivial: &TestCase, runs: u32) -> Result<()> {
    // A source no earlier run compiled, so that the first judge pays the compile.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let echo = prefloop_sandbox::Program {
        language: Language::Cpp,
        source: format!(
            "// {nonce}\n#include <cstdio>\nint main() {{ int x; scanf(\"%d\", &x); printf(\"%d\\n\", x); }}\n"
        ),
        style: TestStyle::Stdio,
    };
    let options = JudgeOptions {
        all_tests: true,
        ..JudgeOptions::default()
    };
    let judge = |tests: &[TestCase]| -> Result<Duration> {
        let started = Instant::now();
        let judgement = sandbox.judge(&echo, tests, &options);
        anyhow::ensure!(
            judgement.verdict == Verdict::Ok,
            "trivial C++ program: {judgement:?}"
        );
        Ok(started.elapsed())
    };
    let compile = judge(std::slice::from_ref(trivial))?;
    let prepared = (0..runs)
        .map(|_| judge(std::slice::from_ref(trivial)))
        .sum::<Result<Duration>>()?
        / runs;
    let tests = vec![trivial.clone(); runs as usize];
    let per_test = judge(&tests)? / runs;
    println!(
        "trivial C++ program (scanf/printf): compile {:.2} s once; then per program {:.2} ms \
         (cached module loaded, linked, one test); per test {:.2} ms",
        compile.as_secs_f64(),
        prepared.as_secs_f64() * 1e3,
        per_test.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The reference run natively, one process per test, stopping at nothing (all tests).
fn native_outcome(python: &str, problem: &Problem, time: &TimePolicy) -> Result<Outcome> {
    let source = program_for(
        problem,
        Language::Python,
        problem.reference_solution.as_deref().unwrap_or_default(),
    )
    .source;
    let limit = time.limit(problem.time_limit_ms, None);
    let started = Instant::now();
    let mut verdict = Verdict::Ok;
    let mut detail = String::new();
    for (i, test) in problem.tests.iter().enumerate() {
        let (stdout, error) = run_native(python, &source, test, limit)?;
        let this = match stdout {
            None => Verdict::TimeLimit,
            Some(_) if !error.is_empty() => Verdict::RuntimeError,
            Some(out) => {
                let ok = match compare_for(problem) {
                    Compare::Apps => apps_match(&out, &test.output),
                    Compare::Tokens => tokens_match(&out, &test.output),
                };
                if ok {
                    Verdict::Ok
                } else {
                    Verdict::WrongAnswer
                }
            }
        };
        if this != Verdict::Ok && verdict == Verdict::Ok {
            verdict = this;
            detail = format!("test {i}: {}", error.lines().last().unwrap_or_default());
        }
    }
    Ok(Outcome {
        verdict,
        tests: problem.tests.len() as u32,
        detail,
        busy: started.elapsed(),
    })
}

/// One native run: (stdout, or None on timeout; stderr if it exited non-zero).
fn run_native(
    python: &str,
    source: &str,
    test: &TestCase,
    limit: Duration,
) -> Result<(Option<String>, String)> {
    let mut child = Command::new(python)
        .args(["-c", source])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = test.input.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    // Drained while the child runs, so a large output cannot block it on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let waited = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let _ = writer.join();
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    Ok(match waited {
        None => (None, String::new()),
        Some(status) if status.success() => (Some(stdout), String::new()),
        Some(status) => (Some(stdout), format!("{status}\n{stderr}")),
    })
}
