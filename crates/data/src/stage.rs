//! A stage directory (`round-0000/samples/` …): numbered shard files plus `MANIFEST.json`.
//! The writer rolls over to a new shard every `shard_rows` rows and lists each shard in the
//! manifest once it is durable; re-opening an unfinished stage resumes after its last listed
//! shard and removes whatever a killed writer left behind.

use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use prefloop_core::Record;

use crate::fsutil::sweep_temp_files;
use crate::manifest::Manifest;
use crate::shard::{RecordReader, ShardWriter, WriterOptions};
use crate::{DataError, Result};

const PART_PREFIX: &str = "part-";

fn part_name(index: usize) -> String {
    format!("{PART_PREFIX}{index:05}.parquet")
}

/// Writes records of type `R` into a stage directory.
#[derive(Debug)]
pub struct StageWriter<R> {
    dir: PathBuf,
    options: WriterOptions,
    manifest: Manifest,
    current: Option<ShardWriter<R>>,
}

impl<R: Record> StageWriter<R> {
    /// Creates the stage, or resumes it if an unfinished one is there. Finding a complete
    /// stage is an error: its rows must not be written twice.
    pub fn open(dir: impl Into<PathBuf>, options: WriterOptions) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(DataError::io(&dir))?;
        let manifest = match Manifest::load(&dir)? {
            None => Manifest::new(R::KIND),
            Some(m) if m.kind != R::KIND => {
                return Err(DataError::Manifest {
                    path: dir,
                    message: format!("holds {} shards, not {}", m.kind, R::KIND),
                });
            }
            Some(m) if m.complete => {
                return Err(DataError::Manifest {
                    path: dir,
                    message: "stage is already complete".into(),
                });
            }
            Some(m) => m,
        };
        sweep_temp_files(&dir, PART_PREFIX)?;
        remove_unlisted_parts(&dir, &manifest)?;
        Ok(Self {
            dir,
            options,
            manifest,
            current: None,
        })
    }

    /// Creates the stage afresh: an unfinished one is discarded rather than resumed. For batch
    /// jobs, whose output order is not stable from one run to the next, so that a killed job
    /// run again writes every row exactly once.
    pub fn restart(dir: impl Into<PathBuf>, options: WriterOptions) -> Result<Self> {
        let dir = dir.into();
        if let Some(manifest) = Manifest::load(&dir)?
            && manifest.kind == R::KIND
            && !manifest.complete
        {
            Manifest::new(R::KIND).save(&dir)?;
        }
        Self::open(dir, options)
    }

    /// Rows already durable in finished shards (those a resumed writer need not write again).
    pub fn committed_rows(&self) -> u64 {
        self.manifest.rows()
    }

    pub fn write(&mut self, mut rows: &[R]) -> Result<()> {
        while !rows.is_empty() {
            let shard = match &mut self.current {
                Some(shard) => shard,
                None => {
                    let path = self.dir.join(part_name(self.manifest.shards.len()));
                    self.current
                        .insert(ShardWriter::create(path, &self.options)?)
                }
            };
            let room = (self.options.shard_rows() - shard.rows()) as usize;
            let (now, later) = rows.split_at(room.min(rows.len()));
            shard.write(now)?;
            rows = later;
            if shard.rows() >= self.options.shard_rows() {
                self.finish_shard()?;
            }
        }
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<()> {
        if let Some(shard) = self.current.take() {
            let info = shard.finish()?;
            self.manifest.shards.push(info);
            self.manifest.save(&self.dir)?;
        }
        Ok(())
    }

    /// Finishes the last shard and marks the stage complete.
    pub fn finish(mut self) -> Result<Manifest> {
        self.finish_shard()?;
        self.manifest.complete = true;
        self.manifest.save(&self.dir)?;
        Ok(self.manifest.clone())
    }
}

