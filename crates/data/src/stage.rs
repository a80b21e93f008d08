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

/// Reads the records of a complete stage, shard after shard, in the manifest's order.
#[derive(Debug)]
pub struct StageReader<R> {
    dir: PathBuf,
    manifest: Manifest,
    next_shard: usize,
    current: Option<RecordReader<R>>,
    _record: PhantomData<fn() -> R>,
}

impl<R: Record> StageReader<R> {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let manifest = Manifest::load(&dir)?.ok_or_else(|| DataError::Manifest {
            path: dir.join(crate::MANIFEST_FILE),
            message: "no manifest: the stage was never started".into(),
        })?;
        let problem = if manifest.kind != R::KIND {
            Some(format!("holds {} shards, not {}", manifest.kind, R::KIND))
        } else if !manifest.complete {
            Some("stage is not complete (resume the run that writes it)".into())
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(DataError::Manifest { path: dir, message });
        }
        for shard in &manifest.shards {
            let path = dir.join(&shard.path);
            let bytes = fs::metadata(&path).map_err(DataError::io(&path))?.len();
            if bytes != shard.bytes {
                let message = format!("{bytes} bytes on disk, {} in the manifest", shard.bytes);
                return Err(DataError::Manifest { path, message });
            }
        }
        Ok(Self {
            dir,
            manifest,
            next_shard: 0,
            current: None,
            _record: PhantomData,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

impl<R: Record> Iterator for StageReader<R> {
    type Item = Result<Vec<R>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(rows) = self.current.as_mut().and_then(Iterator::next) {
                return Some(rows);
            }
            let shard = self.manifest.shards.get(self.next_shard)?;
            self.next_shard += 1;
            match RecordReader::open(self.dir.join(&shard.path)) {
                Ok(reader) => self.current = Some(reader),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prefloop_core::{Finish, Sample};

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
}
