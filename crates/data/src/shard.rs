//! One Parquet shard: a streaming writer that only makes the file visible once it is whole,
//! and streaming readers, one for any Parquet file and one that checks a record's schema.

use std::fs::{self, File};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use arrow_array::{RecordBatch, RecordBatchReader};
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;
use prefloop_core::{Record, RecordError, conform};
use sha2::{Digest, Sha256};

use crate::fsutil::{commit, temp_path};
use crate::manifest::ShardInfo;
use crate::{DataError, Result};

/// How shards are laid out. The defaults suit text rows of a few hundred bytes.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    row_group_rows: usize,
    row_group_bytes: usize,
    zstd_level: i32,
    shard_rows: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            row_group_rows: 64 * 1024,
            row_group_bytes: 64 << 20,
            zstd_level: 3,
            shard_rows: 1 << 20,
        }
    }
}

impl WriterOptions {
    /// Most rows in one row group (default 65,536): the unit a reader decodes at a time.
    pub fn with_row_group_size(mut self, rows: usize) -> Self {
        self.row_group_rows = rows.max(1);
        self
    }

    /// A row group is closed early once its encoded size passes this (default 64 MiB), which
    /// bounds the writer's memory whatever the row width.
    pub fn with_row_group_bytes(mut self, bytes: usize) -> Self {
        self.row_group_bytes = bytes.max(1);
        self
    }

    /// zstd level, 1–22 (default 3).
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }

    /// Rows per shard file when a stage writer rolls over to the next part (default 1,048,576).
    pub fn with_shard_rows(mut self, rows: u64) -> Self {
        self.shard_rows = rows.max(1);
        self
    }

    pub(crate) fn shard_rows(&self) -> u64 {
        self.shard_rows
    }

    fn properties(&self) -> Result<WriterProperties, ParquetError> {
        Ok(WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(self.zstd_level)?))
            .set_max_row_group_size(self.row_group_rows)
            .set_created_by(format!("prefloop {}", env!("CARGO_PKG_VERSION")))
            .build())
    }
}

