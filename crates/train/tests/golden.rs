//! Golden tests: every loss and estimator of the trainers against an independent PyTorch
//! computation (the project venv's torch and transformers) on the same inputs, to 1e-5 in
//! fp32, and one whole DPO optimiser step against `torch.optim.AdamW` on a tiny Llama.
//! Skipped with a message when the venv is not installed (run scripts/setup).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use prefloop_model::{Config, Decoder, Model, Precision, fill};
use prefloop_train::{
    AdamW, Estimator, LossAggregation, OptimConfig, PreferenceLoss, RunningMoments, TokenBatch,
    TokenLogprobs, bradley_terry_loss, ema_update, gae, group_advantages, k3_kl,
    kl_penalised_rewards, normalise_advantages, overlong_penalty, policy_loss, preference_loss,
    sequence_sum, token_advantages, value_loss,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The PyTorch side. Writes the tiny model (transformers' own init), the inputs, and the
/// expected outputs, computed the way TRL and OpenRLHF write them.
const REFERENCE: &str = r#"
import sys, torch, torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2)
model = LlamaForCausalLM(cfg).float()
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" in n:
            p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out + "/model", safe_serialization=True)
e = {}

# Two pairs: sequences chosen0, chosen1, rejected0, rejected1 as (prompt, answer).
seqs = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18, 19]),
        ([5, 6, 7], [20, 21]), ([12, 13], [22, 23, 24, 25, 26])]
for i, (p, a) in enumerate(seqs):
    e[f"prompt{i}"] = torch.tensor(p); e[f"answer{i}"] = torch.tensor(a)
T = max(len(p) + len(a) for p, a in seqs)
ids = torch.zeros(4, T, dtype=torch.long); attn = torch.zeros(4, T, dtype=torch.long)
mask = torch.zeros(4, T - 1)
for i, (p, a) in enumerate(seqs):
    n = len(p) + len(a)
    ids[i, :n] = torch.tensor(p + a); attn[i, :n] = 1
    mask[i, len(p) - 1:n - 1] = 1
logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
seq = (logp * mask).sum(-1)
e["seq_logps"] = seq.detach()

beta = 0.1
ref = torch.randn(4) * 3 - 20
e["ref_logps"] = ref
h = (seq[:2] - ref[:2]) - (seq[2:] - ref[2:])
dpo = -F.logsigmoid(beta * h).mean()
e["dpo_loss"] = dpo.detach().reshape(1)
# IPO as TRL's DPOTrainer computes it: policy and reference log-probs averaged over each
# answer's tokens (`all_logps / loss_mask.sum(-1)`), then (h - 1/(2 beta))^2.
n = mask.sum(-1)
h_mean = (seq[:2] / n[:2] - ref[:2] / n[:2]) - (seq[2:] / n[2:] - ref[2:] / n[2:])
e["ipo_loss"] = ((h_mean - 1 / (2 * beta)) ** 2).mean().detach().reshape(1)
e["chosen_rewards"] = (beta * (seq[:2] - ref[:2])).detach()

# One AdamW step on the DPO loss: decay on matrices, none on 1-D parameters, clipping.
params = dict(model.named_parameters())
for n, p in params.items():
    e["before." + n] = p.detach().clone()
