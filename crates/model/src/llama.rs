//! A Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) in tch: RMSNorm, rotary
//! position embeddings, grouped-query attention, SwiGLU MLP. Two ways through it: the
//! training forward (whole sequences, causal) and the sampler's (generate.rs): a prefill that
//! hands back each layer's keys and values, and a decode step over a slot cache in which every
//! row has its own length.
//!
//! Built for few kernels per layer: q/k/v are one matmul (`qkv_proj`), gate/up another
//! (`gate_up_proj`), fused when the weights are loaded and split again when they are saved, so
//! checkpoints keep Hugging Face's names (`fuse_projections`, `split_projections`); RoPE's
//! cos/sin are gathered once per forward and q and k rotated together; RMSNorm is libtorch's
//! (fused where the device has a kernel for it).

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::lora::{Adapters, LayerAdapters, LoraConfig, ProjectionAdapters};

/// A layer's adapters as one forward pass applies them: dropout only in a training pass.
#[derive(Clone, Copy)]
struct Active<'a> {
    adapters: &'a LayerAdapters,
    dropout: f64,
}

/// `base`, the output of a projection of `x`, plus its adapters' update when a pass has them.
fn adapted(
    base: Tensor,
    x: &Tensor,
    lora: Option<Active>,
    projection: fn(&LayerAdapters) -> &ProjectionAdapters,
) -> Tensor {
    match lora {
        Some(active) => projection(active.adapters).add_to(x, base, active.dropout),
        None => base,
    }
}

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
        // As transformers: normalised in f32 and cast back (libtorch's rms_norm, one call),
        // then scaled in the input's dtype. Handing rms_norm the weight would scale before
        // the cast, which rounds differently in bf16; in f32 there is no cast, the two are
        // the same products, and rms_norm scales in the same call (one op fewer).
        let shape = [x.size()[x.dim() - 1]];
        match x.kind() {
            Kind::Float => x.rms_norm(shape, Some(&self.weight), self.eps),
            _ => x.rms_norm(shape, None::<&Tensor>, self.eps) * &self.weight,
        }
    }
}

/// cos/sin tables of the rotary embedding, (max_positions, head_dim), in transformers'
/// rotate-half layout.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// sin with its first half negated, for a decode step's rotation by `roll`: rotate_half(x)
    /// · sin is roll(x, D/2) · sin_rolled, exactly (a negation rounds nothing).
    sin_rolled: Tensor,
}

