//! The decoder trunk every family shares: token embeddings, the family's layers (arch/), the
//! final norm and the language-model head, with LoRA adapters beside the projections. The
//! layers come from the registry (arch/mod.rs) by `model_type`; everything outside this crate
//! talks to a model through [`Decoder`]'s methods, whatever its family.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::arch::{self, Layer};
use crate::blocks::{
    Active, Causal, ENABLE_GQA, LayerKv, Pass, RmsNorm, Rope, SlotCache, Step, key_mask,
};
use crate::config::Config;
use crate::error::Result;
use crate::lora::{Adapters, LoraConfig};

/// The decoder trunk and its language-model head.
#[derive(Debug)]
pub struct Decoder {
    embed_tokens: Tensor,
    layers: Vec<Box<dyn Layer>>,
    norm: RmsNorm,
    /// (V, C); the embedding matrix itself when embeddings are tied.
    lm_head: Tensor,
    rope: Rope,
    /// Gemma 3's sliding layers' RoPE (`rope_local_base_freq`, unscaled).
    local_rope: Option<Rope>,
    /// Embeddings × this (Gemma: √hidden_size).
    embed_scale: Option<f64>,
    /// The layers' distinct attention windows, each needing its mask once per pass.
    windows: Vec<i64>,
    config: Config,
    /// LoRA adapters beside the projections, if attached (lora.rs).
    lora: Option<Adapters>,
    /// Whether forward passes apply the adapters: off, the model is its base.
    adapters_on: AtomicBool,
    /// Whether forward passes are training updates (the adapters' dropout applies).
    training: AtomicBool,
}

