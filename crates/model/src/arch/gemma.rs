//! Gemma 2 and Gemma 3 (text; `gemma3_text`, Gemma-3-1B and the language model of the larger
//! ones): four RMSNorms per layer, each scaling by 1 + w in fp32 — around the attention and
//! around the MLP, block outputs normalised before the residual add —, GeGLU (tanh GELU),
//! embeddings × √hidden, scores scaled by 1/√`query_pre_attn_scalar`, and sliding-window layers
//! beside global ones (`layer_types`: Gemma 2 alternates, Gemma 3 has one global layer in six).
//! Gemma 2 soft-caps attention scores and the final logits; Gemma 3 norms each query and key
//! head and rotates its sliding layers by a RoPE of their own base (`rope_local_base_freq`).

use tch::{Tensor, nn};

use super::{Family, Layer};
use crate::blocks::{Active, Attention, AttentionOptions, Mlp, Norm, Pass, RmsNorm, Rotation};
use crate::config::Config;

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(p: nn::Path, cfg: &Config, i: usize) -> Self {
        let gemma3 = cfg.model_type == "gemma3_text";
        let window = cfg.layer_window(i);
        let attention = AttentionOptions {
            qk_norm: gemma3.then_some(Norm::UnitOffset),
            window,
            rope: if gemma3 && window.is_some() {
                Rotation::Local
            } else {
                Rotation::Global
            },
            scale: cfg.query_pre_attn_scalar.map(|s| 1.0 / s.sqrt()),
            softcap: cfg.attn_logit_softcapping,
        };
        let norm = |name: &str| {
            RmsNorm::new(
                &p / name,
                cfg.hidden_size as i64,
                cfg.rms_norm_eps,
                Norm::UnitOffset,
            )
        };
        Self {
            input_layernorm: norm("input_layernorm"),
            self_attn: Attention::new(&p / "self_attn", cfg, attention),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            mlp: Mlp::new(&p / "mlp", cfg),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
        }
    }
}

impl Layer for DecoderLayer {
    fn forward(&self, x: &Tensor, pass: Pass<'_>, lora: Option<Active<'_>>) -> Tensor {
        // x + norm(attention(norm(x))), then x + norm(mlp(norm(x))).
        let normed = self.input_layernorm.forward(x);
        let h = self.self_attn.forward(&normed, pass, lora).apply();
        let x = x + self.post_attention_layernorm.forward(&h);
        let normed = self.pre_feedforward_layernorm.forward(&x);
        let h = self.mlp.forward(&normed, lora).apply();
        &x + self.post_feedforward_layernorm.forward(&h)
    }

    fn window(&self) -> Option<i64> {
        self.self_attn.window()
    }
}

fn layer(p: nn::Path, cfg: &Config, i: usize) -> Box<dyn Layer> {
    Box::new(DecoderLayer::new(p, cfg, i))
}

/// Gemma's configs name `query_pre_attn_scalar` and `head_dim` (256 on every size, not
/// hidden / heads); Gemma 3's need the local RoPE base.
fn check(cfg: &Config) -> Result<(), String> {
    if cfg.query_pre_attn_scalar.is_none() {
        return Err("query_pre_attn_scalar: Gemma configs name it; this one does not".into());
    }
    if cfg.head_dim.is_none() {
        return Err("head_dim: Gemma configs name it; this one does not".into());
    }
    if cfg.model_type == "gemma3_text" && cfg.rope_local_base_freq.is_none() {
        return Err("rope_local_base_freq: Gemma 3 configs name it; this one does not".into());
    }
    Ok(())
}

pub(super) const GEMMA2: Family = Family {
    model_type: "gemma2",
    causal_lm: "Gemma2ForCausalLM",
    classifier: "Gemma2ForSequenceClassification",
    check,
    layer,
    norm: Norm::UnitOffset,
    scaled_embeddings: true,
    tie_word_embeddings: true,
    fused_checkpoint: false,
};

pub(super) const GEMMA3: Family = Family {
    model_type: "gemma3_text",
    causal_lm: "Gemma3ForCausalLM",
    classifier: "Gemma3TextForSequenceClassification",
    check,
    layer,
    norm: Norm::UnitOffset,
    scaled_embeddings: true,
    tie_word_embeddings: true,
    fused_checkpoint: false,
};
