//! `prefloop bench random-model` and `prefloop bench device`: what scripts/gpu-check needs on
//! a machine that has nothing but the binary. The first writes a Hugging Face directory of
//! random weights in a real model's shape (no download); the second reports what this
//! machine's libtorch offers (CUDA, bf16, the attention kernels it picks for the model's shapes)
//! and how the model's logits on the device in its compute dtype compare with the CPU in fp32.

use std::path::PathBuf;

use anyhow::Result;
use prefloop_model::{Config, Decoder, Model, Precision, best_device};
use tch::{Device, Kind, Tensor};

use crate::model_args::ModelArgs;

/// Model shapes the GPU check measures.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shape {
    /// SmolLM2-135M (the embedded default): 30 layers, hidden 576, 9 heads / 3 KV heads.
    Smollm2_135m,
    /// Qwen2-1.5B: 28 layers, hidden 1536, 12 heads / 2 KV heads, q/k/v bias, vocab 151936.
    Qwen2_1_5b,
    /// Qwen3-0.6B: 28 layers, hidden 1024, 16 heads × 128 / 8 KV heads, q/k norms, vocab 151936.
    Qwen3_0_6b,
    /// 2 layers, hidden 64, SmolLM2's vocabulary: for dry runs on a CPU.
    Tiny,
    /// Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads, vocab 128256, untied head.
    Llama3_8b,
    /// SmolLM2-135M's depth and head layout (30 layers, 9 heads / 3 KV heads) at hidden 64
    /// (head dim 8): each step costs what its kernels' launches cost, the CPU's stand-in for
    /// a GPU's overhead-bound decode.
    DeepNarrow,
}

impl Shape {
    pub(super) fn config(self, eos: Option<serde_json::Value>, bos: Option<u32>) -> Config {
        let (model_type, vocab, hidden, inner, layers, heads, kv, theta, max_positions) = match self
        {
            Shape::Smollm2_135m => ("llama", 49152, 576, 1536, 30, 9, 3, 1e5, 8192),
            Shape::Qwen2_1_5b => ("qwen2", 151_936, 1536, 8960, 28, 12, 2, 1e6, 32768),
            Shape::Qwen3_0_6b => ("qwen3", 151_936, 1024, 3072, 28, 16, 8, 1e6, 40960),
            Shape::Llama3_8b => ("llama", 128_256, 4096, 14336, 32, 32, 8, 5e5, 8192),
            Shape::Tiny => ("llama", 49152, 64, 128, 2, 4, 2, 1e5, 2048),
            Shape::DeepNarrow => ("llama", 49152, 64, 192, 30, 9, 3, 1e5, 8192),
        };
        Config {
            model_type: model_type.into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inner,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: match self {
                Shape::DeepNarrow => Some(8),
                Shape::Qwen3_0_6b => Some(128),
                _ => None,
            },
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: None,
            max_position_embeddings: max_positions,
            tie_word_embeddings: !matches!(self, Shape::Llama3_8b),
            attention_bias: model_type == "qwen2",
            bos_token_id: bos,
            eos_token_id: eos,
            ..Config::default()
        }
    }
}

/// A Hugging Face directory of random weights in a real model's shape.
#[derive(Debug, clap::Args)]
pub struct RandomModelArgs {
    /// The real model whose shape the weights take.
    #[arg(long, value_enum)]
    shape: Shape,
    /// Directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// The model whose tokenizer (and chat template, EOS and BOS) the new one takes: a GGUF
    /// file or a Hugging Face directory; the embedded default when omitted.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Precision the weights are stored in.
    #[arg(long, default_value_t = Precision::Bf16)]
    dtype: Precision,
    /// Seeds the weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

pub fn random_model(args: &RandomModelArgs) -> Result<()> {
    let source = Model::load(args.tokenizer.as_deref(), Device::Cpu, Precision::Fp32)?;
    let base = source.decoder.config();
    let config = args
        .shape
        .config(base.eos_token_id.clone(), base.bos_token_id);
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let decoder = Decoder::new(&vs, &config)?;
    // In name order, so the seed alone decides the weights (the store is a hash map).
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::manual_seed(args.seed);
    tch::no_grad(|| {
        for (name, mut var) in variables {
            if name.ends_with("norm.weight") {
                let _ = var.fill_(1.0);
            } else if name.ends_with(".bias") {
                let _ = var.zero_();
            } else {
                // transformers' initializer_range for both families.
                var.copy_(&(var.randn_like() * 0.02));
            }
        }
    });
    let kind = args.dtype.kind(Device::Cpu);
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    let parameters: i64 = vs.variables().values().map(Tensor::numel).sum::<usize>() as i64;
    let model = Model {
        vs,
        decoder,
        tokenizer: source.tokenizer,
        source: args.out.clone(),
        adapters: None,
    };
    model.save(&args.out)?;
    println!(
        "wrote {} ({:?}, {:.1}M parameters, {kind:?})",
        args.out.display(),
        args.shape,
        parameters as f64 / 1e6
    );
    Ok(())
}

/// What this machine's libtorch offers, and the model's logits on the device in `--dtype`
/// against the CPU in fp32.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn device(args: &DeviceArgs) -> Result<()> {
    let device = best_device();
    println!("bench device");
    if tch::Cuda::is_available() {
        println!(
            "cuda: {} device(s), cuDNN {}",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                "available"
            } else {
                "missing"
            }
        );
    } else {
        println!("cuda: not available (libtorch sees no GPU); measuring the CPU");
    }
    let a = Tensor::randn([256, 256], (Kind::Float, device));
    let exact = a.matmul(&a);
    let bf16 = a.to_kind(Kind::BFloat16).matmul(&a.to_kind(Kind::BFloat16));
    let error =
        ((bf16.to_kind(Kind::Float) - &exact).abs().max() / exact.abs().max()).double_value(&[]);
    println!("bf16 matmul on {device:?}: max error {error:.2e} of the largest fp32 entry");

    let model = args.model.load(device)?;
    println!(
        "model: {} on {device:?} in {:?}",
        model.source.display(),
        model.kind()
    );
    let decoder = &model.decoder;
    println!(
        "sdpa backend, training forward and prefill (8 × 512, causal): {}",
        decoder.causal_attention_backend(8, 512)
    );
    for rows in [128, 512] {
        println!(
            "sdpa backend, decode step ({rows} rows, 384 keys, query groups folded, key mask): {}",
            decoder.decode_attention_backend(rows, 384)
        );
    }

    let text = model
        .tokenizer
        .apply_chat_template("What is the capital of France?")?;
    let ids: Vec<i64> = model
        .tokenizer
        .encode(&text)?
        .into_iter()
        .map(i64::from)
        .collect();
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let ours = tch::no_grad(|| decoder.forward(&input.to_device(device)))
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    let reference = Model::load(args.model.model.as_deref(), Device::Cpu, Precision::Fp32)?;
    let exact = tch::no_grad(|| reference.decoder.forward(&input));
    let diff = (&ours - &exact).abs();
    let spread = exact.std(true).double_value(&[]);
    let agree = ours
        .argmax(-1, false)
        .eq_tensor(&exact.argmax(-1, false))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    println!(
        "logits, {device:?} {:?} against CPU fp32 over {} positions: max |Δ| {:.4}, mean |Δ| {:.4} \
         (logits' std {spread:.3}), top-1 agrees at {:.1}% of positions",
        model.kind(),
        ids.len(),
        diff.max().double_value(&[]),
        diff.mean(Kind::Float).double_value(&[]),
        agree * 100.0
    );
    Ok(())
}