dpo.backward()
e["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).reshape(1)
decay = [p for p in model.parameters() if p.dim() > 1]
no_decay = [p for p in model.parameters() if p.dim() <= 1]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
opt.step()
for n, p in params.items():
    e["after." + n] = p.detach().clone()

# The same DPO loss and step in bf16 with fp32 master weights, as prefloop trains under bf16:
# bf16 forward and backward from the same weights, gradients read in fp32, clipping and AdamW
# on fp32 copies. AdamW's eps is 1 here, which makes the first update proportional to the
# gradient (rather than ±lr whatever its size), so the comparison sees gradient errors.
bf = LlamaForCausalLM.from_pretrained(out + "/model", dtype=torch.bfloat16)
masters = {n: p.detach().float().clone() for n, p in bf.named_parameters()}
logits = bf(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
seq_bf = (logp * mask).sum(-1)
h_bf = (seq_bf[:2] - ref[:2]) - (seq_bf[2:] - ref[2:])
loss_bf = -F.logsigmoid(beta * h_bf).mean()
loss_bf.backward()
e["bf16.loss"] = loss_bf.detach().reshape(1)
for n, p in bf.named_parameters():
    e["bf16.before." + n] = masters[n].clone()
    masters[n].requires_grad_(True)
    masters[n].grad = p.grad.float()
torch.nn.utils.clip_grad_norm_(list(masters.values()), 1.0)
opt = torch.optim.AdamW(list(masters.values()), lr=1e-3, eps=1.0, weight_decay=0.0)
opt.step()
for n in masters:
    e["bf16.after." + n] = masters[n].detach().clone()

# Bradley–Terry.
c, r = torch.randn(16), torch.randn(16)
e["bt_chosen"], e["bt_rejected"] = c, r
e["bt_loss"] = (-F.logsigmoid(c - r).mean()).reshape(1)

# PPO experience, OpenRLHF-style: completions right after prompts, right padding.
B, L = 3, 7
m = torch.zeros(B, L)
m[0, 2:6] = 1; m[1, 1:7] = 1; m[2, 4:5] = 1
lp, ref_lp, old_lp = torch.randn(B, L) * 0.5 - 2, torch.randn(B, L) * 0.5 - 2, torch.randn(B, L) * 0.5 - 2
values, old_values = torch.randn(B, L), torch.randn(B, L)
score = torch.tensor([3.0, -25.0, 40.0])
for k, v in dict(m=m, lp=lp, ref_lp=ref_lp, old_lp=old_lp, values=values, old_values=old_values, score=score).items():
    e["ppo." + k] = v
kl = (lp - ref_lp) * m
rewards = -0.1 * kl
last = (m * torch.arange(L)).argmax(-1)
rewards[torch.arange(B), last] += score.clamp(-20, 20)
e["rewards"] = rewards
gamma, lam = 0.9, 0.8
v_m, r_m = values * m, rewards * m
lastgaelam = torch.zeros(B); adv = []
for t in reversed(range(L)):
    nextvalues = v_m[:, t + 1] if t < L - 1 else torch.zeros(B)
    delta = r_m[:, t] + gamma * nextvalues - v_m[:, t]
    lastgaelam = delta + gamma * lam * lastgaelam
    adv.append(lastgaelam)
adv = torch.stack(adv[::-1], 1)
e["advantages"], e["returns"] = adv * m, (adv + v_m) * m
# Truncated rollouts bootstrap from the value of the state after their last token (ReaLHF:
# values one longer than rewards, the last scaled by seq_no_eos_mask); row 1 ended.
boot = torch.tensor([0.7, 0.0, -1.3])
e["ppo.bootstrap"] = boot
adv_b = torch.zeros(B, L)
for i in range(B):
    idx = m[i].nonzero().squeeze(-1)
    s, end = int(idx[0]), int(idx[-1]) + 1
    v = torch.cat([values[i, s:end], boot[i:i + 1]])
    last, out_i = 0.0, []
    for t in reversed(range(end - s)):
        last = rewards[i, s + t] + gamma * v[t + 1] - v[t] + gamma * lam * last
        out_i.append(last)
    adv_b[i, s:end] = torch.stack(out_i[::-1])
e["advantages_bootstrap"], e["returns_bootstrap"] = adv_b, (adv_b + v_m) * m
mean = (adv * m).sum() / m.sum()
var = (((adv - mean) ** 2) * m).sum() / m.sum()
e["normalised"] = (adv - mean) * torch.rsqrt(var + 1e-8) * m
ratio = (lp - old_lp).exp()
surr = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
e["policy_loss"] = ((surr * m).sum() / m.sum()).reshape(1)
e["clip_fraction"] = ((((-adv * ratio.clamp(0.8, 1.2)) > (-adv * ratio)).float() * m).sum() / m.sum()).reshape(1)
e["approx_kl"] = ((((ratio - 1) - (lp - old_lp)) * m).sum() / m.sum()).reshape(1)
returns = adv + v_m
clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
vl = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
e["value_loss"] = (0.5 * (vl * m).sum() / m.sum()).reshape(1)

# Group estimators, member by member as TRL (GRPO), OpenRLHF (RLOO, REINFORCE++-baseline)
# write them, over the valid members of each group: group 1 has one invalid member, group 2
# two, group 3 only one valid member (no baseline: every advantage 0).
gr = torch.tensor([[1., 0., 0., 10.], [2., 2., 5., 7.], [3., 1., 4., 4.], [5., 6., 7., 8.]])
gv = torch.tensor([[1., 1., 1., 1.], [1., 0., 1., 1.], [0., 1., 0., 1.], [0., 0., 1., 0.]])
est = {k: torch.zeros(4, 4) for k in ["grpo", "dr_grpo", "rloo", "reinforce_pp"]}
for g in range(4):
    idx = [k for k in range(4) if gv[g, k] > 0]
    if len(idx) < 2:
        continue
    vals = gr[g, idx]
    mean, std = vals.mean(), vals.std()
    for k in idx:
        est["grpo"][g, k] = (gr[g, k] - mean) / (std + 1e-4)
        est["dr_grpo"][g, k] = gr[g, k] - mean
        est["rloo"][g, k] = gr[g, k] - (vals.sum() - gr[g, k]) / (len(idx) - 1)
        est["reinforce_pp"][g, k] = gr[g, k] - mean
e["group.rewards"], e["group.valid"] = gr.reshape(-1), gv.reshape(-1)
for k, v in est.items():
    e["group." + k] = v.reshape(-1)
# Per-token: REINFORCE++ whitens the broadcast advantages over the loss tokens; a KL reward
# adds its return to go.
gm = torch.zeros(16, 5)
for i in range(16):
    gm[i, i % 3:i % 3 + 2 + i % 2] = 1
kl_r = torch.randn(16, 5) * 0.1
e["group.mask"], e["group.kl_rewards"] = gm, kl_r
tok = est["reinforce_pp"].reshape(-1)[:, None] * gm
tmean = (tok * gm).sum() / gm.sum()
tvar = (((tok - tmean) ** 2) * gm).sum() / gm.sum()
e["group.tokens_reinforce_pp"] = (tok - tmean) * torch.rsqrt(tvar + 1e-8) * gm
togo = torch.zeros(16, 5)
for i in range(16):
    run = 0.0
    for t in reversed(range(5)):
        run = run + kl_r[i, t] * gm[i, t]
        togo[i, t] = run * gm[i, t]
e["group.tokens_rloo_kl"] = est["rloo"].reshape(-1)[:, None] * gm + togo

# The clip-higher surrogate (ε_low 0.2, ε_high 0.28) under veRL's three aggregations, and the
# k3 KL (Schulman's estimator, as TRL's GRPO writes it).
lo, hi = 0.8, 1.28
surr = torch.max(-adv * ratio, -adv * ratio.clamp(lo, hi))
e["dapo.token_mean"] = ((surr * m).sum() / m.sum()).reshape(1)
e["dapo.seq_mean_token_sum"] = (surr * m).sum(-1).mean().reshape(1)
e["dapo.seq_mean_token_mean"] = ((surr * m).sum(-1) / m.sum(-1)).mean().reshape(1)
# Dr. GRPO as TRL's GRPOTrainer writes `dr_grpo`: the masked sum over (rows x budget), budget 10.
e["dapo.seq_mean_token_sum_norm"] = ((surr * m).sum() / (surr.size(0) * 10)).reshape(1)
active = (-adv * ratio.clamp(lo, hi)) > (-adv * ratio)
e["dapo.clip_low"] = (((active & (adv < 0)).float() * m).sum() / m.sum()).reshape(1)
e["dapo.clip_high"] = (((active & (adv > 0)).float() * m).sum() / m.sum()).reshape(1)
e["k3"] = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1

# DAPO's soft overlong punishment, budget 20, buffer 8, factor 1.5.
def overlong(L, L_max=20, L_cache=8, f=1.5):
    if L <= L_max - L_cache:
        return 0.0
    if L <= L_max:
        return ((L_max - L_cache) - L) / L_cache * f
    return -f
e["overlong.lengths"] = torch.arange(0, 23, dtype=torch.float)
e["overlong.penalty"] = torch.tensor([overlong(L) for L in range(23)])

# EMA reference update, η = 0.001.
ref_w, actor_w = torch.randn(5, 4), torch.randn(5, 4)
e["ema.ref"], e["ema.actor"] = ref_w.clone(), actor_w
e["ema.out"] = ref_w.mul_(1 - 0.001).add_(actor_w, alpha=0.001)

# One DPO step with LoRA through peft (when the venv has it): an adapter on every projection
# with random A and B (init_lora_weights=False), saved for prefloop to load; the same DPO
# loss against the same reference, clipping at 0.5 and AdamW on the adapters alone.
try:
    from peft import LoraConfig, get_peft_model
except ImportError:
    LoraConfig = None
if LoraConfig is not None:
    base = LlamaForCausalLM.from_pretrained(out + "/model", dtype=torch.float32)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
        init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj"]))
    lora.save_pretrained(out + "/adapter")
    trained = {n.removeprefix("base_model.model.").replace(".default.", "."): p
               for n, p in lora.named_parameters() if p.requires_grad}
    for n, p in trained.items():
        e["lora.before." + n] = p.detach().clone()
    logits = lora(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    seq_lora = (logp * mask).sum(-1)
    h_lora = (seq_lora[:2] - ref[:2]) - (seq_lora[2:] - ref[2:])
    loss_lora = -F.logsigmoid(beta * h_lora).mean()
    loss_lora.backward()
    e["lora.loss"] = loss_lora.detach().reshape(1)
    torch.nn.utils.clip_grad_norm_(list(trained.values()), 0.5)
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-3, weight_decay=0.1)
    opt.step()
    for n, p in trained.items():
        e["lora.after." + n] = p.detach().clone()

save_file({k: v.contiguous() for k, v in e.items()}, out + "/expected.safetensors")
"#;

struct Golden {
    dir: PathBuf,
    expected: HashMap<String, Tensor>,
}

/// Runs the reference once per test binary; each test then reads its outputs.
fn golden() -> Option<Golden> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| {
            let python = PathBuf::from(std::env::var_os("PREFLOOP_PYTHON")?);
            let ok = Command::new(&python)
                .args(["-c", "import torch, transformers"])
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
            let dir = tempfile::tempdir().unwrap().keep();
            let status = Command::new(&python)
                .args(["-c", REFERENCE])
                .arg(&dir)
                .env("HF_HUB_OFFLINE", "1")
                .status()
                .unwrap();
            assert!(status.success(), "the PyTorch reference failed");
            Some(dir)
        })
        .clone()?;
    let expected = Tensor::read_safetensors(dir.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Some(Golden { dir, expected })
}

macro_rules! golden_or_skip {
    () => {
        match golden() {
            Some(g) => g,
            None => {
                eprintln!(
                    "skipped: needs the venv with torch and transformers (run scripts/setup)"
                );
                return;
            }
        }
    };
}

impl Golden {
    fn get(&self, name: &str) -> &Tensor {
        self.expected
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    fn scalar(&self, name: &str) -> f64 {
        self.get(name).double_value(&[0])
    }

    fn tiny_llama(&self) -> (VarStore, Decoder) {
        let dir = self.dir.join("model");
        let config = Config::from_file(&dir.join("config.json")).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let decoder = Decoder::new(&vs, &config).unwrap();
        let file = dir.join("model.safetensors");
        fill(&vs, Tensor::read_safetensors(&file).unwrap(), &file).unwrap();
        (vs, decoder)
    }

    /// PyTorch's value of one of our parameters under `prefix` ("before", "after", …).
    fn parameter(&self, prefix: &str, name: &str) -> Tensor {
        common::parameter(&self.expected, prefix, name)
    }

    fn pair_batch(&self) -> TokenBatch {
        common::pair_batch(&self.expected)
    }

    /// The DPO loss (β 0.1) of the two golden pairs under `decoder`, with the log-probs to
    /// back-propagate through.
    fn dpo_loss(&self, decoder: &Decoder) -> (TokenLogprobs, prefloop_train::PreferenceOutput) {
        common::dpo_loss(decoder, &self.pair_batch(), self.get("ref_logps"))
    }
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: shapes");
    let diff = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff <= 1e-5, "{what}: max |Δ| = {diff:e}");
}

fn assert_scalar(ours: &Tensor, theirs: f64, what: &str) {
    let ours = ours.double_value(&[]);
    assert!((ours - theirs).abs() <= 1e-5, "{what}: {ours} vs {theirs}");
}

#[test]
fn masked_sequence_log_probs() {
    let g = golden_or_skip!();
    let (_vs, decoder) = g.tiny_llama();
    let batch = g.pair_batch();
    let sums = sequence_sum(
        &prefloop_train::token_logprobs(&decoder, &batch),
        &batch.loss_mask,
    );
    assert_close(&sums, g.get("seq_logps"), "sequence log-probs");
}

#[test]
fn dpo_and_ipo_losses() {
    let g = golden_or_skip!();
    let tokens = g
        .pair_batch()
        .loss_mask
        .sum_dim_intlist([1].as_slice(), false, Kind::Float);
    let half = |t: &Tensor, i: i64| t.narrow(0, 2 * i, 2);
    let run = |kind: PreferenceLoss| {
        // Each loss on the sequence log-probs it reads: sums for DPO, token means for IPO.
        let seq = kind.sequence_logps(g.get("seq_logps"), &tokens);
        let reference = kind.sequence_logps(g.get("ref_logps"), &tokens);
        preference_loss(
            kind,
            0.1,
            &half(&seq, 0),
            &half(&seq, 1),
            &half(&reference, 0),
            &half(&reference, 1),
        )
    };
    let dpo = run(PreferenceLoss::Sigmoid);
    assert_scalar(&dpo.loss, g.scalar("dpo_loss"), "DPO loss");
    assert_close(
        &dpo.chosen_rewards,
        g.get("chosen_rewards"),
        "rewards/chosen",
    );
    assert_scalar(
        &run(PreferenceLoss::Ipo).loss,
        g.scalar("ipo_loss"),
        "IPO loss",
    );
}

#[test]
fn bradley_terry() {
    let g = golden_or_skip!();
    let loss = bradley_terry_loss(g.get("bt_chosen"), g.get("bt_rejected"));
    assert_scalar(&loss, g.scalar("bt_loss"), "Bradley–Terry loss");
}

#[test]
fn kl_penalised_rewards_gae_and_advantage_normalisation() {
    let g = golden_or_skip!();
    let p = |k: &str| g.get(&format!("ppo.{k}"));
    let mask = p("m");
    let rewards = kl_penalised_rewards(p("score"), p("lp"), p("ref_lp"), mask, 0.1, 20.0);
    assert_close(&(&rewards * mask), &(g.get("rewards") * mask), "rewards");
    let (advantages, returns) = gae(&rewards, p("values"), mask, None, 0.9, 0.8);
    assert_close(&advantages, g.get("advantages"), "GAE advantages");
    assert_close(&returns, g.get("returns"), "returns");
    let bootstrap = p("bootstrap");
    let (bootstrapped, returns) = gae(&rewards, p("values"), mask, Some(bootstrap), 0.9, 0.8);
    assert_close(
        &bootstrapped,
        g.get("advantages_bootstrap"),
        "GAE advantages of truncated rollouts",
    );
    assert_close(
        &returns,
        g.get("returns_bootstrap"),
        "returns of truncated rollouts",
    );
    let normalised = normalise_advantages(&advantages, mask);
    assert_close(&normalised, g.get("normalised"), "normalised advantages");
}

#[test]
fn ppo_policy_and_value_losses() {
    let g = golden_or_skip!();
    let p = |k: &str| g.get(&format!("ppo.{k}"));
    let mask = p("m");
    let advantages = g.get("advantages");
    let out = policy_loss(
        p("lp"),
        p("old_lp"),
        advantages,
        mask,
        0.2,
        0.2,
        LossAggregation::TokenMean,
        10,
    );
    assert_scalar(&out.loss, g.scalar("policy_loss"), "policy loss");
    assert_scalar(
        &out.clip_fraction,
        g.scalar("clip_fraction"),
        "clip fraction",
    );
    assert_scalar(&out.approx_kl, g.scalar("approx_kl"), "approx KL");
    let loss = value_loss(p("values"), p("old_values"), g.get("returns"), mask, 0.2);
    assert_scalar(&loss, g.scalar("value_loss"), "value loss");
}

#[test]
fn ema_reference_update() {
    let g = golden_or_skip!();
    let reference = g.get("ema.ref").copy();
    ema_update(
        &[reference.shallow_clone()],
        &[g.get("ema.actor").shallow_clone()],
        0.001,
    );
    assert_close(&reference, g.get("ema.out"), "EMA update");
}

#[test]
fn value_normalisation_moments_match_the_pooled_statistics() {
    let mut moments = RunningMoments::default();
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 100.0]);
    let b = Tensor::from_slice(&[-4.0f32, 6.0]);
    moments.update(&a, &Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0]));
    moments.update(&b, &Tensor::ones([2], (Kind::Float, Device::Cpu)));
    // Pooled over 1, 2, 3, -4, 6: mean 1.6, population variance 10.64.
    assert!((moments.mean - 1.6).abs() < 1e-6, "{moments:?}");
    assert!((moments.var - 10.64).abs() < 1e-5, "{moments:?}");
    let x = Tensor::from_slice(&[5.0f32]);
    assert_close(
        &moments.denormalise(&moments.normalise(&x)),
        &x,
        "round trip",
    );
}

