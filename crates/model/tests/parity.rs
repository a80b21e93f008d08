//! Parity with an independent implementation: prefloop saves the embedded default as a Hugging
//! Face directory, `transformers` (from the project venv) loads it, and both run the same
//! prompt. Skipped with a message when the venv or the model is not installed.

use std::path::PathBuf;
use std::process::Command;

use prefloop_model::{Model, Precision, Request, SamplingParams, default_model_path, generate};
use tch::{Device, Kind, Tensor};

/// The transformers side: token ids of the chat prompt, fp32 logits of the prompt, and a
/// greedy continuation of 64 tokens.
const REFERENCE: &str = r#"
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, user, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
    gen = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
save_file({"logits": logits.contiguous(), "ids": ids[0].contiguous(), "generated": gen.contiguous()}, out)
"#;

fn venv_python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("PREFLOOP_PYTHON")?);
    let has_transformers = Command::new(&python)
        .args(["-c", "import transformers"])
        .status()
        .ok()?
        .success();
    has_transformers.then_some(python)
}

#[test]
fn transformers_loads_what_prefloop_saved_and_agrees() {
    let (Some(python), true) = (venv_python(), default_model_path().exists()) else {
        eprintln!(
            "skipped: needs the venv with transformers and the embedded model (run scripts/setup)"
        );
        return;
    };
    let model = Model::load(None, Device::Cpu, Precision::Fp32).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("smollm2");
    model.save(&dir).unwrap();

    let user = "Write a short poem about the ocean and the stars.";
    let out = scratch.path().join("reference.safetensors");
    let status = Command::new(&python)
        .args(["-c", REFERENCE])
        .arg(&dir)
        .arg(user)
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "the transformers reference failed");
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();

    // Same tokens for the same chat prompt.
    let ours = model
        .tokenizer
        .encode(&model.tokenizer.apply_chat_template(user).unwrap())
        .unwrap();
    let theirs: Vec<i64> = Vec::try_from(&reference["ids"]).unwrap();
    assert_eq!(ours.iter().map(|&t| t as i64).collect::<Vec<_>>(), theirs);

    // Logits within 1e-3 at every position.
    let input = Tensor::from_slice(&theirs).unsqueeze(0);
    let logits = tch::no_grad(|| model.decoder.forward(&input)).squeeze_dim(0);
    let diff = (logits - &reference["logits"])
        .abs()
        .max()
        .double_value(&[]);
    eprintln!("max |Δlogit| vs transformers = {diff:e}");
    assert!(diff <= 1e-3, "max |Δlogit| = {diff}");

    // Identical greedy continuations of 64 tokens.
    let greedy = generate(
        &model,
        &[Request {
            prompt: ours,
            seed: 0,
        }],
        &SamplingParams::greedy(64),
    )
    .unwrap();
    let theirs: Vec<i64> = Vec::try_from(&reference["generated"]).unwrap();
    let ours: Vec<i64> = greedy[0].tokens.iter().map(|&t| t as i64).collect();
    assert_eq!(
        ours.len(),
        64,
        "the prompt must not end in EOS within 64 tokens"
    );
    assert_eq!(ours, theirs);

    // And prefloop loads its own saved directory to the same weights.
    let reloaded = Model::load(Some(&dir), Device::Cpu, Precision::Fp32).unwrap();
    let again = tch::no_grad(|| reloaded.decoder.forward(&input)).squeeze_dim(0);
    let original = tch::no_grad(|| model.decoder.forward(&input)).squeeze_dim(0);
    assert_eq!(
        (again - original)
            .abs()
            .max()
            .to_kind(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

/// Tiny random models of the other architectures prefloop loads, built by transformers: Qwen2
/// (q/k/v bias, tied embeddings, rope_theta 1e6), Llama with Llama 3.1's frequency-dependent
/// `rope_scaling` (original context 32, so positions past it exercise every band), and Llama
/// with `attention_bias` (a bias on o_proj too, which was once left out). Biases and
/// norms are randomised too (transformers initialises them to 0 and 1). Writes the model
/// directory and the fp32 logits of `ids`.
const TINY_REFERENCE: &str = r#"
import sys, torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
kind, out, ref = sys.argv[1:]
shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
if kind == "qwen2":
    model = Qwen2ForCausalLM(Qwen2Config(**shape, rope_theta=1e6, tie_word_embeddings=True))
elif kind == "llama-bias":
    model = LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True))
else:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500000.0, rope_scaling=scaling,
                                         tie_word_embeddings=False))
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.5)
        elif "norm" in name:
            p.normal_(1.0, 0.2)
model.eval().save_pretrained(out, safe_serialization=True)
ids = (torch.arange(96) * 7919 % 49152).unsqueeze(0)
with torch.no_grad():
    logits = model(ids).logits[0]
save_file({"logits": logits.contiguous(), "ids": ids[0].contiguous()}, ref)
"#;

#[test]
fn transformers_qwen2_and_llama3_rope_scaling_agree() {
    let (Some(python), true) = (venv_python(), default_model_path().exists()) else {
        eprintln!(
            "skipped: needs the venv with transformers and the embedded model (run scripts/setup)"
        );
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    // The embedded model's tokenizer files, for directories transformers writes without one.
    let base = scratch.path().join("base");
    Model::load(None, Device::Cpu, Precision::Fp32)
        .unwrap()
        .save(&base)
        .unwrap();
    for kind in ["qwen2", "llama3-scaled", "llama-bias"] {
        let (dir, out) = (
            scratch.path().join(kind),
            scratch.path().join(format!("{kind}.safetensors")),
        );
        let status = Command::new(&python)
            .args(["-c", TINY_REFERENCE, kind])
            .arg(&dir)
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "the transformers reference for {kind} failed"
        );
        for entry in std::fs::read_dir(&base).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.starts_with("tokenizer") || name == "special_tokens_map.json" {
                std::fs::copy(&path, dir.join(&name)).unwrap();
            }
        }
        let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        let model = Model::load(Some(&dir), Device::Cpu, Precision::Fp32).unwrap();
        let ids = reference["ids"].unsqueeze(0);
        let logits = tch::no_grad(|| model.decoder.forward(&ids)).squeeze_dim(0);
        let diff = (logits - &reference["logits"])
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{kind}: max |Δlogit| vs transformers = {diff:e}");
        // Agreement is ~3e-7; ignoring the scaling would move these logits by 8e-3 (checked
        // with transformers, rope_scaling None against llama3).
        assert!(diff <= 1e-4, "{kind}: max |Δlogit| = {diff}");
    }
}
