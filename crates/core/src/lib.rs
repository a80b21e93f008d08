//! prefloop-core: the records that flow between stages and their Arrow schemas.
//!
//! Every stage of a round reads and writes these records as Parquet shards. The column names
//! and types are a public contract (DESIGN §3): other tools (TRL, pyarrow, polars) read our
//! shards, and users bring problems and pairs written by other tools.

mod column;
mod error;
mod labels;
pub mod paths;
mod record;
mod records;

pub use column::Column;
pub use error::RecordError;
pub use labels::{Finish, PairSource, ProblemSource, Scorer, Verdict};
pub use record::{Record, check_schema, conform};
pub use records::{Pair, Problem, ReferenceLogps, Sample, Score, TestCase};
