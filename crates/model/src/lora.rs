//! LoRA (Hu et al., 2021): trainable low-rank adapters beside the decoder's frozen linear
//! layers, y = W x + (α / r) · B A dropout(x), A (r, in) and B (out, r).
//!
//! One adapter per Hugging Face projection (q, k, v, o, gate, up, down), also where the decoder
//! fuses q/k/v and gate/up into one matmul: the adapters' outputs are stacked in the fused
//! layout and added to the fused output. The adapters live in their own VarStore, in fp32
//! whatever the base's dtype, so an optimiser over that store trains them alone and the base
//! stays frozen. Names and files are PEFT's (`adapter_config.json`,
//! `adapter_model.safetensors` with `base_model.model.…lora_A.weight` tensors), so an adapter
//! moves between prefloop and `peft` both ways.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::load::{Model, fill};

/// The projections an adapter can sit on, by their Hugging Face module names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The fused projections a checkpoint may name instead (Phi-3's `qkv_proj`, `gate_up_proj`):
/// a target of either also selects its parts, and all of its parts select it.
pub const FUSED_PROJECTIONS: [&str; 2] = ["qkv_proj", "gate_up_proj"];

/// The prefix PEFT puts before the base model's own parameter names.
const PEFT_PREFIX: &str = "base_model.model.";

/// `lora = { rank, alpha, dropout, targets }` in the trainers' and runs' configs: rank 16,
/// α 32 on every projection (PEFT's common recipe for decoder models), no dropout (PEFT's and
/// TRL's default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r, the rank of every adapter. Default 16.
    pub rank: u32,
    /// α: an adapter's update is scaled by α / r. Default 32.
    pub alpha: f64,
    /// Dropout on an adapter's input during training updates (never when sampling or scoring).
    /// SFT, DPO and the reward model take any value in [0, 1); PPO and the group estimators
    /// refuse one above 0, since their old log-probs are computed without dropout and the
    /// on-policy ratio would then differ from 1. Default 0.
    pub dropout: f64,
    /// The projections that get an adapter, by module name (see [`PROJECTIONS`]; a fused
    /// projection, [`FUSED_PROJECTIONS`], selects its parts, and all of a fused projection's
    /// parts select it on a family whose checkpoints fuse them). Default: all seven.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: PROJECTIONS.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

