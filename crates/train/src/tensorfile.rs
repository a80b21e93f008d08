//! Safetensors files written and read one tensor at a time, so a checkpoint of a large model
//! never holds more than one tensor's bytes on the host beyond the model itself (tch's own
//! reader loads the whole file, then builds every tensor: about twice the file at its peak).
//! The format is the safetensors crate's: an 8-byte header length, a JSON header, the data.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, View};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// Headers larger than this are refused (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// A tensor on any device, copied to the host only when the writer asks for its bytes.
struct Lazy {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let host = self.tensor.to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; self.data_len()];
        // A host tensor of a supported kind copies into a buffer of its own size.
        host.f_copy_data_u8(&mut bytes, host.numel())
            .expect("a host tensor copies out");
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes `tensors` (any device) to `path`, one tensor on the host at a time.
pub fn write(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let views = tensors
        .into_iter()
        .map(|(name, tensor)| {
            let dtype = dtype(tensor.kind()).ok_or_else(|| TrainError::Checkpoint {
                path: path.to_owned(),
                message: format!("`{name}` has a dtype safetensors cannot hold"),
            })?;
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            let tensor = tensor.detach();
            Ok((
                name,
                Lazy {
                    tensor,
                    dtype,
                    shape,
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| TrainError::Checkpoint {
        path: path.to_owned(),
        message: format!("writing: {e}"),
    })
}

/// A safetensors file opened for reading tensor by tensor.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: BufReader<File>,
    metadata: Metadata,
    /// Where the data section starts.
    data_start: u64,
}

impl TensorFile {
    /// Opens `path` and reads its header; a file cut short or with a bad header is an error
    /// naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| TrainError::Checkpoint {
            path: path.to_owned(),
            message,
        };
        let mut file = BufReader::new(File::open(path).map_err(TrainError::io(path))?);
        let size = file
            .get_ref()
            .metadata()
            .map_err(TrainError::io(path))?
            .len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("not a safetensors file: shorter than its header".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
            return Err(bad(format!(
                "header length {header_len} does not fit the file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(TrainError::io(path))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        if data_start + metadata.data_len() as u64 != size {
            return Err(bad(format!(
                "holds {} data bytes, its header describes {}: cut short or corrupt",
                size - data_start,
                metadata.data_len()
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            metadata,
            data_start,
        })
    }

    /// Reads tensor `name` to the host, checked against the shape of `like`; it keeps the dtype
    /// it was saved in (callers copy it into tensors of their own dtype and device).
    pub fn read(&mut self, name: &str, like: &Tensor) -> Result<Tensor> {
        let bad = |message: String| TrainError::Checkpoint {
            path: self.path.clone(),
            message,
        };
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| bad(format!("has no `{name}`")))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if shape != like.size() {
            return Err(bad(format!(
                "`{name}` has shape {shape:?}, expected {:?}",
                like.size()
            )));
        }
        let kind = kind(info.dtype).ok_or_else(|| bad(format!("`{name}`: unsupported dtype")))?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(TrainError::io(&self.path))?;
        Tensor::f_from_data_size(&bytes, &shape, kind).map_err(|e| bad(format!("`{name}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_a_cut_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        let steps = Tensor::from_slice(&[7i64]);
        write(
            &path,
            vec![
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
                ("steps".into(), steps.shallow_clone()),
            ],
        )
        .unwrap();
        // tch's own reader agrees on every byte.
        let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let mut file = TensorFile::open(&path).unwrap();
        for (name, t) in [("a", &a), ("b", &b), ("steps", &steps)] {
            let ours = file.read(name, t).unwrap();
            assert_eq!(ours.kind(), t.kind());
            assert!(ours.equal(t) && theirs[name].equal(t), "{name}");
        }
        let err = file.read("a", &b).unwrap_err().to_string();
        assert!(err.contains("`a` has shape [3, 4]"), "{err}");
        assert!(
            file.read("c", &a)
                .unwrap_err()
                .to_string()
                .contains("no `c`")
        );

        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 5, 12, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = TensorFile::open(&path).unwrap_err().to_string();
            assert!(err.contains("t.safetensors"), "cut at {cut}: {err}");
        }
    }
}
