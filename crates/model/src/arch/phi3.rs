//! Phi-3 and Phi-3.5 (mini, medium): Llama's layer (llama.rs) with checkpoints that keep q/k/v
//! and gate/up fused (`qkv_proj`, `gate_up_proj` — the decoder's own layout, so they load and
//! save as they are, and LoRA adapts the fused projections under PEFT's names) and Mistral's
//! sliding window on every layer (Phi-3-mini-4k: 2047). Its 128k variants' `longrope` scaling
//! and Phi-4-mini's partial rotation are refused.

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

/// Phi-3's o_proj and MLP have no bias, and every head dimension rotates.
fn check(cfg: &Config) -> Result<(), String> {
    if cfg.attention_bias {
        return Err("attention_bias true is not Phi-3's layout".into());
    }
    match cfg.partial_rotary_factor {
        Some(factor) if factor != 1.0 => Err(format!(
            "partial_rotary_factor {factor} is not supported (only whole-head rotation)"
        )),
        _ => Ok(()),
    }
}

pub(super) const PHI3: Family = Family {
    model_type: "phi3",
    causal_lm: "Phi3ForCausalLM",
    classifier: "Phi3ForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: false,
    fused_checkpoint: true,
};