/// Hashes and counts the bytes on their way to the file, so finishing a shard needs no
/// second pass over it.
struct HashingFile {
    file: File,
    sha256: Sha256,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha256.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes records of type `R` to one Parquet file, streaming: memory is bounded by one row
/// group plus two batches in flight. The file appears at its path only when
/// [`ShardWriter::finish`] succeeds; a writer dropped earlier (or a process killed) leaves at
/// most a hidden temp file.
///
/// Rows become Arrow arrays on the caller's thread while a second thread encodes and
/// compresses the previous batch, so conversion and zstd overlap.
pub struct ShardWriter<R> {
    path: PathBuf,
    temp: PathBuf,
    /// Batches to the encoder thread; None once finished or failed.
    batches: Option<SyncSender<RecordBatch>>,
    encoder: Option<JoinHandle<Result<HashingFile>>>,
    rows: u64,
    _record: PhantomData<fn(R)>,
}

impl<R> std::fmt::Debug for ShardWriter<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

/// The encoder thread: writes every batch it receives, closes the file when the channel does.
fn encode(
    mut writer: ArrowWriter<HashingFile>,
    batches: Receiver<RecordBatch>,
    row_group_bytes: usize,
    path: PathBuf,
) -> Result<HashingFile> {
    for batch in batches {
        writer.write(&batch).map_err(DataError::parquet(&path))?;
        if writer.in_progress_size() >= row_group_bytes {
            writer.flush().map_err(DataError::parquet(&path))?;
        }
    }
    writer.into_inner().map_err(DataError::parquet(&path))
}

impl<R: Record> ShardWriter<R> {
    pub fn create(path: impl Into<PathBuf>, options: &WriterOptions) -> Result<Self> {
        let path = path.into();
        let temp = temp_path(&path);
        let file = File::create(&temp).map_err(DataError::io(&temp))?;
        let sink = HashingFile {
            file,
            sha256: Sha256::new(),
            bytes: 0,
        };
        let writer = options
            .properties()
            .and_then(|props| ArrowWriter::try_new(sink, R::schema(), Some(props)));
        let writer = match writer {
            Ok(writer) => writer,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(DataError::parquet(path)(e));
            }
        };
        let (sender, receiver) = sync_channel(2);
        let (row_group_bytes, thread_path) = (options.row_group_bytes, path.clone());
        let encoder = std::thread::Builder::new()
            .name("shard-encoder".into())
            .spawn(move || encode(writer, receiver, row_group_bytes, thread_path))
            .map_err(DataError::io(&temp))?;
        Ok(Self {
            path,
            temp,
            batches: Some(sender),
            encoder: Some(encoder),
            rows: 0,
            _record: PhantomData,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn write(&mut self, rows: &[R]) -> Result<()> {
        let batch = R::to_batch(rows).map_err(DataError::record(&self.path))?;
        self.send(batch)
    }

    /// Writes a batch from elsewhere (another tool's file, a polars job), checking and casting
    /// it to `R`'s schema first.
    pub fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        let batch = conform(batch, &R::schema()).map_err(|e| DataError::Record {
            path: self.path.clone(),
            source: e.at_offset(self.rows),
        })?;
        self.send(batch)
    }

    fn send(&mut self, batch: RecordBatch) -> Result<()> {
        let rows = batch.num_rows() as u64;
        let sender = self.batches.as_ref().expect("present until finish");
        if sender.send(batch).is_err() {
            // The encoder stopped on an error; it is the one to report.
            self.batches = None;
            return match self.join_encoder() {
                Err(e) => Err(e),
                Ok(_) => unreachable!("the encoder hangs up only on an error"),
            };
        }
        self.rows += rows;
        Ok(())
    }

    fn join_encoder(&mut self) -> Result<HashingFile> {
        let encoder = self.encoder.take().expect("joined once");
        encoder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Writes the footer, syncs the file and renames it into place.
    pub fn finish(mut self) -> Result<ShardInfo> {
        self.batches = None;
        let synced = self.join_encoder().and_then(|mut sink| {
            sink.flush()
                .and_then(|()| sink.file.sync_all())
                .map_err(DataError::io(&self.temp))?;
            Ok(sink)
        });
        let sink = match synced {
            Ok(sink) => sink,
            Err(e) => {
                let _ = fs::remove_file(&self.temp);
                return Err(e);
            }
        };
        commit(&self.temp, &self.path)?;
        let name = self.path.file_name().unwrap_or_default();
        Ok(ShardInfo {
            path: name.to_string_lossy().into_owned(),
            rows: self.rows,
            bytes: sink.bytes,
            sha256: format!("{:x}", sink.sha256.finalize()),
        })
    }
}

impl<R> Drop for ShardWriter<R> {
    fn drop(&mut self) {
        if let Some(encoder) = self.encoder.take() {
            self.batches = None;
            let _ = encoder.join();
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Reads any Parquet file batch by batch; memory is bounded by one row group.
pub struct ShardReader {
    path: PathBuf,
    schema: SchemaRef,
    rows: u64,
    metadata: Arc<ParquetMetaData>,
    batches: ParquetRecordBatchReader,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

/// Rows per batch handed out by the readers.
const BATCH_ROWS: usize = 8192;

impl ShardReader {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_projected(path.into(), None)
    }

    /// Opens `path` reading only `expected`'s columns, after checking they are all there with
    /// compatible types: the error names the file and the column.
    fn open_projected(path: PathBuf, expected: Option<&SchemaRef>) -> Result<Self> {
        let file = File::open(&path).map_err(DataError::io(&path))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(DataError::parquet(&path))?;
        let file_schema = builder.schema().clone();
        let metadata = Arc::clone(builder.metadata());
        let rows = metadata.file_metadata().num_rows() as u64;
        let builder = builder.with_batch_size(BATCH_ROWS);
        let builder = match expected {
            None => builder,
            Some(expected) => {
                prefloop_core::check_schema(&file_schema, expected)
                    .map_err(DataError::record(&path))?;
                let roots = expected
                    .fields()
                    .iter()
                    .filter_map(|f| file_schema.index_of(f.name()).ok());
                let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                builder.with_projection(mask)
            }
        };
        let batches = builder.build().map_err(DataError::parquet(&path))?;
        Ok(Self {
            schema: batches.schema(),
            path,
            rows,
            metadata,
            batches,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The Arrow schema of the batches this reader yields.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows in the file, from its footer.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The file's footer: row groups, writer, key-value metadata.
    pub fn metadata(&self) -> &ParquetMetaData {
        &self.metadata
    }
}

impl Iterator for ShardReader {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.batches.next()?;
        Some(batch.map_err(|e| DataError::parquet(&self.path)(ParquetError::from(e))))
    }
}

/// Reads records of type `R` from one Parquet file written by us or by another tool, batch by
/// batch. Opening fails on a missing or mistyped column; a bad value names its row.
#[derive(Debug)]
pub struct RecordReader<R> {
    shard: ShardReader,
    rows_read: u64,
    _record: PhantomData<fn() -> R>,
}

impl<R: Record> RecordReader<R> {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self {
            shard: ShardReader::open_projected(path.into(), Some(&R::schema()))?,
            rows_read: 0,
            _record: PhantomData,
        })
    }

    /// Rows in the file, from its footer.
    pub fn rows(&self) -> u64 {
        self.shard.rows()
    }

    fn decode(&self, batch: &RecordBatch) -> Result<Vec<R>, RecordError> {
        R::from_batch(&conform(batch, &R::schema())?)
    }
}

impl<R: Record> Iterator for RecordReader<R> {
    type Item = Result<Vec<R>>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.shard.next()? {
            Ok(batch) => batch,
            Err(e) => return Some(Err(e)),
        };
        let rows = self.decode(&batch).map_err(|e| DataError::Record {
            path: self.shard.path.clone(),
            source: e.at_offset(self.rows_read),
        });
        self.rows_read += batch.num_rows() as u64;
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{ArrayRef, Float64Array, StringArray};
    use prefloop_core::{
        Finish, Pair, PairSource, Problem, ProblemSource, Sample, Score, Scorer, TestCase, Verdict,
    };

    use super::*;

    pub(crate) fn samples(n: u32) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                problem_id: format!("p{}", i / 4),
                prompt: format!("prompt {}", i / 4),
                completion: format!("completion {i} ünïcode"),
                sample_idx: i % 4,
                round: 1,
                policy: "round-0000".into(),
                seed: 7 + i as u64,
                num_tokens: i,
                logprob_sum: -0.5 * i as f32,
                finish: Finish::Stop,
            })
            .collect()
    }

    fn round_trip<R: Record + PartialEq + std::fmt::Debug>(rows: Vec<R>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.parquet");
        let options = WriterOptions::default().with_row_group_size(3);
        let mut writer = ShardWriter::<R>::create(&path, &options).unwrap();
        for chunk in rows.chunks(5) {
            writer.write(chunk).unwrap();
        }
        let info = writer.finish().unwrap();
        assert_eq!(info.rows, rows.len() as u64);
        assert_eq!(info.bytes, fs::metadata(&path).unwrap().len());
        let reader = RecordReader::<R>::open(&path).unwrap();
        assert_eq!(reader.rows(), rows.len() as u64);
        let back: Vec<R> = reader.flat_map(Result::unwrap).collect();
        assert_eq!(back, rows);
    }

    #[test]
    fn every_record_type_round_trips_through_parquet() {
        round_trip(samples(23));
        round_trip(
            (0..11)
                .map(|i| Score {
                    problem_id: format!("p{i}"),
                    sample_idx: i,
                    round: 3,
                    reward: if i % 2 == 0 { 10.0 } else { 0.0 },
                    scorer: Scorer::Tests,
                    passed: i,
                    total: 12,
                    verdict: Verdict::ALL[i as usize % Verdict::ALL.len()],
                    wall_ms: 1.5,
                })
                .collect(),
        );
        round_trip(
            (0..9)
                .map(|i| Pair {
                    prompt: format!("q{i}"),
                    chosen: "yes".into(),
                    rejected: "no".into(),
                    chosen_reward: 1.0,
                    rejected_reward: -1.0,
                    margin: 2.0,
                    problem_id: format!("p{i}"),
                    round: 0,
                    source: PairSource::Reference,
                    chosen_finish: None,
                    rejected_finish: None,
                })
                .collect(),
        );
        round_trip(
            (0..8)
                .map(|i| Problem {
                    problem_id: format!("cc/{i}"),
                    source: ProblemSource::CodeContests,
                    prompt: "sum two numbers".into(),
                    tests: (0..i)
                        .map(|t| TestCase {
                            input: format!("{t} {t}\n"),
                            output: format!("{}\n", 2 * t),
                        })
                        .collect(),
                    fn_name: None,
                    starter_code: String::new(),
                    reference_solution: (i % 2 == 0)
                        .then(|| "print(sum(map(int,input().split())))".into()),
                    difficulty: "7".into(),
                    time_limit_ms: (i > 3).then_some(1000),
                    memory_limit_bytes: None,
                })
                .collect(),
        );
    }

    #[test]
    fn a_dropped_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00000.parquet");
        let mut writer = ShardWriter::<Sample>::create(&path, &WriterOptions::default()).unwrap();
        writer.write(&samples(100)).unwrap();
        assert!(!path.exists(), "a shard must not be visible before finish");
        drop(writer);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_truncated_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.parquet");
        let mut writer = ShardWriter::<Sample>::create(&path, &WriterOptions::default()).unwrap();
        writer.write(&samples(50)).unwrap();
        writer.finish().unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = RecordReader::<Sample>::open(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not a readable Parquet file", path.display())),
            "{err}"
        );
    }

    #[test]
    fn a_non_parquet_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.parquet");
        fs::write(&path, "problem_id,prompt\np1,hello\n").unwrap();
        let err = ShardReader::open(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not a readable Parquet file", path.display())),
            "{err}"
        );
    }

