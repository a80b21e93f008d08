//! The blocks every decoder family is built from (arch/): RMSNorm, rotary position embeddings,
//! grouped-query attention with its optional per-head q/k norms and sliding window, the SwiGLU
//! MLP, and the slot cache. Each block has two ways through it, chosen by [`Pass`]: the causal
//! pass over whole sequences (training, and the sampler's prefill, which hands back each
//! layer's keys and values) and the decode step over a slot cache in which every row has its
//! own length (generate.rs). A family's `DecoderLayer::forward` is written once over both.
//!
//! Built for few kernels per layer: q/k/v are one matmul (`qkv_proj`), gate/up another
//! (`gate_up_proj`), fused when the weights are loaded and split again when they are saved, so
//! checkpoints keep Hugging Face's names (`fuse_projections`, `split_projections`); RoPE's
//! cos/sin are gathered once per forward and q and k rotated together; RMSNorm is libtorch's
//! (fused where the device has a kernel for it); in a decode step the residual is added inside
//! the output projections' matmuls ([`Projected::plus`]).

use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::{ModelError, Result};
use crate::lora::{LayerAdapters, ProjectionAdapters};

/// A layer's adapters as one forward pass applies them: dropout only in a training pass.
#[derive(Clone, Copy)]
pub(crate) struct Active<'a> {
    pub adapters: &'a LayerAdapters,
    pub dropout: f64,
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
pub(crate) const ENABLE_GQA: bool = true;

/// How an RMSNorm scales: by its weight (Llama), or by 1 + its weight, in fp32 before the cast
/// back (Gemma, whose checkpoints store the weight around 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Norm {
    Plain,
    UnitOffset,
}

#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
    norm: Norm,
}

impl RmsNorm {
    pub fn new(p: nn::Path, size: i64, eps: f64, norm: Norm) -> Self {
        let init = match norm {
            Norm::Plain => 1.0,
            Norm::UnitOffset => 0.0,
        };
        Self {
            weight: p.var("weight", &[size], Init::Const(init)),
            eps,
            norm,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let shape = [x.size()[x.dim() - 1]];
        match (self.norm, x.kind()) {
            // As transformers: normalised in f32 and cast back (libtorch's rms_norm, one call),
            // then scaled in the input's dtype. Handing rms_norm the weight would scale before
            // the cast, which rounds differently in bf16; in f32 there is no cast, the two are
            // the same products, and rms_norm scales in the same call (one op fewer).
            (Norm::Plain, Kind::Float) => x.rms_norm(shape, Some(&self.weight), self.eps),
            (Norm::Plain, _) => x.rms_norm(shape, None::<&Tensor>, self.eps) * &self.weight,
            // Gemma: (normed · (1 + w)) in f32, then cast.
            (Norm::UnitOffset, kind) => {
                let scale = self.weight.to_kind(Kind::Float) + 1.0;
                (x.to_kind(Kind::Float)
                    .rms_norm(shape, None::<&Tensor>, self.eps)
                    * scale)
                    .to_kind(kind)
            }
        }
    }
}

/// cos/sin tables of the rotary embedding, (max_positions, head_dim), in transformers'
/// rotate-half layout.
#[derive(Debug)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// sin with its first half negated, for a decode step's rotation by `roll`: rotate_half(x)
    /// · sin is roll(x, D/2) · sin_rolled, exactly (a negation rounds nothing).
    sin_rolled: Tensor,
}

