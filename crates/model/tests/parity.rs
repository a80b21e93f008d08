//! Parity with an independent implementation: prefloop saves the embedded default as a Hugging
//! Face directory, `transformers` (from the project venv) loads it, and both run the same
//! prompt. Skipped with a message when the venv or the model is not installed.

use std::path::PathBuf;
use std::process::Command;

use prefloop_model::{Model, Request, SamplingParams, default_model_path, generate};
use tch::{Device, Kind, Tensor};

/// The transformers side: token ids of the chat prompt, fp32 logits of the prompt, and a
/// greedy continuation of 64 tokens.
const REFERENCE: &str = r#"
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, user, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
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
    let model = Model::load(None, Device::Cpu).unwrap();
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
    let logits = tch::no_grad(|| model.llama.forward(&input)).squeeze_dim(0);
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
    let reloaded = Model::load(Some(&dir), Device::Cpu).unwrap();
    let again = tch::no_grad(|| reloaded.llama.forward(&input)).squeeze_dim(0);
    let original = tch::no_grad(|| model.llama.forward(&input)).squeeze_dim(0);
    assert_eq!(
        (again - original)
            .abs()
            .max()
            .to_kind(Kind::Float)
            .double_value(&[]),
        0.0
    );
}
