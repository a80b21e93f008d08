//! A record type is a row of one of our datasets. Its Arrow schema and both conversions are
//! derived from one field list (the `record!` macro), so the struct and the schema cannot drift.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow_cast::{CastOptions, can_cast_types, cast_with_options};
use arrow_schema::{DataType, Schema, SchemaRef};

use crate::RecordError;
use crate::column::reject_nulls;

/// A row type with a fixed Arrow schema.
pub trait Record: Sized + Send + 'static {
    /// The dataset's name ("samples", "scores", …), as used in manifests and messages.
    const KIND: &'static str;

    fn schema() -> SchemaRef;

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, RecordError>;

    /// Reads a batch that [`conform`] has put into [`Record::schema`].
    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, RecordError>;
}

/// Declares a record struct and derives its [`Record`] impl from the field list.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident as $kind:literal {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)+
        }

        impl $crate::Record for $name {
            const KIND: &'static str = $kind;

            fn schema() -> arrow_schema::SchemaRef {
                static SCHEMA: std::sync::OnceLock<arrow_schema::SchemaRef> =
                    std::sync::OnceLock::new();
                SCHEMA
                    .get_or_init(|| {
                        std::sync::Arc::new(arrow_schema::Schema::new(vec![$(
                            arrow_schema::Field::new(
                                stringify!($field),
                                <$ty as $crate::Column>::data_type(),
                                <$ty as $crate::Column>::nullable(),
                            ),
                        )+]))
                    })
                    .clone()
            }

            fn to_batch(rows: &[Self]) -> Result<arrow_array::RecordBatch, $crate::RecordError> {
                let columns = vec![$(
                    <$ty as $crate::Column>::to_array(rows.iter().map(|r| &r.$field)),
                )+];
                Ok(arrow_array::RecordBatch::try_new(Self::schema(), columns)?)
            }

            fn from_batch(
                batch: &arrow_array::RecordBatch,
            ) -> Result<Vec<Self>, $crate::RecordError> {
                $(
                    let column = batch.column_by_name(stringify!($field)).ok_or_else(|| {
                        $crate::RecordError::MissingColumn {
                            column: stringify!($field).to_owned(),
                            expected: <$ty as $crate::Column>::data_type(),
                        }
                    })?;
                    let mut $field =
                        <$ty as $crate::Column>::from_array(stringify!($field), column.as_ref())?
                            .into_iter();
                )+
                Ok((0..batch.num_rows())
                    .map_while(|_| Some($name { $($field: $field.next()?,)+ }))
                    .collect())
            }
        }
    };
}
pub(crate) use record;

/// Type families within which a reader converts silently: a file written by another tool may
/// use `large_utf8` or `int64` where we write `utf8` or `uint32`. Anything else is an error.
fn same_family(found: &DataType, expected: &DataType) -> bool {
    use DataType::*;
    let family = |t: &DataType| match t {
        Utf8 | LargeUtf8 | Utf8View => 1,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => 2,
        Float16 | Float32 | Float64 => 3,
        List(_) | LargeList(_) | ListView(_) | LargeListView(_) => 4,
        _ => 0,
    };
    found == expected || (family(found) != 0 && family(found) == family(expected))
}

/// Checks that `found` can be read as `expected`: every expected column present with a
/// compatible type, except nullable ones, which other tools' files may omit (they read as
/// nulls). Extra columns are allowed (and ignored).
pub fn check_schema(found: &Schema, expected: &Schema) -> Result<(), RecordError> {
    for field in expected.fields() {
        let column = field.name();
        let Ok(have) = found.field_with_name(column) else {
            if field.is_nullable() {
                continue;
            }
            return Err(RecordError::MissingColumn {
                column: column.clone(),
                expected: field.data_type().clone(),
            });
        };
        let (have, want) = (have.data_type(), field.data_type());
        if !(same_family(have, want) && can_cast_types(have, want)) {
            return Err(RecordError::ColumnType {
                column: column.clone(),
                expected: want.clone(),
                found: have.clone(),
            });
        }
    }
    Ok(())
}

/// Puts a batch read from anywhere into `schema`: selects the columns in order, casts
/// compatible types, and names the first row holding a null where none is allowed or a
/// number that does not fit.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, RecordError> {
    check_schema(&batch.schema(), schema)?;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let name = field.name();
        let Some(array) = batch.column_by_name(name) else {
            // A nullable column the file omits (check_schema let it through).
            columns.push(new_null_array(field.data_type(), batch.num_rows()));
            continue;
        };
        let array = if array.data_type() == field.data_type() {
            Arc::clone(array)
        } else {
            // A safe cast turns a value that does not fit into null; find the first one.
            let cast = cast_with_options(array, field.data_type(), &CastOptions::default())?;
            if let Some(row) = (0..array.len()).find(|&i| array.is_valid(i) && cast.is_null(i)) {
                let message = format!("value does not fit {}", field.data_type());
                return Err(RecordError::bad_value(name, row, message));
            }
            cast
        };
        if !field.is_nullable() {
            reject_nulls(name, array.as_ref())?;
        }
        columns.push(array);
    }
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}
