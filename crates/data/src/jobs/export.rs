//! `export`: a pairs stage → one TRL-ready file (`prompt`, `chosen`, `rejected` and our
//! reward columns), Parquet or JSONL by the file's extension, written atomically.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use prefloop_core::Pair;
use serde_json::json;

use crate::fsutil::{commit, temp_path};
use crate::shard::{ShardWriter, WriterOptions};
use crate::stage::StageReader;
use crate::{DataError, Result};

/// Copies every pair of the stage `pairs` into `out` (`.parquet` or `.jsonl`); returns the rows.
pub fn export_pairs(pairs: &Path, out: &Path) -> Result<u64> {
    let reader = StageReader::<Pair>::open(pairs)?;
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    if name.ends_with(".parquet") {
        let mut writer = ShardWriter::<Pair>::create(out, &WriterOptions::default())?;
        for rows in reader {
            writer.write(&rows?)?;
        }
        return Ok(writer.finish()?.rows);
    }
    if !name.ends_with(".jsonl") {
        let message = "export writes .parquet or .jsonl files".into();
        return Err(DataError::Manifest {
            path: out.to_owned(),
            message,
        });
    }
    let temp = temp_path(out);
    let written = write_jsonl(reader, &temp);
    match written {
        Ok(rows) => {
            commit(&temp, out)?;
            Ok(rows)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

fn write_jsonl(reader: StageReader<Pair>, path: &Path) -> Result<u64> {
    let file = File::create(path).map_err(DataError::io(path))?;
    let mut out = BufWriter::new(file);
    let mut rows = 0;
    // NaN (a human label's unknown reward) is not JSON: it becomes null.
    let number = |x: f32| if x.is_finite() { json!(x) } else { json!(null) };
    for chunk in reader {
        for p in chunk? {
            let line = json!({
                "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                "chosen_reward": number(p.chosen_reward), "rejected_reward": number(p.rejected_reward),
                "margin": number(p.margin), "problem_id": p.problem_id, "round": p.round,
                "source": p.source.as_str(),
            });
            writeln!(out, "{line}").map_err(DataError::io(path))?;
            rows += 1;
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| DataError::io(path)(e.into_error()))?;
    file.sync_all().map_err(DataError::io(path))?;
    Ok(rows)
}