#[test]
fn one_dpo_optimiser_step_equals_pytorch() {
    let g = golden_or_skip!();
    let (vs, decoder) = g.tiny_llama();
    let (logprobs, out) = g.dpo_loss(&decoder);
    assert_scalar(&out.loss, g.scalar("dpo_loss"), "DPO loss of the step");
    out.loss.backward();
    logprobs.backward(&decoder);
    let config = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        ..OptimConfig::default()
    };
    let mut optimizer = AdamW::new(&vs, config).unwrap();
    let norm = optimizer.clip_grad_norm();
    assert!(
        (norm - g.scalar("grad_norm")).abs() < 1e-5,
        "grad norm {norm}"
    );
    optimizer.step(1e-3);
    let mut checked = 0;
    for (name, value) in vs.variables() {
        let before = g.parameter("before", &name);
        let after = g.parameter("after", &name);
        let (ours, theirs) = (&value - &before, after - &before);
        let moved = theirs.abs().max().double_value(&[]);
        assert!(moved > 1e-5, "{name} did not move in PyTorch");
        assert_close(&ours, &theirs, &format!("update of {name}"));
        checked += 1;
    }
    // Per layer: two norms, the fused q/k/v, o, the fused gate/up and down; plus the
    // embedding and the final norm.
    assert_eq!(checked, 2 * 6 + 2, "every parameter compared");
}

