//! Every family against transformers on tiny random models that transformers itself makes
//! (`AutoConfig.for_model` + `from_config`, norms and biases moved off their initial constants,
//! a word-level tokenizer of 512 tokens, saved in shards): logits on a right-padded batch (and in
//! bf16 within its rounding), greedy generation of
//! 32 tokens through the continuous-batching sampler (prompts longer than the sliding window
//! among them), the saved directory loading in transformers as the same family with the same
//! logits, a reward model (a scalar head on the trunk) loading as its sequence classifier with
//! the same scores, and LoRA adapters loading in peft with the same logits. Skipped with a message when
//! the venv lacks transformers or peft (run scripts/setup).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{read_tensors, venv_python};
use prefloop_model::{LoraConfig, Model, Precision, Request, SamplingParams, ScalarHead, generate};
use tch::{Device, Tensor};

/// The transformers side: the model directory and the reference outputs.
const MAKE: &str = r#"
import sys, torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM
kind, out, ref = sys.argv[1:]
V = 512
shape = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
families = {
    # Qwen3-0.6B's shape in miniature: head_dim named (4 x 32 = 128 against a hidden size
    # of 64), tied embeddings, no bias.
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    # Biases on all four projections, and a full then a sliding layer (window 8).
    "qwen3-bias-sliding": ("qwen3", dict(head_dim=24, attention_bias=True,
        tie_word_embeddings=False, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # Mistral's window on every layer.
    "mistral-window": ("mistral", dict(sliding_window=8, tie_word_embeddings=False)),
    # A RoPE layer, then a NoPE layer that slides.
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2, use_sliding_window=True,
        sliding_window=8, tie_word_embeddings=True)),
    # A sliding then a global layer; scores and logits capped where the caps bite.
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.0, initializer_range=0.1)),
    # Fused q/k/v and gate/up in the checkpoint, Phi-3-mini-4k's window on every layer.
    "phi3": ("phi3", dict(sliding_window=8, tie_word_embeddings=False)),
    # Per-head norms, and two RoPE bases: the global one scaled.
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rope_theta=1e6,
        rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
model_type, extra = families[kind]
torch.manual_seed(0)
config = AutoConfig.for_model(model_type, **shape, **extra)
# Eager attention, the reference: transformers' SDPA path leaves Gemma 2's score cap out.
model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.5)
        elif "norm" in name:
            p.normal_(1.0, 0.2)
# In shards, with an index, as the larger checkpoints come.
model.save_pretrained(out, safe_serialization=True, max_shard_size="200KB")
Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(out + "/tokenizer.json")
g = torch.Generator().manual_seed(1)
lengths = [40, 23, 9]
ids = torch.randint(3, V, (len(lengths), max(lengths)), generator=g)
mask = torch.zeros_like(ids)
for i, n in enumerate(lengths):
    mask[i, :n] = 1
    ids[i, n:] = 0
e = {"ids": ids, "mask": mask}
with torch.no_grad():
    e["logits"] = model(ids, attention_mask=mask).logits
    for i, n in enumerate([5, 12, 30]):
        prompt = torch.randint(0, V, (1, n), generator=g)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                             do_sample=False)
        e[f"prompt{i}"], e[f"greedy{i}"] = prompt[0], gen[0, n:]
    e["bf16"] = model.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
save_file({k: v.contiguous() for k, v in e.items()}, ref)
"#;

/// What transformers and peft make of prefloop's saved directory and adapter.
const CHECK: &str = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import PeftModel
base, saved, adapter, family, rm_dir, ref, out = sys.argv[1:]
e = load_file(ref)
def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()
model = load(saved)
name = type(model).__name__
assert name == family + "ForCausalLM", name
with torch.no_grad():
    r = {"saved": model(e["ids"], attention_mask=e["mask"]).logits,
         "peft": PeftModel.from_pretrained(load(base), adapter).eval()(
             e["ids"], attention_mask=e["mask"]).logits}
    rm = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, dtype=torch.float32, attn_implementation="eager").eval()
    name = type(rm).__name__
    assert name.endswith("ForSequenceClassification"), name
    # It scores the last token that is not its pad id.
    ids = e["ids"].masked_fill(e["mask"] == 0, rm.config.pad_token_id)
    r["rm"] = rm(ids, attention_mask=e["mask"]).logits[:, 0]
save_file({k: v.contiguous() for k, v in r.items()}, out)
"#;