/// A shard file the manifest does not list was renamed into place by a writer killed before
/// it could record it: its rows will be written again, so the file goes.
fn remove_unlisted_parts(dir: &Path, manifest: &Manifest) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(DataError::io(dir))? {
        let entry = entry.map_err(DataError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let listed = manifest.shards.iter().any(|s| s.path == name);
        if name.starts_with(PART_PREFIX) && name.ends_with(".parquet") && !listed {
            tracing::warn!(file = %entry.path().display(), "removing a shard the manifest does not list");
            fs::remove_file(entry.path()).map_err(DataError::io(entry.path()))?;
        }
    }
    Ok(())
}

/// Where a stage's rows are read from: the shards its manifest lists, or Parquet files
/// another tool wrote (pyarrow, pandas, polars, vLLM scripts), read as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct StageFiles {
    /// The record kind the manifest names; None for files without a manifest.
    pub kind: Option<String>,
    /// The Parquet files, in order.
    pub files: Vec<PathBuf>,
    /// Rows in all of them.
    pub rows: u64,
}

/// Resolves `path` for reading: a stage directory (its manifest complete, of `kind` where
/// one is asked for, its shards the sizes it lists), or, read-only, a Parquet file, a
/// directory of Parquet files without a manifest, or a glob (`out/*.parquet`). Files without
/// a manifest are checked column by column as their rows are read.
pub fn stage_files(path: &Path, kind: Option<&str>) -> Result<StageFiles> {
    if path.is_dir()
        && let Some(manifest) = Manifest::load(path)?
    {
        let problem = match kind {
            Some(kind) if manifest.kind != kind => {
                Some(format!("holds {} shards, not {kind}", manifest.kind))
            }
            _ if !manifest.complete => {
                Some("stage is not complete (resume the run that writes it)".into())
            }
            _ => None,
        };
        if let Some(message) = problem {
            return Err(DataError::Manifest {
                path: path.to_owned(),
                message,
            });
        }
        let mut files = Vec::with_capacity(manifest.shards.len());
        for shard in &manifest.shards {
            let file = path.join(&shard.path);
            let bytes = fs::metadata(&file).map_err(DataError::io(&file))?.len();
            if bytes != shard.bytes {
                let message = format!("{bytes} bytes on disk, {} in the manifest", shard.bytes);
                return Err(DataError::Manifest {
                    path: file,
                    message,
                });
            }
            files.push(file);
        }
        return Ok(StageFiles {
            rows: manifest.rows(),
            kind: Some(manifest.kind),
            files,
        });
    }
    let files = foreign_files(path)?;
    let mut rows = 0;
    for file in &files {
        rows += parquet_rows(file)?;
    }
    Ok(StageFiles {
        kind: None,
        files,
        rows,
    })
}

