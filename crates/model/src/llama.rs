//! A Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) in tch: RMSNorm, rotary
//! position embeddings, grouped-query attention over a preallocated KV cache, SwiGLU MLP.
//! Parameter names are Hugging Face's, so a saved VarStore is a transformers checkpoint.

use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};

/// Grouped-query attention is handed to SDPA as it is (fewer key/value heads than query
/// heads), never expanded by hand.
const ENABLE_GQA: bool = true;

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[size], Init::Const(1.0)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // As transformers: normalise in f32, cast back, then scale.
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        (x32 * (variance + self.eps).rsqrt()).to_kind(kind) * &self.weight
    }
}

/// cos/sin tables of the rotary embedding, (max_positions, head_dim), in transformers'
/// rotate-half layout.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Config, device: Device) -> Result<Self> {
        let dim = cfg.head_dim() as i64;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        if let Some(scaling) = &cfg.rope_scaling {
            match scaling.rope_type.as_str() {
                "linear" => inv_freq.iter_mut().for_each(|f| *f /= scaling.factor),
                "llama3" => {
                    // Llama 3.1: low frequencies scaled by `factor`, high ones kept, smooth between.
                    let low = scaling.low_freq_factor.unwrap_or(1.0);
                    let high = scaling.high_freq_factor.unwrap_or(4.0);
                    let original = scaling.original_max_position_embeddings.unwrap_or(8192) as f64;
                    let (low_wavelen, high_wavelen) = (original / low, original / high);
                    for f in &mut inv_freq {
                        let wavelen = 2.0 * std::f64::consts::PI / *f;
                        if wavelen > low_wavelen {
                            *f /= scaling.factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (original / wavelen - low) / (high - low);
                            *f = (1.0 - smooth) * *f / scaling.factor + smooth * *f;
                        }
                    }
                }
                other => {
                    return Err(ModelError::Config {
                        path: "config.json".into(),
                        message: format!(
                            "rope_scaling type `{other}` is not supported (linear, llama3)"
                        ),
                    });
                }
            }
        }
        let inv_freq = Tensor::from_slice(&inv_freq).to_kind(Kind::Float);
        let positions = Tensor::arange(
            cfg.max_position_embeddings as i64,
            (Kind::Float, Device::Cpu),
        );
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0); // (P, D/2)
        let emb = Tensor::cat(&[&freqs, &freqs], 1); // (P, D)
        Ok(Self {
            cos: emb.cos().to_device(device),
            sin: emb.sin().to_device(device),
        })
    }

    /// Rotates q or k, (B, H, T, D), at `positions`, (B, T).
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let (b, _, t, d) = x.size4().expect("(B, H, T, D)");
        let flat = positions.flatten(0, 1);
        let cos = self
            .cos
            .index_select(0, &flat)
            .view([b, 1, t, d])
            .to_kind(x.kind());
        let sin = self
            .sin
            .index_select(0, &flat)
            .view([b, 1, t, d])
            .to_kind(x.kind());
        let halves = x.chunk(2, -1);
        let rotated = Tensor::cat(&[&(-&halves[1]), &halves[0]], -1);
        x * cos + rotated * sin
    }
}

/// Keys and values of every layer, preallocated for the whole generation:
/// each (B, n_kv_heads, capacity, head_dim). Steps write into it in place.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Positions filled so far (the same for every row: rows are left-padded).
    len: i64,
}

impl KvCache {
    pub fn new(cfg: &Config, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [
            batch,
            cfg.num_kv_heads() as i64,
            capacity,
            cfg.head_dim() as i64,
        ];
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                (
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                )
            })
            .collect();
        Self { layers, len: 0 }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let (hidden, heads, kv_heads, head_dim) = (
            cfg.hidden_size as i64,
            cfg.num_attention_heads as i64,
            cfg.num_kv_heads() as i64,
            cfg.head_dim() as i64,
        );
        let proj = |name: &str, in_dim: i64, out_dim: i64, bias: bool| {
            let config = nn::LinearConfig {
                ws_init: Init::Const(0.0),
                bs_init: Some(Init::Const(0.0)),
                bias,
            };
            nn::linear(&p / name, in_dim, out_dim, config)
        };
        Self {
            q_proj: proj("q_proj", hidden, heads * head_dim, cfg.attention_bias),
            k_proj: proj("k_proj", hidden, kv_heads * head_dim, cfg.attention_bias),
            v_proj: proj("v_proj", hidden, kv_heads * head_dim, cfg.attention_bias),
            o_proj: proj("o_proj", heads * head_dim, hidden, false),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// x: (B, T, C); positions: (B, T); mask: (B, 1, T, S) true where a query may attend,
    /// S = keys so far. With a cache, the new keys/values are written at its current length.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, C)");
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]).transpose(1, 2);
        let q = rope.apply(&split(self.q_proj.forward(x), self.heads), positions); // (B, H, T, D)
        let k = rope.apply(&split(self.k_proj.forward(x), self.kv_heads), positions); // (B, KV, T, D)
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = match cache {
            Some(((k_cache, v_cache), offset)) => {
                k_cache.narrow(2, offset, t).copy_(&k);
                v_cache.narrow(2, offset, t).copy_(&v);
                (
                    k_cache.narrow(2, 0, offset + t),
                    v_cache.narrow(2, 0, offset + t),
                ) // (B, KV, S, D)
            }
            None => (k, v),
        };
        // Without a mask the attention is plain causal, which lets torch pick its fused
        // (flash / memory-efficient) kernels: O(T) memory instead of (B, H, T, T) scores.
        let causal = mask.is_none();
        let y =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, ENABLE_GQA);
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let (hidden, inner) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let config = nn::LinearConfig {
            ws_init: Init::Const(0.0),
            bs_init: None,
            bias: false,
        };
        Self {
            gate_proj: nn::linear(&p / "gate_proj", hidden, inner, config),
            up_proj: nn::linear(&p / "up_proj", hidden, inner, config),
            down_proj: nn::linear(&p / "down_proj", inner, hidden, config),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let hidden = cfg.hidden_size as i64;
        Self {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", hidden, cfg.rms_norm_eps),
            self_attn: Attention::new(&p / "self_attn", cfg),
            post_attention_layernorm: RmsNorm::new(
                &p / "post_attention_layernorm",
                hidden,
                cfg.rms_norm_eps,
            ),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }
}

