//! `prefloop bench jobs`: `pairs` and `stats` over a generated samples + scores dataset of
//! N rows each. Each job runs in a fresh process of this binary, so its peak RSS is the job's
//! own and not the generator's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use prefloop_core::{Sample, Score, Scorer, Verdict};
use prefloop_data::{Manifest, PairsOptions, StageWriter, WriterOptions, build_pairs, stage_stats};
use rand::Rng;

use super::{TextGen, mib, peak_rss, rss};

/// Time `pairs` and `stats` over N generated samples and their scores; report wall time and
/// peak RSS of each job, measured in a fresh process.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sample rows (and as many score rows).
    #[arg(long, default_value_t = 5_000_000)]
    rows: u64,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    samples_per_prompt: u32,
    /// Rounds the rows are spread over.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Average text bytes per sample (prompt + completion).
    #[arg(long, default_value_t = 500)]
    row_bytes: usize,
    /// Where the dataset lives (default: a temporary directory, removed afterwards). A dataset
    /// already there is reused.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run one job over the dataset in --dir and report it (how the parent times each job).
    #[arg(long, requires = "dir", value_parser = ["pairs", "stats"])]
    job: Option<String>,
}

/// Score rows built per writer call.
const CHUNK_ROWS: u64 = 8192;

pub fn run(args: &Args) -> Result<()> {
    if let Some(job) = &args.job {
        return run_job(job, args.dir.as_ref().expect("clap requires --dir"));
    }
    let scratch;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            scratch = tempfile::tempdir()?;
            scratch.path().to_owned()
        }
    };
    let start = Instant::now();
    let generated = generate(args, &dir)?;
    if generated {
        println!(
            "generated {} samples and {} scores in {:.1} s",
            args.rows,
            args.rows,
            start.elapsed().as_secs_f64()
        );
    }
    let (samples, scores) = (
        Manifest::load(&dir.join("samples"))?,
        Manifest::load(&dir.join("scores"))?,
    );
    let on_disk: u64 = [samples, scores]
        .iter()
        .flatten()
        .flat_map(|m| &m.shards)
        .map(|s| s.bytes)
        .sum();
    println!(
        "bench jobs: {} samples + {} scores, {:.1} MiB of Parquet in {}",
        args.rows,
        args.rows,
        mib(on_disk),
        dir.display()
    );
    println!("job    seconds  rows/s      peak RSS MiB  above start MiB  result");
    let exe = std::env::current_exe()?;
    for job in ["pairs", "stats"] {
        let status = Command::new(&exe)
            .args(["bench", "jobs", "--job", job, "--dir"])
            .arg(&dir)
            .status()
            .with_context(|| format!("running the {job} job"))?;
        ensure!(status.success(), "the {job} job failed: {status}");
    }
    Ok(())
}

/// Writes samples/ and scores/ under `dir` unless both are complete; true if it wrote them.
fn generate(args: &Args, dir: &Path) -> Result<bool> {
    let complete = |stage: &str| {
        Manifest::load(&dir.join(stage))
            .map(|m| m.is_some_and(|m| m.complete && m.rows() == args.rows))
    };
    if complete("samples")? && complete("scores")? {
        return Ok(false);
    }
    for stage in ["samples", "scores"] {
        let path = dir.join(stage);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    let mut samples = StageWriter::<Sample>::open(dir.join("samples"), WriterOptions::default())?;
    let mut scores = StageWriter::<Score>::open(dir.join("scores"), WriterOptions::default())?;
    let mut text = TextGen::new(1);
    let (prompt_bytes, completion_bytes) = (args.row_bytes * 3 / 5, args.row_bytes * 2 / 5);
    let per_prompt = u64::from(args.samples_per_prompt);
    let per_round = args.rows.div_ceil(u64::from(args.rounds));
    let mut prompt = String::new();
    let mut row = 0;
    while row < args.rows {
        let end = (row + CHUNK_ROWS).min(args.rows);
        let (mut sample_rows, mut score_rows) = (Vec::new(), Vec::new());
        for i in row..end {
            let (round, in_round) = ((i / per_round) as u32, i % per_round);
            let (problem, sample_idx) = (in_round / per_prompt, (in_round % per_prompt) as u32);
            if sample_idx == 0 {
                prompt = text.text(prompt_bytes);
            }
            let sample = text.sample(problem, &prompt, sample_idx, round, i, completion_bytes);
            sample_rows.push(sample);
            // A code round: 30% of samples pass all 8 tests; the rest fail some.
            let total = 8;
            let (passed, verdict) = match text.rng.random_range(0..10) {
                0..3 => (total, Verdict::Ok),
                3..8 => (text.rng.random_range(0..total), Verdict::WrongAnswer),
                _ => (text.rng.random_range(0..total), Verdict::TimeLimit),
            };
            score_rows.push(Score {
                problem_id: format!("bench/{problem}"),
                sample_idx,
                round,
                reward: if passed == total { 10.0 } else { 0.0 },
                scorer: Scorer::Tests,
                passed,
                total,
                verdict,
                wall_ms: text.rng.random_range(1.0..50.0),
            });
        }
        samples.write(&sample_rows)?;
        scores.write(&score_rows)?;
        row = end;
    }
    samples.finish()?;
    scores.finish()?;
    Ok(true)
}

/// One job in this (fresh) process: its wall time and the process's peak RSS.
fn run_job(job: &str, dir: &Path) -> Result<()> {
    let base = rss().unwrap_or(0);
    let start = Instant::now();
    let (samples, scores) = (dir.join("samples"), dir.join("scores"));
    let rows = Manifest::load(&samples)?.map_or(0, |m| m.rows());
    let result = match job {
        "pairs" => {
            let out = dir.join("pairs");
            if out.exists() {
                std::fs::remove_dir_all(&out)?;
            }
            let manifest = build_pairs(&samples, &scores, None, &out, &PairsOptions::default())?;
            format!("{} pairs", manifest.rows())
        }
        _ => {
            let rounds = stage_stats(&samples, &scores, &[1, 4])?;
            let first = rounds.first().context("no rounds")?;
            format!(
                "{} round(s); round {}: reward {:.3}, pass@1 {:.3}",
                rounds.len(),
                first.round,
                first.reward_mean,
                first.pass_at.first().map_or(f64::NAN, |p| p.1)
            )
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let peak = peak_rss().unwrap_or(0);
    println!(
        "{job:6} {secs:8.2} {:10.0} {:14.1} {:16.1}  {result}",
        rows as f64 / secs,
        mib(peak),
        mib(peak.saturating_sub(base))
    );
    Ok(())
}