/// A Qwen3 GGUF file as llama.cpp writes one, with its own Python package (gguf-py): the
/// tensors renamed by its `TensorNameMap` for the architecture, the hyper-parameters by its
/// writer's `add_*` calls as `convert_hf_to_gguf.py` makes them, the vocabulary copied field by
/// field from the embedded SmolLM2 GGUF (which llama.cpp converted), F32. Also the transformers
/// directory of the same model and its logits.
const GGUF_MAKE: &str = r#"
import sys, torch, gguf
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
hf, embedded, out, ref = sys.argv[1:]
torch.manual_seed(0)
config = AutoConfig.for_model("qwen3", vocab_size=49152, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True)
model = AutoModelForCausalLM.from_config(config).float().eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(1.0, 0.2)
model.save_pretrained(hf, safe_serialization=True)
w = gguf.GGUFWriter(out, "qwen3")
w.add_context_length(config.max_position_embeddings)
w.add_embedding_length(config.hidden_size)
w.add_block_count(config.num_hidden_layers)
w.add_feed_forward_length(config.intermediate_size)
w.add_head_count(config.num_attention_heads)
w.add_head_count_kv(config.num_key_value_heads)
w.add_rope_freq_base(config.rope_theta)
w.add_layer_norm_rms_eps(config.rms_norm_eps)
w.add_key_length(config.head_dim)
w.add_value_length(config.head_dim)
w.add_file_type(gguf.LlamaFileType.ALL_F32)
reader = gguf.GGUFReader(embedded)
for field in reader.fields.values():
    if field.name.startswith("tokenizer."):
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
for name, tensor in model.state_dict().items():
    if name == "lm_head.weight":
        continue  # tied: llama.cpp writes no output tensor
    w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy())
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
ids = (torch.arange(40) * 7919 % 49152).unsqueeze(0)
with torch.no_grad():
    save_file({"ids": ids[0].contiguous(), "logits": model(ids).logits[0].contiguous()}, ref)
"#;

/// Largest |Δ| between `ours` and `theirs` (B, T, V) over each row's first `lengths[b]`
/// positions (the padding's logits are not compared).
fn max_difference_unpadded(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f64 {
    let valid = mask.unsqueeze(-1).to_kind(tch::Kind::Bool);
    (ours - theirs)
        .abs()
        .masked_fill(&valid.logical_not(), 0.0)
        .max()
        .double_value(&[])
}

fn logits(model: &Model, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.decoder.forward(ids))
}

fn run(python: &Path, script: &str, args: &[&Path], what: &str) {
    let status = Command::new(python)
        .args(["-c", script])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{what} failed");
}

/// One family: `kind` names its configuration in MAKE, `family` transformers' class prefix.
fn check_family(python: &Path, kind: &str, family: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let at = |name: &str| scratch.path().join(name);
    run(
        python,
        MAKE,
        &[Path::new(kind), &at("hf"), &at("ref.safetensors")],
        &format!("the transformers reference for {kind}"),
    );
    let reference: HashMap<String, Tensor> = read_tensors(&at("ref.safetensors"));
    let model = Model::load(Some(&at("hf")), Device::Cpu, Precision::Fp32).unwrap();
    let (ids, mask) = (&reference["ids"], &reference["mask"]);

    // The causal pass (training's and the prefill's) on a right-padded batch.
    let ours = logits(&model, ids);
    let diff = max_difference_unpadded(&ours, &reference["logits"], mask);
    eprintln!("{kind}: max |Δlogit| vs transformers = {diff:e}");
    assert!(diff <= 1e-4, "{kind}: max |Δlogit| = {diff}");

    // In bf16 (the GPU's dtype) the same model computes the same logits within bf16's
    // rounding, through both passes.
    let bf16 = Model::load(Some(&at("hf")), Device::Cpu, Precision::Bf16).unwrap();
    let rounded = logits(&bf16, ids).to_kind(tch::Kind::Float);
    let diff = max_difference_unpadded(&rounded, &reference["bf16"], mask);
    let rounding = max_difference_unpadded(&reference["bf16"], &reference["logits"], mask);
    eprintln!(
        "{kind}: bf16 against transformers' bf16: max |Δlogit| = {diff:e} (transformers' bf16 against its fp32: {rounding:e})"
    );
    // Different kernels round bf16 differently: within twice what bf16 moves transformers' own
    // logits by.
    assert!(
        diff <= 2.0 * rounding,
        "{kind}: bf16 logits, max |Δlogit| = {diff} against transformers' {rounding}"
    );

    // Greedy decoding, the three prompts sampled together in the slot cache.
    let requests: Vec<Request> = (0..3)
        .map(|i| Request {
            prompt: Vec::<i64>::try_from(&reference[&format!("prompt{i}")])
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect(),
            seed: 0,
        })
        .collect();
    let greedy = generate(&model, &requests, &SamplingParams::greedy(32)).unwrap();
    generate(&bf16, &requests, &SamplingParams::greedy(32)).unwrap();
    for (i, generation) in greedy.iter().enumerate() {
        let theirs = Vec::<i64>::try_from(&reference[&format!("greedy{i}")]).unwrap();
        let ours: Vec<i64> = generation.tokens.iter().map(|&t| i64::from(t)).collect();
        assert_eq!(
            ours,
            theirs,
            "{kind}: greedy continuation of a {}-token prompt",
            requests[i].prompt.len()
        );
    }

    // A reward model: a random scalar head on the trunk, saved as transformers' classifier.
    let reward_model = Model::load(Some(&at("hf")), Device::Cpu, Precision::Fp32).unwrap();
    let head = ScalarHead::new(
        reward_model.vs.root() / "score",
        reward_model.decoder.config().hidden_size,
    );
    tch::manual_seed(9);
    tch::no_grad(|| {
        for (name, mut var) in reward_model.vs.variables() {
            if name.starts_with("score") {
                var.copy_(&(var.randn_like() * 0.1));
            }
        }
    });
    reward_model.save(&at("rm")).unwrap();
    let last = (mask.sum_dim_intlist(1, false, tch::Kind::Int64) - 1).unsqueeze(1);
    let our_scores = tch::no_grad(|| {
        head.per_token(&reward_model.decoder.forward_hidden_causal(ids))
            .gather(1, &last, false)
            .squeeze_dim(1)
    });

    // Saved, and with random LoRA adapters on every projection saved as PEFT.
    model.save(&at("saved")).unwrap();
    let lora = LoraConfig::with_rank(4, None);
    let adapted = model.with_lora(&lora, 3).unwrap();
    tch::manual_seed(5);
    tch::no_grad(|| {
        for (name, mut var) in adapted.trainable().variables() {
            if name.contains("lora_B") {
                var.copy_(&(var.randn_like() * 0.05));
            }
        }
    });
    adapted.save_adapter(&at("adapter")).unwrap();
    let our_adapted = logits(&adapted, ids);
    assert!(
        max_difference_unpadded(&our_adapted, &ours, mask) > 1e-3,
        "{kind}: the adapter changes nothing"
    );
    run(
        python,
        CHECK,
        &[
            &at("hf"),
            &at("saved"),
            &at("adapter"),
            Path::new(family),
            &at("rm"),
            &at("ref.safetensors"),
            &at("check.safetensors"),
        ],
        &format!("transformers and peft on prefloop's {kind}"),
    );
    let check = read_tensors(&at("check.safetensors"));
    let diff = max_difference_unpadded(&check["saved"], &reference["logits"], mask);
    eprintln!("{kind}: saved, in transformers: max |Δlogit| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "{kind}: saved directory, max |Δlogit| = {diff}"
    );
    let diff = (&check["rm"] - &our_scores).abs().max().double_value(&[]);
    eprintln!("{kind}: reward model in transformers: max |Δscore| = {diff:e}");
    assert!(diff <= 1e-4, "{kind}: reward model, max |Δscore| = {diff}");
    let diff = max_difference_unpadded(&check["peft"], &our_adapted, mask);
    eprintln!("{kind}: LoRA, prefloop vs peft: max |Δlogit| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "{kind}: LoRA adapter in peft, max |Δlogit| = {diff}"
    );
}

