//! Training through each family against PyTorch on tiny random models that transformers makes:
//! one DPO step (AdamW with ε = 1, so the update follows the gradient's size, not only its sign)
//! moves every parameter as PyTorch moves it, and a GRPO loss (DAPO's clip-higher surrogate,
//! token mean) on the model's log-probs equals PyTorch's. Sequences are longer than the
//! sliding window where the family has one. Skipped with a message when the venv lacks
//! transformers (run scripts/setup).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prefloop_model::{Config, Decoder, fill};
use prefloop_train::{AdamW, LossAggregation, OptimConfig, policy_loss};
use tch::nn::VarStore;
use tch::{Device, Tensor};

const REFERENCE: &str = r#"
import sys, torch, torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
kind, out = sys.argv[1:]
V = 96
shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
families = {
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3-bias-sliding": ("qwen3", dict(head_dim=12, attention_bias=True,
        use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "mistral-window": ("mistral", dict(sliding_window=6, tie_word_embeddings=False)),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2, use_sliding_window=True,
        sliding_window=6)),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.0)),
    "phi3": ("phi3", dict(sliding_window=6)),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=1e4)),
}
model_type, extra = families[kind]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape, **extra),
                                         attn_implementation="eager").float()
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.normal_(0.0, 0.5)
        elif "norm" in n:
            p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out + "/model", safe_serialization=True)
e = {}
g = torch.Generator().manual_seed(1)
# Two pairs: chosen0, chosen1, rejected0, rejected1 as (prompt, answer), past the window.
lengths = [(5, 9), (3, 12), (5, 4), (3, 10)]
seqs = [(torch.randint(3, V, (p,), generator=g), torch.randint(3, V, (a,), generator=g)) for p, a in lengths]
T = max(p + a for p, a in lengths)
ids = torch.zeros(4, T, dtype=torch.long); attn = torch.zeros(4, T, dtype=torch.long)
mask = torch.zeros(4, T - 1)
for i, (p, a) in enumerate(seqs):
    e[f"prompt{i}"], e[f"answer{i}"] = p, a
    n = len(p) + len(a)
    ids[i, :n] = torch.cat([p, a]); attn[i, :n] = 1
    mask[i, len(p) - 1:n - 1] = 1
logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask

# GRPO: DAPO's clip-higher surrogate against old log-probs a little off, token mean.
old = (lp.detach() + 0.2 * torch.randn(lp.shape, generator=g)) * mask
adv = torch.tensor([1.0, -0.5, 0.3, -1.2])[:, None].expand_as(lp).contiguous()
ratio = torch.exp(lp - old)
surrogate = torch.min(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.28) * adv)
e["old"], e["adv"] = old, adv
e["grpo_loss"] = ((-surrogate * mask).sum() / mask.sum()).detach().reshape(1)

# DPO (beta 0.1) and one AdamW step.
seq = lp.sum(-1)
ref = torch.randn(4, generator=g) * 3 - 40
e["ref"] = ref
h = (seq[:2] - ref[:2]) - (seq[2:] - ref[2:])
loss = -F.logsigmoid(0.1 * h).mean()
e["dpo_loss"] = loss.detach().reshape(1)
params = dict(model.named_parameters())
for n, p in params.items():
    e["before." + n] = p.detach().clone()
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1.0, weight_decay=0.0).step()
for n, p in params.items():
    e["after." + n] = p.detach().clone()
save_file({k: v.contiguous() for k, v in e.items()}, out + "/expected.safetensors")
"#;

fn venv_python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("PREFLOOP_PYTHON")?);
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .status()
        .ok()?
        .success();
    ok.then_some(python)
}

fn check_family(python: &Path, kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(python)
        .args(["-c", REFERENCE, kind])
        .arg(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "the PyTorch reference for {kind} failed");
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let model = dir.path().join("model");
    let config = Config::from_file(&model.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let decoder = Decoder::new(&vs, &config).unwrap();
    let file = model.join("model.safetensors");
    fill(&vs, Tensor::read_safetensors(&file).unwrap(), &file).unwrap();

    let batch = common::pair_batch(&expected);
    let (logprobs, out) = common::dpo_loss(&decoder, &batch, &expected["ref"]);
    let grpo = policy_loss(
        &logprobs.values,
        &expected["old"],
        &expected["adv"],
        &batch.loss_mask,
        0.2,
        0.28,
        LossAggregation::TokenMean,
        0,
    );
    let (ours, theirs) = (
        grpo.loss.double_value(&[]),
        expected["grpo_loss"].double_value(&[0]),
    );
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "{kind}: GRPO loss {ours} vs PyTorch's {theirs}"
    );

    let (ours, theirs) = (
        out.loss.double_value(&[]),
        expected["dpo_loss"].double_value(&[0]),
    );
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "{kind}: DPO loss {ours} vs PyTorch's {theirs}"
    );
    out.loss.backward();
    logprobs.backward(&decoder);
    let config = OptimConfig {
        lr: 1e-3,
        eps: 1.0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        ..OptimConfig::default()
    };
    let mut optimizer = AdamW::new(&vs, config).unwrap();
    optimizer.clip_grad_norm();
    optimizer.step(1e-3);
    for (name, value) in vs.variables() {
        let before = common::parameter(&expected, "before", &name);
        let theirs = common::parameter(&expected, "after", &name) - &before;
        let ours = &value - &before;
        let norm = |t: &Tensor| t.norm().double_value(&[]);
        let (error, size) = (norm(&(&ours - &theirs)), norm(&theirs));
        assert!(size > 0.0, "{kind}: {name} did not move in PyTorch");
        assert!(
            error <= 1e-3 * size,
            "{kind}: update of {name}: |ours − PyTorch's| = {error:e}, |PyTorch's| = {size:e}"
        );
    }
    eprintln!("{kind}: GRPO loss, DPO loss and step agree with PyTorch");
}

#[test]
fn one_dpo_step_and_a_grpo_loss_of_each_family_match_pytorch() {
    let Some(python) = venv_python() else {
        eprintln!("skipped: needs the venv with torch and transformers (run scripts/setup)");
        return;
    };
    for kind in [
        "qwen3",
        "qwen3-bias-sliding",
        "mistral-window",
        "smollm3",
        "phi3",
        "gemma2",
        "gemma3",
    ] {
        check_family(&python, kind);
    }
}