    fn write_foreign(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut writer =
            ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn missing_and_mistyped_columns_name_file_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let strings = |v: &str| Arc::new(StringArray::from(vec![v; 2])) as ArrayRef;
        let floats = Arc::new(Float64Array::from(vec![1.0, 0.0])) as ArrayRef;

        let missing = dir.path().join("missing.parquet");
        write_foreign(
            &missing,
            vec![("prompt", strings("q")), ("chosen", strings("a"))],
        );
        let err = RecordReader::<Pair>::open(&missing)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: missing column `rejected` (expected type Utf8)",
                missing.display()
            )
        );

        let mistyped = dir.path().join("mistyped.parquet");
        let mut columns = vec![
            ("prompt", strings("q")),
            ("chosen", strings("a")),
            ("rejected", strings("b")),
            ("chosen_reward", floats.clone()),
            ("rejected_reward", floats.clone()),
            ("margin", strings("big")),
        ];
        write_foreign(&mistyped, columns.clone());
        let err = RecordReader::<Pair>::open(&mistyped)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: column `margin` has type Utf8, expected Float32",
                mistyped.display()
            )
        );

        // float64 from another tool is fine where we store float32.
        columns[5].1 = floats;
        let ok = dir.path().join("ok.parquet");
        let more: [(&str, ArrayRef); 3] = [
            ("problem_id", strings("p")),
            ("round", Arc::new(arrow_array::Int64Array::from(vec![0, 1]))),
            ("source", strings("policy")),
        ];
        columns.extend(more);
        write_foreign(&ok, columns);
        let pairs: Vec<Pair> = RecordReader::<Pair>::open(&ok)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].round, 1);
    }

    #[test]
    fn a_bad_value_names_file_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.parquet");
        let n = BATCH_ROWS + 10;
        let mut verdicts = vec!["OK"; n];
        verdicts[BATCH_ROWS + 3] = "PASSED";
        let u32s = |v: u32| Arc::new(arrow_array::UInt32Array::from(vec![v; n])) as ArrayRef;
        let f32s = || Arc::new(arrow_array::Float32Array::from(vec![0.0; n])) as ArrayRef;
        write_foreign(
            &path,
            vec![
                ("problem_id", Arc::new(StringArray::from(vec!["p"; n]))),
                ("sample_idx", u32s(0)),
                ("round", u32s(0)),
                ("reward", f32s()),
                ("scorer", Arc::new(StringArray::from(vec!["tests"; n]))),
                ("passed", u32s(1)),
                ("total", u32s(1)),
                ("verdict", Arc::new(StringArray::from(verdicts))),
                ("wall_ms", f32s()),
            ],
        );
        let err = RecordReader::<Score>::open(&path)
            .unwrap()
            .find_map(Result::err)
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}: row {}, column `verdict`: `PASSED` is not a Verdict",
                path.display(),
                BATCH_ROWS + 4 // counted from 1
            )),
            "{err}"
        );
    }
}