impl LoraConfig {
    /// A config with rank `rank` and α `alpha` (default 2 r), other settings as the defaults.
    pub fn with_rank(rank: u32, alpha: Option<f64>) -> Self {
        Self {
            rank,
            alpha: alpha.unwrap_or(2.0 * f64::from(rank)),
            ..Self::default()
        }
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }

    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("lora.rank: must be at least 1".into());
        }
        if self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err("lora.alpha: must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("lora.dropout: must be in [0, 1)".into());
        }
        if self.targets.is_empty() {
            return Err("lora.targets: name at least one projection".into());
        }
        for target in &self.targets {
            if !PROJECTIONS.contains(&target.as_str())
                && !FUSED_PROJECTIONS.contains(&target.as_str())
            {
                return Err(format!(
                    "lora.targets: `{target}` is not one of the decoder's projections ({}, or \
                     the fused {})",
                    PROJECTIONS.join(", "),
                    FUSED_PROJECTIONS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Parameters of the adapters this config puts on a decoder of shape `cfg`: r · (in + out)
    /// per adapted projection per layer.
    pub fn parameter_count(&self, cfg: &Config) -> u64 {
        let per_layer: u64 = sites(cfg)
            .iter()
            .flatten()
            .filter(|site| site.selected(self))
            .map(|site| u64::from(self.rank) * (site.inputs + site.rows) as u64)
            .sum();
        per_layer * cfg.num_hidden_layers as u64
    }

    fn targets(&self, projection: &str) -> bool {
        self.targets.iter().any(|t| t == projection)
    }
}

/// A projection an adapter can sit on, as the checkpoint names it.
struct Site {
    module: &'static str,
    name: &'static str,
    /// Targets that select it too when all are given (a fused projection's parts; a part's
    /// fused projection).
    aliases: &'static [&'static str],
    inputs: i64,
    rows: i64,
}

impl Site {
    fn selected(&self, lora: &LoraConfig) -> bool {
        lora.targets(self.name)
            || (!self.aliases.is_empty() && self.aliases.iter().all(|alias| lora.targets(alias)))
    }
}

/// A layer's projections in the decoder's four fused groups (q/k/v, o, gate/up, down), as the
/// family's checkpoints name them: apart (q_proj …) or fused (Phi-3's qkv_proj, gate_up_proj).
fn sites(cfg: &Config) -> [Vec<Site>; 4] {
    let (hidden, inner) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
    let d = cfg.head_dim() as i64;
    let (q, kv) = (
        cfg.num_attention_heads as i64 * d,
        cfg.num_kv_heads() as i64 * d,
    );
    let site = |module, name, aliases, inputs, rows| Site {
        module,
        name,
        aliases,
        inputs,
        rows,
    };
    let o = vec![site("self_attn", "o_proj", &[][..], q, hidden)];
    let down = vec![site("mlp", "down_proj", &[][..], inner, hidden)];
    if crate::arch::fused_checkpoint(cfg) {
        let qkv_parts: &[&str] = &["q_proj", "k_proj", "v_proj"];
        let gate_up_parts: &[&str] = &["gate_proj", "up_proj"];
        [
            vec![site("self_attn", "qkv_proj", qkv_parts, hidden, q + 2 * kv)],
            o,
            vec![site(
                "mlp",
                "gate_up_proj",
                gate_up_parts,
                hidden,
                2 * inner,
            )],
            down,
        ]
    } else {
        let qkv: &[&str] = &["qkv_proj"];
        let gate_up: &[&str] = &["gate_up_proj"];
        [
            vec![
                site("self_attn", "q_proj", qkv, hidden, q),
                site("self_attn", "k_proj", qkv, hidden, kv),
                site("self_attn", "v_proj", qkv, hidden, kv),
            ],
            o,
            vec![
                site("mlp", "gate_proj", gate_up, hidden, inner),
                site("mlp", "up_proj", gate_up, hidden, inner),
            ],
            down,
        ]
    }
}

/// One adapter: the update B A x scaled by α / r.
#[derive(Debug)]
struct Adapter {
    /// (r, in), fp32.
    a: Tensor,
    /// (out, r), fp32.
    b: Tensor,
    scale: f64,
}

impl Adapter {
    /// Declares `lora_A` and `lora_B` under `p`: A as PEFT initialises it (Kaiming-uniform with
    /// a = √5, i.e. U(±1/√in)), B zero, so a fresh adapter changes nothing.
    fn new(p: &nn::Path, inputs: i64, outputs: i64, lora: &LoraConfig) -> Self {
        let r = i64::from(lora.rank);
        let bound = 1.0 / (inputs as f64).sqrt();
        let a = (p / "lora_A").var(
            "weight",
            &[r, inputs],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = (p / "lora_B").var("weight", &[outputs, r], Init::Const(0.0));
        Self {
            a,
            b,
            scale: lora.scale(),
        }
    }

    /// x (…, in) in the base's dtype → the update (…, out) in fp32.
    fn forward(&self, x: &Tensor, dropout: f64) -> Tensor {
        let x = x.to_kind(Kind::Float);
        let x = if dropout > 0.0 {
            x.dropout(dropout, true)
        } else {
            x
        };
        x.matmul(&self.a.tr()).matmul(&self.b.tr()) * self.scale
    }

    /// (α / r) · B A, the update folded into the base weight (out, in), fp32.
    fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale
    }
}

/// A (possibly fused) projection's adapters: one optional adapter per Hugging Face part, each
/// with the number of output rows its part owns in the fused weight.
#[derive(Debug)]
pub(crate) struct ProjectionAdapters {
    parts: Vec<(i64, Option<Adapter>)>,
}

impl ProjectionAdapters {
    /// Adds the adapters' update to the projection's output `base` (…, Σ rows) of input `x`.
    pub(crate) fn add_to(&self, x: &Tensor, base: Tensor, dropout: f64) -> Tensor {
        if self.parts.iter().all(|(_, a)| a.is_none()) {
            return base;
        }
        let mut shape = base.size();
        let deltas: Vec<Tensor> = self
            .parts
            .iter()
            .map(|(rows, adapter)| match adapter {
                Some(adapter) => adapter.forward(x, dropout),
                None => {
                    *shape.last_mut().expect("a feature axis") = *rows;
                    Tensor::zeros(shape.as_slice(), (Kind::Float, base.device()))
                }
            })
            .collect();
        let delta = if deltas.len() == 1 {
            deltas.into_iter().next().expect("one")
        } else {
            Tensor::cat(&deltas, -1)
        };
        let kind = base.kind();
        base + delta.to_kind(kind)
    }

    /// The update of the fused weight, (Σ rows, in), fp32; None without any adapter.
    fn delta_weight(&self, inputs: i64, device: Device) -> Option<Tensor> {
        if self.parts.iter().all(|(_, a)| a.is_none()) {
            return None;
        }
        let parts: Vec<Tensor> = self
            .parts
            .iter()
            .map(|(rows, adapter)| match adapter {
                Some(adapter) => adapter.delta_weight(),
                None => Tensor::zeros([*rows, inputs], (Kind::Float, device)),
            })
            .collect();
        Some(Tensor::cat(&parts, 0))
    }
}

/// The adapters of one decoder layer.
#[derive(Debug)]
pub(crate) struct LayerAdapters {
    pub(crate) qkv: ProjectionAdapters,
    pub(crate) o: ProjectionAdapters,
    pub(crate) gate_up: ProjectionAdapters,
    pub(crate) down: ProjectionAdapters,
}

/// Every layer's adapters and the config they were made with.
#[derive(Debug)]
pub(crate) struct Adapters {
    pub(crate) layers: Vec<LayerAdapters>,
    pub(crate) config: LoraConfig,
}

impl Adapters {
    /// Declares the adapters `lora` asks for on a decoder of shape `cfg` in `vs` (fp32, on
    /// `vs`'s device), under the base model's own names: `model.layers.N.self_attn.q_proj.
    /// lora_A.weight` and so on.
    pub(crate) fn new(vs: &nn::VarStore, cfg: &Config, lora: &LoraConfig) -> Self {
        let sites = sites(cfg);
        let root = vs.root();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let layer = &root / "model" / "layers" / i;
                let group = |g: usize| ProjectionAdapters {
                    parts: sites[g]
                        .iter()
                        .map(|site| {
                            let adapter = site.selected(lora).then(|| {
                                let path = &layer / site.module / site.name;
                                Adapter::new(&path, site.inputs, site.rows, lora)
                            });
                            (site.rows, adapter)
                        })
                        .collect(),
                };
                LayerAdapters {
                    qkv: group(0),
                    o: group(1),
                    gate_up: group(2),
                    down: group(3),
                }
            })
            .collect();
        // The modules adapted, as this checkpoint names them: what PEFT's target_modules says.
        let targets = sites
            .iter()
            .flatten()
            .filter(|site| site.selected(lora))
            .map(|site| site.name.to_owned())
            .collect();
        Self {
            layers,
            config: LoraConfig {
                targets,
                ..lora.clone()
            },
        }
    }

    /// The updates to fold into the base's fused weights, by the base's parameter names
    /// (`model.layers.N.self_attn.qkv_proj.weight`, …), fp32.
    pub(crate) fn merged_deltas(&self, cfg: &Config, device: Device) -> Vec<(String, Tensor)> {
        let (hidden, inner) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let q_rows = cfg.num_attention_heads as i64 * cfg.head_dim() as i64;
        let mut deltas = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let projections = [
                ("self_attn.qkv_proj", &layer.qkv, hidden),
                ("self_attn.o_proj", &layer.o, q_rows),
                ("mlp.gate_up_proj", &layer.gate_up, hidden),
                ("mlp.down_proj", &layer.down, inner),
            ];
            for (name, adapters, inputs) in projections {
                if let Some(delta) = adapters.delta_weight(inputs, device) {
                    deltas.push((format!("model.layers.{i}.{name}.weight"), delta));
                }
            }
        }
        deltas
    }
}