impl Decoder {
    /// Declares every parameter of `cfg`'s family in `vs` (zero-filled until loaded): Hugging
    /// Face's names, but for the fused `qkv_proj` and `gate_up_proj` (see
    /// [`crate::blocks::fuse_projections`]).
    pub fn new(vs: &nn::VarStore, cfg: &Config) -> Result<Self> {
        let family = arch::family(cfg)?;
        let root = vs.root();
        let model = &root / "model";
        let (vocab, hidden) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        let embed_tokens =
            (&model / "embed_tokens").var("weight", &[vocab, hidden], Init::Const(0.0));
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            (&root / "lm_head").var("weight", &[vocab, hidden], Init::Const(0.0))
        };
        let layers: Vec<Box<dyn Layer>> = (0..cfg.num_hidden_layers)
            .map(|i| (family.layer)(&model / "layers" / i, cfg, i))
            .collect();
        let mut windows: Vec<i64> = layers.iter().filter_map(|l| l.window()).collect();
        windows.sort_unstable();
        windows.dedup();
        Ok(Self {
            layers,
            windows,
            norm: RmsNorm::new(&model / "norm", hidden, cfg.rms_norm_eps, family.norm),
            rope: Rope::new(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), vs.device())?,
            local_rope: match cfg.rope_local_base_freq {
                Some(theta) => Some(Rope::new(cfg, theta, None, vs.device())?),
                None => None,
            },
            embed_scale: family
                .scaled_embeddings
                .then(|| (cfg.hidden_size as f64).sqrt()),
            embed_tokens,
            lm_head,
            config: cfg.clone(),
            lora: None,
            adapters_on: AtomicBool::new(true),
            training: AtomicBool::new(false),
        })
    }

    /// Declares LoRA adapters (fp32, B zero, so the model is unchanged) in `vs`, a store of
    /// their own, and applies them from the next forward pass.
    pub(crate) fn attach_lora(&mut self, vs: &nn::VarStore, lora: &LoraConfig) {
        self.lora = Some(Adapters::new(vs, &self.config, lora));
    }

    pub(crate) fn adapters(&self) -> Option<&Adapters> {
        self.lora.as_ref()
    }

    /// The LoRA settings of the attached adapters, if any.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|a| &a.config)
    }

    /// Runs `f` with the adapters switched off: the base model, i.e. the starting policy a
    /// LoRA run's reference is, without a second copy of the weights.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.adapters_on.swap(false, Ordering::SeqCst);
        let out = f();
        self.adapters_on.store(was, Ordering::SeqCst);
        out
    }

    /// Runs `f` as a training pass: the adapters' dropout applies (drawn from libtorch's
    /// generator, which the trainer seeds per step).
    pub fn training<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.training.swap(true, Ordering::SeqCst);
        let out = f();
        self.training.store(was, Ordering::SeqCst);
        out
    }

    /// Each layer's adapters as this pass applies them; None for every layer without any.
    fn active(&self) -> Vec<Option<Active<'_>>> {
        let adapters = self
            .lora
            .as_ref()
            .filter(|_| self.adapters_on.load(Ordering::SeqCst));
        match adapters {
            Some(adapters) => {
                let dropout = if self.training.load(Ordering::SeqCst) {
                    adapters.config.dropout
                } else {
                    0.0
                };
                adapters
                    .layers
                    .iter()
                    .map(|layer| {
                        Some(Active {
                            adapters: layer,
                            dropout,
                        })
                    })
                    .collect()
            }
            None => vec![None; self.layers.len()],
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The family this model was loaded as and its shape, in one line (for `doctor --model`).
    pub fn describe(&self) -> String {
        let cfg = &self.config;
        let family = arch::family(cfg).map_or("?", |f| f.causal_lm);
        let sliding: Vec<String> = (0..cfg.num_hidden_layers)
            .filter_map(|i| Some(format!("{i}: {}", cfg.layer_window(i)?)))
            .collect();
        format!(
            "{} ({family}), {} layers, hidden {}, {} query heads and {} key/value \
             heads of {}, vocabulary {}, {} embeddings, sliding windows {}",
            cfg.model_type,
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            cfg.vocab_size,
            if cfg.tie_word_embeddings {
                "tied"
            } else {
                "untied"
            },
            if sliding.is_empty() {
                "none".to_owned()
            } else {
                format!("(layer: keys) {}", sliding.join(", "))
            },
        )
    }

    /// The dtype of the weights; caches, heads and optimiser state that belong to this model
    /// take it from here, never from the device.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// (query heads, key/value heads, head dim).
    fn head_layout(&self) -> (i64, i64, i64) {
        let cfg = &self.config;
        (
            cfg.num_attention_heads as i64,
            cfg.num_kv_heads() as i64,
            cfg.head_dim() as i64,
        )
    }

    /// The LM head's weight, (V, C): the embedding matrix itself when embeddings are tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Final hidden states, (B, T, C), of sequences that are unpadded or right-padded, at
    /// positions 0..T under a plain causal mask: what training batches need. Real tokens never
    /// see the padding after them; padding rows' outputs are junk the losses mask out.
    pub fn forward_hidden_causal(&self, input_ids: &Tensor) -> Tensor {
        self.decoder(input_ids, None)
    }

    /// A prefill of right-padded prompts (B, T): the final hidden states (B, T, C) and every
    /// layer's keys and values, (B, 2 KV, T, D), for the sampler to place in its slots.
    pub(crate) fn prefill(&self, input_ids: &Tensor) -> (Tensor, LayerKv) {
        let mut kv = Vec::with_capacity(self.layers.len());
        let hidden = self.decoder(input_ids, Some(&mut kv));
        (hidden, kv)
    }

    /// Embedding, decoder layers and final norm, causal at positions 0..T.
    fn decoder(&self, input_ids: &Tensor, mut kv: Option<&mut LayerKv>) -> Tensor {
        let (b, t) = input_ids.size2().expect("(B, T)");
        let at = Causal::new(
            (&self.rope, self.local_rope.as_ref()),
            b,
            t,
            &self.windows,
            self.kind(),
            input_ids.device(),
        );
        let mut x = self.embed(input_ids); // (B, T, C)
        for (layer, lora) in self.layers.iter().zip(self.active()) {
            let pass = Pass::Causal {
                at: &at,
                kv: kv.as_deref_mut(),
            };
            x = layer.forward(&x, pass, lora);
        }
        self.norm.forward(&x)
    }

    /// The token embeddings of `ids`, scaled where the family scales them (by √hidden rounded
    /// to the model's dtype, as transformers multiplies).
    fn embed(&self, ids: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        match self.embed_scale {
            Some(scale) => x * Tensor::from(scale).to_kind(self.kind()),
            None => x,
        }
    }

    /// One decode step: `tokens` (S,) at positions `lens` (S,), each row's token written into
    /// its slot at column lens[r] and attending to columns 0..=lens[r] (the last `window` of
    /// them in a windowed layer); `width` > every lens[r] bounds the columns read. Returns the
    /// final hidden states, (S, C).
    pub(crate) fn decode_step(
        &self,
        tokens: &Tensor,
        lens: &Tensor,
        width: i64,
        cache: &mut SlotCache,
    ) -> Tensor {
        let s = tokens.size()[0];
        let (h, g, d) = self.head_layout();
        let kind = self.kind();
        let rope = self.rope.decode_tables(lens, h + g, g, kind);
        let local = self
            .local_rope
            .as_ref()
            .map(|local| local.decode_tables(lens, h + g, g, kind));
        let step = Step {
            at: lens.view([s, 1, 1, 1]).expand([s, 2 * g, 1, d], false),
            mask: key_mask(lens, width, None, kind),
            windows: self
                .windows
                .iter()
                .map(|&w| (w, key_mask(lens, width, Some(w), kind)))
                .collect(),
            width,
            rope,
            local,
        };
        let mut x = self.embed(tokens); // (S, C)
        let layers = self.layers.iter().zip(self.active());
        for ((layer, lora), cache) in layers.zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, Pass::Decode { step: &step, cache }, lora);
        }
        self.norm.forward(&x)
    }

    /// The attention kernel libtorch picks (`_fused_sdp_choice`, named as torch's
    /// `SDPBackend`) for the training forward's causal attention over `len` positions.
    pub fn causal_attention_backend(&self, batch: i64, len: i64) -> String {
        let (h, g, d) = self.head_layout();
        let options = (self.kind(), self.embed_tokens.device());
        let q = Tensor::zeros([batch, h, len, d], options);
        let k = Tensor::zeros([batch, g, len, d], options);
        let choice = Tensor::internal_fused_sdp_choice(
            &q,
            &k,
            &k,
            None::<&Tensor>,
            0.0,
            true,
            None,
            ENABLE_GQA,
        );
        backend_name(choice)
    }

    /// The kernel libtorch picks for a decode step's attention: the folded query groups
    /// against `keys` cached keys under the key mask, as [`Decoder::decode_step`] calls it.
    pub fn decode_attention_backend(&self, batch: i64, keys: i64) -> String {
        let (h, g, d) = self.head_layout();
        let options = (self.kind(), self.embed_tokens.device());
        let q = Tensor::zeros([batch, g, h / g, d], options);
        let k = Tensor::zeros([batch, g, keys, d], options);
        let lens = Tensor::full([batch], keys - 1, (Kind::Int64, options.1));
        let mask = key_mask(&lens, keys, None, self.kind());
        let choice =
            Tensor::internal_fused_sdp_choice(&q, &k, &k, Some(&mask), 0.0, false, None, false);
        backend_name(choice)
    }

    /// Logits, (B, T, V), of unpadded sequences (B, T): positions 0..T, every token valid.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.logits(&self.forward_hidden_causal(input_ids))
    }

    /// Logits, (…, V), of hidden states (…, C), soft-capped where the family caps them (Gemma
    /// 2: cap · tanh(logits / cap)).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = hidden.matmul(&self.lm_head.tr());
        match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }
}

fn backend_name(choice: i64) -> String {
    match choice {
        0 => "math".into(),
        1 => "flash_attention".into(),
        2 => "efficient_attention".into(),
        3 => "cudnn_attention".into(),
        4 => "overrideable".into(),
        other => format!("error ({other})"),
    }
}