/// The rotation at one forward's positions, (B, 1, T, D) each, in the compute dtype: gathered
/// once and used by every layer.
struct RopeAt {
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
        let sign = Tensor::cat(
            &[
                -Tensor::ones([dim / 2], (Kind::Float, Device::Cpu)),
                Tensor::ones([dim / 2], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        Ok(Self {
            cos: emb.cos().to_device(device),
            sin: emb.sin().to_device(device),
            sin_rolled: (emb.sin() * sign).to_device(device),
        })
    }

    /// A decode step's rotation of every head of its fused q/k/v output, (S, H + 2 KV, 1, D)
    /// each, at positions `lens` (S,), in `kind`: q and k heads rotate, v heads take cos 1 and
    /// sin 0 and pass unchanged, so one roll and two multiplies rotate the whole output.
    fn decode_tables(
        &self,
        lens: &Tensor,
        rotated: i64,
        unrotated: i64,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let s = lens.size()[0];
        let d = self.cos.size()[1];
        let table = |table: &Tensor, fill: f64| {
            let at = table.index_select(0, lens).to_kind(kind).view([s, 1, 1, d]);
            let rest = Tensor::full([s, unrotated, 1, d], fill, (kind, lens.device()));
            Tensor::cat(&[&at.expand([s, rotated, 1, d], false), &rest], 1)
        };
        (table(&self.cos, 1.0), table(&self.sin_rolled, 0.0))
    }

    /// The rotation at `positions`, (B, T), in `kind`.
    fn at(&self, positions: &Tensor, kind: Kind) -> RopeAt {
        let (b, t) = positions.size2().expect("(B, T)");
        let d = self.cos.size()[1];
        let gather = |table: &Tensor| {
            table
                .index_select(0, &positions.flatten(0, 1))
                .view([b, 1, t, d])
                .to_kind(kind)
        };
        RopeAt {
            cos: gather(&self.cos),
            sin: gather(&self.sin),
        }
    }
}

impl RopeAt {
    /// Rotates x, (B, heads, T, D): q and k together, as one tensor.
    fn apply(&self, x: &Tensor) -> Tensor {
        let halves = x.chunk(2, -1);
        let rotated = Tensor::cat(&[&(-&halves[1]), &halves[0]], -1);
        x * &self.cos + rotated * &self.sin
    }
}

/// Keys and values of every layer for a batch of slots, each layer one tensor (S, 2 ·
/// n_kv_heads, capacity, head_dim): the keys' heads, then the values'. Row r's positions
/// 0..len_r hold its tokens, in order; the sampler keeps the lengths (generate.rs). Keys and
/// values together take a decode step's new entries in one scatter.
#[derive(Debug)]
pub(crate) struct SlotCache {
    pub layers: Vec<Tensor>,
}

impl SlotCache {
    pub fn new(cfg: &Config, slots: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [
            slots,
            2 * cfg.num_kv_heads() as i64,
            capacity,
            cfg.head_dim() as i64,
        ];
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Tensor::zeros(shape, (kind, device)))
            .collect();
        Self { layers }
    }

    /// Positions a slot can hold.
    pub fn capacity(&self) -> i64 {
        self.layers[0].size()[2]
    }
}

/// A prefill's keys and values: each layer's, (B, 2 KV, T, D) in the slot cache's layout (keys'
/// heads, then values'), for the sampler to place in its slots.
pub(crate) type LayerKv = Vec<Tensor>;

#[derive(Debug)]
struct Attention {
    /// q, k and v stacked, (H + 2 KV) · D rows.
    qkv_proj: nn::Linear,
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
        let qkv = (heads + 2 * kv_heads) * head_dim;
        Self {
            qkv_proj: proj("qkv_proj", hidden, qkv, cfg.attention_bias),
            o_proj: proj("o_proj", heads * head_dim, hidden, cfg.output_bias()),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// x: (B, T, C) → (B, T, C), causal; the keys and values pushed to `kv` if given.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        kv: Option<&mut LayerKv>,
        lora: Option<Active>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, C)");
        let (h, g) = (self.heads, self.kv_heads);
        let qkv = adapted(self.qkv_proj.forward(x), x, lora, |a| &a.qkv)
            .view([b, t, h + 2 * g, self.head_dim])
            .transpose(1, 2); // (B, H + 2 KV, T, D)
        let qk = rope.apply(&qkv.narrow(1, 0, h + g));
        let (q, k) = (qk.narrow(1, 0, h), qk.narrow(1, h, g)); // (B, H | KV, T, D)
        let v = qkv.narrow(1, h + g, g);
        // Plain causal attention lets torch pick its fused (flash / memory-efficient)
        // kernels: O(T) memory instead of (B, H, T, T) scores.
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None,
            ENABLE_GQA,
        );
        if let Some(kv) = kv {
            kv.push(Tensor::cat(&[&k, &v], 1));
        }
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, t, h * self.head_dim]);
        adapted(self.o_proj.forward(&y), &y, lora, |a| &a.o)
    }

    /// One decode step: the residual stream `x` (S, C) plus attention over `normed`, its
    /// input normalised, with this step's keys and values written into the slots. The query
    /// heads sharing a key/value head are folded into the query axis — q (S, KV, G, D) against
    /// k, v (S, KV, W, D) under an additive key mask (S, 1, 1, W) — so SDPA gets the shapes its
    /// fused kernels take, with no GQA expansion and no copy of the cache. Per layer: one
    /// matmul, a roll and two multiplies for RoPE, one scatter, SDPA, and o_proj with the
    /// residual added in the same matmul.
    fn decode(
        &self,
        x: &Tensor,
        normed: &Tensor,
        cache: &mut Tensor,
        step: &Step,
        lora: Option<Active>,
    ) -> Tensor {
        let s = x.size()[0];
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = adapted(self.qkv_proj.forward(normed), normed, lora, |a| &a.qkv).view([
            s,
            h + 2 * g,
            1,
            d,
        ]);
        let mut rotated = qkv.roll([d / 2], [-1]);
        rotated *= &step.sin;
        let _ = rotated.addcmul_(&qkv, &step.cos); // (S, H + 2 KV, 1, D): q, k rotated, v as is
        // q (S, H, 1, D), and this step's keys and values (S, 2 KV, 1, D) as the cache lays them.
        let heads = rotated.split_with_sizes([h, 2 * g], 1);
        let _ = cache.scatter_(2, &step.at, &heads[1]);
        let q = heads[0].view([s, g, h / g, d]); // (S, KV, G, D)
        let kv = cache.narrow(2, 0, step.width).chunk(2, 1); // (S, KV, W, D) each
        let (k, v) = (&kv[0], &kv[1]);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            k,
            v,
            Some(&step.mask),
            0.0,
            false,
            None,
            false,
        ); // (S, KV, G, D)
        let y = y.reshape([s, h * d]);
        // linear with a 2-D bias is addmm(x, y, Wᵀ): the residual added in the matmul, and the
        // transpose inside the one call.
        let mut out = y.linear(&self.o_proj.ws, Some(x));
        if let Some(bias) = &self.o_proj.bs {
            out += bias;
        }
        adapted(out, &y, lora, |a| &a.o)
    }
}