/// The rotation at one forward's positions, (B, 1, T, D) each, in the compute dtype: gathered
/// once and used by every layer.
pub(crate) struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of base `theta` with `scaling` for `cfg`'s head size and positions.
    pub fn new(
        cfg: &Config,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: Device,
    ) -> Result<Self> {
        let dim = cfg.head_dim() as i64;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        if let Some(scaling) = scaling {
            match scaling.rope_type.as_str() {
                "default" => {}
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
                            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
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
    pub fn decode_tables(
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
    pub fn at(&self, positions: &Tensor, kind: Kind) -> RopeAt {
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

/// What sets one family's attention apart; everything else (the fused q/k/v, RoPE, grouped-query
/// attention, the slot cache) is shared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionOptions {
    /// RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3), of this kind.
    pub qk_norm: Option<Norm>,
    /// The keys a query sees, itself included (Mistral, Qwen's and Gemma's sliding layers);
    /// None: every earlier key.
    pub window: Option<i64>,
    /// How queries and keys are rotated: not at all (SmolLM3's NoPE layers), by the model's
    /// RoPE, or by its local one (Gemma 3's sliding layers).
    pub rope: Rotation,
    /// The scores' scale; None: 1/√head_dim (Gemma: 1/√query_pre_attn_scalar).
    pub scale: Option<f64>,
    /// Scores soft-capped to ±cap by cap · tanh(s / cap) before the mask (Gemma 2).
    pub softcap: Option<f64>,
}

/// Which RoPE tables a layer's attention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rotation {
    None,
    Global,
    Local,
}

impl AttentionOptions {
    /// Layer `i`'s window and rotation as the config sets them, without q/k norms, at the
    /// default scale.
    pub fn for_layer(cfg: &Config, i: usize) -> Self {
        Self {
            qk_norm: None,
            window: cfg.layer_window(i),
            rope: if cfg.layer_uses_rope(i) {
                Rotation::Global
            } else {
                Rotation::None
            },
            scale: None,
            softcap: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Attention {
    /// q, k and v stacked, (H + 2 KV) · D rows.
    qkv_proj: nn::Linear,
    o_proj: nn::Linear,
    /// Per-head norms of queries and keys, (D,) each, when the family has them.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    window: Option<i64>,
    rope: Rotation,
    scale: Option<f64>,
    softcap: Option<f64>,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: &Config, options: AttentionOptions) -> Self {
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
        let norm = |name: &str, kind| RmsNorm::new(&p / name, head_dim, cfg.rms_norm_eps, kind);
        Self {
            qkv_proj: proj("qkv_proj", hidden, qkv, cfg.attention_bias),
            o_proj: proj("o_proj", heads * head_dim, hidden, cfg.output_bias()),
            qk_norm: options
                .qk_norm
                .map(|kind| (norm("q_norm", kind), norm("k_norm", kind))),
            heads,
            kv_heads,
            head_dim,
            window: options.window,
            rope: options.rope,
            scale: options.scale,
            softcap: options.softcap,
        }
    }

    /// The keys a query sees, itself included; None for every earlier key.
    pub fn window(&self) -> Option<i64> {
        self.window
    }

    /// Attention over `normed`, the layer's input normalised: (B, T, C) in a causal pass, (S, C)
    /// in a decode step. Its output projection is left to the layer, which adds it to the
    /// residual stream.
    pub fn forward<'a>(
        &'a self,
        normed: &Tensor,
        pass: Pass<'_>,
        lora: Option<Active<'a>>,
    ) -> Projected<'a> {
        let y = match pass {
            Pass::Causal { at, kv } => self.causal(normed, at, kv, lora),
            Pass::Decode { step, cache } => self.decode(normed, step, cache, lora),
        };
        Projected {
            input: y,
            linear: &self.o_proj,
            lora,
            part: |a| &a.o,
        }
    }

    /// The fused q/k/v output, heads on axis 1, with the query and key heads normalised where
    /// the family norms them.
    fn normed_heads(&self, qkv: Tensor) -> Tensor {
        match &self.qk_norm {
            Some((q_norm, k_norm)) => {
                let (h, g) = (self.heads, self.kv_heads);
                let parts = qkv.split_with_sizes([h, g, g], 1);
                let q = q_norm.forward(&parts[0]);
                let k = k_norm.forward(&parts[1]);
                Tensor::cat(&[&q, &k, &parts[2]], 1)
            }
            None => qkv,
        }
    }

    /// x: (B, T, C) → (B, T, H · D), causal (within the window, if the layer has one); the keys
    /// and values pushed to `kv` if given.
    fn causal(
        &self,
        x: &Tensor,
        at: &Causal,
        kv: Option<&mut LayerKv>,
        lora: Option<Active>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, C)");
        let (h, g) = (self.heads, self.kv_heads);
        let qkv = adapted(self.qkv_proj.forward(x), x, lora, |a| &a.qkv)
            .view([b, t, h + 2 * g, self.head_dim])
            .transpose(1, 2); // (B, H + 2 KV, T, D)
        let qkv = self.normed_heads(qkv);
        let qk = qkv.narrow(1, 0, h + g);
        let qk = match self.rope {
            Rotation::None => qk,
            Rotation::Global => at.rope.apply(&qk),
            Rotation::Local => at.local.as_ref().expect("local RoPE tables").apply(&qk),
        };
        let (q, k) = (qk.narrow(1, 0, h), qk.narrow(1, h, g)); // (B, H | KV, T, D)
        let v = qkv.narrow(1, h + g, g);
        let window = self.window.and_then(|w| at.window_mask(w));
        let y = match self.softcap {
            // Plain causal attention lets torch pick its fused (flash / memory-efficient)
            // kernels: O(T) memory instead of (B, H, T, T) scores. A window shorter than the
            // sequence needs its mask.
            None => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                window,
                0.0,
                window.is_none(),
                self.scale,
                ENABLE_GQA,
            ),
            // No fused kernel caps the scores: computed as transformers' eager attention.
            Some(cap) => {
                let seen = match window {
                    Some(mask) => mask.shallow_clone(),
                    None => Tensor::ones([t, t], (Kind::Bool, x.device())).tril(0),
                };
                let repeat = |x: &Tensor| x.repeat_interleave_self_int(h / g, Some(1), None);
                self.capped(&q, &repeat(&k), &repeat(&v), &seen.logical_not(), cap)
            }
        };
        if let Some(kv) = kv {
            kv.push(Tensor::cat(&[&k, &v], 1));
        }
        y.transpose(1, 2)
            .contiguous()
            .view([b, t, h * self.head_dim])
    }

    /// Attention with soft-capped scores: softmax(cap · tanh(q kᵀ · scale / cap), masked) v in
    /// fp32, as transformers' eager attention; `unseen` is true where a query must not see a
    /// key (broadcast against the scores).
    fn capped(&self, q: &Tensor, k: &Tensor, v: &Tensor, unseen: &Tensor, cap: f64) -> Tensor {
        let scale = self
            .scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f64).sqrt());
        let scores = q.matmul(&k.transpose(-1, -2)) * scale;
        let scores = (scores / cap).tanh() * cap;
        let scores = scores.masked_fill(unseen, f64::NEG_INFINITY);
        scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(v)
    }

    /// One decode step over `normed` (S, C), this step's keys and values written into the
    /// slots. The query heads sharing a key/value head are folded into the query axis — q (S,
    /// KV, G, D) against k, v (S, KV, W, D) under an additive key mask (S, 1, 1, W) — so SDPA
    /// gets the shapes its fused kernels take, with no GQA expansion and no copy of the cache.
    /// Per layer: one matmul, a roll and two multiplies for RoPE, one scatter, SDPA.
    fn decode(
        &self,
        normed: &Tensor,
        step: &Step,
        cache: &mut Tensor,
        lora: Option<Active>,
    ) -> Tensor {
        let s = normed.size()[0];
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = adapted(self.qkv_proj.forward(normed), normed, lora, |a| &a.qkv).view([
            s,
            h + 2 * g,
            1,
            d,
        ]);
        let qkv = self.normed_heads(qkv);
        let tables = match self.rope {
            Rotation::None => None,
            Rotation::Global => Some(&step.rope),
            Rotation::Local => Some(step.local.as_ref().expect("local RoPE tables")),
        };
        let rotated = match tables {
            Some((cos, sin)) => {
                let mut rotated = qkv.roll([d / 2], [-1]);
                rotated *= sin;
                let _ = rotated.addcmul_(&qkv, cos);
                rotated // (S, H + 2 KV, 1, D): q, k rotated, v as is
            }
            None => qkv,
        };
        // q (S, H, 1, D), and this step's keys and values (S, 2 KV, 1, D) as the cache lays them.
        let heads = rotated.split_with_sizes([h, 2 * g], 1);
        let _ = cache.scatter_(2, &step.at, &heads[1]);
        let q = heads[0].view([s, g, h / g, d]); // (S, KV, G, D)
        let kv = cache.narrow(2, 0, step.width).chunk(2, 1); // (S, KV, W, D) each
        let (k, v) = (&kv[0], &kv[1]);
        let mask = step.mask(self.window);
        let y = match self.softcap {
            None => Tensor::scaled_dot_product_attention(
                &q,
                k,
                v,
                Some(mask),
                0.0,
                false,
                self.scale,
                false,
            ),
            Some(cap) => self.capped(&q, k, v, &mask.isinf(), cap),
        }; // (S, KV, G, D)
        y.reshape([s, h * d])
    }
}

