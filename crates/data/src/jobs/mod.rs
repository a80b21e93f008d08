//! Batch jobs over stages, on polars' lazy streaming engine: the inputs are scanned shard by
//! shard (a stage's manifest lists them; other tools' Parquet files are read as they are) and
//! never loaded whole.

mod export;
mod filter;
mod pairs;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;

use crate::{DataError, Result};

pub use export::export_pairs;
pub use filter::{FilterReport, filter_stage};
pub use pairs::{PairsOptions, build_pairs};
pub use stats::{RoundStats, pass_at_k, stage_stats};

/// A complete stage's shards, or Parquet files another tool wrote ([`crate::stage_files`]),
/// as a lazy frame.
fn scan_stage(dir: &Path, kind: &str) -> Result<LazyFrame> {
    let paths: Vec<PlPath> = crate::stage_files(dir, Some(kind))?
        .files
        .iter()
        .map(|file| PlPath::Local(Arc::from(file.as_path())))
        .collect();
    LazyFrame::scan_parquet_files(paths.into(), ScanArgsParquet::default())
        .map_err(polars_error(dir))
}

/// Runs a plan on polars' streaming engine. (`collect` alone picks the in-memory engine, which
/// loads every input whole, whatever `with_new_streaming` says.)
fn streaming(lf: LazyFrame) -> PolarsResult<DataFrame> {
    lf.collect_with_engine(Engine::Streaming)
}

pub(crate) fn polars_error(path: &Path) -> impl FnOnce(PolarsError) -> DataError {
    let path: PathBuf = path.to_owned();
    move |e| DataError::Manifest {
        path,
        message: format!("batch job failed: {e}"),
    }
}

/// Writes `rows` as a complete stage: the job tests' inputs.
#[cfg(test)]
fn write_test_stage<R: prefloop_core::Record>(dir: &Path, rows: &[R]) {
    let options = crate::WriterOptions::default().with_shard_rows(3);
    let mut writer = crate::StageWriter::<R>::open(dir, options).unwrap();
    writer.write(rows).unwrap();
    writer.finish().unwrap();
}
