//! The one error type of this crate: a batch that does not fit a record's schema, or a value
//! that does not fit its column. Callers add the file name; we name the column and the row.

use arrow_schema::{ArrowError, DataType};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("missing column `{column}` (expected type {expected})")]
    MissingColumn { column: String, expected: DataType },

    #[error("column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        column: String,
        expected: DataType,
        found: DataType,
    },

    /// `row` counts from 0 at the start of the batch until [`RecordError::at_offset`] moves it
    /// to the row within the file; the message counts from 1, as a person does.
    #[error("row {}, column `{column}`: {message}", row + 1)]
    BadValue {
        column: String,
        row: u64,
        message: String,
    },

    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

impl RecordError {
    pub fn bad_value(column: &str, row: usize, message: impl Into<String>) -> Self {
        Self::BadValue {
            column: column.to_owned(),
            row: row as u64,
            message: message.into(),
        }
    }

    /// Shifts a batch-relative row number by the number of rows read before the batch.
    pub fn at_offset(self, offset: u64) -> Self {
        match self {
            Self::BadValue {
                column,
                row,
                message,
            } => Self::BadValue {
                column,
                row: row + offset,
                message,
            },
            other => other,
        }
    }
}
