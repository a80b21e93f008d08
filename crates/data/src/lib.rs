//! prefloop-data: Parquet shards and the manifests that say which shards are complete.
//!
//! A shard is written to a hidden temp file, fsynced and renamed, so a shard that is visible is
//! whole. A stage directory lists its shards in `MANIFEST.json`; a shard exists for readers
//! only once the manifest names it, and the stage is complete only once the manifest says so.

mod error;
mod fsutil;
mod import;
mod jobs;
mod manifest;
mod shard;
mod stage;

pub use error::DataError;
pub use fsutil::write_atomic;
pub use import::{DatasetKind, ImportOptions, ImportReport, SafePreference, import};
pub use jobs::{
    FilterReport, PairsOptions, RoundStats, build_pairs, export_pairs, filter_stage, pass_at_k,
    stage_stats,
};
pub use manifest::{MANIFEST_FILE, Manifest, ShardInfo};
pub use shard::{RecordReader, ShardReader, ShardWriter, WriterOptions};
pub use stage::{StageFiles, StageReader, StageWriter, kinds_matching, stage_files};

pub type Result<T, E = DataError> = std::result::Result<T, E>;
