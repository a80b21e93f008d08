//! `prefloop sandbox run` (one program, for people), `prefloop score-tests` (a samples stage
//! against its problems' unit tests, into a scores stage) and `prefloop score-program` (a
//! samples stage through a reward program, into a scores stage).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prefloop_core::{Problem, TestCase, Verdict};
use prefloop_pipeline::{
    ProgramFields, Shard, read_problems, read_prompts, score_program_stage, score_tests_stage,
};
use prefloop_sandbox::{
    Calibration, Compare, JudgeOptions, Language, Limits, Program, RewardOptions, RewardProgram,
    Sandbox, ScoreOptions, TestStyle, TimePolicy, judge_run,
};

/// Commands of the sandbox.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Run(RunArgs),
}

/// Run one program in the sandbox with stdin as its input; print its stdout, then on stderr
/// its stderr and its verdict as score-tests judges it (OK, RE with the exception, TLE, MLE,
/// OLE, CE; WA against --expected) with the time and fuel used. Exits 1 for any verdict but
/// OK. The program never runs outside wasm.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The program's language: python or cpp.
    #[arg(long, default_value = "python")]
    lang: String,
    /// The program's source file.
    file: PathBuf,
    /// The expected output: the run is WA unless its output matches, token by token as
    /// CodeContests' checker compares. Default: no comparison, a clean exit is OK.
    #[arg(long)]
    expected: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Per-test limits (per sample, for a reward program).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Time limit per test, in milliseconds (score-tests: for problems that state none).
    #[arg(long, default_value_t = Limits::default().time.as_millis() as u64)]
    time_limit_ms: u64,
    /// Memory limit per test, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    memory_mb: usize,
    /// Output limit per test, in MiB.
    #[arg(long, default_value_t = Limits::default().output_bytes >> 20)]
    output_mb: usize,
    /// Fuel per test (about one unit per wasm instruction): a run that uses it up is TLE
    /// however loaded the machine is, so verdicts are reproducible; the time limit stays as
    /// a backstop. `sandbox run` prints what a program used. Default: time alone.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    fuel: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            time: Duration::from_millis(self.time_limit_ms),
            memory_bytes: self.memory_mb << 20,
            output_bytes: self.output_mb << 20,
            fuel: self.fuel,
        }
    }
}

fn open_sandbox() -> Result<Sandbox> {
    let started = Instant::now();
    let sandbox = Sandbox::open_default()?;
    tracing::debug!(elapsed = ?started.elapsed(), "sandbox ready");
    Ok(sandbox)
}

pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Run(args) => run_one(args),
    }
}