#[test]
fn one_bf16_dpo_step_with_fp32_master_weights_matches_pytorch_in_bf16() {
    let g = golden_or_skip!();
    let (mut vs, decoder) = g.tiny_llama();
    vs.set_kind(Kind::BFloat16);
    let (logprobs, out) = g.dpo_loss(&decoder);
    let (ours, theirs) = (out.loss.double_value(&[]), g.scalar("bf16.loss"));
    assert!(
        (ours - theirs).abs() <= 1e-2 * theirs.abs(),
        "bf16 DPO loss {ours} vs PyTorch's {theirs}"
    );
    out.loss.backward();
    logprobs.backward(&decoder);
    let config = OptimConfig {
        lr: 1e-3,
        eps: 1.0,
        max_grad_norm: 1.0,
        ..OptimConfig::default()
    };
    let mut optimizer = AdamW::new(&vs, config).unwrap();
    optimizer.accumulate();
    optimizer.clip_grad_norm();
    optimizer.step(1e-3);
    let masters: HashMap<String, Tensor> = optimizer.masters().into_iter().collect();
    assert_eq!(
        masters.len(),
        2 * 6 + 2,
        "every bf16 parameter has an fp32 master"
    );
    for (name, value) in vs.variables() {
        assert_eq!(value.kind(), Kind::BFloat16, "{name} computes in bf16");
        let before = g.parameter("bf16.before", &name);
        let theirs = g.parameter("bf16.after", &name) - &before;
        let ours = &masters[&name] - &before;
        // The two bf16 passes run different kernels (a padding mask against a causal one, a
        // chunked head against a whole one) and round differently, by about 2^-8 relative per
        // element: the update as a whole agrees within 5 %.
        let norm = |t: &Tensor| t.norm().double_value(&[]);
        let (error, size) = (norm(&(&ours - &theirs)), norm(&theirs));
        assert!(size > 0.0, "{name} did not move in PyTorch");
        assert!(
            error <= 0.05 * size,
            "update of {name}: |ours − PyTorch's| = {error:e}, |PyTorch's| = {size:e}"
        );
        // The parameter the model computes with is the master rounded to bf16.
        assert!(
            value.equal(&masters[&name].to_kind(Kind::BFloat16)),
            "{name}"
        );
    }
}