/// Writes the adapters in `vs` as a PEFT directory: `adapter_config.json` and
/// `adapter_model.safetensors` (PEFT's tensor names), written into a hidden sibling first and
/// renamed into place.
pub(crate) fn save_peft(
    vs: &nn::VarStore,
    lora: &LoraConfig,
    base: &str,
    dir: &Path,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelError::Io { path, source }
    };
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&temp).map_err(io(&temp))?;
    let written = (|| -> Result<()> {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let value = t.detach().to_device(Device::Cpu).contiguous();
                (format!("{PEFT_PREFIX}{name}"), value)
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, temp.join("adapter_model.safetensors"))?;
        // Trained modules that are not adapters (a reward model's or critic's `score` head)
        // are PEFT's `modules_to_save`, saved whole under their own names.
        let mut modules: Vec<String> = named
            .iter()
            .filter(|(name, _)| !is_adapter_tensor(name))
            .filter_map(|(name, _)| {
                let module = name.strip_prefix(PEFT_PREFIX)?.rsplit_once('.')?.0;
                Some(module.to_owned())
            })
            .collect();
        modules.dedup();
        let task_type = match modules.is_empty() {
            true => "CAUSAL_LM",
            false => "SEQ_CLS",
        };
        let config = json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base,
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": lora.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": (!modules.is_empty()).then_some(modules),
            "use_rslora": false,
            "use_dora": false,
        });
        let path = temp.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
        std::fs::write(&path, text).map_err(io(&path))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&temp, dir).map_err(io(dir))
}

