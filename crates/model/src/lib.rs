//! prefloop-model: the policy. A decoder-only causal LM in tch — one file per family (arch/)
//! over shared blocks (blocks.rs) and one trunk (decoder.rs) — that loads Hugging Face
//! safetensors directories and llama.cpp GGUF files, tokenises with the model's own tokenizer
//! and chat template, and samples with continuous batching over a per-row KV cache.

mod arch;
mod blocks;
mod config;
mod decoder;
mod error;
mod generate;
mod generator;
mod gguf;
mod head;
mod load;
mod lora;
mod precision;
mod save;
mod tokenizer;

pub use arch::model_types;
pub use config::{Config, RopeScaling};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use generate::{
    Batching, GenerateStats, Generation, Request, SamplingParams, collect, generate, generate_each,
};
pub use generator::{Generator, InProcess};
pub use head::ScalarHead;
pub use load::{
    DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, Model, best_device, default_model_path, fill,
};
pub use lora::{FUSED_PROJECTIONS, LoraConfig, PROJECTIONS};
pub use precision::Precision;
pub use save::ADAPTER_DIR;
pub use tokenizer::{Message, Tokenizer};
