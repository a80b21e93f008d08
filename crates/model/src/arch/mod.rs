//! The families prefloop runs, keyed by Hugging Face's `model_type` (a loader registry, as in
//! mistral.rs): each names its transformers classes, says which settings it cannot honour, and
//! builds its decoder layers from the shared blocks (blocks.rs). A new family is a file here and
//! a line in [`FAMILIES`].

mod llama;
mod qwen3;

use std::fmt::Debug;

use tch::{Tensor, nn};

use crate::blocks::{Active, Pass};
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
    /// transformers' class prefix (`{name}ForCausalLM`, `{name}ForSequenceClassification`).
    pub name: &'static str,
    /// Refuses a setting the family's layers do not implement, naming the field and value.
    pub check: fn(&Config) -> std::result::Result<(), String>,
    /// Declares layer `i` under `p`.
    pub layer: fn(nn::Path, &Config, usize) -> Box<dyn Layer>,
}

const FAMILIES: [&Family; 4] = [&llama::LLAMA, &llama::MISTRAL, &llama::QWEN2, &qwen3::QWEN3];

/// The family of `cfg.model_type`.
pub(crate) fn family(cfg: &Config) -> Result<&'static Family> {
    FAMILIES
        .into_iter()
        .find(|f| f.model_type == cfg.model_type)
        .ok_or_else(|| ModelError::UnknownArchitecture {
            model_type: cfg.model_type.clone(),
            known: model_types().join(", "),
        })
}

/// Every `model_type` prefloop loads.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}