#[test]
fn one_lora_dpo_step_equals_the_same_step_in_peft() {
    let g = golden_or_skip!();
    let adapter = g.dir.join("adapter");
    if !adapter.exists() {
        eprintln!("skipped: needs peft in the venv (run scripts/setup)");
        return;
    }
    // The tokenizer plays no part here; a Model needs one, the embedded default's will do.
    let Ok(embedded) = Model::load(None, Device::Cpu, Precision::Fp32) else {
        eprintln!("skipped: needs the embedded model (run scripts/setup)");
        return;
    };
    let (vs, decoder) = g.tiny_llama();
    let model = Model {
        vs,
        decoder,
        tokenizer: embedded.tokenizer,
        source: g.dir.join("model"),
        adapters: None,
    }
    .load_adapter(&adapter)
    .unwrap();
    let (logprobs, out) = g.dpo_loss(&model.decoder);
    assert_scalar(
        &out.loss,
        g.scalar("lora.loss"),
        "DPO loss with the adapter",
    );
    out.loss.backward();
    logprobs.backward(&model.decoder);
    let config = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        ..OptimConfig::default()
    };
    let mut optimizer = AdamW::new(model.trainable(), config).unwrap();
    optimizer.clip_grad_norm();
    optimizer.step(1e-3);
    let mut checked = 0;
    for (name, value) in model.trainable().variables() {
        let before = g.get(&format!("lora.before.{name}"));
        let theirs = g.get(&format!("lora.after.{name}")) - before;
        assert!(
            theirs.abs().max().double_value(&[]) > 1e-5,
            "{name} did not move in peft"
        );
        assert_close(&(&value - before), &theirs, &format!("update of {name}"));
        checked += 1;
    }
    assert_eq!(
        checked,
        2 * 7 * 2,
        "A and B of seven projections in two layers"
    );
    // The base did not move: only the adapters are trained.
    for (name, value) in model.vs.variables() {
        assert!(value.equal(&g.parameter("before", &name)), "{name} moved");
    }
}

