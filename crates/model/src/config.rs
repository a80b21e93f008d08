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
    /// Absent in `{"rope_type": "default"}`.
    #[serde(default = "unit_factor")]
    pub factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn unit_factor() -> f64 {
    1.0
}

/// Positions whose RoPE tables a model may have (2^21, past every released context length).
const MAX_POSITIONS: usize = 1 << 21;

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// `Config::default()` is no model (every size 0); it fills the fields a literal leaves out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The family (arch/mod.rs): "llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2",
    /// "gemma3_text", "phi3".
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
    /// Where config.json names it (Qwen3, Gemma); else hidden_size / num_attention_heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Kept as given: transformers' default for some families (SmolLM3's 128004) lies outside
    /// a small vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
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
    /// SmolLM3: 1 where layer i rotates queries and keys, 0 for a NoPE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layers: Option<Vec<u8>>,
    /// SmolLM3 without `no_rope_layers`: every this-many-th layer is NoPE (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layer_interval: Option<usize>,
    /// Bias on the MLP's projections (Llama's and SmolLM3's option): refused, no released
    /// checkpoint of these families sets it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    /// The MLP's activation: "silu" (Llama's name for the field) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// … or "gelu_pytorch_tanh" (Gemma's name for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores scaled by 1/√this rather than 1/√head_dim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores capped to ±this by tanh. Written even when null, as
    /// transformers' Gemma 2 defaults it to 50.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits capped to ±this by tanh (written even when null: its default is 30).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding layers (the global ones use `rope_theta` and
    /// `rope_scaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Phi: the share of each head that rotates (refused unless 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Gemma 3 without `layer_types`: every this-many-th layer is global (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = |message: String| ModelError::Config {
            path: path.to_owned(),
            message,
        };
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut config: Self =
            serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        // Qwen2's config.json leaves the q/k/v bias implicit.
        if config.model_type == "qwen2" {
            config.attention_bias = true;
        }
        config.check().map_err(|e| bad(e.to_string()))?;
        // transformers leaves `tie_word_embeddings` out of config.json where it is true (its
        // base class's default), so an absent one is the family's own default.
        if raw.get("tie_word_embeddings").is_none() {
            config.tie_word_embeddings = crate::arch::family(&config)?.tie_word_embeddings;
        }
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
        if let Some(scaling) = &self.rope_scaling
            && !matches!(scaling.rope_type.as_str(), "default" | "linear" | "llama3")
        {
            return Err(refuse(format!(
                "rope_scaling.rope_type `{}` is not supported (default, linear, llama3)",
                scaling.rope_type
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(refuse("sliding_window 0 sees no key".into()));
        }
        if self.mlp_bias {
            return Err(refuse("mlp_bias true is not supported".into()));
        }
        if !matches!(self.activation(), "silu" | "gelu_pytorch_tanh") {
            return Err(refuse(format!(
                "hidden_act `{}` is not supported (silu, gelu_pytorch_tanh)",
                self.activation()
            )));
        }
        for (field, value) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if value.is_some_and(|v| v.is_nan() || v <= 0.0) {
                return Err(refuse(format!("{field} must be positive")));
            }
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
        let gated = matches!(self.model_type.as_str(), "qwen2" | "qwen3" | "smollm3");
        let sliding = match &self.layer_types {
            _ if self.model_type == "llama" => false,
            _ if gated && !self.use_sliding_window.unwrap_or(false) => false,
            Some(types) => types[layer] == "sliding_attention",
            // SmolLM3's NoPE layers slide.
            None if self.model_type == "smollm3" => !self.layer_uses_rope(layer),
            // Gemma 2 alternates, sliding first; Gemma 3 makes every 6th layer global.
            None if self.model_type == "gemma2" => layer.is_multiple_of(2),
            None if self.model_type == "gemma3_text" => {
                !(layer + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6))
            }
            None if gated => layer >= self.max_window_layers.unwrap_or(28),
            None => true,
        };
        sliding.then_some(window)
    }

    /// The MLP's activation as transformers names it (`hidden_activation`, else `hidden_act`,
    /// else SiLU).
    pub fn activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or("silu")
    }

    /// Whether layer `layer` rotates its queries and keys: all but SmolLM3's NoPE layers.
    pub fn layer_uses_rope(&self, layer: usize) -> bool {
        if self.model_type != "smollm3" {
            return true;
        }
        match &self.no_rope_layers {
            Some(flags) => flags[layer] != 0,
            None => !(layer + 1).is_multiple_of(self.no_rope_layer_interval.unwrap_or(4)),
        }
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
        let bias = match (self.attention_bias, self.output_bias()) {
            (false, _) => 0,
            (true, false) => q + 2 * kv,
            (true, true) => q + 2 * kv + hidden,
        };
        let qk_norms = match self.model_type.as_str() {
            "qwen3" | "gemma3_text" => 2 * head,
            _ => 0,
        };
        let norms = match self.model_type.as_str() {
            "gemma2" | "gemma3_text" => 4 * hidden,
            _ => 2 * hidden,
        };
        let attention = hidden.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = hidden
            .checked_mul(n(self.intermediate_size))?
            .checked_mul(3)?;
        let layer = attention
            .checked_add(mlp)?
            .checked_add(bias + qk_norms + norms)?;
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

    /// Bias on o_proj: Llama's, Qwen3's and SmolLM3's `attention_bias` puts one on all four attention
    /// projections, where Qwen2's q/k/v bias leaves o_proj without.
    pub fn output_bias(&self) -> bool {
        self.attention_bias && matches!(self.model_type.as_str(), "llama" | "qwen3" | "smollm3")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny config of `model_type` with `extra` fields.
    fn config(model_type: &str, extra: serde_json::Value) -> Config {
        let mut value = serde_json::json!({
            "model_type": model_type, "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 64,
        });
        for (key, v) in extra.as_object().unwrap() {
            value[key] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn refusal(model_type: &str, extra: serde_json::Value) -> String {
        config(model_type, extra).check().unwrap_err().to_string()
    }

    #[test]
    fn settings_no_family_implements_are_refused_naming_the_field_and_value() {
        let cases = [
            (
                refusal(
                    "phi3",
                    serde_json::json!({"rope_scaling": {"type": "longrope", "factor": 32.0}}),
                ),
                "rope_scaling.rope_type `longrope` is not supported",
            ),
            (
                refusal("phi3", serde_json::json!({"partial_rotary_factor": 0.75})),
                "partial_rotary_factor 0.75 is not supported",
            ),
            (
                refusal("qwen3", serde_json::json!({})),
                "head_dim: Qwen3 configs name it",
            ),
            (
                refusal(
                    "gemma2",
                    serde_json::json!({"head_dim": 8, "query_pre_attn_scalar": 8,
                        "layer_types": ["sliding_attention", "chunked_attention"]}),
                ),
                "layer_types[1] `chunked_attention` is not supported",
            ),
            (
                refusal("llama", serde_json::json!({"mlp_bias": true})),
                "mlp_bias true is not supported",
            ),
            (
                refusal("llama", serde_json::json!({"hidden_act": "relu"})),
                "hidden_act `relu` is not supported",
            ),
            (
                refusal("gemma3", serde_json::json!({})),
                "Gemma 3's multimodal checkpoints are not supported",
            ),
            (
                refusal("falcon", serde_json::json!({})),
                "unknown architecture `falcon`",
            ),
        ];
        for (error, expected) in cases {
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn each_family_reads_its_sliding_layers_and_rotation_from_its_config() {
        let windows = |c: &Config| (0..4).map(|i| c.layer_window(i)).collect::<Vec<_>>();
        let four = serde_json::json!({"num_hidden_layers": 4, "sliding_window": 8});
        let with = |extra: serde_json::Value| {
            let mut v = four.clone();
            for (key, value) in extra.as_object().unwrap() {
                v[key] = value.clone();
            }
            v
        };
        // Mistral slides everywhere; Llama never; Qwen only with use_sliding_window, from
        // max_window_layers on.
        assert_eq!(windows(&config("mistral", four.clone())), [Some(8); 4]);
        assert_eq!(windows(&config("llama", four.clone())), [None; 4]);
        assert_eq!(windows(&config("qwen2", four.clone())), [None; 4]);
        let qwen = config(
            "qwen2",
            with(serde_json::json!({"use_sliding_window": true, "max_window_layers": 2})),
        );
        assert_eq!(windows(&qwen), [None, None, Some(8), Some(8)]);
        // Gemma 2 alternates, sliding first; Gemma 3 makes every pattern-th layer global.
        assert_eq!(
            windows(&config("gemma2", four.clone())),
            [Some(8), None, Some(8), None]
        );
        let gemma3 = config(
            "gemma3_text",
            with(serde_json::json!({"sliding_window_pattern": 2})),
        );
        assert_eq!(windows(&gemma3), [Some(8), None, Some(8), None]);
        // SmolLM3: every fourth layer is NoPE, and with use_sliding_window the NoPE ones slide.
        let smol = config(
            "smollm3",
            with(serde_json::json!({"use_sliding_window": true})),
        );
        let rope: Vec<bool> = (0..4).map(|i| smol.layer_uses_rope(i)).collect();
        assert_eq!(rope, [true, true, true, false]);
        assert_eq!(windows(&smol), [None, None, None, Some(8)]);
    }
}