/// The Parquet files at `path` (a file, a directory without a manifest, a glob), in name order.
fn foreign_files(path: &Path) -> Result<Vec<PathBuf>> {
    let not_a_stage = |message: &str| DataError::Manifest {
        path: path.to_owned(),
        message: message.into(),
    };
    let text = path.to_string_lossy();
    let mut files: Vec<PathBuf> = if text.contains(['*', '?', '[']) && !path.exists() {
        glob::glob(&text)
            .map_err(|e| not_a_stage(&format!("not a glob: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| not_a_stage(&e.to_string()))?
    } else if path.is_dir() {
        fs::read_dir(path)
            .map_err(DataError::io(path))?
            .map(|entry| Ok(entry.map_err(DataError::io(path))?.path()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet") && p.is_file())
            .collect()
    } else {
        fs::metadata(path).map_err(DataError::io(path))?;
        vec![path.to_owned()]
    };
    files.sort();
    if files.is_empty() {
        return Err(not_a_stage(
            "no MANIFEST.json and no Parquet files: neither a stage nor another tool's output",
        ));
    }
    Ok(files)
}

/// Rows in a Parquet file, from its footer.
fn parquet_rows(file: &Path) -> Result<u64> {
    Ok(crate::shard::ShardReader::open(file)?.rows())
}

/// Every record kind with its columns.
fn record_schemas() -> [(&'static str, arrow_schema::SchemaRef); 5] {
    use prefloop_core::{Pair, Problem, ReferenceLogps, Sample, Score};
    [
        (Sample::KIND, Sample::schema()),
        (Score::KIND, Score::schema()),
        (Pair::KIND, Pair::schema()),
        (Problem::KIND, Problem::schema()),
        (ReferenceLogps::KIND, ReferenceLogps::schema()),
    ]
}

/// The columns of a record kind (`samples`, `scores`, …), or None for an unknown kind.
pub(crate) fn schema_of(kind: &str) -> Option<arrow_schema::SchemaRef> {
    record_schemas()
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, schema)| schema)
}

/// The record kinds (samples, scores, pairs, problems, reference_logps) whose columns a file
/// of `schema` has, as the readers check them.
pub fn kinds_matching(schema: &arrow_schema::Schema) -> Vec<&'static str> {
    record_schemas()
        .into_iter()
        .filter(|(_, expected)| prefloop_core::check_schema(schema, expected).is_ok())
        .map(|(kind, _)| kind)
        .collect()
}

/// Reads the records of a complete stage, or of Parquet files another tool wrote (see
/// [`stage_files`]), shard by shard.
#[derive(Debug)]
pub struct StageReader<R> {
    files: StageFiles,
    next_file: usize,
    current: Option<RecordReader<R>>,
    _record: PhantomData<fn() -> R>,
}

impl<R: Record> StageReader<R> {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self {
            files: stage_files(&path.into(), Some(R::KIND))?,
            next_file: 0,
            current: None,
            _record: PhantomData,
        })
    }

    /// Rows in the stage.
    pub fn rows(&self) -> u64 {
        self.files.rows
    }
}

impl<R: Record> Iterator for StageReader<R> {
    type Item = Result<Vec<R>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(rows) = self.current.as_mut().and_then(Iterator::next) {
                return Some(rows);
            }
            let file = self.files.files.get(self.next_file)?;
            self.next_file += 1;
            match RecordReader::open(file) {
                Ok(reader) => self.current = Some(reader),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prefloop_core::{Finish, Pair, Sample};

    use super::*;
    use crate::MANIFEST_FILE;

    fn samples(range: std::ops::Range<u32>) -> Vec<Sample> {
        range
            .map(|i| Sample {
                problem_id: format!("p{i}"),
                prompt: "q".into(),
                completion: "a".repeat(i as usize % 17),
                sample_idx: 0,
                round: 0,
                policy: "init".into(),
                seed: i as u64,
                num_tokens: i,
                logprob_sum: 0.0,
                finish: Finish::Length,
            })
            .collect()
    }

    fn options() -> WriterOptions {
        WriterOptions::default()
            .with_shard_rows(10)
            .with_row_group_size(4)
    }

    fn visible_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_stage_rolls_over_into_parts_listed_in_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = StageWriter::<Sample>::open(dir.path(), options()).unwrap();
        for chunk in samples(0..37).chunks(7) {
            writer.write(chunk).unwrap();
        }
        let manifest = writer.finish().unwrap();
        assert!(manifest.complete);
        assert_eq!(
            manifest.shards.iter().map(|s| s.rows).collect::<Vec<_>>(),
            [10, 10, 10, 7]
        );
        manifest.verify(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap().unwrap(), manifest);
        assert_eq!(
            visible_files(dir.path()),
            [
                MANIFEST_FILE,
                "part-00000.parquet",
                "part-00001.parquet",
                "part-00002.parquet",
                "part-00003.parquet"
            ]
        );
        let back: Vec<Sample> = StageReader::open(dir.path())
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        assert_eq!(back, samples(0..37));
    }

    #[test]
    fn a_dropped_stage_keeps_only_finished_shards_and_resumes_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = StageWriter::<Sample>::open(dir.path(), options()).unwrap();
        writer.write(&samples(0..25)).unwrap();
        drop(writer); // as if killed with 5 rows in an unfinished third shard

        let manifest = Manifest::load(dir.path()).unwrap().unwrap();
        assert!(!manifest.complete);
        assert_eq!(manifest.rows(), 20);
        assert_eq!(
            visible_files(dir.path()),
            [MANIFEST_FILE, "part-00000.parquet", "part-00001.parquet"]
        );
        let err = StageReader::<Sample>::open(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("stage is not complete"), "{err}");

        // A killed process can also leave a temp file, or a renamed shard it never listed.
        fs::write(dir.path().join(".part-00002.parquet.tmp-1-0"), b"partial").unwrap();
        fs::copy(
            dir.path().join("part-00001.parquet"),
            dir.path().join("part-00002.parquet"),
        )
        .unwrap();

        let mut writer = StageWriter::<Sample>::open(dir.path(), options()).unwrap();
        assert_eq!(writer.committed_rows(), 20);
        writer.write(&samples(20..31)).unwrap();
        let manifest = writer.finish().unwrap();
        manifest.verify(dir.path()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            5,
            "no stray files"
        );
        let back: Vec<Sample> = StageReader::open(dir.path())
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        assert_eq!(back, samples(0..31));
    }

    #[test]
    fn a_complete_stage_is_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = StageWriter::<Sample>::open(dir.path(), options()).unwrap();
        writer.write(&samples(0..3)).unwrap();
        writer.finish().unwrap();
        let err = StageWriter::<Sample>::open(dir.path(), options())
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("stage is already complete"), "{err}");
        let err = StageWriter::<prefloop_core::Pair>::open(dir.path(), options())
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("holds samples shards, not pairs"), "{err}");
    }

    #[test]
    fn verify_catches_a_changed_shard() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = StageWriter::<Sample>::open(dir.path(), options()).unwrap();
        writer.write(&samples(0..3)).unwrap();
        let manifest = writer.finish().unwrap();
        let path = dir.path().join("part-00000.parquet");
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = manifest.verify(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("SHA-256 differs from the manifest"), "{err}");
    }

    #[test]
    fn parquet_files_without_a_manifest_read_as_a_stage_from_a_file_a_directory_or_a_glob() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("vllm-out");
        fs::create_dir(&foreign).unwrap();
        for (name, range) in [("b.parquet", 5..9), ("a.parquet", 0..5)] {
            let mut writer =
                crate::ShardWriter::<Sample>::create(foreign.join(name), &WriterOptions::default())
                    .unwrap();
            writer.write(&samples(range)).unwrap();
            writer.finish().unwrap();
        }
        fs::write(foreign.join("notes.txt"), "not data").unwrap();
        let ids = |path: &Path| -> Vec<String> {
            StageReader::<Sample>::open(path)
                .unwrap()
                .flat_map(Result::unwrap)
                .map(|s| s.problem_id)
                .collect()
        };
        let all: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
        assert_eq!(
            ids(&foreign),
            all,
            "a directory: its Parquet files in name order"
        );
        assert_eq!(ids(&foreign.join("*.parquet")), all, "a glob");
        assert_eq!(ids(&foreign.join("b.parquet")), all[5..], "one file");
        let files = stage_files(&foreign, Some(Sample::KIND)).unwrap();
        assert_eq!((files.kind, files.rows), (None, 9));

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let err = StageReader::<Sample>::open(&empty).unwrap_err().to_string();
        assert!(
            err.contains("no MANIFEST.json and no Parquet files"),
            "{err}"
        );
        // Wrong columns are an error naming the file, as for any shard.
        let err = StageReader::<Pair>::open(&foreign)
            .unwrap()
            .find_map(Result::err)
            .unwrap()
            .to_string();
        assert!(err.contains("a.parquet"), "{err}");
    }
}
