//! prefloop-model: the policy. A Llama-family causal LM in tch that loads Hugging Face
//! safetensors directories and llama.cpp GGUF files, tokenises with the model's own tokenizer
//! and chat template, and samples with continuous batching over a per-row KV cache.

mod config;
mod error;
mod generate;
mod gguf;
mod head;
mod llama;
mod load;
mod lora;
mod precision;
mod save;
mod tokenizer;

pub use config::{Config, RopeScaling};
pub use error::{ModelError, Result};
pub use generate::{
    Batching, GenerateStats, Generation, Request, SamplingParams, collect, generate, generate_each,
};
pub use head::ScalarHead;
pub use llama::Llama;
pub use load::{
    DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, Model, best_device, default_model_path, fill,
};
pub use lora::{LoraConfig, PROJECTIONS};
pub use precision::Precision;
pub use save::ADAPTER_DIR;
pub use tokenizer::Tokenizer;
