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
/// as a lazy frame. Other tools' files are checked as the record readers check them (every
/// column there, of a compatible type: an error names the file and the column) and each is
/// cast to our column types, so a pyarrow file's `int64` sample_idx joins our `uint32` one
/// and files of one glob may differ in their types.
fn scan_stage(dir: &Path, kind: &str) -> Result<LazyFrame> {
    let files = crate::stage_files(dir, Some(kind))?;
    let scan = |paths: Vec<PlPath>| {
        LazyFrame::scan_parquet_files(paths.into(), ScanArgsParquet::default())
            .map_err(polars_error(dir))
    };
    let local = |file: &Path| PlPath::Local(Arc::from(file));
    if files.kind.is_some() {
        return scan(files.files.iter().map(|f| local(f)).collect());
    }
    let expected = crate::stage::schema_of(kind).expect("jobs scan record kinds");
    let columns: Vec<Expr> = expected
        .fields()
        .iter()
        .map(|field| {
            let column = col(field.name().as_str());
            match polars_type(field.data_type()) {
                Some(dtype) => column.strict_cast(dtype),
                None => column,
            }
        })
        .collect();
    let frames = files
        .files
        .iter()
        .map(|file| {
            let reader = crate::ShardReader::open(file)?;
            prefloop_core::check_schema(reader.schema(), &expected)
                .map_err(crate::DataError::record(file))?;
            Ok(scan(vec![local(file)])?.select(columns.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    concat(frames, UnionArgs::default()).map_err(polars_error(dir))
}

/// Polars' type for one of our flat column types (nested ones are read as they are).
fn polars_type(arrow: &arrow_schema::DataType) -> Option<DataType> {
    use arrow_schema::DataType as A;
    Some(match arrow {
        A::Utf8 | A::LargeUtf8 => DataType::String,
        A::UInt32 => DataType::UInt32,
        A::UInt64 => DataType::UInt64,
        A::Int64 => DataType::Int64,
        A::Float32 => DataType::Float32,
        A::Float64 => DataType::Float64,
        A::Boolean => DataType::Boolean,
        _ => return None,
    })
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
