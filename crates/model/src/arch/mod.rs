//! The families prefloop runs, keyed by Hugging Face's `model_type` (a loader registry, as in
//! mistral.rs): each names its transformers classes, says which settings it cannot honour, and
//! builds its decoder layers from the shared blocks (blocks.rs). A new family is a file here and
//! a line in [`FAMILIES`].

mod gemma;
mod llama;
mod phi3;
mod qwen3;
mod smollm3;

use std::fmt::Debug;

use tch::{Tensor, nn};

use crate::blocks::{Active, Norm, Pass};
use crate::config::Config;
use crate::error::{ModelError, Result};

/// One decoder layer of a family.
pub(crate) trait Layer: Debug + Send {
    /// The layer over the residual stream `x`: (B, T, C) in a causal pass, (S, C) in a decode
    /// step; the same shape out.
    fn forward(&self, x: &Tensor, pass: Pass<'_>, lora: Option<Active<'_>>) -> Tensor;

    /// The keys its attention sees, itself included; None for every earlier key.
    fn window(&self) -> Option<i64>;
}

/// A family: how to build it and what to call it.
pub(crate) struct Family {
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// transformers' causal-LM class, written as the saved policy's architecture.
    pub causal_lm: &'static str,
    /// transformers' sequence classifier, written as a saved reward model's or critic's.
    pub classifier: &'static str,
    /// Refuses a setting the family's layers do not implement, naming the field and value.
    pub check: fn(&Config) -> std::result::Result<(), String>,
    /// Declares layer `i` under `p`.
    pub layer: fn(nn::Path, &Config, usize) -> Box<dyn Layer>,
    /// The final norm's kind.
    pub norm: Norm,
    /// Embeddings scaled by √hidden_size (Gemma), in the model's dtype as transformers rounds it.
    pub scaled_embeddings: bool,
    /// `tie_word_embeddings` where config.json leaves it out (transformers' class default).
    pub tie_word_embeddings: bool,
    /// Checkpoints name q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`: Phi-3), so they
    /// are saved fused and LoRA adapts the fused projections.
    pub fused_checkpoint: bool,
}

const FAMILIES: [&Family; 8] = [
    &llama::LLAMA,
    &llama::MISTRAL,
    &llama::QWEN2,
    &qwen3::QWEN3,
    &smollm3::SMOLLM3,
    &gemma::GEMMA2,
    &gemma::GEMMA3,
    &phi3::PHI3,
];

/// Model types users try that are not a family here, with why.
const REFUSED: [(&str, &str); 3] = [
    (
        "gemma3",
        "Gemma 3's multimodal checkpoints are not supported; its text model (`gemma3_text`, e.g. \
         gemma-3-1b) is",
    ),
    (
        "qwen3_moe",
        "mixture-of-experts layers are not supported; Qwen3 dense (`qwen3`) is",
    ),
    (
        "qwen3_5",
        "Qwen3.5's Gated DeltaNet layers are not supported yet",
    ),
];

/// The family of `cfg.model_type`.
pub(crate) fn family(cfg: &Config) -> Result<&'static Family> {
    if let Some((model_type, why)) = REFUSED.iter().find(|(t, _)| *t == cfg.model_type) {
        return Err(ModelError::Unsupported {
            model_type: (*model_type).to_owned(),
            message: (*why).to_owned(),
        });
    }
    FAMILIES
        .into_iter()
        .find(|f| f.model_type == cfg.model_type)
        .ok_or_else(|| ModelError::UnknownArchitecture {
            model_type: cfg.model_type.clone(),
            known: model_types().join(", "),
        })
}

/// Whether `cfg`'s family keeps q/k/v and gate/up fused in its checkpoints.
pub(crate) fn fused_checkpoint(cfg: &Config) -> bool {
    family(cfg).is_ok_and(|f| f.fused_checkpoint)
}

/// Every `model_type` prefloop loads.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}