/// The way through a layer: a causal pass over whole sequences (training and the sampler's
/// prefill) or one decode step over the slot cache.
pub(crate) enum Pass<'a> {
    /// Positions 0..T; each layer's keys and values pushed to `kv` when given (a prefill).
    Causal {
        at: &'a Causal,
        kv: Option<&'a mut LayerKv>,
    },
    /// One new token per slot; `cache` is this layer's slots.
    Decode {
        step: &'a Step,
        cache: &'a mut Tensor,
    },
}

/// What a causal pass's layers share: the rotation at positions 0..T and the mask of each
/// attention window shorter than T.
pub(crate) struct Causal {
    pub rope: RopeAt,
    /// Gemma 3's sliding layers' own rotation.
    pub local: Option<RopeAt>,
    /// (window, (T, T) boolean mask, true where a query sees a key).
    pub windows: Vec<(i64, Tensor)>,
}

impl Causal {
    /// The pass over `t` positions in `kind` on `device`, with masks for the layers' `windows`.
    pub fn new(
        (rope, local): (&Rope, Option<&Rope>),
        b: i64,
        t: i64,
        windows: &[i64],
        kind: Kind,
        device: Device,
    ) -> Self {
        let positions = Tensor::arange(t, (Kind::Int64, device)).expand([b, t], true);
        let windows = windows
            .iter()
            .filter(|&&w| w < t)
            .map(|&w| {
                // transformers' sliding window: key j seen from query i when i - w < j <= i.
                let rows = Tensor::arange(t, (Kind::Int64, device)).view([t, 1]);
                let columns = Tensor::arange(t, (Kind::Int64, device)).view([1, t]);
                let seen = columns
                    .le_tensor(&rows)
                    .logical_and(&columns.gt_tensor(&(&rows - w)));
                (w, seen)
            })
            .collect();
        Self {
            rope: rope.at(&positions, kind),
            local: local.map(|local| local.at(&positions, kind)),
            windows,
        }
    }

