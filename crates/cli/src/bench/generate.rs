//! `prefloop bench generate`: batched sampling throughput on fixed shapes (prompt 128 tokens,
//! 256 new tokens, top-k 200): tokens per second, time and host syncs per decode step,
//! optionally against Hugging Face transformers' `generate` and against a hand-written eager
//! PyTorch decoder (a preallocated KV cache and SDPA: a user's best plain PyTorch) on the same
//! shapes and weights in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use prefloop_model::{Batching, Request, SamplingParams, best_device, generate, generate_each};

use crate::model_args::ModelArgs;

use super::{baseline_columns, memory_meaning, memory_mib, python_baseline, reset_peak_rss};

/// Tokens per second of batched sampling, per batch size.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128,512")]
    batch_sizes: Vec<usize>,
    /// Tokens in each prompt.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens sampled per row (no EOS stops it early).
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Top-k of the sampling (the paper's 200).
    #[arg(long, default_value_t = 200)]
    top_k: i64,
    /// Also time transformers' `generate` on the same shapes, with this python (a venv with
    /// torch and transformers; scripts/setup makes one).
    #[arg(long)]
    hf_python: Option<PathBuf>,
    /// Also time the eager PyTorch decoder on the same weights and shapes, with this python
    /// (a venv with torch and safetensors).
    #[arg(long)]
    eager_python: Option<PathBuf>,
}

/// The baseline: the same model directory, random prompts of the same length, sampling with
/// top-k, EOS ignored so every row makes exactly `new` tokens. Prints tokens/s.
const HF_BASELINE: &str = r#"
import sys, time, torch
from transformers import AutoModelForCausalLM
model_dir, dtype, (bs, plen, new, topk) = sys.argv[1], getattr(torch, sys.argv[2]), map(int, sys.argv[3:])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
ids = torch.randint(100, model.config.vocab_size - 100, (bs, plen), device=device)
kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=topk, temperature=1.0,
          pad_token_id=model.config.eos_token_id)
with torch.no_grad():
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=True, pad_token_id=kw["pad_token_id"])
    if device == "cuda": torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, **kw)
    if device == "cuda": torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
assert out.shape[1] - plen == new, out.shape
print(f"{bs * new / elapsed:.1f}")
"#;

/// The eager baseline: the model's own weights in plain PyTorch — a preallocated KV cache per
/// layer, SDPA with grouped-query heads, top-k sampling — all rows the same length, so no
/// mask. Times `new` decode steps after a prefill and a warm-up; prints milliseconds per step.
const EAGER_BASELINE: &str = include_str!("eager_decoder.py");

pub fn run(args: &Args) -> Result<()> {
    let device = best_device();
    let model = args.model.load(device)?;
    let vocab = model.decoder.config().vocab_size as u32;
    let params = SamplingParams {
        top_k: args.top_k,
        max_new_tokens: args.new_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let baseline_dir = match args.hf_python.as_ref().or(args.eager_python.as_ref()) {
        Some(_) => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("model");
            model.save(&path)?;
            Some((dir, path))
        }
        None => None,
    };
    // Warm-up: first-call allocations and kernel selection stay out of the numbers.
    let warm = Request {
        prompt: (0..8).map(|i| 100 + i).collect(),
        seed: 0,
    };
    generate(
        &model,
        &[warm],
        &SamplingParams {
            max_new_tokens: 4,
            ..params.clone()
        },
    )?;

    println!(
        "bench generate: {} on {device:?} in {:?}, prompt {} + {} new tokens, top-k {}",
        model.source.display(),
        model.kind(),
        args.prompt_len,
        args.new_tokens,
        args.top_k
    );
    println!(
        "batch   prefloop tok/s  seconds  ms/step  syncs/step   peak MiB  transformers tok/s  \
         speed-up  eager ms/step  speed-up/step   ({})",
        memory_meaning(device)
    );
    for &batch in &args.batch_sizes {
        let requests: Vec<Request> = (0..batch as u64)
            .map(|row| Request {
                prompt: (0..args.prompt_len as u64)
                    .map(|i| (100 + (row * 7919 + i * 104_729) % (vocab as u64 - 200)) as u32)
                    .collect(),
                seed: row,
            })
            .collect();
        reset_peak_rss();
        let start = Instant::now();
        let mut tokens = 0;
        let stats = generate_each(&model, &requests, &params, Batching::new(batch), |_, g| {
            tokens += g.tokens.len();
            Ok::<(), anyhow::Error>(())
        })?;
        let seconds = start.elapsed().as_secs_f64();
        anyhow::ensure!(tokens == batch * args.new_tokens, "made {tokens} tokens");
        let ours = tokens as f64 / seconds;
        let per_step = stats.seconds_per_step() * 1e3;
        let syncs = stats.readbacks as f64 / stats.decode_steps.max(1) as f64;
        let memory = memory_mib(device);
        let eager = match (&args.eager_python, &baseline_dir) {
            (Some(python), Some((_, dir))) => Some(same_shape_baseline(
                python,
                EAGER_BASELINE,
                "eager PyTorch",
                dir,
                super::train::torch_dtype(model.kind()),
                batch,
                args,
            )),
            _ => None,
        };
        let (eager_ms, step_ratio) = match eager {
            Some(Ok(ms)) => (format!("{ms:.2}"), format!("{:.2}x", ms / per_step)),
            Some(Err(e)) => {
                eprintln!("{e:#}");
                ("failed".into(), "-".into())
            }
            None => ("-".into(), "-".into()),
        };
        let baseline = match (&args.hf_python, &baseline_dir) {
            (Some(python), Some((_, dir))) => Some(same_shape_baseline(
                python,
                HF_BASELINE,
                "transformers",
                dir,
                super::train::torch_dtype(model.kind()),
                batch,
                args,
            )),
            _ => None,
        };
        let (theirs, ratio) = baseline_columns(baseline, ours);
        println!(
            "{batch:5} {ours:16.1} {seconds:8.2} {per_step:8.2} {syncs:11.3} {memory:10.1} \
             {theirs:>19} {ratio:>9} {eager_ms:>14} {step_ratio:>14}"
        );
    }
    Ok(())
}