/// Where one decode step writes and reads the slot cache, and its rotation: built once per
/// step, shared by every layer.
struct Step {
    /// Each row's column for its new keys and values, expanded to (S, 2 KV, 1, D) for
    /// `scatter_`.
    at: Tensor,
    /// (S, 1, 1, W), in the model's dtype: 0 at the columns a row attends to, -inf elsewhere.
    mask: Tensor,
    /// W: the columns read, more than every row's length.
    width: i64,
    /// (S, H + 2 KV, 1, D) each: see [`Rope::decode_tables`].
    cos: Tensor,
    sin: Tensor,
}

#[derive(Debug)]
struct Mlp {
    /// gate and up stacked, 2 · intermediate rows.
    gate_up_proj: nn::Linear,
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
            gate_up_proj: nn::linear(&p / "gate_up_proj", hidden, 2 * inner, config),
            down_proj: nn::linear(&p / "down_proj", inner, hidden, config),
        }
    }

    fn forward(&self, x: &Tensor, lora: Option<Active>) -> Tensor {
        let gate_up = adapted(self.gate_up_proj.forward(x), x, lora, |a| &a.gate_up).chunk(2, -1);
        let h = gate_up[0].silu() * &gate_up[1];
        adapted(self.down_proj.forward(&h), &h, lora, |a| &a.down)
    }

    /// A decode step's MLP over `normed` (S, C), added to the residual `x` by down_proj's
    /// matmul itself.
    fn decode(&self, x: &Tensor, normed: &Tensor, lora: Option<Active>) -> Tensor {
        let gate_up = adapted(self.gate_up_proj.forward(normed), normed, lora, |a| {
            &a.gate_up
        })
        .chunk(2, -1);
        let mut h = gate_up[0].silu();
        h *= &gate_up[1];
        let out = h.linear(&self.down_proj.ws, Some(x));
        adapted(out, &h, lora, |a| &a.down)
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

    /// One decode step through the layer: x (S, C) → (S, C).
    fn decode(&self, x: &Tensor, cache: &mut Tensor, step: &Step, lora: Option<Active>) -> Tensor {
        let x = self
            .self_attn
            .decode(x, &self.input_layernorm.forward(x), cache, step, lora);
        self.mlp
            .decode(&x, &self.post_attention_layernorm.forward(&x), lora)
    }

    /// The MLP half, after attention's `h` is added to the residual `x`.
    fn finish(&self, x: &Tensor, h: Tensor, lora: Option<Active>) -> Tensor {
        // Out of place: the norms saved `x` for the backward pass.
        let x = x + h;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x), lora)
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
    /// LoRA adapters beside the projections, if attached (lora.rs).
    lora: Option<Adapters>,
    /// Whether forward passes apply the adapters: off, the model is its base.
    adapters_on: AtomicBool,
    /// Whether forward passes are training updates (the adapters' dropout applies).
    training: AtomicBool,
}

