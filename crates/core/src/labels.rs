//! The small closed vocabularies stored as strings in our shards: verdicts, finish reasons,
//! scorers and sources. Strings (not dictionary codes) keep the shards readable by any tool.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, StringArray};
use arrow_schema::DataType;

use crate::column::reject_nulls;
use crate::{Column, RecordError};

macro_rules! labels {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label as stored in Parquet.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($label => Ok($name::$variant),)+
                    _ => Err(format!(
                        "`{s}` is not a {}; expected one of {}",
                        stringify!($name),
                        [$($label),+].join(", ")
                    )),
                }
            }
        }

        impl Column for $name {
            fn data_type() -> DataType {
                DataType::Utf8
            }

            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(StringArray::from_iter_values(values.map(|v| v.as_str())))
            }

            fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
                reject_nulls(column, array)?;
                array
                    .as_string::<i32>()
                    .iter()
                    .enumerate()
                    .map(|(row, v)| {
                        v.unwrap_or_default()
                            .parse()
                            .map_err(|e: String| RecordError::bad_value(column, row, e))
                    })
                    .collect()
            }
        }

        impl Column for Option<$name> {
            fn data_type() -> DataType {
                DataType::Utf8
            }

            fn nullable() -> bool {
                true
            }

            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(values.map(|v| v.map(|v| v.as_str())).collect::<StringArray>())
            }

            fn from_array(column: &str, array: &dyn Array) -> Result<Vec<Self>, RecordError> {
                array
                    .as_string::<i32>()
                    .iter()
                    .enumerate()
                    .map(|(row, v)| {
                        v.map(|v| v.parse())
                            .transpose()
                            .map_err(|e: String| RecordError::bad_value(column, row, e))
                    })
                    .collect()
            }
        }
    };
}

labels! {
    /// The outcome of running one program on its tests (DESIGN §5).
    Verdict {
        /// Every test passed.
        Ok = "OK",
        /// Wrong answer.
        WrongAnswer = "WA",
        /// Time limit exceeded.
        TimeLimit = "TLE",
        /// Memory limit exceeded.
        MemoryLimit = "MLE",
        /// Runtime error: non-zero exit or trap.
        RuntimeError = "RE",
        /// Does not compile (for Python: a SyntaxError).
        CompileError = "CE",
        /// Output over the limit.
        OutputLimit = "OLE",
        /// Our fault, never the program's.
        SandboxError = "SANDBOX_ERROR",
    }
}

labels! {
    /// Why generation of a sample stopped.
    Finish {
        /// The policy sampled an end-of-sequence token. (In shards written before
        /// `stop_string` existed: EOS or a stop string.)
        Stop = "stop",
        /// A stop string ended it: the completion is cut before it, and no EOS was sampled.
        StopString = "stop_string",
        /// The max-new-tokens budget ran out.
        Length = "length",
    }
}

labels! {
    /// What produced a score.
    Scorer {
        /// A Bradley–Terry reward model.
        RewardModel = "rm",
        /// Running the program against unit tests in the sandbox.
        Tests = "tests",
        /// A reward program (`reward(prompt, completion, **fields)`) run in the sandbox.
        Program = "program",
        /// A weighted sum of several of these; `passed`, `total` and `verdict` are the tests'
        /// where tests are one of them, else those of the first whose verdict is not OK.
        Sum = "sum",
    }
}

labels! {
    /// Where the chosen answer of a pair came from.
    PairSource {
        /// Both answers were sampled from the policy.
        Policy = "policy",
        /// No sample passed, so the dataset's reference solution is the chosen answer.
        Reference = "reference",
    }
}

labels! {
    /// The dataset a problem was imported from.
    ProblemSource {
        Apps = "apps",
        CodeContests = "codecontests",
        HumanEval = "humaneval",
        Mbpp = "mbpp",
        HhRlhf = "hh",
        SafeRlhf = "safe",
    }
}
