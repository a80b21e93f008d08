//! Loading a llama.cpp GGUF file: hyper-parameters from its metadata, weights dequantised to
//! f32 under their Hugging Face names, and the tokenizer and chat template it carries.
//!
//! ggus parses the container; dequantisation is done here on the raw bytes (ggml-quants would
//! need an unsafe cast from bytes to its block structs, and this crate has no unsafe code).

use std::path::Path;

use ggus::{GGmlType, GGuf, GGufMetaMapExt};
use half::{bf16, f16};
use tch::Tensor;

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::tokenizer::GgufVocab;

/// What a GGUF file holds, in the form the rest of the crate uses.
#[derive(Debug)]
pub struct GgufContents {
    pub config: Config,
    /// f32 CPU tensors keyed by Hugging Face parameter names.
    pub weights: Vec<(String, Tensor)>,
    pub vocab: GgufVocab,
}

pub fn load(path: &Path) -> Result<GgufContents> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| ModelError::Gguf {
        path: path.to_owned(),
        message,
    };
    let gguf = GGuf::new(&bytes).map_err(|e| bad(e.to_string()))?;
    let arch = gguf
        .general_architecture()
        .map_err(|e| bad(format!("general.architecture: {e:?}")))?;
    let model_type = match arch {
        "llama" | "qwen2" => arch.to_owned(),
        other => return Err(ModelError::UnknownArchitecture(other.to_owned())),
    };
    let int = |key: &str| {
        gguf.get_usize(&format!("{arch}.{key}"))
            .map_err(|e| bad(format!("{arch}.{key}: {e:?}")))
    };
    let float = |key: &str, default: f64| {
        gguf.get_f32(&format!("{arch}.{key}"))
            .map_or(default, f64::from)
    };

    let vocab = GgufVocab::from_gguf(&gguf).map_err(bad)?;
    let heads = int("attention.head_count")?;
    let hidden = int("embedding_length")?;
    let config = Config {
        model_type: model_type.clone(),
        vocab_size: int("vocab_size").unwrap_or(vocab.tokens.len()),
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(int("attention.head_count_kv").unwrap_or(heads)),
        head_dim: Some(int("attention.key_length").unwrap_or(hidden / heads)),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: float("rope.freq_base", 10_000.0),
        rope_scaling: None,
        max_position_embeddings: int("context_length")?,
        tie_word_embeddings: !gguf.tensors.contains_key("output.weight"),
        attention_bias: model_type == "qwen2",
        bos_token_id: vocab.bos,
        eos_token_id: vocab.eos.map(serde_json::Value::from),
    };

    let mut weights = Vec::with_capacity(gguf.tensors.len());
    for (&name, meta) in &gguf.tensors {
        let Some(hf_name) = hf_name(name) else {
            tracing::debug!(
                tensor = name,
                "skipping a GGUF tensor prefloop does not use"
            );
            continue;
        };
        let info = meta.to_info();
        let start = info.offset();
        let data = gguf
            .data
            .get(start..start + info.nbytes())
            .ok_or_else(|| bad(format!("tensor `{name}` runs past the end of the file")))?;
        let values = dequantize(info.ty(), data).ok_or_else(|| ModelError::UnsupportedQuant {
            path: path.to_owned(),
            name: name.to_owned(),
            kind: format!("{:?}", info.ty()),
        })?;
        // GGUF lists dimensions innermost first; torch wants them outermost first.
        let shape: Vec<i64> = info.shape().iter().rev().map(|&d| d as i64).collect();
        let mut tensor = Tensor::from_slice(&values).reshape(&shape);
        // llama.cpp's converter permutes q/k rows for its interleaved RoPE; undo it so the
        // weights match the Hugging Face (rotate-half) layout.
        if model_type == "llama" {
            if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                tensor = unpermute(&tensor, heads);
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                tensor = unpermute(&tensor, config.num_kv_heads());
            }
        }
        weights.push((hf_name, tensor));
    }
    Ok(GgufContents {
        config,
        weights,
        vocab,
    })
}

/// Inverse of llama.cpp's `permute`: rows (H, 2, D/2) were stored as (H, D/2, 2).
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let shape = w.size();
    let rows = shape[0];
    let heads = heads as i64;
    let rest: Vec<i64> = shape[1..].to_vec();
    let mut split = vec![heads, rows / heads / 2, 2];
    split.extend(&rest);
    w.reshape(&split)
        .transpose(1, 2)
        .contiguous()
        .reshape(&shape)
}

fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = tensor.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{param}"))
}

/// Block layouts of ggml (ggml-common.h): each block holds 32 values.
fn dequantize(ty: GGmlType, data: &[u8]) -> Option<Vec<f32>> {
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    Some(match ty {
        GGmlType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GGmlType::F16 => data.chunks_exact(2).map(half).collect(),
        GGmlType::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        // d: f16, then 32 signed bytes: x = d·q
        GGmlType::Q8_0 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = half(b);
                b[2..].iter().map(move |&q| d * q as i8 as f32)
            })
            .collect(),
        // d: f16, then 16 bytes of nibbles: low nibbles are values 0..16, high 16..32; x = d·(q−8)
        GGmlType::Q4_0 => data
            .chunks_exact(18)
            .flat_map(|b| {
                let d = half(b);
                nibbles(&b[2..]).map(move |q| d * (q as f32 - 8.0))
            })
            .collect(),
        // d: f16, m: f16, then nibbles as Q4_0; x = d·q + m
        GGmlType::Q4_1 => data
            .chunks_exact(20)
            .flat_map(|b| {
                let (d, m) = (half(b), half(&b[2..]));
                nibbles(&b[4..]).map(move |q| d * q as f32 + m)
            })
            .collect(),
        _ => return None,
    })
}

fn nibbles(quants: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let low = quants.iter().map(|q| q & 0x0f);
    let high = quants.iter().map(|q| q >> 4);
    low.chain(high)
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn q4_1_blocks_dequantise_low_nibbles_first() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| (15 - i) << 4 | i));
        let values = dequantize(GGmlType::Q4_1, &block).unwrap();
        assert_eq!(values[0], -1.0);
        assert_eq!(values[15], 0.5 * 15.0 - 1.0);
        assert_eq!(values[16], 0.5 * 15.0 - 1.0);
        assert_eq!(values[31], -1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks_dequantise() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let values = dequantize(GGmlType::Q8_0, &block).unwrap();
        assert_eq!(values[0], -4.0);
        assert_eq!(values[31], 3.75);

        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x8f; 16]);
        let values = dequantize(GGmlType::Q4_0, &block).unwrap();
        assert_eq!((values[0], values[16]), (14.0, 0.0));
        assert!(dequantize(GGmlType::Q6K, &block).is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(H, 2, D/2, C).swapaxes(1, 2).reshape(w.shape)
        let (heads, dim, cols) = (3, 8, 5);
        let hf = Tensor::arange(heads * dim * cols, (Kind::Float, tch::Device::Cpu))
            .reshape([heads * dim, cols]);
        let permuted = hf
            .reshape([heads, 2, dim / 2, cols])
            .transpose(1, 2)
            .contiguous()
            .reshape([heads * dim, cols]);
        assert!(unpermute(&permuted, heads as usize).equal(&hf));
    }

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
