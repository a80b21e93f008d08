//! Where import rows come from, as JSON values: JSONL, gzipped JSONL, Parquet (each row through
//! arrow-json), or the APPS directory layout (each problem directory assembled into the
//! Hugging Face row schema).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde_json::{Value, json};

use crate::shard::ShardReader;
use crate::{DataError, Result};

/// Where a row came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct RowRef {
    pub file: PathBuf,
    /// 0-based row within the file (JSONL: the line, counting blank lines).
    pub row: u64,
}

/// A row: its JSON value, or why it is not valid JSON.
pub(crate) type SourceRow = Result<(Result<Value, String>, RowRef)>;

pub(crate) fn rows(src: &Path) -> Result<Box<dyn Iterator<Item = SourceRow>>> {
    if src.is_dir() {
        return Ok(Box::new(
            apps_dirs(src)?.into_iter().map(|dir| apps_row(&dir)),
        ));
    }
    let name = src.file_name().unwrap_or_default().to_string_lossy();
    if name.ends_with(".parquet") {
        return parquet_rows(src);
    }
    let file = File::open(src).map_err(DataError::io(src))?;
    let reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let path = src.to_owned();
    let lines = BufReader::new(reader).lines().enumerate();
    Ok(Box::new(lines.filter_map(move |(i, line)| {
        let at = RowRef {
            file: path.clone(),
            row: i as u64,
        };
        match line {
            Err(e) => Some(Err(DataError::io(&path)(e))),
            Ok(line) if line.trim().is_empty() => None,
            Ok(line) => Some(Ok((
                serde_json::from_str(&line).map_err(|e| e.to_string()),
                at,
            ))),
        }
    })))
}

fn parquet_rows(src: &Path) -> Result<Box<dyn Iterator<Item = SourceRow>>> {
    let reader = ShardReader::open(src)?;
    let path = src.to_owned();
    let mut next_row = 0u64;
    let batches = reader.map(move |batch| -> Result<Vec<SourceRow>> {
        let batch = batch?;
        let mut writer = arrow_json::LineDelimitedWriter::new(Vec::new());
        writer
            .write(&batch)
            .and_then(|()| writer.finish())
            .map_err(|e| DataError::parquet(&path)(e.into()))?;
        let text = writer.into_inner();
        let rows = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                let at = RowRef {
                    file: path.clone(),
                    row: next_row,
                };
                next_row += 1;
                Ok((serde_json::from_slice(line).map_err(|e| e.to_string()), at))
            })
            .collect();
        Ok(rows)
    });
    Ok(Box::new(batches.flat_map(|rows| match rows {
        Ok(rows) => rows,
        Err(e) => vec![Err(e)],
    })))
}

/// Problem directories (holding question.txt) at `src`, one level below it (`train/`), or two
/// (`apps/train/`), in name order.
fn apps_dirs(src: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![(src.to_owned(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        if dir.join("question.txt").is_file() {
            found.push(dir);
            continue;
        }
        if depth == 2 {
            continue;
        }
        for entry in fs::read_dir(&dir).map_err(DataError::io(&dir))? {
            let path = entry.map_err(DataError::io(&dir))?.path();
            if path.is_dir() {
                pending.push((path, depth + 1));
            }
        }
    }
    if found.is_empty() {
        return Err(DataError::Manifest {
            path: src.to_owned(),
            message: "no APPS problem directories (with question.txt) here".into(),
        });
    }
    found.sort();
    Ok(found)
}

/// An APPS problem directory as a Hugging Face APPS row.
fn apps_row(dir: &Path) -> SourceRow {
    let read = |name: &str| -> Result<Option<String>> {
        match fs::read_to_string(dir.join(name)) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataError::io(dir.join(name))(e)),
        }
    };
    let metadata: Value = match read("metadata.json")? {
        Some(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let id = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let row = json!({
        "problem_id": id,
        "question": read("question.txt")?,
        "solutions": read("solutions.json")?,
        "input_output": read("input_output.json")?,
        "starter_code": read("starter_code.py")?.unwrap_or_default(),
        "difficulty": metadata.get("difficulty"),
        "url": metadata.get("url"),
    });
    Ok((
        Ok(row),
        RowRef {
            file: dir.to_owned(),
            row: 0,
        },
    ))
}
