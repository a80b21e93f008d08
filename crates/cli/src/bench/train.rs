//! `prefloop bench train`, `bench ppo` and `bench grpo`. The first: one DPO optimiser step on fixed shapes (sequences of 512 tokens,
//! 8 and 32 pairs): the reference pass, the policy's forward and backward, AdamW. Tokens/s,
//! peak memory and MFU, optionally against an eager PyTorch DPO step (transformers model,
//! full log-softmax, torch.optim.AdamW) on the same shapes in the same run. `bench ppo` and
//! `bench grpo`: one PPO iteration, and one iteration of a group estimator, timed per phase.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use prefloop_model::{Config, LoraConfig, best_device};
use prefloop_train::{
    AdamW, DpoConfig, EncodeConfig, Encoder, Estimator, GroupConfig, KL_TO_REFERENCE, OnlineConfig,
    OptimConfig, Overlong, PpoConfig, PpoModels, PromptExample, RewardModel, Rollout, Share,
    TokenBatch, dpo_backward, sequence_sum, token_logprobs, train_group, train_ppo, with_lora,
};
use tch::{Device, Kind, Tensor};

use crate::model_args::ModelArgs;

use super::device::Shape;
use super::{baseline_columns, memory_meaning, memory_mib, python_baseline, reset_peak_rss};

/// One DPO optimiser step on fixed shapes: tokens/s, peak memory, MFU on a GPU, and an eager
/// PyTorch step in the same run.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Pairs per step, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pairs: Vec<usize>,
    /// Tokens per sequence (prompt + answer); chosen and rejected alike.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Prompt tokens of each sequence (no loss on them).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Pairs per forward and backward pass; a step accumulates the gradients of
    /// pairs / micro-pairs passes (the trainers' `accumulation_steps`), the memory knob that
    /// fits large steps on a small machine. Default: every pair in one pass.
    #[arg(long)]
    micro_pairs: Option<usize>,
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
    /// Train LoRA adapters of this rank (α 2r, every projection, no dropout) instead of
    /// every weight; prints the training states' memory of full and LoRA training for this
    /// model, Qwen2-1.5B and Llama-3-8B by the same accounting.
    #[arg(long, conflicts_with = "torch_python")]
    lora_rank: Option<u32>,
}

/// The baseline: policy forward+backward, reference forward, full-vocabulary log-softmax in
/// fp32, torch.optim.AdamW, gradients accumulated over the same micro-batches as prefloop's.
/// Prints tokens/s of the timed steps.
const TORCH_BASELINE: &str = r#"
import sys, time, copy, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
model_dir, dtype, (pairs, micro, seq, plen, steps) = sys.argv[1], getattr(torch, sys.argv[2]), map(int, sys.argv[3:])
device = "cuda" if torch.cuda.is_available() else "cpu"
policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
reference = copy.deepcopy(policy).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
g = torch.Generator().manual_seed(0)
chosen, rejected = torch.randint(100, policy.config.vocab_size - 100, (2, pairs, seq), generator=g).to(device)
def logps(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp[:, plen - 1:].sum(-1)
def step():
    for start in range(0, pairs, micro):
        ids = torch.cat([chosen[start:start + micro], rejected[start:start + micro]])
        m = ids.shape[0] // 2
        with torch.no_grad():
            ref = logps(reference, ids)
        pol = logps(policy, ids)
        h = (pol[:m] - ref[:m]) - (pol[m:] - ref[m:])
        loss = -F.logsigmoid(0.1 * h).sum() / pairs
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
    let lora = args.lora_rank.map(|rank| LoraConfig {
        dropout: 0.0,
        ..LoraConfig::with_rank(rank, None)
    });
    let model = with_lora(args.model.load(device)?, lora.as_ref(), 0)?;
    let config = model.decoder.config();
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
        "bench train: DPO step on {} ({:.1}M matmul parameters) on {device:?} in {:?}, {} tokens a sequence ({} prompt)",
        model.source.display(),
        params as f64 / 1e6,
        model.kind(),
        args.seq_len,
        args.prompt_len
    );
    println!("peak MiB: {}", memory_meaning(device));
    println!("pairs  micro  prefloop tok/s  s/step  peak MiB      MFU  PyTorch tok/s  speed-up");
    let mut optimizer = AdamW::new(model.trainable(), OptimConfig::default())?;
    let dpo = DpoConfig::default();
    for &pairs in &args.pairs {
        let micro = args.micro_pairs.unwrap_or(pairs).clamp(1, pairs);
        let sequence = |row: u64| {
            let token = |i: u64| (100 + (row * 7919 + i * 104_729) % (vocab as u64 - 200)) as u32;
            let ids: Vec<u32> = (0..args.seq_len as u64).map(token).collect();
            let (prompt, answer) = ids.split_at(args.prompt_len);
            (prompt.to_vec(), answer.to_vec())
        };
        // Each micro-batch: its chosen sequences, then its rejected ones.
        let batches: Vec<TokenBatch> = (0..pairs)
            .step_by(micro)
            .map(|start| {
                let rows = start..(start + micro).min(pairs);
                let sequences: Vec<(Vec<u32>, Vec<u32>)> = rows
                    .clone()
                    .map(|pair| sequence(pair as u64))
                    .chain(rows.map(|pair| sequence((pairs + pair) as u64)))
                    .collect();
                let parts: Vec<(&[u32], &[u32])> = sequences
                    .iter()
                    .map(|(p, a)| (p.as_slice(), a.as_slice()))
                    .collect();
                TokenBatch::new(&parts, model.tokenizer.pad_id(), device)
            })
            .collect();
        let mut step = || {
            for batch in &batches {
                let b = batch.input_ids.size()[0] / 2;
                let reference =
                    sequence_sum(&token_logprobs(&model.decoder, batch), &batch.loss_mask);
                let reference = (reference.narrow(0, 0, b), reference.narrow(0, b, b));
                // The bench's DPO has no SFT term: the chosen tokens are not read.
                let share = Share {
                    pairs: b as f64 / pairs as f64,
                    chosen_tokens: 0.0,
                };
                dpo_backward(&model, batch, &reference, &dpo, share);
                optimizer.accumulate();
            }
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
        let memory = memory_mib(device);
        let baseline = match (&args.torch_python, &torch_dir) {
            (Some(python), Some((_, dir))) => Some(torch_tokens_per_second(
                python,
                dir,
                torch_dtype(model.kind()),
                pairs,
                micro,
                args,
            )),
            _ => None,
        };
        let (theirs, ratio) = baseline_columns(baseline, ours);
        println!(
            "{pairs:5} {micro:6} {ours:15.1} {seconds:7.2} {memory:9.1} {mfu:>8} {theirs:>14} {ratio:>9}"
        );
    }
    if let Some(lora) = &lora {
        print_state_memory(config, model.kind(), lora);
    }
    Ok(())
}

