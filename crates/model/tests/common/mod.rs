//! What the model crate's integration tests share: the embedded default (skipped with a
//! message when scripts/setup has not installed it), chat-templated requests, and small random
//! models with its tokenizer.

#![allow(dead_code)] // each test binary uses its own share of these

use std::path::{Path, PathBuf};
use std::process::Command;

use prefloop_model::{Config, Decoder, Model, Precision, Request, Tokenizer, default_model_path};
use tch::{Device, Tensor, nn::VarStore};

pub fn embedded() -> Option<Model> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "skipped: {} is not installed (run scripts/setup)",
            path.display()
        );
        return None;
    }
    Some(Model::load(None, Device::Cpu, Precision::Fp32).expect("the embedded default loads"))
}

pub fn request(model: &Model, user: &str, seed: u64) -> Request {
    let text = model.tokenizer.apply_chat_template(user).unwrap();
    Request {
        prompt: model.tokenizer.encode(&text).unwrap(),
        seed,
    }
}

/// A SmolLM2-shaped config two layers deep and 64 wide.
pub fn smollm_config(vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": true, "eos_token_id": 2
    })
}

/// Saves at `dir` a model of `config`'s shape with random weights (seeded; norms near 1) and
/// the embedded model's tokenizer, as a Hugging Face directory.
pub fn random_model_dir(config: serde_json::Value, tokenizer: &Tokenizer, seed: i64, dir: &Path) {
    let config: Config = serde_json::from_value(config).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let decoder = Decoder::new(&vs, &config).unwrap();
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let noise = var.randn_like();
            if name.contains("norm") {
                var.copy_(&(noise * 0.1 + 1.0));
            } else {
                var.copy_(&(noise * 0.05));
            }
        }
    });
    let model = Model {
        vs,
        decoder,
        tokenizer: tokenizer.clone(),
        source: dir.to_owned(),
        adapters: None,
    };
    model.save(dir).unwrap();
}

/// The project venv's python if it has every one of `modules`, else None with a message.
pub fn venv_python(modules: &[&str]) -> Option<PathBuf> {
    let Some(python) = std::env::var_os("PREFLOOP_PYTHON").map(PathBuf::from) else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set (source scripts/env.sh)");
        return None;
    };
    let imports = format!("import {}", modules.join(", "));
    let found = Command::new(&python)
        .args(["-c", &imports])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: the venv lacks one of {modules:?} (run scripts/setup)");
        return None;
    }
    Some(python)
}

/// Tensors by name from a safetensors file.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}
