//! `prefloop generate`: sample N completions per prompt from a model into a samples stage.

use std::path::PathBuf;

use crate::model_args::ModelArgs;
use anyhow::Result;
use prefloop_model::{Batching, InProcess, best_device};
use prefloop_pipeline::{GenerateConfig, Shard, generate_stage, read_prompts};
use prefloop_train::{EncodeConfig, Encoder};

/// Sample completions for every prompt into a samples stage directory.
///
/// Prompts come from JSONL (`{"prompt": …, "problem_id": …}` a line) or Parquet (a `prompt`
/// column, `problem_id` if present: a problems shard works). Each user prompt is wrapped in the
/// model's chat template unless --raw. Killed and run again with the same arguments, it
/// resumes after the rows already written; sample k of prompt i has its own seed, so the
/// resumed rows are the ones an uninterrupted run would have written.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL or Parquet file of prompts.
    #[arg(long)]
    prompts: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    n: u32,
    /// Stage directory to write (part-*.parquet and MANIFEST.json).
    #[arg(long)]
    out: PathBuf,
    /// Tokens a completion may have (it ends earlier at EOS or a stop string).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 for greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// 0 for no limit.
    #[arg(long, default_value_t = 200)]
    top_k: i64,
    /// Nucleus sampling: the smallest set of tokens with this much probability; 1 for no limit.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Stop strings (repeatable); the completion is cut before the first one.
    #[arg(long)]
    stop: Vec<String>,
    /// Seed of the run: each row's own seed derives from it, its prompt and its sample index.
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
    /// Sample only slice i of n of the prompts (contiguous), into OUT/shard-IIIII-of-NNNNN;
    /// `prefloop merge OUT` joins the slices once all are done. Same rows and seeds as one
    /// unsharded run.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        args.n > 0 && args.batch_size > 0 && args.shard_rows > 0,
        "--n, --batch-size and --shard-rows must be positive"
    );
    let prompts = read_prompts(&args.prompts)?;
    let model = args.model.load(best_device())?;
    let policy = model
        .source
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    tracing::info!(model = %model.source.display(), device = ?model.vs.device(), prompts = prompts.len(), n = args.n, "generating");
    let config = GenerateConfig {
        n: args.n,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop: args.stop.clone(),
        batch_size: args.batch_size,
        shard_rows: args.shard_rows,
        seed: args.seed,
        raw_prompts: args.raw,
    };
    // Prompts whole (templated unless --raw), up to the model's context.
    let context = model.decoder.config().max_position_embeddings;
    let encode = EncodeConfig {
        max_prompt_tokens: context,
        max_length: context + 1,
        raw_prompts: args.raw,
    };
    let encoder = Encoder::new(&model.tokenizer, encode)?;
    let mut generator = InProcess::new(&model, Batching::new(config.batch_size));
    let report = generate_stage(
        &mut generator,
        &encoder,
        &prompts,
        &config,
        &policy,
        args.round,
        args.seed,
        args.shard,
        &args.out,
    )?;
    println!(
        "wrote {} samples ({} this run, {:.0} tok/s) to {}",
        report.rows,
        report.new_rows,
        report.tokens_per_s(),
        args.shard.dir(&args.out).display()
    );
    Ok(())
}