/// Bytes a trainer holds for the model beside activations. Full training: the weights, their
/// gradients and AdamW's two fp32 moments (16 bytes a parameter in fp32); under bf16 also the
/// fp32 master weights and fp32 gradient sums (2 + 2 + 4 + 4 + 8 = 20). LoRA: the frozen base
/// in its dtype with no gradient, and the fp32 adapters with their gradients and moments.
fn state_bytes(cfg: &Config, kind: Kind, lora: Option<&LoraConfig>) -> f64 {
    let parameters = cfg.parameter_count().unwrap_or(u64::MAX) as f64;
    let weight = if kind == Kind::Float { 4.0 } else { 2.0 };
    let trained = if kind == Kind::Float { 16.0 } else { 20.0 };
    match lora {
        None => parameters * trained,
        Some(lora) => parameters * weight + lora.parameter_count(cfg) as f64 * 16.0,
    }
}

/// The states' memory of full and LoRA training for this model and two larger shapes.
fn print_state_memory(measured: &Config, kind: Kind, lora: &LoraConfig) {
    let gib = |bytes: f64| bytes / f64::from(1u32 << 30);
    println!(
        "training states (weights, gradients, AdamW moments, fp32 masters under bf16; no activations), LoRA r {} on {} projections:",
        lora.rank,
        lora.targets.len()
    );
    println!("model                   dtype  parameters  LoRA params  full GiB  LoRA GiB");
    let shapes = [
        ("this model", measured.clone(), kind),
        (
            "Qwen2-1.5B",
            Shape::Qwen2_1_5b.config(None, None),
            Kind::BFloat16,
        ),
        (
            "Llama-3-8B",
            Shape::Llama3_8b.config(None, None),
            Kind::BFloat16,
        ),
    ];
    for (name, cfg, kind) in shapes {
        println!(
            "{name:<22} {:>6} {:>10.1}M {:>11.2}M {:>9.2} {:>9.2}",
            torch_dtype(kind),
            cfg.parameter_count().unwrap_or(0) as f64 / 1e6,
            lora.parameter_count(&cfg) as f64 / 1e6,
            gib(state_bytes(&cfg, kind, None)),
            gib(state_bytes(&cfg, kind, Some(lora))),
        );
    }
}