/// The decoder trunk and its language-model head.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// (V, C); the embedding matrix itself when embeddings are tied.
    lm_head: Tensor,
    rope: Rope,
    config: Config,
}

impl Llama {
    /// Declares every parameter in `vs` under its Hugging Face name (zero-filled until loaded).
    pub fn new(vs: &nn::VarStore, cfg: &Config) -> Result<Self> {
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
        Ok(Self {
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::new(&model / "layers" / i, cfg))
                .collect(),
            norm: RmsNorm::new(&model / "norm", hidden, cfg.rms_norm_eps),
            rope: Rope::new(cfg, vs.device())?,
            embed_tokens,
            lm_head,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype of the weights; caches, heads and optimiser state that belong to this model
    /// take it from here, never from the device.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// The LM head's weight, (V, C): the embedding matrix itself when embeddings are tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Final hidden states, (B, T, C), for `input_ids` (B, T) at `positions` (B, T).
    ///
    /// `key_valid` (B, S) marks which key positions hold real tokens (false for left padding),
    /// S = cache length + T with a cache, T without. A query attends to valid keys at or before
    /// its own position, and always to itself, so a padding row stays finite.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (_, t) = input_ids.size2().expect("(B, T)");
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let s = offset + t;
        let device = input_ids.device();
        let query_pos = Tensor::arange_start(offset, s, (Kind::Int64, device)).view([t, 1]);
        let key_pos = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
        let causal = key_pos.le_tensor(&query_pos); // (T, S)
        let own = key_pos.eq_tensor(&query_pos);
        let mask = key_valid
            .view([-1, 1, 1, s])
            .logical_and(&causal)
            .logical_or(&own); // (B, 1, T, S)

        let x = self.decoder(input_ids, positions, Some(&mask), cache.as_deref_mut());
        if let Some(cache) = cache {
            cache.len = s;
        }
        x
    }

    /// Final hidden states, (B, T, C), of sequences that are unpadded or right-padded, at
    /// positions 0..T under a plain causal mask: what training batches need. Real tokens never
    /// see the padding after them; padding rows' outputs are junk the losses mask out.
    pub fn forward_hidden_causal(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("(B, T)");
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).expand([b, t], true);
        self.decoder(input_ids, &positions, None, None)
    }

    /// Embedding, decoder layers and final norm; `mask` None means causal.
    fn decoder(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // (B, T, C)
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| (&mut c.layers[i], offset));
            let h = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x),
                &self.rope,
                positions,
                mask,
                layer_cache,
            );
            // Out of place: the norm above saved `x` for the backward pass.
            x = &x + h;
            x = &x
                + layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&x));
        }
        self.norm.forward(&x)
    }

    /// The attention kernel libtorch picks for this model's attention (`_fused_sdp_choice`,
    /// named as torch's `SDPBackend`): `query_len` positions against `key_len` keys, under
    /// the key-validity mask generation passes (`masked`) or training's plain causal mask.
    pub fn sdpa_backend(&self, batch: i64, query_len: i64, key_len: i64, masked: bool) -> String {
        let cfg = &self.config;
        let (heads, kv, d) = (
            cfg.num_attention_heads as i64,
            cfg.num_kv_heads() as i64,
            cfg.head_dim() as i64,
        );
        let options = (self.kind(), self.embed_tokens.device());
        let q = Tensor::zeros([batch, heads, query_len, d], options);
        let k = Tensor::zeros([batch, kv, key_len, d], options);
        let mask = masked.then(|| {
            Tensor::ones(
                [batch, 1, query_len, key_len],
                (Kind::Bool, self.embed_tokens.device()),
            )
        });
        let choice = Tensor::internal_fused_sdp_choice(
            &q,
            &k,
            &k,
            mask.as_ref(),
            0.0,
            !masked,
            None,
            ENABLE_GQA,
        );
        match choice {
            0 => "math".into(),
            1 => "flash_attention".into(),
            2 => "efficient_attention".into(),
            3 => "cudnn_attention".into(),
            4 => "overrideable".into(),
            other => format!("error ({other})"),
        }
    }

    /// Logits, (B, T, V), of unpadded sequences (B, T): positions 0..T, every token valid.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.logits(&self.forward_hidden_causal(input_ids))
    }

    /// Logits, (…, V), of hidden states (…, C).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.lm_head.tr())
    }
}