#[test]
fn group_advantages_of_the_three_estimators_over_groups_of_unequal_validity() {
    let g = golden_or_skip!();
    let (rewards, valid) = (g.get("group.rewards"), g.get("group.valid"));
    for (estimator, scale, name) in [
        (Estimator::Grpo, true, "grpo"),
        (Estimator::Grpo, false, "dr_grpo"),
        (Estimator::Rloo, true, "rloo"),
        (Estimator::ReinforcePp, true, "reinforce_pp"),
    ] {
        let ours = group_advantages(rewards, valid, 4, estimator, scale);
        assert_close(&ours, g.get(&format!("group.{name}")), name);
    }
    let mask = g.get("group.mask");
    let sequence = group_advantages(rewards, valid, 4, Estimator::ReinforcePp, true);
    let tokens = token_advantages(&sequence, mask, None, Estimator::ReinforcePp);
    assert_close(
        &tokens,
        g.get("group.tokens_reinforce_pp"),
        "REINFORCE++ whitened token advantages",
    );
    let sequence = group_advantages(rewards, valid, 4, Estimator::Rloo, true);
    let kl = g.get("group.kl_rewards");
    let tokens = token_advantages(&sequence, mask, Some(kl), Estimator::Rloo);
    assert_close(
        &tokens,
        g.get("group.tokens_rloo_kl"),
        "RLOO advantages with the KL reward's return to go",
    );
}