    /// The mask of `window`, None where the window covers the whole sequence.
    fn window_mask(&self, window: i64) -> Option<&Tensor> {
        self.windows
            .iter()
            .find_map(|(w, mask)| (*w == window).then_some(mask))
    }
}

/// Where one decode step writes and reads the slot cache, and its rotation: built once per
/// step, shared by every layer.
pub(crate) struct Step {
    /// Each row's column for its new keys and values, expanded to (S, 2 KV, 1, D) for
    /// `scatter_`.
    pub at: Tensor,
    /// (S, 1, 1, W), in the model's dtype: 0 at the columns a row attends to, -inf elsewhere.
    pub mask: Tensor,
    /// The same for each attention window: the last `window` columns up to the row's own.
    pub windows: Vec<(i64, Tensor)>,
    /// W: the columns read, more than every row's length.
    pub width: i64,
    /// cos and sin, (S, H + 2 KV, 1, D) each: see [`Rope::decode_tables`].
    pub rope: (Tensor, Tensor),
    /// The same of Gemma 3's local RoPE.
    pub local: Option<(Tensor, Tensor)>,
}

impl Step {
    /// The key mask of a layer with `window`.
    fn mask(&self, window: Option<i64>) -> &Tensor {
        window
            .and_then(|window| {
                self.windows
                    .iter()
                    .find_map(|(w, mask)| (*w == window).then_some(mask))
            })
            .unwrap_or(&self.mask)
    }
}

