//! How one Rust field type maps onto one Arrow column: its Arrow type, how values become an
//! array, and how an array becomes values again, naming the row of a value that does not fit.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, ArrowPrimitiveType, ListArray, PrimitiveArray, StringArray, StructArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields};

use crate::RecordError;
use crate::records::TestCase;

/// A Rust type stored as one Arrow column.
pub trait Column: Sized {
    /// The column's Arrow type; readers cast compatible types (say `large_utf8`) to it.
    fn data_type() -> DataType;

    /// Whether the column may hold nulls (only `Option<T>` columns do).
    fn nullable() -> bool {
        false
    }

    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef
    where
        Self: 'a;

    /// Reads every value of `array`, which has already been cast to [`Column::data_type`].
    fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError>;
}

/// Fails on the first null of a column that may not hold one.
pub(crate) fn reject_nulls(column: &str, array: &dyn Array) -> Result<(), RecordError> {
    match array.logical_nulls() {
        Some(nulls) if nulls.null_count() > 0 => {
            let row = (0..array.len()).find(|&i| nulls.is_null(i)).unwrap_or(0);
            Err(RecordError::bad_value(
                column,
                row,
                "null in a non-nullable column",
            ))
        }
        _ => Ok(()),
    }
}

impl Column for String {
    fn data_type() -> DataType {
        DataType::Utf8
    }

    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(values))
    }

    fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
        reject_nulls(column, array)?;
        Ok(array
            .as_string::<i32>()
            .iter()
            .map(|v| v.unwrap_or_default().to_owned())
            .collect())
    }
}

impl Column for Option<String> {
    fn data_type() -> DataType {
        DataType::Utf8
    }

    fn nullable() -> bool {
        true
    }

    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.map(Option::as_deref).collect::<StringArray>())
    }

    fn from_array(_column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
        Ok(array
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect())
    }
}

macro_rules! primitive_column {
    ($native:ty, $arrow:ty) => {
        impl Column for $native {
            fn data_type() -> DataType {
                <$arrow as ArrowPrimitiveType>::DATA_TYPE
            }

            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(PrimitiveArray::<$arrow>::from_iter_values(values.copied()))
            }

            fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
                reject_nulls(column, array)?;
                Ok(array.as_primitive::<$arrow>().values().to_vec())
            }
        }

        impl Column for Option<$native> {
            fn data_type() -> DataType {
                <$arrow as ArrowPrimitiveType>::DATA_TYPE
            }

            fn nullable() -> bool {
                true
            }

            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(values.copied().collect::<PrimitiveArray<$arrow>>())
            }

            fn from_array(_column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
                Ok(array.as_primitive::<$arrow>().iter().collect())
            }
        }
    };
}

primitive_column!(u32, UInt32Type);
primitive_column!(u64, UInt64Type);
primitive_column!(f32, Float32Type);

fn test_case_fields() -> Fields {
    Fields::from(vec![
        Field::new("input", DataType::Utf8, false),
        Field::new("output", DataType::Utf8, false),
    ])
}

/// `list<struct{input: utf8, output: utf8}>`: a problem's unit tests.
impl Column for Vec<TestCase> {
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(test_case_fields()),
            false,
        )))
    }

    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        let mut lengths = Vec::with_capacity(values.len());
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for tests in values {
            lengths.push(tests.len());
            for t in tests {
                inputs.push(t.input.as_str());
                outputs.push(t.output.as_str());
            }
        }
        let cases = StructArray::new(
            test_case_fields(),
            vec![
                Arc::new(StringArray::from(inputs)),
                Arc::new(StringArray::from(outputs)),
            ],
            None,
        );
        let DataType::List(item) = Self::data_type() else {
            unreachable!("a list type")
        };
        Arc::new(ListArray::new(
            item,
            OffsetBuffer::from_lengths(lengths),
            Arc::new(cases),
            None,
        ))
    }

    fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
        reject_nulls(column, array)?;
        let lists = array.as_list::<i32>();
        let cases = lists.values().as_struct();
        let inputs = String::from_array(&format!("{column}.input"), cases.column(0).as_ref());
        let outputs = String::from_array(&format!("{column}.output"), cases.column(1).as_ref());
        // A null inside the list is reported against the problem's row, not the flat index.
        let (inputs, outputs) = match (inputs, outputs) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(RecordError::BadValue { column, row, .. }), _)
            | (_, Err(RecordError::BadValue { column, row, .. })) => {
                let offsets = lists.value_offsets();
                let problem = offsets.partition_point(|&o| o as u64 <= row) - 1;
                return Err(RecordError::bad_value(&column, problem, "null test field"));
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let offsets = lists.value_offsets();
        // A sliced list starts part-way into its child arrays.
        let mut cases = inputs
            .into_iter()
            .zip(outputs)
            .map(|(input, output)| TestCase { input, output })
            .skip(offsets[0] as usize);
        Ok(offsets
            .windows(2)
            .map(|w| cases.by_ref().take((w[1] - w[0]) as usize).collect())
            .collect())
    }
}
