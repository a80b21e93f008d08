//! The model's hyper-parameters, as in a Hugging Face `config.json` (every family in arch/), or
//! read from GGUF metadata into the same struct.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `rope_scaling` of config.json. Llama 3.1's frequency-dependent scaling and plain linear
/// position interpolation are supported; other kinds are rejected when the model is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// Positions whose RoPE tables a model may have (2^21, past every released context length).
const MAX_POSITIONS: usize = 1 << 21;

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The family (arch/mod.rs): "llama", "mistral", "qwen2", "qwen3".
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: fewer key/value heads than query heads. Defaults to
    /// `num_attention_heads` (plain multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 has it; Llama does not).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// The keys a query sees in a sliding-window layer, itself included: Mistral's on every
    /// layer, Qwen's on the layers `layer_types` names when `use_sliding_window`. Written even
    /// when null: transformers' Mistral defaults it to 4096.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether `sliding_window` applies at all (transformers' default: no).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3 without `layer_types`: the layers from this one on slide (default 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Each layer's attention, "full_attention" or "sliding_attention" (transformers ≥ 4.53).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Qwen2's config.json leaves the q/k/v bias implicit.
        if config.model_type == "qwen2" {
            config.attention_bias = true;
        }
        config.check().map_err(|e| ModelError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// The family exists and can honour every setting: an error names the field and value.
    pub fn check(&self) -> Result<()> {
        let family = crate::arch::family(self)?;
        let refuse = |message: String| ModelError::Unsupported {
            model_type: self.model_type.clone(),
            message,
        };
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(refuse(format!(
                    "layer_types lists {} layers, num_hidden_layers is {}",
                    types.len(),
                    self.num_hidden_layers
                )));
            }
            if let Some((i, kind)) = types
                .iter()
                .enumerate()
                .find(|(_, t)| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return Err(refuse(format!(
                    "layer_types[{i}] `{kind}` is not supported (full_attention, sliding_attention)"
                )));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(refuse("sliding_window 0 sees no key".into()));
        }
        (family.check)(self).map_err(refuse)
    }

    /// Layer `layer`'s attention window (the keys a query sees, itself included), None for
    /// full attention, as transformers reads the config: `layer_types` where it lists them,
    /// else Mistral's `sliding_window` on every layer, else Qwen's sliding layers from
    /// `max_window_layers` on. Qwen's window applies only with `use_sliding_window`; Llama has
    /// none.
    pub fn layer_window(&self, layer: usize) -> Option<i64> {
        let window = self.sliding_window? as i64;
        let qwen = matches!(self.model_type.as_str(), "qwen2" | "qwen3");
        let sliding = match &self.layer_types {
            _ if self.model_type == "llama" => false,
            _ if qwen && !self.use_sliding_window.unwrap_or(false) => false,
            Some(types) => types[layer] == "sliding_attention",
            None if qwen => layer >= self.max_window_layers.unwrap_or(28),
            None => true,
        };
        sliding.then_some(window)
    }

    /// The sizes make a model: none zero, heads dividing evenly, and a model no bigger than
    /// the `present` parameters its weights hold (so a damaged file is refused before the
    /// model is allocated). The message names the field.
    pub fn check_sizes(&self, present: u64) -> std::result::Result<(), String> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("{field} is 0"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is not a positive even number",
                self.head_dim()
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err("num_attention_heads is not a multiple of num_key_value_heads".into());
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "max_position_embeddings {} is past the {MAX_POSITIONS} prefloop supports",
                self.max_position_embeddings
            ));
        }
        match self.parameter_count() {
            Some(declared) if declared <= present => Ok(()),
            declared => Err(format!(
                "the sizes declare {} parameters, the weights hold {present}",
                declared.map_or("more than 2^64".into(), |n| n.to_string())
            )),
        }
    }

    /// Parameters of the model these sizes describe (None past u64).
    pub fn parameter_count(&self) -> Option<u64> {
        let n = |v: usize| v as u64;
        let (hidden, head) = (n(self.hidden_size), n(self.head_dim()));
        let q = n(self.num_attention_heads).checked_mul(head)?;
        let kv = n(self.num_kv_heads()).checked_mul(head)?;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let qk_norms = if self.model_type == "qwen3" {
            2 * head
        } else {
            0
        };
        let attention = hidden.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = hidden
            .checked_mul(n(self.intermediate_size))?
            .checked_mul(3)?;
        let layer = attention
            .checked_add(mlp)?
            .checked_add(bias + qk_norms + 2 * hidden)?;
        let embeddings = n(self.vocab_size).checked_mul(hidden)?;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        n(self.num_hidden_layers)
            .checked_mul(layer)?
            .checked_add(embeddings.checked_mul(heads)?)?
            .checked_add(hidden)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Bias on o_proj: Llama's and Qwen3's `attention_bias` puts one on all four attention
    /// projections, where Qwen2's q/k/v bias leaves o_proj without.
    pub fn output_bias(&self) -> bool {
        self.attention_bias && matches!(self.model_type.as_str(), "llama" | "qwen3")
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Every end-of-sequence id the config names (a number or a list of them).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(token_ids)
            .unwrap_or_default()
    }
}

/// The ids of an `eos_token_id` field (config.json, generation_config.json): a number or a
/// list of them.
pub(crate) fn token_ids(value: &serde_json::Value) -> Vec<u32> {
    match value {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        serde_json::Value::Array(ids) => ids
            .iter()
            .filter_map(|v| v.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}
