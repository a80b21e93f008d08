//! `prefloop generate`: sample N completions per prompt from a model into a samples stage.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::Sample;
use prefloop_data::{ShardReader, StageWriter, WriterOptions};
use prefloop_model::{Model, Request, SamplingParams, best_device, generate};

/// Sample completions for every prompt into a samples stage directory.
///
/// Prompts come from JSONL (`{"prompt": …, "problem_id": …}` a line) or Parquet (a `prompt`
/// column, `problem_id` if present: a problems shard works). Each user prompt is wrapped in the
/// model's chat template unless --raw. Killed and run again with the same arguments, it
/// resumes after the rows already written; sample k of prompt i has its own seed, so the
/// resumed rows are the ones an uninterrupted run would have written.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or a Hugging Face directory; the embedded default when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL or Parquet file of prompts.
    #[arg(long)]
    prompts: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    n: u32,
    /// Stage directory to write (part-*.parquet and MANIFEST.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 for greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// 0 for no limit.
    #[arg(long, default_value_t = 200)]
    top_k: i64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Stop strings (repeatable); the completion is cut before the first one.
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows generated together in one batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Rows per shard: a shard is durable once finished, so a killed run loses at most this many.
    #[arg(long, default_value_t = 4096)]
    shard_rows: u64,
    /// Round number recorded in the `round` column.
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Feed prompts to the model as they are, without the chat template.
    #[arg(long)]
    raw: bool,
}

struct PromptRow {
    problem_id: String,
    prompt: String,
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        args.n > 0 && args.batch_size > 0,
        "--n and --batch-size must be positive"
    );
    let prompts = read_prompts(&args.prompts)?;
    let options = WriterOptions::default().with_shard_rows(args.shard_rows);
    let mut writer = StageWriter::<Sample>::open(&args.out, options)?;
    let total = prompts.len() as u64 * args.n as u64;
    let done = writer.committed_rows();
    if done > total {
        bail!(
            "{} already holds {done} rows, more than the {total} these prompts make",
            args.out.display()
        );
    }

    let model = Model::load(args.model.as_deref(), best_device())?;
    let policy = model
        .source
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    tracing::info!(model = %model.source.display(), device = ?model.vs.device(), prompts = prompts.len(), n = args.n, "generating");
    let templated: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let text = if args.raw {
                p.prompt.clone()
            } else {
                model.tokenizer.apply_chat_template(&p.prompt)?
            };
            model.tokenizer.encode(&text)
        })
        .collect::<Result<_, _>>()?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        ignore_eos: false,
    };

    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} samples {msg} [{elapsed_precise}<{eta_precise}]",
    )?);
    let (start, mut tokens) = (Instant::now(), 0usize);
    let rows: Vec<u64> = (done..total).collect();
    for chunk in rows.chunks(args.batch_size) {
        let requests: Vec<Request> = chunk
            .iter()
            .map(|&row| Request {
                prompt: templated[(row / args.n as u64) as usize].clone(),
                seed: row_seed(args.seed, row),
            })
            .collect();
        let generations = generate(&model, &requests, &params)?;
        let samples: Vec<Sample> = chunk
            .iter()
            .zip(generations)
            .map(|(&row, g)| {
                let p = &prompts[(row / args.n as u64) as usize];
                tokens += g.tokens.len();
                Sample {
                    problem_id: p.problem_id.clone(),
                    prompt: p.prompt.clone(),
                    completion: g.text,
                    sample_idx: (row % args.n as u64) as u32,
                    round: args.round,
                    policy: policy.clone(),
                    seed: row_seed(args.seed, row),
                    num_tokens: g.tokens.len() as u32,
                    logprob_sum: g.logprobs.iter().sum(),
                    finish: g.finish,
                }
            })
            .collect();
        writer.write(&samples)?;
        bar.inc(samples.len() as u64);
        bar.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / start.elapsed().as_secs_f64()
        ));
    }
    let manifest = writer.finish()?;
    bar.finish();
    println!(
        "wrote {} samples in {} shard(s) to {}",
        manifest.rows(),
        manifest.shards.len(),
        args.out.display()
    );
    Ok(())
}

/// The seed of sample row `row` (prompt-major): SplitMix64 of the run seed and the row, so
/// neighbouring rows get unrelated streams.
fn row_seed(seed: u64, row: u64) -> u64 {
    let mut z = seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let is_parquet = path.extension().is_some_and(|e| e == "parquet");
    let rows = if is_parquet {
        read_parquet_prompts(path)?
    } else {
        read_jsonl_prompts(path)?
    };
    anyhow::ensure!(!rows.is_empty(), "{}: no prompts", path.display());
    Ok(rows)
}

fn read_jsonl_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| path.display().to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(&line).with_context(at)?;
        let prompt = value
            .get("prompt")
            .and_then(|p| p.as_str())
            .with_context(|| format!("{}: no string field `prompt`", at()))?;
        let problem_id = match value.get("problem_id") {
            Some(id) => id
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| id.to_string()),
            None => format!("prompt-{}", rows.len()),
        };
        rows.push(PromptRow {
            problem_id,
            prompt: prompt.to_owned(),
        });
    }
    Ok(rows)
}

fn read_parquet_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let reader = ShardReader::open(path)?;
    let schema = reader.schema().clone();
    let string_column = |name: &str| {
        schema.field_with_name(name).ok().map(|f| {
            anyhow::ensure!(
                f.data_type() == &DataType::Utf8,
                "{}: column `{name}` has type {}, expected Utf8",
                path.display(),
                f.data_type()
            );
            Ok(())
        })
    };
    string_column("prompt")
        .with_context(|| format!("{}: no column `prompt`", path.display()))??;
    let has_id = string_column("problem_id").transpose()?.is_some();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let prompts = batch
            .column_by_name("prompt")
            .expect("checked")
            .as_string::<i32>();
        let ids = has_id.then(|| {
            batch
                .column_by_name("problem_id")
                .expect("checked")
                .as_string::<i32>()
        });
        for i in 0..batch.num_rows() {
            let row = rows.len();
            anyhow::ensure!(
                prompts.is_valid(i),
                "{}: row {row}, column `prompt`: null",
                path.display()
            );
            let problem_id = match ids {
                Some(ids) if ids.is_valid(i) => ids.value(i).to_owned(),
                _ => format!("prompt-{row}"),
            };
            rows.push(PromptRow {
                problem_id,
                prompt: prompts.value(i).to_owned(),
            });
        }
    }
    Ok(rows)
}