/// A decode step's additive key mask, (S, 1, 1, W) in `kind`: row r attends to columns
/// 0..=lens[r], or to the last `window` of them. Its rows are laid out 16 columns apart (a view
/// of a wider tensor), the alignment the memory-efficient CUDA kernel asks of a mask, which it
/// would otherwise pad in every layer.
pub(crate) fn key_mask(lens: &Tensor, width: i64, window: Option<i64>, kind: Kind) -> Tensor {
    let s = lens.size()[0];
    let padded = (width + 15) / 16 * 16;
    let columns = Tensor::arange(padded, (Kind::Int64, lens.device()));
    let lens = lens.view([s, 1]);
    let mut unseen = columns.gt_tensor(&lens);
    if let Some(w) = window {
        unseen = unseen.logical_or(&columns.le_tensor(&(&lens - w)));
    }
    Tensor::zeros([s, 1, 1, padded], (kind, lens.device()))
        .masked_fill(&unseen.view([s, 1, 1, padded]), f64::NEG_INFINITY)
        .narrow(3, 0, width)
}

/// The gated MLP: down(act(gate(x)) · up(x)), gate and up one matmul; act is SiLU (SwiGLU) or
/// tanh-approximated GELU (Gemma's GeGLU), as the config's `hidden_act` / `hidden_activation`
/// says.
#[derive(Debug)]
pub(crate) struct Mlp {
    /// gate and up stacked, 2 · intermediate rows.
    gate_up_proj: nn::Linear,
    down_proj: nn::Linear,
    gelu_tanh: bool,
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &Config) -> Self {
        let (hidden, inner) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let config = nn::LinearConfig {
            ws_init: Init::Const(0.0),
            bs_init: None,
            bias: false,
        };
        Self {
            gate_up_proj: nn::linear(&p / "gate_up_proj", hidden, 2 * inner, config),
            down_proj: nn::linear(&p / "down_proj", inner, hidden, config),
            gelu_tanh: cfg.activation() == "gelu_pytorch_tanh",
        }
    }

    /// The MLP over `normed`, (…, C); down_proj is left to the layer, which adds it to the
    /// residual stream.
    pub fn forward<'a>(&'a self, normed: &Tensor, lora: Option<Active<'a>>) -> Projected<'a> {
        let gate_up = adapted(self.gate_up_proj.forward(normed), normed, lora, |a| {
            &a.gate_up
        })
        .chunk(2, -1);
        let gate = if self.gelu_tanh {
            gate_up[0].gelu("tanh")
        } else {
            gate_up[0].silu()
        };
        Projected {
            input: gate * &gate_up[1],
            linear: &self.down_proj,
            lora,
            part: |a| &a.down,
        }
    }
}

/// A block's output projection and its input, not yet applied: the layer adds it to the
/// residual stream with [`Projected::plus`].
pub(crate) struct Projected<'a> {
    input: Tensor,
    linear: &'a nn::Linear,
    lora: Option<Active<'a>>,
    part: fn(&LayerAdapters) -> &ProjectionAdapters,
}

impl Projected<'_> {
    /// residual + the projection. In a decode step (2-D rows) the residual is added by the
    /// matmul itself — `linear` with a 2-D bias is addmm(x, y, Wᵀ) — so it costs no op of its
    /// own; a causal pass adds it out of place (the norms saved `residual` for the backward).
    pub fn plus(self, residual: &Tensor) -> Tensor {
        if self.input.dim() == 2 {
            let mut out = self.input.linear(&self.linear.ws, Some(residual));
            if let Some(bias) = &self.linear.bs {
                out += bias;
            }
            adapted(out, &self.input, self.lora, self.part)
        } else {
            residual + self.apply()
        }
    }

    /// The projection alone (Gemma normalises a block's output before adding it).
    pub fn apply(self) -> Tensor {
        let base = self.linear.forward(&self.input);
        adapted(base, &self.input, self.lora, self.part)
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
