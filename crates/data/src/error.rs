//! Errors of the data layer. Every variant names the file it is about.

use std::io;
use std::path::PathBuf;

use parquet::errors::ParquetError;
use prefloop_core::RecordError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("{}: not a readable Parquet file: {source}", path.display())]
    Parquet { path: PathBuf, source: ParquetError },

    /// A column missing or of the wrong type, or a value that does not fit its column.
    #[error("{}: {source}", path.display())]
    Record { path: PathBuf, source: RecordError },

    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },

    /// A source row that does not convert (imports). `row` counts from 0; the message from 1
    /// (a JSONL file's line number).
    #[error("{}: row {}, field `{field}`: {message}", path.display(), row + 1)]
    BadRow {
        path: PathBuf,
        row: u64,
        field: String,
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>) -> impl FnOnce(ParquetError) -> Self {
        let path = path.into();
        move |source| Self::Parquet { path, source }
    }

    pub(crate) fn record(path: impl Into<PathBuf>) -> impl FnOnce(RecordError) -> Self {
        let path = path.into();
        move |source| Self::Record { path, source }
    }
}
