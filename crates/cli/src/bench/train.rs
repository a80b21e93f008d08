//! `prefloop bench train` and `prefloop bench ppo`. The first: one DPO optimiser step on fixed shapes (sequences of 512 tokens,
//! 8 and 32 pairs): the reference pass, the policy's forward and backward, AdamW. Tokens/s,
//! peak memory and MFU, optionally against an eager PyTorch DPO step (transformers model,
//! full log-softmax, torch.optim.AdamW) on the same shapes in the same run. The second: one PPO
//! iteration, timed per phase.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use prefloop_model::{Model, best_device};
use prefloop_train::{
    AdamW, DpoConfig, Encoder, OptimConfig, PpoConfig, PpoModels, PromptExample, RewardModel,
    Rollout, TokenBatch, dpo_backward, sequence_sum, token_logprobs, train_ppo,
};
use tch::{Device, Tensor};

use super::{mib, peak_rss, python_baseline, reset_peak_rss};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or a Hugging Face directory; the embedded default when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pairs per step, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pairs: Vec<usize>,
    /// Tokens per sequence (prompt + answer); chosen and rejected alike.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Prompt tokens of each sequence (no loss on them).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Timed steps per shape, after one warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Dense bf16 peak of the GPU in TFLOP/s, for MFU (H100/H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    /// Also time an eager PyTorch DPO step on the same shapes, with this python (the venv
    /// scripts/setup makes has torch and transformers).
    #[arg(long)]
    torch_python: Option<PathBuf>,
}

/// The baseline: policy forward+backward, reference forward, full-vocabulary log-softmax in
/// fp32, torch.optim.AdamW. Prints tokens/s of the timed steps.
const TORCH_BASELINE: &str = r#"
import sys, time, copy, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
model_dir, pairs, seq, plen, steps = sys.argv[1], *map(int, sys.argv[2:])
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
policy = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).train()
reference = copy.deepcopy(policy).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, policy.config.vocab_size - 100, (2 * pairs, seq), generator=g).to(device)
mask = torch.zeros(2 * pairs, seq - 1, device=device); mask[:, plen - 1:] = 1
def logps(model):
    logits = model(input_ids=ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * mask).sum(-1)
def step():
    with torch.no_grad():
        ref = logps(reference)
    pol = logps(policy)
    h = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
    loss = -F.logsigmoid(0.1 * h).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
def sync():
    if device == "cuda": torch.cuda.synchronize()
step(); sync()
start = time.perf_counter()
for _ in range(steps): step()
sync()
print(f"{steps * 2 * pairs * seq / (time.perf_counter() - start):.1f}")
"#;

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        args.prompt_len > 0 && args.prompt_len < args.seq_len && args.steps > 0,
        "need 0 < --prompt-len < --seq-len and --steps ≥ 1"
    );
    let device = best_device();
    let model = Model::load(args.model.as_deref(), device)?;
    let config = model.llama.config();
    let (vocab, hidden) = (config.vocab_size, config.hidden_size);
    // Parameters the step multiplies by per token: every matrix but the embedding lookup,
    // plus the LM head (tied or not).
    let params: i64 = model
        .vs
        .variables()
        .iter()
        .filter(|(name, _)| name.as_str() != "model.embed_tokens.weight")
        .map(|(_, t)| t.numel() as i64)
        .sum::<i64>()
        + if config.tie_word_embeddings {
            (vocab * hidden) as i64
        } else {
            0
        };
    let torch_dir = match &args.torch_python {
        Some(_) => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("model");
            model.save(&path)?;
            Some((dir, path))
        }
        None => None,
    };
    println!(
        "bench train: DPO step on {} ({:.1}M matmul parameters) on {device:?}, {} tokens a sequence ({} prompt)",
        model.source.display(),
        params as f64 / 1e6,
        args.seq_len,
        args.prompt_len
    );
    println!("pairs  prefloop tok/s  s/step  peak MiB      MFU  PyTorch tok/s  speed-up");
    let mut optimizer = AdamW::new(&model.vs, OptimConfig::default())?;
    let dpo = DpoConfig::default();
    for &pairs in &args.pairs {
        let sequences: Vec<(Vec<u32>, Vec<u32>)> = (0..2 * pairs as u64)
            .map(|row| {
                let token =
                    |i: u64| (100 + (row * 7919 + i * 104_729) % (vocab as u64 - 200)) as u32;
                let ids: Vec<u32> = (0..args.seq_len as u64).map(token).collect();
                let (prompt, answer) = ids.split_at(args.prompt_len);
                (prompt.to_vec(), answer.to_vec())
            })
            .collect();
        let parts: Vec<(&[u32], &[u32])> = sequences
            .iter()
            .map(|(p, a)| (p.as_slice(), a.as_slice()))
            .collect();
        let batch = TokenBatch::new(&parts, model.tokenizer.pad_id(), device);
        let mut step = || {
            let reference = sequence_sum(&token_logprobs(&model.llama, &batch), &batch.loss_mask);
            let b = pairs as i64;
            let reference = (reference.narrow(0, 0, b), reference.narrow(0, b, b));
            dpo_backward(&model, &batch, &reference, &dpo, 1.0);
            optimizer.clip_grad_norm();
            optimizer.step(1e-6);
            optimizer.zero_grad();
        };
        step();
        synchronize(device);
        reset_peak_rss();
        let start = Instant::now();
        for _ in 0..args.steps {
            step();
        }
        synchronize(device);
        let seconds = start.elapsed().as_secs_f64() / args.steps as f64;
        let tokens = (2 * pairs * args.seq_len) as f64;
        let ours = tokens / seconds;
        // Useful work: policy forward+backward (6 N) and reference forward (2 N) per token.
        let mfu = match device {
            Device::Cuda(_) => format!(
                "{:.1}%",
                8.0 * params as f64 * ours / (args.peak_tflops * 1e12) * 100.0
            ),
            _ => "-".into(),
        };
        let memory = match device {
            Device::Cuda(_) => gpu_memory_mib().unwrap_or(f64::NAN),
            _ => mib(peak_rss().unwrap_or(0)),
        };
        let baseline = match (&args.torch_python, &torch_dir) {
            (Some(python), Some((_, dir))) => {
                Some(torch_tokens_per_second(python, dir, pairs, args)?)
            }
            _ => None,
        };
        let (theirs, ratio) = match baseline {
            Some(b) => (format!("{b:.1}"), format!("{:.2}x", ours / b)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{pairs:5} {ours:15.1} {seconds:7.2} {memory:9.1} {mfu:>8} {theirs:>14} {ratio:>9}"
        );
    }
    if device.is_cuda() {
        println!(
            "GPU memory: what nvidia-smi reports for this process (the caching allocator keeps its peak)"
        );
    }
    Ok(())
}