fn run_one(args: &RunArgs) -> Result<()> {
    let language = Language::parse(&args.lang)?;
    let source = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let expected = match &args.expected {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let sandbox = open_sandbox()?;
    let program = Program {
        language,
        source,
        style: TestStyle::Stdio,
    };
    let options = JudgeOptions {
        limits: args.limits.limits(),
        all_tests: true,
        ..JudgeOptions::default()
    };
    // One test whose expected output is unknown: the verdict is read off the run alone.
    let test = TestCase {
        input,
        output: String::new(),
    };
    let run = sandbox.run_program(&program, &test, &options)?;
    std::io::stdout().write_all(&run.stdout)?;
    std::io::stdout().flush()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stderr = stderr
        .rsplit_once('\0')
        .map_or(&*stderr, |(before, _)| before);
    if !stderr.trim().is_empty() {
        eprintln!("{}", stderr.trim_end_matches('\n'));
    }
    let judged = judge_run(&run, &program, expected.as_deref(), Compare::Tokens);
    let detail = match judged.detail.is_empty() {
        true => String::new(),
        false => format!(" ({})", judged.detail),
    };
    eprintln!(
        "[sandbox] {}{detail} after {:.1} ms{}{}",
        judged.verdict.as_str(),
        run.wall.as_secs_f64() * 1e3,
        run.fuel_used
            .map_or(String::new(), |fuel| format!(", {fuel} fuel")),
        if run.memory_refused {
            " (a memory growth was refused)"
        } else {
            ""
        }
    );
    anyhow::ensure!(
        judged.verdict == Verdict::Ok,
        "{} is {}{detail}",
        args.file.display(),
        judged.verdict.as_str()
    );
    Ok(())
}

/// Score a samples stage by running each completion against its problem's unit tests in the
/// sandbox: reward 10 if every test passes, else 0 (the paper), or partial credit.
///
/// The completion's first fenced code block is the program (or the whole completion). Time
/// limits scale from the problem's own limit, or, with --calibrate, from its reference
/// solution's measured time, never below --time-floor-ms. Resumable: run again after a kill,
/// it continues after the scores already written.
#[derive(Debug, clap::Args)]
pub struct ScoreTestsArgs {
    /// The problems stage (prefloop import …).
    #[arg(long)]
    problems: PathBuf,
    /// The samples stage (prefloop generate …).
    #[arg(long)]
    samples: PathBuf,
    /// The scores stage to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    /// No test gets less time than this.
    #[arg(long, default_value_t = TimePolicy::default().floor.as_millis() as u64)]
    time_floor_ms: u64,
    /// Multiplies a problem's own time limit (CPython in wasm is several times slower).
    #[arg(long, default_value_t = TimePolicy::default().problem_scale)]
    time_scale: f64,
    /// Time problems without a limit from their reference solution's slowest test.
    #[arg(long)]
    calibrate: bool,
    /// With --calibrate: each test of a reference gets this long while it is timed.
    #[arg(long, default_value_t = TimePolicy::default().calibration_ceiling.as_millis() as u64)]
    calibration_ceiling_ms: u64,
    /// Reward 10 × passed / total instead of all-or-nothing.
    #[arg(long)]
    partial_credit: bool,
    /// Run every test, not only up to the first failure.
    #[arg(long)]
    all_tests: bool,
    /// Samples scored per batch (a batch's scores are written together).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Score only slice i of n of the samples' rows (contiguous), into
    /// OUT/shard-IIIII-of-NNNNN; `prefloop merge OUT` joins the slices once all are done.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
}

pub fn score_tests(args: &ScoreTestsArgs) -> Result<()> {
    let problems: HashMap<String, Problem> = read_problems(&args.problems)?
        .into_iter()
        .map(|p| (p.problem_id.clone(), p))
        .collect();
    let sandbox = open_sandbox()?;
    let options = ScoreOptions {
        judge: JudgeOptions {
            limits: args.limits.limits(),
            all_tests: args.all_tests,
            ..JudgeOptions::default()
        },
        time: TimePolicy {
            default: Duration::from_millis(args.limits.time_limit_ms),
            floor: Duration::from_millis(args.time_floor_ms),
            problem_scale: args.time_scale,
            calibration_ceiling: Duration::from_millis(args.calibration_ceiling_ms),
            ..TimePolicy::default()
        },
        partial_credit: args.partial_credit,
        calibrate: args.calibrate,
    };
    anyhow::ensure!(args.batch > 0, "--batch must be positive");
    let calibration = Calibration::default();
    let report = score_tests_stage(
        &sandbox,
        &problems,
        &args.samples,
        &options,
        &calibration,
        args.batch,
        args.shard,
        &args.out,
    )?;
    println!(
        "scored {} samples ({} this run) in {:.1} s: {} passed every test; wrote {}",
        report.rows,
        report.new_rows,
        report.seconds,
        report.passed,
        args.shard.dir(&args.out).display()
    );
    let uncalibrated = calibration.uncalibrated();
    if args.calibrate && !uncalibrated.is_empty() {
        println!(
            "{} problem(s) could not be calibrated (reference missing or failing its tests) and kept the {} ms default: {}",
            uncalibrated.len(),
            args.limits.time_limit_ms,
            uncalibrated.join(", ")
        );
    }
    Ok(())
}

/// Score a samples stage with a reward program in the sandbox: a Python file defining
/// `reward(prompt, completion, **fields) -> float`, called once per sample in a fresh
/// instance with the prompt row's other fields by name (from --prompts: JSONL keys or Parquet
/// columns beside `prompt` and `problem_id`). A sample whose program raises (RE with the
/// exception's type), runs out of time or memory (TLE, MLE), prints too much (OLE) or returns
/// something other than a finite number (RE) gets --failure-reward and that verdict; nothing
/// stops the stage. Resumable: run again after a kill, it continues after the scores written.
#[derive(Debug, clap::Args)]
pub struct ScoreProgramArgs {
    /// The reward program (Python).
    #[arg(long)]
    program: PathBuf,
    /// The samples stage (prefloop generate …), or other tools' Parquet.
    #[arg(long)]
    samples: PathBuf,
    /// The prompts the samples came from, with the fields the program takes (JSONL or
    /// Parquet, by problem_id). Default: no fields.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// The scores stage to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    /// The reward of a sample whose program failed.
    #[arg(long, allow_negative_numbers = true, default_value_t = RewardOptions::default().failure_reward)]
    failure_reward: f32,
    /// Samples scored per batch (a batch's scores are written together).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Score only slice i of n of the samples' rows (contiguous), into
    /// OUT/shard-IIIII-of-NNNNN; `prefloop merge OUT` joins the slices once all are done.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
}

pub fn score_program(args: &ScoreProgramArgs) -> Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch must be positive");
    let program = RewardProgram::read(&args.program)?;
    let fields: ProgramFields = match &args.prompts {
        Some(path) => read_prompts(path)?
            .into_iter()
            .map(|p| (p.problem_id, p.fields))
            .collect(),
        None => ProgramFields::new(),
    };
    let sandbox = open_sandbox()?;
    let options = RewardOptions {
        limits: args.limits.limits(),
        failure_reward: args.failure_reward,
    };
    let report = score_program_stage(
        &sandbox,
        &program,
        &fields,
        &args.samples,
        &options,
        args.batch,
        args.shard,
        &args.out,
    )?;
    println!(
        "scored {} samples ({} this run) in {:.1} s with {} (sha256 {}): {} returned a reward; \
         wrote {}",
        report.rows,
        report.new_rows,
        report.seconds,
        args.program.display(),
        program.sha256(),
        report.passed,
        args.shard.dir(&args.out).display()
    );
    Ok(())
}
