//! Llama and the families that share its layer: Llama 2/3 and SmolLM2, Mistral (a sliding
//! window on every layer when `sliding_window` is set), Qwen2 and Qwen2.5 (q/k/v bias; sliding
//! layers when `use_sliding_window`). Pre-norm residual blocks: RMSNorm → attention → add,
//! RMSNorm → SwiGLU MLP → add.

use tch::{Tensor, nn};

use super::{Family, Layer};
use crate::blocks::{Active, Attention, AttentionOptions, Mlp, Norm, Pass, RmsNorm};
use crate::config::Config;

#[derive(Debug)]
pub(super) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// A layer of `cfg` under `p` with `attention` (Qwen3 norms each head, SmolLM3 leaves some
    /// unrotated).
    pub(super) fn new(p: nn::Path, cfg: &Config, attention: AttentionOptions) -> Self {
        let hidden = cfg.hidden_size as i64;
        Self {
            input_layernorm: RmsNorm::new(
                &p / "input_layernorm",
                hidden,
                cfg.rms_norm_eps,
                Norm::Plain,
            ),
            self_attn: Attention::new(&p / "self_attn", cfg, attention),
            post_attention_layernorm: RmsNorm::new(
                &p / "post_attention_layernorm",
                hidden,
                cfg.rms_norm_eps,
                Norm::Plain,
            ),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }
}

impl Layer for DecoderLayer {
    fn forward(&self, x: &Tensor, pass: Pass<'_>, lora: Option<Active<'_>>) -> Tensor {
        // x + attention(norm(x)), then x + mlp(norm(x)).
        let normed = self.input_layernorm.forward(x);
        let x = self.self_attn.forward(&normed, pass, lora).plus(x);
        let normed = self.post_attention_layernorm.forward(&x);
        self.mlp.forward(&normed, lora).plus(&x)
    }

    fn window(&self) -> Option<i64> {
        self.self_attn.window()
    }
}

fn layer(p: nn::Path, cfg: &Config, i: usize) -> Box<dyn Layer> {
    Box::new(DecoderLayer::new(
        p,
        cfg,
        AttentionOptions::for_layer(cfg, i),
    ))
}

/// Nothing beyond what every family checks (config.rs).
fn check(_: &Config) -> Result<(), String> {
    Ok(())
}

pub(super) const LLAMA: Family = Family {
    model_type: "llama",
    causal_lm: "LlamaForCausalLM",
    classifier: "LlamaForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: false,
    fused_checkpoint: false,
};

pub(super) const MISTRAL: Family = Family {
    model_type: "mistral",
    causal_lm: "MistralForCausalLM",
    classifier: "MistralForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: false,
    fused_checkpoint: false,
};

pub(super) const QWEN2: Family = Family {
    model_type: "qwen2",
    causal_lm: "Qwen2ForCausalLM",
    classifier: "Qwen2ForSequenceClassification",
    check,
    layer,
    norm: Norm::Plain,
    scaled_embeddings: false,
    tie_word_embeddings: false,
    fused_checkpoint: false,
};
