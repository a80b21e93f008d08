//! Qwen3 dense (0.6B–32B): Llama's layer (llama.rs) with an RMSNorm over each query and key
//! head before RoPE (`q_norm`, `k_norm`, (head_dim,) each), an explicit `head_dim` (0.6B: 16
//! heads × 128 over a hidden size of 1024), no q/k/v bias, tied embeddings on the small sizes.
//! Qwen3-MoE (`qwen3_moe`) is another `model_type` and is not this file.

use tch::nn;

use super::llama::DecoderLayer;
use super::{Family, Layer};
use crate::blocks::{AttentionOptions, Norm};
use crate::config::Config;

fn layer(p: nn::Path, cfg: &Config, i: usize) -> Box<dyn Layer> {
    let attention = AttentionOptions {
        qk_norm: Some(Norm::Plain),
        ..AttentionOptions::for_layer(cfg, i)
    };
    Box::new(DecoderLayer::new(p, cfg, attention))
}

/// Qwen3's config.json always names `head_dim` (it is not hidden / heads on most sizes).
fn check(cfg: &Config) -> Result<(), String> {
    match cfg.head_dim {
        Some(_) => Ok(()),
        None => Err("head_dim: Qwen3 configs name it; this one does not".into()),
    }
}

pub(super) const QWEN3: Family = Family {
    model_type: "qwen3",
    causal_lm: "Qwen3ForCausalLM",
    classifier: "Qwen3ForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: false,
    fused_checkpoint: false,
};