/// Whether a tensor of an adapter store is one of the adapters' A or B matrices (rather than a
/// module trained whole beside them).
fn is_adapter_tensor(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// Reads a PEFT LoRA directory: its config as a [`LoraConfig`] and its tensors under the base
/// model's names (PEFT's prefix and adapter name taken off). Refuses what prefloop cannot
/// apply exactly (DoRA, rsLoRA, per-module ranks, biases, other adapter types), naming the
/// file and the field.
pub(crate) fn read_peft(dir: &Path) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    let config_path = dir.join("adapter_config.json");
    let bad = |message: String| ModelError::Config {
        path: config_path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |name: &str| value.get(name).filter(|v| !v.is_null());
    if field("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(bad("peft_type: prefloop loads LORA adapters only".into()));
    }
    for (name, unsupported) in [
        (
            "use_dora",
            field("use_dora").and_then(|v| v.as_bool()) == Some(true),
        ),
        (
            "use_rslora",
            field("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        ),
        (
            "fan_in_fan_out",
            field("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true),
        ),
        (
            "bias",
            field("bias")
                .and_then(|v| v.as_str())
                .is_some_and(|b| b != "none"),
        ),
        (
            "rank_pattern",
            field("rank_pattern")
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty()),
        ),
        (
            "alpha_pattern",
            field("alpha_pattern")
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty()),
        ),
        (
            "lora_bias",
            field("lora_bias").and_then(|v| v.as_bool()) == Some(true),
        ),
        (
            "layers_to_transform",
            field("layers_to_transform").is_some(),
        ),
        ("layer_replication", field("layer_replication").is_some()),
        ("target_parameters", field("target_parameters").is_some()),
        (
            "trainable_token_indices",
            field("trainable_token_indices").is_some(),
        ),
        (
            "modules_to_save",
            field("modules_to_save")
                .and_then(|v| v.as_array())
                .is_some_and(|m| !m.is_empty()),
        ),
    ] {
        if unsupported {
            return Err(bad(format!("{name}: not supported by prefloop's LoRA")));
        }
    }
    let rank = field("r")
        .and_then(|v| v.as_u64())
        .and_then(|r| u32::try_from(r).ok())
        .ok_or_else(|| bad("r: missing or not a positive integer".into()))?;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad("lora_alpha: missing or not a number".into()))?;
    let dropout = field("lora_dropout")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let targets: Vec<String> = match field("target_modules") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("target_modules: expected module names".into()))?,
        Some(serde_json::Value::String(s)) if s == "all-linear" => {
            PROJECTIONS.iter().map(|p| (*p).to_owned()).collect()
        }
        _ => return Err(bad("target_modules: expected a list of module names".into())),
    };
    let lora = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
    };
    lora.validate().map_err(bad)?;

    let file = dir.join("adapter_model.safetensors");
    let tensors = crate::load::read_safetensors_file(&file)?;
    let weights = tensors
        .into_iter()
        .map(|(name, t)| {
            let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
            // Saved by peft without an adapter name; with one (`lora_A.default.weight`), the
            // name is taken off too.
            let name = name
                .replace(".lora_A.default.", ".lora_A.")
                .replace(".lora_B.default.", ".lora_B.");
            (name, t)
        })
        .collect();
    Ok((lora, weights))
}