#[test]
fn qwen3_matches_transformers_and_peft() {
    let Some(python) = venv_python(&["transformers", "peft"]) else {
        return;
    };
    check_family(&python, "qwen3", "Qwen3");
    check_family(&python, "qwen3-bias-sliding", "Qwen3");
}

#[test]
fn smollm3_matches_transformers_and_peft() {
    let Some(python) = venv_python(&["transformers", "peft"]) else {
        return;
    };
    check_family(&python, "smollm3", "SmolLM3");
}

#[test]
fn gemma2_and_gemma3_match_transformers_and_peft() {
    let Some(python) = venv_python(&["transformers", "peft"]) else {
        return;
    };
    check_family(&python, "gemma2", "Gemma2");
    check_family(&python, "gemma3", "Gemma3");
}

#[test]
fn phi3_matches_transformers_and_peft() {
    let Some(python) = venv_python(&["transformers", "peft"]) else {
        return;
    };
    check_family(&python, "phi3", "Phi3");
}

#[test]
fn qwen3_loads_from_a_gguf_file_as_llama_cpp_writes_it() {
    let (Some(python), true) = (
        venv_python(&["transformers", "gguf"]),
        prefloop_model::default_model_path().exists(),
    ) else {
        eprintln!("skipped: needs the embedded model's GGUF (run scripts/setup)");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let at = |name: &str| scratch.path().join(name);
    run(
        &python,
        GGUF_MAKE,
        &[
            &at("hf"),
            &prefloop_model::default_model_path(),
            &at("qwen3.gguf"),
            &at("ref.safetensors"),
        ],
        "gguf-py writing a Qwen3 GGUF",
    );
    let reference = read_tensors(&at("ref.safetensors"));
    let model = Model::load(Some(&at("qwen3.gguf")), Device::Cpu, Precision::Fp32).unwrap();
    assert_eq!(model.decoder.config().model_type, "qwen3");
    assert_eq!(model.decoder.config().head_dim(), 32);
    let ids = reference["ids"].unsqueeze(0);
    let diff = (logits(&model, &ids).squeeze_dim(0) - &reference["logits"])
        .abs()
        .max()
        .double_value(&[]);
    eprintln!("qwen3 from GGUF: max |Δlogit| vs transformers = {diff:e}");
    assert!(diff <= 1e-4, "qwen3 from GGUF: max |Δlogit| = {diff}");
}

/// Mistral's `sliding_window` was once ignored: with a window of 8, greedy completions
/// differed from transformers' from the first token past the window.
#[test]
fn mistral_sliding_window_holds_in_the_causal_pass_and_decode() {
    let Some(python) = venv_python(&["transformers", "peft"]) else {
        return;
    };
    check_family(&python, "mistral-window", "Mistral");
}
