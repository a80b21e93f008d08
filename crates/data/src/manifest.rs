//! `MANIFEST.json`: the shards of one stage directory and whether the stage is complete. A
//! shard counts only once it is listed here; the file is always replaced atomically.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::write_atomic;
use crate::{DataError, Result};

pub const MANIFEST_FILE: &str = "MANIFEST.json";

/// One finished shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name, relative to the manifest's directory.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The record type of every shard ("samples", "scores", "pairs", "problems").
    pub kind: String,
    /// Set once the stage wrote its last shard; an incomplete stage is resumed, not read.
    pub complete: bool,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            complete: false,
            shards: Vec::new(),
        }
    }

    /// The manifest of `dir`, or None when it has none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io(path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::Manifest {
                path,
                message: format!("malformed manifest: {e}"),
            })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        json.push(b'\n');
        write_atomic(&dir.join(MANIFEST_FILE), &json)
    }

    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// Checks that every listed shard exists with its recorded size and SHA-256.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for shard in &self.shards {
            let path = dir.join(&shard.path);
            let mismatch = |message: String| DataError::Manifest {
                path: path.clone(),
                message,
            };
            let (bytes, sha256) = hash_file(&path)?;
            if bytes != shard.bytes {
                return Err(mismatch(format!(
                    "{bytes} bytes on disk, {} in the manifest",
                    shard.bytes
                )));
            }
            if sha256 != shard.sha256 {
                return Err(mismatch("SHA-256 differs from the manifest".into()));
            }
        }
        Ok(())
    }
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).map_err(DataError::io(path))?;
    let mut sha256 = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(DataError::io(path))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, format!("{:x}", sha256.finalize())))
}
