//! `prefloop sandbox run` (one program, for people) and `prefloop score-tests` (a samples stage
//! against its problems' unit tests, into a scores stage).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::{Problem, Sample, TestCase};
use prefloop_data::{StageReader, StageWriter, WriterOptions};
use prefloop_sandbox::{
    Calibration, JudgeOptions, Language, Limits, Program, Sandbox, ScoreOptions, TestStyle,
    TimePolicy, default_runtime_dir, score_samples,
};

/// Commands of the sandbox.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Run(RunArgs),
}

/// Run one program in the sandbox with stdin as its input; print its stdout, its stderr and
/// the verdict-relevant facts (exit, time) on stderr. The program never runs outside wasm.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The program's language: python.
    #[arg(long, default_value = "python")]
    lang: String,
    /// The program's source file.
    file: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Per-test limits.
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
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            time: Duration::from_millis(self.time_limit_ms),
            memory_bytes: self.memory_mb << 20,
            output_bytes: self.output_mb << 20,
        }
    }
}

fn open_sandbox() -> Result<Sandbox> {
    let started = Instant::now();
    let sandbox = Sandbox::open(&default_runtime_dir())?;
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
    eprintln!(
        "[sandbox] {:?} after {:.1} ms{}",
        run.exit,
        run.wall.as_secs_f64() * 1e3,
        if run.memory_refused {
            " (a memory growth was refused)"
        } else {
            ""
        }
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
    /// Reward 10 × passed / total instead of all-or-nothing.
    #[arg(long)]
    partial_credit: bool,
    /// Run every test, not only up to the first failure.
    #[arg(long)]
    all_tests: bool,
    /// Samples scored per batch (a batch's scores are written together).
    #[arg(long, default_value_t = 256)]
    batch: usize,
}

pub fn score_tests(args: &ScoreTestsArgs) -> Result<()> {
    let mut problems: HashMap<String, Problem> = HashMap::new();
    for rows in StageReader::<Problem>::open(&args.problems)? {
        problems.extend(rows?.into_iter().map(|p| (p.problem_id.clone(), p)));
    }
    let reader = StageReader::<Sample>::open(&args.samples)?;
    let total = reader.manifest().rows();
    let mut writer = StageWriter::open(&args.out, WriterOptions::default())?;
    let done = writer.committed_rows();
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
            ..TimePolicy::default()
        },
        partial_credit: args.partial_credit,
        calibrate: args.calibrate,
    };

    let calibration = Calibration::default();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} samples, {per_sec}, {msg}",
        )?
        .progress_chars("=> "),
    );
    bar.set_position(done);
    let (mut seen, mut passed, mut batch) = (0u64, 0u64, Vec::with_capacity(args.batch));
    let started = Instant::now();
    let mut flush = |batch: &mut Vec<Sample>, bar: &ProgressBar| -> Result<()> {
        let scores = score_samples(&sandbox, &problems, batch, &options, &calibration)?;
        passed += scores.iter().filter(|s| s.reward >= 10.0).count() as u64;
        writer.write(&scores)?;
        bar.inc(batch.len() as u64);
        bar.set_message(format!("{passed} passed"));
        batch.clear();
        Ok(())
    };
    for rows in reader {
        for sample in rows? {
            seen += 1;
            if seen <= done {
                continue;
            }
            batch.push(sample);
            if batch.len() == args.batch {
                flush(&mut batch, &bar)?;
            }
        }
    }
    flush(&mut batch, &bar)?;
    bar.finish_and_clear();
    let manifest = writer.finish()?;
    println!(
        "scored {} samples ({} this run) in {:.1} s: {passed} passed every test; wrote {}",
        manifest.rows(),
        total - done,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