impl Model {
    /// Attaches fresh adapters (`lora`, A drawn from libtorch's generator seeded with `seed`,
    /// B zero) and freezes the base: from here a trainer updates [`Model::trainable`] only.
    pub fn with_lora(mut self, lora: &LoraConfig, seed: u64) -> Result<Self> {
        lora.validate().map_err(|message| ModelError::Config {
            path: self.source.clone(),
            message,
        })?;
        tch::manual_seed(seed as i64);
        let adapters = nn::VarStore::new(self.vs.device());
        self.decoder.attach_lora(&adapters, lora);
        self.vs.freeze();
        self.adapters = Some(adapters);
        Ok(self)
    }

    /// Loads the PEFT LoRA adapter in `dir` (made by `peft` or by prefloop) onto this model,
    /// its base: every tensor the adapter holds must fit a declared adapter, by name and
    /// shape, and none may be left over.
    pub fn load_adapter(self, dir: &Path) -> Result<Self> {
        let (lora, weights) = read_peft(dir)?;
        let file = dir.join("adapter_model.safetensors");
        let model = self.with_lora(&lora, 0)?;
        let store = model.adapters.as_ref().expect("attached");
        let declared = store.variables();
        if let Some((name, _)) = weights.iter().find(|(n, _)| !declared.contains_key(n)) {
            return Err(ModelError::Config {
                path: file,
                message: format!(
                    "tensor `{name}` fits no adapter of this base model (target_modules {:?})",
                    lora.targets
                ),
            });
        }
        fill(store, weights, &file)?;
        Ok(model)
    }

    /// What a trainer updates: the adapters when attached, otherwise every weight.
    pub fn trainable(&self) -> &nn::VarStore {
        self.adapters.as_ref().unwrap_or(&self.vs)
    }

    /// Writes the attached adapters alone as a PEFT directory at `dir` (replacing one that is
    /// there); an error if the model has none.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let (Some(store), Some(lora)) = (&self.adapters, self.decoder.lora()) else {
            return Err(ModelError::Config {
                path: dir.to_owned(),
                message: "the model has no LoRA adapters to save".into(),
            });
        };
        save_peft(store, lora, &self.source.display().to_string(), dir)
    }

    /// The weights a merged save writes, under the decoder's names: each adapted projection's
    /// base weight plus its adapters' (α / r) · B A, and the modules trained whole beside the
    /// adapters (a `score` head), all in the base's dtype.
    pub(crate) fn merged_weights(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        if let Some(store) = &self.adapters {
            let kind = self.kind();
            named.extend(
                store
                    .variables()
                    .into_iter()
                    .filter(|(name, _)| !is_adapter_tensor(name))
                    .map(|(name, t)| (name, t.to_kind(kind))),
            );
        }
        if let Some(adapters) = self.decoder.adapters() {
            let deltas: std::collections::HashMap<String, Tensor> = adapters
                .merged_deltas(self.decoder.config(), self.vs.device())
                .into_iter()
                .collect();
            tch::no_grad(|| {
                for (name, weight) in &mut named {
                    if let Some(delta) = deltas.get(name.as_str()) {
                        let merged = weight.to_kind(Kind::Float) + delta;
                        *weight = merged.to_kind(weight.kind());
                    }
                }
            });
        }
        named
    }
}