/// The name of `kind` in torch, for the Python baselines.
pub(super) fn torch_dtype(kind: tch::Kind) -> &'static str {
    match kind {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "float16",
        _ => "float32",
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(_) = device {
        // Reading a value back waits for every queued kernel.
        let _ = Tensor::zeros([1], (tch::Kind::Float, device)).double_value(&[0]);
    }
}

fn torch_tokens_per_second(
    python: &Path,
    dir: &Path,
    dtype: &str,
    pairs: usize,
    micro: usize,
    args: &Args,
) -> Result<f64> {
    let mut values = vec![dtype.to_string()];
    values.extend([pairs, micro, args.seq_len, args.prompt_len, args.steps].map(|n| n.to_string()));
    python_baseline(python, TORCH_BASELINE, dir, &values, "PyTorch")
}

/// One PPO iteration on the embedded model, timed per phase.
#[derive(Debug, clap::Args)]
pub struct PpoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rollouts in the iteration (the paper's large batch is 512).
    #[arg(long, default_value_t = 64)]
    rollouts: usize,
    /// Tokens each rollout may have.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// PPO epochs over the rollouts (5 dialogue, 16 code in the paper).
    #[arg(long, default_value_t = 1)]
    ppo_epochs: usize,
    /// Optimiser steps the rollouts are cut into per epoch.
    #[arg(long, default_value_t = 4)]
    minibatches: usize,
    /// Rows per forward pass inside a minibatch.
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
}

/// Generation, experience (reward model, actor, reference and critic passes), training and
/// the EMA update, with an untrained reward model (the timing does not depend on what it says).
pub fn run_ppo(args: &PpoArgs) -> Result<()> {
    let device = best_device();
    let config = PpoConfig {
        online: OnlineConfig {
            iterations: 1,
            micro_batch_size: args.micro_batch_size,
            generation_batch_size: args.rollouts,
            max_new_tokens: args.new_tokens,
            ..OnlineConfig::default()
        },
        rollout_batch_size: args.rollouts,
        num_minibatches: args.minibatches,
        ppo_epochs: args.ppo_epochs,
        ..PpoConfig::default()
    };
    let models = PpoModels::load(
        args.model.model.as_deref(),
        device,
        args.model.dtype,
        &config,
    )?;
    let rm = untrained_reward_model(&args.model, device)?;
    let reward = RewardOf::new(&rm, &config.online.encode, args.micro_batch_size)?;
    let out = tempfile::tempdir()?;
    let records = train_ppo(
        &models,
        &bench_prompts(args.rollouts),
        &mut |_, rollouts| reward.score(rollouts),
        &config,
        out.path(),
        |_, _| {},
    )?;
    let m = &records[0].metrics;
    println!(
        "bench ppo: one iteration on {device:?} in {:?}, {} rollouts × {} new tokens, {} PPO epoch(s), {} minibatches",
        models.policy.actor.kind(),
        args.rollouts,
        args.new_tokens,
        args.ppo_epochs,
        args.minibatches
    );
    print_phases(&[
        ("generate", m["time/generate"]),
        ("score (reward model)", m["time/score"]),
        ("experience", m["time/experience"]),
        ("train (actor + critic)", m["time/train"]),
        ("EMA reference update", m["time/reference_update"]),
    ]);
    println!(
        "generation {:.1} tok/s, ema/reference_shift {:.3} (1.0 = as the EMA formula says), truncated {:.3}, reward/mean {:.4}, {KL_TO_REFERENCE} {:.4}",
        m["generate/tokens_per_s"],
        m["ema/reference_shift"],
        m["truncated"],
        m["reward/mean"],
        m[KL_TO_REFERENCE]
    );
    Ok(())
}

/// One iteration of a group estimator on the embedded model, timed per phase.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// grpo, rloo or reinforce_pp.
    #[arg(long, default_value = "grpo")]
    estimator: Estimator,
    /// Prompts (groups) in the iteration.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    /// Tokens each completion may have.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Optimiser steps the iteration's rollouts are cut into.
    #[arg(long, default_value_t = 4)]
    minibatches: usize,
    /// Rows per forward pass inside a minibatch.
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
    /// Train LoRA adapters of this rank (α 2r, every projection) instead of every weight: the
    /// reference is then the base with the adapters off, not a second model.
    #[arg(long)]
    lora_rank: Option<u32>,
}

