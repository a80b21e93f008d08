//! SmolLM3 (3B, the successor of the embedded default's family): Llama's layer (llama.rs) with
//! NoPE layers — every `no_rope_layer_interval`-th layer (4 in the release) attends without
//! rotary position embeddings (`no_rope_layers[i] == 0`) — and Qwen's optional sliding window.

use tch::nn;

use super::llama::DecoderLayer;
use super::{Family, Layer};
use crate::blocks::{AttentionOptions, Norm};
use crate::config::Config;

fn layer(p: nn::Path, cfg: &Config, i: usize) -> Box<dyn Layer> {
    Box::new(DecoderLayer::new(
        p,
        cfg,
        AttentionOptions::for_layer(cfg, i),
    ))
}

/// `no_rope_layers`, where given, names every layer.
fn check(cfg: &Config) -> Result<(), String> {
    if cfg.no_rope_layer_interval == Some(0) {
        return Err("no_rope_layer_interval 0 is not a layer interval".into());
    }
    match &cfg.no_rope_layers {
        Some(flags) if flags.len() != cfg.num_hidden_layers => Err(format!(
            "no_rope_layers lists {} layers, num_hidden_layers is {}",
            flags.len(),
            cfg.num_hidden_layers
        )),
        _ => Ok(()),
    }
}

pub(super) const SMOLLM3: Family = Family {
    model_type: "smollm3",
    causal_lm: "SmolLM3ForCausalLM",
    classifier: "SmolLM3ForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: true,
    fused_checkpoint: false,
};
