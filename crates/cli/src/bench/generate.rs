//! `prefloop bench generate`: batched sampling throughput on fixed shapes (prompt 128 tokens,
//! 256 new tokens, top-k 200), optionally against Hugging Face transformers' `generate` on the
//! same shapes in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use prefloop_model::{Request, SamplingParams, best_device, generate};

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
}

/// The baseline: the same model directory, random prompts of the same length, sampling with
/// top-k, EOS ignored so every row makes exactly `new` tokens. Prints tokens/s.
const HF_BASELINE: &str = r#"
import sys, time, torch
from transformers import AutoModelForCausalLM
model_dir, dtype, (bs, plen, new, topk) = sys.argv[1], getattr(torch, sys.argv[2]), map(int, sys.argv[3:])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
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

pub fn run(args: &Args) -> Result<()> {
    let device = best_device();
    let model = args.model.load(device)?;
    let vocab = model.llama.config().vocab_size as u32;
    let params = SamplingParams {
        top_k: args.top_k,
        max_new_tokens: args.new_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let hf_dir = match &args.hf_python {
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
        "batch   prefloop tok/s  seconds      peak MiB  transformers tok/s  speed-up   ({})",
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
        let out = generate(&model, &requests, &params)?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
        anyhow::ensure!(tokens == batch * args.new_tokens, "made {tokens} tokens");
        let ours = tokens as f64 / seconds;
        let memory = memory_mib(device);
        let baseline = match (&args.hf_python, &hf_dir) {
            (Some(python), Some((_, dir))) => Some(hf_tokens_per_second(
                python,
                dir,
                super::train::torch_dtype(model.kind()),
                batch,
                args,
            )),
            _ => None,
        };
        let (theirs, ratio) = baseline_columns(baseline, ours);
        println!("{batch:5} {ours:16.1} {seconds:8.2} {memory:13.1} {theirs:>19} {ratio:>9}");
    }
    Ok(())
}

fn hf_tokens_per_second(
    python: &std::path::Path,
    dir: &std::path::Path,
    dtype: &str,
    batch: usize,
    args: &Args,
) -> Result<f64> {
    let mut values = vec![dtype.to_string()];
    values.extend([batch, args.prompt_len, args.new_tokens].map(|n| n.to_string()));
    values.push(args.top_k.to_string());
    python_baseline(python, HF_BASELINE, dir, &values, "transformers")
}