/// Generation, scoring, experience (the sampling policy's and the reference's log-probs) and
/// the update of one group iteration, scored by an untrained reward model: its scores differ
/// within every group, so no group is dropped and the update runs on all of them.
pub fn run_group(args: &GroupArgs) -> Result<()> {
    let device = best_device();
    let config = GroupConfig {
        online: OnlineConfig {
            iterations: 1,
            micro_batch_size: args.micro_batch_size,
            generation_batch_size: args.prompts * args.group_size,
            max_new_tokens: args.new_tokens,
            lora: args.lora_rank.map(|rank| LoraConfig::with_rank(rank, None)),
            ..OnlineConfig::default()
        },
        rollout_batch_size: args.prompts,
        group_size: args.group_size,
        num_minibatches: args.minibatches,
        overlong: Overlong::Keep,
        ..GroupConfig::default()
    };
    let policy = config.load_policy(args.model.model.as_deref(), device, args.model.dtype)?;
    let rm = untrained_reward_model(&args.model, device)?;
    let reward = RewardOf::new(&rm, &config.online.encode, args.micro_batch_size)?;
    let out = tempfile::tempdir()?;
    let records = train_group(
        &policy,
        &bench_prompts(args.prompts),
        args.estimator,
        &mut |_, rollouts| reward.score(rollouts),
        &mut |_, _, _| Ok(()),
        &config,
        out.path(),
        |_, _| {},
    )?;
    let m = &records[0].metrics;
    anyhow::ensure!(
        m.contains_key("time/train"),
        "every group's completions scored alike: nothing to time the update on"
    );
    println!(
        "bench grpo: one {:?} iteration on {device:?} in {:?}, {} prompts × {} completions × {} new tokens, {} minibatches",
        args.estimator,
        policy.actor.kind(),
        args.prompts,
        args.group_size,
        args.new_tokens,
        args.minibatches
    );
    print_phases(&[
        ("generate", m["time/generate"]),
        ("score (reward model)", m["time/score"]),
        ("experience", m["time/experience"]),
        ("train (actor)", m["time/train"]),
    ]);
    let reference = match (&policy.reference, config.online.lora.is_some()) {
        (Some(_), _) => "a second model",
        (None, true) => "the base, adapters off",
        (None, false) => "none (no KL penalty)",
    };
    println!(
        "reference: {reference}; peak MiB ({}): {:.1}",
        memory_meaning(device),
        memory_mib(device)
    );
    println!(
        "generation {:.1} tok/s, groups kept {} of {}, truncated {:.3}, reward/mean {:.4}, {KL_TO_REFERENCE} {:.4}",
        m["generate/tokens_per_s"],
        m["groups/kept"],
        m["groups/sampled"],
        m["truncated"],
        m["reward/mean"],
        m[KL_TO_REFERENCE]
    );
    Ok(())
}

fn print_phases(phases: &[(&str, f64)]) {
    println!("phase                          seconds");
    for (phase, seconds) in phases {
        println!("{phase:<26}{seconds:12.2}");
    }
}

/// Prompts for the iteration benchmarks: what they say does not matter, only their lengths.
fn bench_prompts(n: usize) -> Vec<PromptExample> {
    (0..n)
        .map(|i| PromptExample {
            problem_id: format!("bench/{i}"),
            prompt: format!("Write a short story about the number {i}."),
        })
        .collect()
}

/// The starting policy with a seeded random score head (a new head is zero, which would
/// score every completion alike and leave a group estimator nothing to learn from): its
/// scores differ between completions, as a trained reward model's do.
fn untrained_reward_model(model: &ModelArgs, device: Device) -> Result<RewardModel> {
    let rm = RewardModel::new(model.load(device)?)?;
    let mut variables = rm.model.vs.variables();
    let head = variables
        .get_mut("score.weight")
        .expect("the reward model's head");
    tch::manual_seed(0);
    tch::no_grad(|| head.copy_(&(head.randn_like() * 0.02)));
    Ok(rm)
}

/// A reward model's scores of rollouts (the online core times the scoring).
struct RewardOf<'a> {
    rm: &'a RewardModel,
    encoder: Encoder<'a>,
    micro_batch_size: usize,
}

impl<'a> RewardOf<'a> {
    fn new(rm: &'a RewardModel, encode: &EncodeConfig, micro_batch_size: usize) -> Result<Self> {
        Ok(Self {
            rm,
            encoder: Encoder::new(&rm.model.tokenizer, encode.clone())?,
            micro_batch_size,
        })
    }

    fn score(&self, rollouts: &[Rollout]) -> prefloop_train::Result<Vec<f32>> {
        let texts: Vec<(&str, &str)> = rollouts
            .iter()
            .map(|r| (r.prompt.as_str(), r.completion.as_str()))
            .collect();
        self.rm.score(&self.encoder, &texts, self.micro_batch_size)
    }
}
