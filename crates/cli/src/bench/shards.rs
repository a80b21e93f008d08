//! `prefloop bench shards`: write then read synthetic sample rows through a stage directory.
//! Throughput counts the rows' logical bytes (text plus fixed-width fields), not file bytes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use prefloop_core::Sample;
use prefloop_data::{StageReader, StageWriter, WriterOptions};

use super::{TextGen, mib, peak_rss, reset_peak_rss, rss};

/// Write then read N `samples` rows; report MB/s and peak RSS of each phase.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows to write and read back.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Average text bytes per row (prompt + completion).
    #[arg(long, default_value_t = 500)]
    row_bytes: usize,
    /// Samples per prompt: rows of one prompt share its text, as in a real round.
    #[arg(long, default_value_t = 4)]
    samples_per_prompt: u32,
    /// zstd compression level of the shards.
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Rows per shard file.
    #[arg(long, default_value_t = 1 << 20)]
    shard_rows: u64,
    /// Where to write the stage (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only read the stage already in --dir: the reader's memory measured in a fresh process.
    #[arg(long, requires = "dir")]
    read_only: bool,
}

/// Fixed-width columns of a sample: sample_idx, round, num_tokens, logprob_sum, seed.
const FIXED_BYTES: u64 = 4 * 4 + 8;

/// Distinct rows generated before timing; the write phase cycles through them.
const POOL_ROWS: usize = 64 * 1024;

/// Rows handed to the writer per call, as a generation batch would be.
const CHUNK_ROWS: usize = 8192;

fn logical_bytes(s: &Sample) -> u64 {
    let text = s.problem_id.len() + s.prompt.len() + s.completion.len() + s.policy.len();
    (text + s.finish.as_str().len()) as u64 + FIXED_BYTES
}

/// Reads every sample of the stage in `dir`: (rows, logical bytes, seconds, peak, start RSS).
fn read_stage(dir: &std::path::Path) -> Result<(u64, u64, std::time::Duration, u64, u64)> {
    reset_peak_rss();
    let read_base = rss().unwrap_or(0);
    let start = Instant::now();
    let (mut read_rows, mut read_logical) = (0u64, 0u64);
    for rows in StageReader::<Sample>::open(dir)? {
        for sample in rows? {
            read_rows += 1;
            read_logical += logical_bytes(&sample);
        }
    }
    Ok((
        read_rows,
        read_logical,
        start.elapsed(),
        peak_rss().unwrap_or(0),
        read_base,
    ))
}

pub fn run(args: &Args) -> Result<()> {
    if args.read_only {
        let dir = args.dir.as_ref().expect("clap requires --dir");
        let (rows, logical, time, peak, base) = read_stage(dir)?;
        let mb = logical as f64 / 1e6;
        println!("bench shards --read-only: {rows} rows, {mb:.1} MB logical");
        println!("phase  seconds    MB/s  peak RSS MiB  above start MiB");
        let secs = time.as_secs_f64();
        println!(
            "read  {secs:8.2} {:7.1} {:13.1} {:16.1}",
            mb / secs,
            mib(peak),
            mib(peak - base)
        );
        return Ok(());
    }
    let scratch;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            scratch = tempfile::tempdir()?;
            scratch.path().join("samples")
        }
    };
    let options = WriterOptions::default()
        .with_zstd_level(args.zstd_level)
        .with_shard_rows(args.shard_rows);
    let mut text = TextGen::new(0);
    let (prompt_bytes, completion_bytes) = (args.row_bytes * 3 / 5, args.row_bytes * 2 / 5);

    // Rows come from a pool made before the clock starts, so the timing is the writer's alone.
    // 64k distinct rows (~36 MB) cycle: far more than zstd's window, so repeats compress no better.
    let mut pool = Vec::with_capacity(POOL_ROWS);
    let mut prompt = String::new();
    for i in 0..POOL_ROWS.min(args.rows as usize) as u64 {
        let sample_idx = (i % args.samples_per_prompt as u64) as u32;
        if sample_idx == 0 {
            prompt = text.text(prompt_bytes);
        }
        let problem = i / args.samples_per_prompt as u64;
        pool.push(text.sample(problem, &prompt, sample_idx, 0, i, completion_bytes));
    }
    let pool_bytes: Vec<u64> = pool.iter().map(logical_bytes).collect();

    reset_peak_rss();
    let write_base = rss().unwrap_or(0);
    let start = Instant::now();
    let mut writer = StageWriter::<Sample>::open(&dir, options)?;
    let (mut written, mut logical) = (0u64, 0u64);
    while written < args.rows {
        let from = (written % pool.len() as u64) as usize;
        let take = (pool.len() - from)
            .min(CHUNK_ROWS)
            .min((args.rows - written) as usize);
        writer.write(&pool[from..from + take])?;
        logical += pool_bytes[from..from + take].iter().sum::<u64>();
        written += take as u64;
    }
    let manifest = writer.finish()?;
    let write_time = start.elapsed();
    let write_peak = peak_rss().unwrap_or(0);
    let file_bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    drop((pool, pool_bytes));

    let (read_rows, read_logical, read_time, read_peak, read_base) = read_stage(&dir)?;
    anyhow::ensure!(
        read_rows == args.rows && read_logical == logical,
        "read back {read_rows} rows / {read_logical} bytes, wrote {} / {logical}",
        args.rows
    );

    let mb = logical as f64 / 1e6;
    println!(
        "bench shards: {} rows, {:.1} MB logical, {:.1} MiB in {} files (zstd {}), ratio {:.2}",
        args.rows,
        mb,
        mib(file_bytes),
        manifest.shards.len(),
        args.zstd_level,
        logical as f64 / file_bytes as f64
    );
    // The binary links libtorch, whose libraries alone are a few hundred MiB resident: the
    // data path's own memory is the peak above the RSS the phase started from.
    println!("phase  seconds    MB/s  peak RSS MiB  above start MiB");
    for (phase, time, peak, base) in [
        ("write", write_time, write_peak, write_base),
        ("read", read_time, read_peak, read_base),
    ] {
        let secs = time.as_secs_f64();
        let above = mib(peak.saturating_sub(base));
        println!(
            "{phase:5} {secs:8.2} {:7.1} {:13.1} {above:16.1}",
            mb / secs,
            mib(peak)
        );
    }
    Ok(())
}