#[test]
fn the_clip_higher_surrogate_under_three_aggregations_and_the_k3_kl() {
    let g = golden_or_skip!();
    let p = |k: &str| g.get(&format!("ppo.{k}"));
    let mask = p("m");
    let advantages = g.get("advantages");
    for (aggregation, name) in [
        (LossAggregation::TokenMean, "token_mean"),
        (LossAggregation::SeqMeanTokenSum, "seq_mean_token_sum"),
        (LossAggregation::SeqMeanTokenMean, "seq_mean_token_mean"),
        (
            LossAggregation::SeqMeanTokenSumNorm,
            "seq_mean_token_sum_norm",
        ),
    ] {
        let out = policy_loss(
            p("lp"),
            p("old_lp"),
            advantages,
            mask,
            0.2,
            0.28,
            aggregation,
            10,
        );
        assert_scalar(&out.loss, g.scalar(&format!("dapo.{name}")), name);
        assert_scalar(
            &out.clip_low_fraction,
            g.scalar("dapo.clip_low"),
            "clip low",
        );
        assert_scalar(
            &out.clip_high_fraction,
            g.scalar("dapo.clip_high"),
            "clip high",
        );
    }
    assert_close(&k3_kl(p("lp"), p("ref_lp")), g.get("k3"), "k3 KL");
}

#[test]
fn the_soft_overlong_penalty_matches_dapo() {
    let g = golden_or_skip!();
    let lengths: Vec<f32> = Vec::try_from(g.get("overlong.lengths")).unwrap();
    let ours: Vec<f32> = lengths
        .iter()
        .map(|&l| overlong_penalty(l as usize, 20, 8, 1.5) as f32)
        .collect();
    assert_close(
        &Tensor::from_slice(&ours),
        g.get("overlong.penalty"),
        "overlong penalty",
    );
}