/// A Python baseline's figure on this bench's shapes: `script` (transformers' `generate`, in
/// tokens per second, or the eager decoder, in milliseconds per step) run on the same model,
/// dtype, batch, prompt length, new tokens and top-k.
fn same_shape_baseline(
    python: &std::path::Path,
    script: &str,
    name: &str,
    dir: &std::path::Path,
    dtype: &str,
    batch: usize,
    args: &Args,
) -> Result<f64> {
    let mut values = vec![dtype.to_string()];
    values.extend([batch, args.prompt_len, args.new_tokens].map(|n| n.to_string()));
    values.push(args.top_k.to_string());
    python_baseline(python, script, dir, &values, name)
}

/// Sampling shaped like a round: the first `limit` prompts of a file (chat-templated, as a
/// round samples them), `n` samples each, EOS on, against transformers' `generate` with
/// `num_return_sequences = n` on the same token ids in the same run.
#[derive(Debug, clap::Args)]
pub struct RoundArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSONL or Parquet prompts file (e.g. HumanEval's prompts).
    #[arg(long)]
    prompts: PathBuf,
    /// Prompts taken from the file.
    #[arg(long, default_value_t = 32)]
    limit: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// The token budget per sample (EOS ends a sample sooner).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Rows prefloop decodes together (slots). Default: every row.
    #[arg(long)]
    slots: Option<usize>,
    /// Also time transformers' `generate`, with this python.
    #[arg(long)]
    hf_python: Option<PathBuf>,
}

/// transformers on the same prompts: left-padded, `num_return_sequences`, top-k 200,
/// temperature 1, EOS on. Counts each row's tokens up to its first EOS; prints tokens/s.
const HF_ROUND_BASELINE: &str = r#"
import json, sys, time, torch
from transformers import AutoModelForCausalLM
model_dir, dtype, ids_file, n, new = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
prompts = json.load(open(ids_file))
eos = model.generation_config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos])
pad = model.generation_config.pad_token_id
width = max(map(len, prompts))
ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
with torch.no_grad():
    model.generate(ids[:1, -8:], max_new_tokens=4, do_sample=True, pad_token_id=pad)
    if device == "cuda": torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=200,
                         temperature=1.0, num_return_sequences=n, pad_token_id=pad)
    if device == "cuda": torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
tokens = 0
for row in out[:, width:].tolist():
    tokens += next((i for i, t in enumerate(row) if t in eos), len(row))
print(f"{tokens / elapsed:.1f}")
"#;

pub fn run_round(args: &RoundArgs) -> Result<()> {
    let device = best_device();
    let model = args.model.load(device)?;
    let prompts = prefloop_pipeline::read_prompts(&args.prompts)?;
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .take(args.limit)
        .map(|p| {
            let text = model.tokenizer.apply_chat_template(&p.prompt)?;
            Ok(model.tokenizer.encode(&text)?)
        })
        .collect::<Result<_>>()?;
    let requests: Vec<Request> = encoded
        .iter()
        .flat_map(|prompt| (0..args.n).map(move |k| (prompt, k)))
        .enumerate()
        .map(|(row, (prompt, _))| Request {
            prompt: prompt.clone(),
            seed: row as u64,
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        ..SamplingParams::default()
    };
    let slots = args.slots.unwrap_or(requests.len());
    println!(
        "bench round-generate: {} on {device:?} in {:?}, {} prompts × {} samples, up to {} new \
         tokens, EOS on, top-k 200, {slots} slots",
        model.source.display(),
        model.kind(),
        encoded.len(),
        args.n,
        args.max_new_tokens
    );
    let start = Instant::now();
    let mut tokens = 0;
    let stats = generate_each(&model, &requests, &params, Batching::new(slots), |_, g| {
        tokens += g.tokens.len();
        Ok::<(), anyhow::Error>(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let ours = tokens as f64 / seconds;
    println!(
        "prefloop: {tokens} completion tokens in {seconds:.1} s = {ours:.1} tok/s ({} decode \
         steps, {} readbacks, {} prefills of {} distinct prompts)",
        stats.decode_steps, stats.readbacks, stats.prefills, stats.prefilled_prompts
    );
    if let Some(python) = &args.hf_python {
        let dir = tempfile::tempdir()?;
        model.save(&dir.path().join("model"))?;
        let ids = dir.path().join("prompts.json");
        std::fs::write(&ids, serde_json::to_string(&encoded)?)?;
        let values = vec![
            super::train::torch_dtype(model.kind()).to_string(),
            ids.display().to_string(),
            args.n.to_string(),
            args.max_new_tokens.to_string(),
        ];
        let theirs = python_baseline(
            python,
            HF_ROUND_BASELINE,
            &dir.path().join("model"),
            &values,
            "transformers",
        );
        let (theirs, ratio) = baseline_columns(Some(theirs), ours);
        println!(
            "transformers generate (num_return_sequences = {}): {theirs} tok/s; prefloop {ratio}",
            args.n
        );
    }
    Ok(())
}