fn synchronize(device: Device) {
    if let Device::Cuda(_) = device {
        // Reading a value back waits for every queued kernel.
        let _ = Tensor::zeros([1], (tch::Kind::Float, device)).double_value(&[0]);
    }
}

/// GPU memory this process holds, from nvidia-smi.
fn gpu_memory_mib() -> Option<f64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (pid, used) = line.split_once(',')?;
            (pid.trim() == me).then(|| used.trim().parse().ok())?
        })
}

fn torch_tokens_per_second(python: &Path, dir: &Path, pairs: usize, args: &Args) -> Result<f64> {
    let values = [pairs, args.seq_len, args.prompt_len, args.steps].map(|n| n.to_string());
    python_baseline(python, TORCH_BASELINE, dir, &values, "PyTorch")
}

/// One PPO iteration on the embedded model, timed per phase.
#[derive(Debug, clap::Args)]
pub struct PpoArgs {
    /// A .gguf file or a Hugging Face directory; the embedded default when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rollouts in the iteration (the paper's large batch is 512).
    #[arg(long, default_value_t = 64)]
    rollouts: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// PPO epochs over the rollouts (5 dialogue, 16 code in the paper).
    #[arg(long, default_value_t = 1)]
    ppo_epochs: usize,
    #[arg(long, default_value_t = 4)]
    minibatches: usize,
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
}

/// Generation, experience (reward model, actor, reference and critic passes), training and
/// the EMA update, with the starting policy as an untrained reward model (the timing does not
/// depend on what it says).
pub fn run_ppo(args: &PpoArgs) -> Result<()> {
    let device = best_device();
    let models = PpoModels::load(args.model.as_deref(), device)?;
    let rm = RewardModel::new(Model::load(args.model.as_deref(), device)?)?;
    let config = PpoConfig {
        iterations: 1,
        rollout_batch_size: args.rollouts,
        num_minibatches: args.minibatches,
        ppo_epochs: args.ppo_epochs,
        micro_batch_size: args.micro_batch_size,
        generation_batch_size: args.rollouts,
        max_new_tokens: args.new_tokens,
        ..PpoConfig::default()
    };
    let encoder = Encoder::new(&rm.model.tokenizer, config.encode.clone())?;
    let mut score_seconds = 0.0;
    let mut reward = |_: u64, rollouts: &[Rollout]| {
        let start = Instant::now();
        let texts: Vec<(&str, &str)> = rollouts
            .iter()
            .map(|r| (r.prompt.as_str(), r.completion.as_str()))
            .collect();
        let scores = rm.score(&encoder, &texts, args.micro_batch_size);
        score_seconds += start.elapsed().as_secs_f64();
        scores
    };
    let prompts: Vec<PromptExample> = (0..args.rollouts)
        .map(|i| PromptExample {
            problem_id: format!("bench/{i}"),
            prompt: format!("Write a short story about the number {i}."),
        })
        .collect();
    let out = tempfile::tempdir()?;
    let records = train_ppo(
        &models,
        &prompts,
        &mut reward,
        &config,
        out.path(),
        |_, _| {},
    )?;
    let m = &records[0].metrics;
    println!(
        "bench ppo: one iteration on {device:?}, {} rollouts × {} new tokens, {} PPO epoch(s), {} minibatches",
        args.rollouts, args.new_tokens, args.ppo_epochs, args.minibatches
    );
    println!("phase                          seconds");
    println!("generate                  {:12.2}", m["time/generate"]);
    println!(
        "  (generation tok/s)      {:12.1}",
        m["generate/tokens_per_s"]
    );
    println!("experience                {:12.2}", m["time/experience"]);
    println!("  of which reward model   {score_seconds:12.2}");
    println!("train (actor + critic)    {:12.2}", m["time/train"]);
    println!(
        "EMA reference update      {:12.2}",
        m["time/reference_update"]
    );
    Ok(())
}
