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
    parse(&bytes, path)
}

/// The contents of the GGUF file `bytes`, read from `path` (for errors).
fn parse(bytes: &[u8], path: &Path) -> Result<GgufContents> {
    let bad = |message: String| ModelError::Gguf {
        path: path.to_owned(),
        message,
    };
    // ggus trusts the file's layout (it slices, allocates and casts type ids as the file
    // says), so a cut or damaged file is caught here first.
    check_layout(bytes).map_err(bad)?;
    let gguf = GGuf::new(bytes).map_err(|e| bad(e.to_string()))?;
    let arch = gguf
        .general_architecture()
        .map_err(|e| bad(format!("general.architecture: {e:?}")))?;
    let model_type = match arch {
        "llama" | "qwen2" | "qwen3" => arch.to_owned(),
        other => {
            return Err(bad(format!(
                "general.architecture `{other}`: prefloop reads GGUF files of llama, qwen2 and \
                 qwen3"
            )));
        }
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
        ..Config::default()
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

/// The bytes of ggml type `id` per block of values, and the values per block (ggml.c's
/// type traits), for the types whose layout ggus knows.
fn ggml_block(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 => (4, 1),       // F32
        1 | 30 => (2, 1),  // F16, BF16
        2 => (18, 32),     // Q4_0
        3 => (20, 32),     // Q4_1
        6 => (22, 32),     // Q5_0
        7 => (24, 32),     // Q5_1
        8 => (34, 32),     // Q8_0
        9 => (36, 32),     // Q8_1
        10 => (84, 256),   // Q2_K
        11 => (110, 256),  // Q3_K
        12 => (144, 256),  // Q4_K
        13 => (176, 256),  // Q5_K
        14 => (210, 256),  // Q6_K
        15 => (292, 256),  // Q8_K
        24 => (1, 1),      // I8
        25 => (2, 1),      // I16
        26 => (4, 1),      // I32
        27 | 28 => (8, 1), // I64, F64
        _ => return None,
    })
}

/// Reads a GGUF file's fields in order, every read bounds-checked.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "cut short: {what} at byte {} needs {n} bytes, the file has {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let field = &self.bytes[self.at..end];
        self.at = end;
        Ok(field)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn string(&mut self, what: &str) -> std::result::Result<&'a str, String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| format!("{what} at byte {} is not UTF-8", self.at))
    }

    /// One metadata value of type `ty` (gguf.md's value types); nested arrays allowed.
    fn value(&mut self, ty: u32, key: &str) -> std::result::Result<(), String> {
        match ty {
            0 | 1 => drop(self.take(1, key)?),
            2 | 3 => drop(self.take(2, key)?),
            4..=6 => drop(self.take(4, key)?),
            10..=12 => drop(self.take(8, key)?),
            7 => {
                let b = self.take(1, key)?;
                if b[0] > 1 {
                    return Err(format!("`{key}`: a bool of {}", b[0]));
                }
            }
            8 => drop(self.string(key)?),
            9 => {
                let element = self.u32(key)?;
                let count = self.u64(key)?;
                // Each element takes at least a byte: a count past the file is damage.
                if count > (self.bytes.len() - self.at) as u64 {
                    return Err(format!(
                        "`{key}`: an array of {count} elements runs past the end"
                    ));
                }
                for _ in 0..count {
                    self.value(element, key)?;
                }
            }
            other => return Err(format!("`{key}`: unknown value type {other}")),
        }
        Ok(())
    }
}

