//! `prefloop bench shards`: write then read synthetic sample rows through a stage directory.
//! Throughput counts the rows' logical bytes (text plus fixed-width fields), not file bytes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use prefloop_core::{Finish, Sample};
use prefloop_data::{StageReader, StageWriter, WriterOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{mib, peak_rss, reset_peak_rss};

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
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Rows per shard file.
    #[arg(long, default_value_t = 1 << 20)]
    shard_rows: u64,
    /// Where to write the stage (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Fixed-width columns of a sample: sample_idx, round, num_tokens, logprob_sum, seed.
const FIXED_BYTES: u64 = 4 * 4 + 8;

fn logical_bytes(s: &Sample) -> u64 {
    let text = s.problem_id.len() + s.prompt.len() + s.completion.len() + s.policy.len();
    (text + s.finish.as_str().len()) as u64 + FIXED_BYTES
}

/// Deterministic English-looking text, so zstd sees something like real prompts.
struct TextGen {
    rng: SmallRng,
    words: Vec<String>,
}

impl TextGen {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let syllables = [
            "an", "re", "to", "pro", "gram", "in", "put", "out", "sum", "val", "de", "x",
        ];
        let words = (0..4000)
            .map(|_| {
                let n = rng.random_range(1..4);
                (0..n)
                    .map(|_| syllables[rng.random_range(0..syllables.len())])
                    .collect()
            })
            .collect();
        Self { rng, words }
    }

    fn text(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes + 16);
        while s.len() < bytes {
            s.push_str(&self.words[self.rng.random_range(0..self.words.len())]);
            s.push(if self.rng.random_ratio(1, 12) {
                '\n'
            } else {
                ' '
            });
        }
        s
    }
}

pub fn run(args: &Args) -> Result<()> {
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

    reset_peak_rss();
    let mut writer = StageWriter::<Sample>::open(&dir, options)?;
    let (mut written, mut write_time, mut logical) = (0u64, Duration::ZERO, 0u64);
    let mut chunk = Vec::with_capacity(8192);
    let mut prompt = String::new();
    while written < args.rows {
        chunk.clear();
        for i in written..(written + 8192).min(args.rows) {
            let sample_idx = (i % args.samples_per_prompt as u64) as u32;
            if sample_idx == 0 {
                prompt = text.text(prompt_bytes);
            }
            let completion_len = text
                .rng
                .random_range(completion_bytes / 2..=completion_bytes * 3 / 2);
            let sample = Sample {
                problem_id: format!("bench/{}", i / args.samples_per_prompt as u64),
                prompt: prompt.clone(),
                completion: text.text(completion_len),
                sample_idx,
                round: 0,
                policy: "bench".into(),
                seed: i,
                num_tokens: (completion_len / 4) as u32,
                logprob_sum: -(completion_len as f32) / 8.0,
                finish: Finish::Stop,
            };
            logical += logical_bytes(&sample);
            chunk.push(sample);
        }
        let start = Instant::now();
        writer.write(&chunk)?;
        write_time += start.elapsed();
        written += chunk.len() as u64;
    }
    drop(chunk);
    let start = Instant::now();
    let manifest = writer.finish()?;
    write_time += start.elapsed();
    let write_peak = peak_rss().unwrap_or(0);
    let file_bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();

    reset_peak_rss();
    let start = Instant::now();
    let (mut read_rows, mut read_logical) = (0u64, 0u64);
    for rows in StageReader::<Sample>::open(&dir)? {
        for sample in rows? {
            read_rows += 1;
            read_logical += logical_bytes(&sample);
        }
    }
    let read_time = start.elapsed();
    let read_peak = peak_rss().unwrap_or(0);
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
    println!("phase  seconds    MB/s  peak RSS MiB");
    println!(
        "write  {:7.2} {:7.1}  {:12.1}",
        write_time.as_secs_f64(),
        mb / write_time.as_secs_f64(),
        mib(write_peak)
    );
    println!(
        "read   {:7.2} {:7.1}  {:12.1}",
        read_time.as_secs_f64(),
        mb / read_time.as_secs_f64(),
        mib(read_peak)
    );
    Ok(())
}