impl Llama {
    /// Declares every parameter in `vs` (zero-filled until loaded): Hugging Face's names, but
    /// for the fused `qkv_proj` and `gate_up_proj` (see [`fuse_projections`]).
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
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).expand([b, t], true);
        let rope = self.rope.at(&positions, self.kind());
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // (B, T, C)
        for (layer, lora) in self.layers.iter().zip(self.active()) {
            let h = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x),
                &rope,
                kv.as_deref_mut(),
                lora,
            );
            x = layer.finish(&x, h, lora);
        }
        self.norm.forward(&x)
    }

    /// One decode step: `tokens` (S,) at positions `lens` (S,), each row's token written into
    /// its slot at column lens[r] and attending to columns 0..=lens[r]; `width` > every lens[r]
    /// bounds the columns read. Returns the final hidden states, (S, C).
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
        let (cos, sin) = self.rope.decode_tables(lens, h + g, g, kind);
        let step = Step {
            at: lens.view([s, 1, 1, 1]).expand([s, 2 * g, 1, d], false),
            mask: key_mask(lens, width, kind),
            width,
            cos,
            sin,
        };
        let mut x = Tensor::embedding(&self.embed_tokens, tokens, -1, false, false); // (S, C)
        let layers = self.layers.iter().zip(self.active());
        for ((layer, lora), slots) in layers.zip(cache.layers.iter_mut()) {
            x = layer.decode(&x, slots, &step, lora);
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
    /// against `keys` cached keys under the key mask, as [`Llama::decode_step`] calls it.
    pub fn decode_attention_backend(&self, batch: i64, keys: i64) -> String {
        let (h, g, d) = self.head_layout();
        let options = (self.kind(), self.embed_tokens.device());
        let q = Tensor::zeros([batch, g, h / g, d], options);
        let k = Tensor::zeros([batch, g, keys, d], options);
        let lens = Tensor::full([batch], keys - 1, (Kind::Int64, options.1));
        let mask = key_mask(&lens, keys, self.kind());
        let choice =
            Tensor::internal_fused_sdp_choice(&q, &k, &k, Some(&mask), 0.0, false, None, false);
        backend_name(choice)
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

/// A decode step's additive key mask, (S, 1, 1, W) in `kind`: row r attends to columns
/// 0..=lens[r]. Its rows are laid out 16 columns apart (a view of a wider tensor), the alignment
/// the memory-efficient CUDA kernel asks of a mask, which it would otherwise pad in every layer.
fn key_mask(lens: &Tensor, width: i64, kind: Kind) -> Tensor {
    let s = lens.size()[0];
    let padded = (width + 15) / 16 * 16;
    let columns = Tensor::arange(padded, (Kind::Int64, lens.device()));
    let beyond = columns
        .gt_tensor(&lens.view([s, 1]))
        .view([s, 1, 1, padded]);
    Tensor::zeros([s, 1, 1, padded], (kind, lens.device()))
        .masked_fill(&beyond, f64::NEG_INFINITY)
        .narrow(3, 0, width)
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

/// The projections the decoder holds fused, each with its Hugging Face parts in row order.
const FUSED: [(&str, [&str; 3]); 2] = [
    (
        "self_attn.qkv_proj",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj", ""]),
];

/// Hugging Face checkpoints name q/k/v and gate/up apart: stacks each layer's parts (weights
/// and biases) into the fused parameter the decoder declares. Fused names pass through, so a
/// trainer's own checkpoint (saved under the VarStore's names) loads as well.
pub(crate) fn fuse_projections(weights: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut by_name: std::collections::BTreeMap<String, Tensor> = weights.into_iter().collect();
    let prefixes: Vec<String> = by_name
        .keys()
        .filter_map(|n| n.strip_suffix("self_attn.q_proj.weight").map(str::to_owned))
        .collect();
    for prefix in prefixes {
        for (fused, parts) in FUSED {
            for suffix in ["weight", "bias"] {
                let names: Vec<String> = parts
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| format!("{prefix}{p}.{suffix}"))
                    .collect();
                if !names.iter().all(|n| by_name.contains_key(n)) {
                    continue;
                }
                let tensors: Vec<Tensor> = names
                    .iter()
                    .map(|n| by_name.remove(n).expect("present"))
                    .collect();
                by_name.insert(
                    format!("{prefix}{fused}.{suffix}"),
                    Tensor::cat(&tensors, 0),
                );
            }
        }
    }
    by_name.into_iter().collect()
}

/// The inverse of [`fuse_projections`] for saving: each fused parameter split back into its
/// Hugging Face parts, so transformers and vLLM load the directory.
pub(crate) fn split_projections(
    named: Vec<(String, Tensor)>,
    cfg: &Config,
) -> Vec<(String, Tensor)> {
    let d = cfg.head_dim() as i64;
    let (h, g) = (cfg.num_attention_heads as i64, cfg.num_kv_heads() as i64);
    let inner = cfg.intermediate_size as i64;
    let mut out = Vec::with_capacity(named.len() + 3 * cfg.num_hidden_layers);
    for (name, tensor) in named {
        let split = FUSED.iter().find_map(|(fused, parts)| {
            let (prefix, suffix) = name.split_once(&format!("{fused}."))?;
            let sizes: &[i64] = match *fused {
                "self_attn.qkv_proj" => &[h * d, g * d, g * d],
                _ => &[inner, inner],
            };
            let pieces = tensor.split_with_sizes(sizes, 0);
            Some(
                parts
                    .iter()
                    .zip(pieces)
                    .map(|(part, piece)| (format!("{prefix}{part}.{suffix}"), piece.contiguous()))
                    .collect::<Vec<_>>(),
            )
        });
        match split {
            Some(parts) => out.extend(parts),
            None => out.push((name, tensor)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