/// Checks that `bytes` is a whole GGUF v3 file: a header, metadata and tensor table that
/// parse within the file, known types, and tensor data that lies inside it.
fn check_layout(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut f = Fields { bytes, at: 0 };
    if f.take(4, "the magic")? != b"GGUF" {
        return Err("not a GGUF file (no GGUF magic)".into());
    }
    let version = f.u32("the version")?;
    if version != 3 {
        return Err(format!("GGUF version {version}; prefloop reads version 3"));
    }
    let tensors = f.u64("the tensor count")?;
    let kvs = f.u64("the metadata count")?;
    let mut alignment = 32;
    for _ in 0..kvs {
        let key = f.string("a metadata key")?;
        let ty = f.u32(key)?;
        let start = f.at;
        f.value(ty, key)?;
        if key == "general.alignment" {
            alignment = match (ty, &bytes[start..f.at]) {
                (4, b) => u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                (10, b) => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                _ => 0,
            };
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err("general.alignment is not a power of two".into());
            }
        }
    }
    let mut data_end = 0u64;
    for _ in 0..tensors {
        let name = f.string("a tensor name")?;
        let dims = f.u32(name)?;
        if !(1..=4).contains(&dims) {
            return Err(format!("tensor `{name}` has {dims} dimensions (1 to 4)"));
        }
        let mut shape = Vec::with_capacity(dims as usize);
        for _ in 0..dims {
            shape.push(f.u64(name)?);
        }
        let ty = f.u32(name)?;
        let offset = f.u64(name)?;
        let (block_bytes, block_values) = ggml_block(ty).ok_or_else(|| {
            format!("tensor `{name}` has ggml type {ty}, which prefloop cannot read")
        })?;
        let values = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|_| shape.first().is_none_or(|d| d % block_values == 0))
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {shape:?}"))?;
        let end = (values / block_values)
            .checked_mul(block_bytes)
            .and_then(|n| n.checked_add(offset))
            .ok_or_else(|| format!("tensor `{name}` has an impossible size"))?;
        data_end = data_end.max(end);
    }
    let data_start = (f.at as u64).div_ceil(alignment) * alignment;
    let present = (bytes.len() as u64).saturating_sub(data_start);
    if data_end > present {
        return Err(format!(
            "cut short: the tensor data needs {data_end} bytes after byte {data_start}, the file \
             holds {present}"
        ));
    }
    Ok(())
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
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
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

    /// Byte positions of fields in the default GGUF: (what, offset, length).
    fn fields_of(bytes: &[u8]) -> Vec<(String, usize, usize)> {
        let mut fields = vec![
            ("magic".to_owned(), 0, 4),
            ("version".to_owned(), 4, 4),
            ("tensor count".to_owned(), 8, 8),
            ("metadata count".to_owned(), 16, 8),
        ];
        let mut f = Fields { bytes, at: 16 };
        let kvs = f.u64("").unwrap();
        for i in 0..kvs {
            let at = f.at;
            let key = f.string("").unwrap();
            let ty = f.u32("").unwrap();
            if i < 3 || key == "tokenizer.ggml.tokens" {
                fields.push((format!("length of key {key}"), at, 8));
                fields.push((format!("type of {key}"), f.at - 4, 4));
            }
            if ty == 9 {
                fields.push((format!("array count of {key}"), f.at + 4, 8));
            }
            f.value(ty, key).unwrap();
        }
        for i in 0..4 {
            let at = f.at;
            let name = f.string("").unwrap().to_owned();
            fields.push((format!("name length of tensor {i}"), at, 8));
            fields.push((format!("dimensions of {name}"), f.at, 4));
            let dims = f.u32("").unwrap();
            fields.push((format!("first dimension of {name}"), f.at, 8));
            f.take(8 * u64::from(dims), "").unwrap();
            fields.push((format!("type of {name}"), f.at, 4));
            fields.push((format!("offset of {name}"), f.at + 4, 8));
            f.take(12, "").unwrap();
        }
        fields
    }

    #[test]
    fn a_cut_or_damaged_gguf_is_an_error_naming_the_file_never_a_panic() {
        let path = crate::default_model_path();
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "skipping: no default model at {}; run scripts/setup",
                path.display()
            );
            return;
        };
        let named = |result: Result<GgufContents>, case: &str| {
            let err = result.expect_err(case).to_string();
            assert!(err.contains(&path.display().to_string()), "{case}: {err}");
        };
        for i in 1..=20 {
            let cut = bytes.len() * i / 21;
            named(parse(&bytes[..cut], &path), &format!("cut at byte {cut}"));
        }
        for cut in [0, 3, 20, 100] {
            named(parse(&bytes[..cut], &path), &format!("cut at byte {cut}"));
        }
        for (what, at, len) in fields_of(&bytes) {
            let mut damaged = bytes.clone();
            // The field's top byte: a count, length, offset or dimension past the file, a type
            // or version no one defined.
            damaged[at + len - 1] ^= 0x80;
            named(
                parse(&damaged, &path),
                &format!("the top bit of the {what} flipped"),
            );
        }
        let mut damaged = bytes.clone();
        damaged[4] = 2;
        named(parse(&damaged, &path), "GGUF version 2");
        assert!(parse(&bytes, &path).is_ok(), "the file itself loads");
    }

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
