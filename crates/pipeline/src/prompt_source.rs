//! Which prompts each round samples. By default every round samples the run's whole set. With
//! `data.prompts_per_round = K`, round r takes the next K prompts of a seeded shuffle of the
//! set, so rounds are disjoint until the set is used up (then a new shuffle begins), as
//! RLHFlow's Online-RLHF gives each iteration its own slice. With `data.prompts` naming a
//! directory or a glob, the source grows: each round takes the prompts of the files no earlier
//! round used (known by content hash), in name order, so a nightly job only drops a new file;
//! a round that finds none reuses every file or stops the run (`data.when_exhausted`).
//!
//! A round's choice is recorded in `state.json` when the round begins (the files with their
//! hashes, the problem ids, a hash of the prompts), and a resumed round samples exactly those
//! prompts again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{RunConfig, WhenExhausted};
use crate::error::{PipelineError, Result};
use crate::generate::{PromptRow, read_prompts};

/// A file (or stage) of a growing source, by its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes (of a stage's MANIFEST.json, which lists its shards'
    /// checksums).
    pub sha256: String,
}

/// What a round samples, recorded when it begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundPrompts {
    /// The files the round took its prompts from (a growing source's; empty otherwise).
    pub files: Vec<SourceFile>,
    /// The problem ids it samples, in order.
    pub problem_ids: Vec<String>,
    /// SHA-256 over those prompts' ids and texts.
    pub hash: String,
}

/// Whether `path` (the configured `data.prompts`) is a growing source: a glob, or a directory
/// that is not itself a stage.
pub(crate) fn is_growing(path: &Path) -> bool {
    let text = path.to_string_lossy();
    text.contains(['*', '?', '['])
        || (path.is_dir() && !path.join(prefloop_data::MANIFEST_FILE).exists())
}

/// Prompts from a file, or from every shard of a stage directory.
pub(crate) fn read_prompt_source(path: &Path) -> Result<Vec<PromptRow>> {
    // A file is read as prompts; only a directory can hold a stage's manifest.
    if !path.is_dir() {
        return read_prompts(path);
    }
    let Some(manifest) = prefloop_data::Manifest::load(path)? else {
        return read_prompts(path);
    };
    let mut prompts = Vec::new();
    for shard in &manifest.shards {
        prompts.extend(read_prompts(&path.join(&shard.path))?);
    }
    Ok(prompts)
}

/// The prompt sources a growing source holds now, in name order: the JSONL and Parquet files
/// and the stage directories a directory holds, or what a glob matches.
fn list(source: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = if source.is_dir() {
        std::fs::read_dir(source)
            .map_err(PipelineError::io(source))?
            .map(|entry| Ok(entry.map_err(PipelineError::io(source))?.path()))
            .collect::<Result<_>>()?
    } else {
        let pattern = source.to_string_lossy();
        let bad = |message: String| PipelineError::Config {
            path: source.to_owned(),
            message,
        };
        glob::glob(&pattern)
            .map_err(|e| bad(format!("not a glob: {e}")))?
            .map(|entry| entry.map_err(|e| bad(e.to_string())))
            .collect::<Result<_>>()?
    };
    paths.retain(|p| {
        let prompts = p
            .extension()
            .is_some_and(|e| ["jsonl", "json", "parquet"].contains(&e.to_string_lossy().as_ref()));
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        !hidden && ((p.is_file() && prompts) || p.join(prefloop_data::MANIFEST_FILE).exists())
    });
    paths.sort();
    Ok(paths)
}

fn sha256_of(path: &Path) -> Result<String> {
    let file = match path.is_dir() {
        true => path.join(prefloop_data::MANIFEST_FILE),
        false => path.to_owned(),
    };
    let bytes = std::fs::read(&file).map_err(PipelineError::io(&file))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 over the prompts' ids and texts, in order.
fn prompts_hash(prompts: &[PromptRow]) -> String {
    let mut hasher = Sha256::new();
    for p in prompts {
        for part in [p.problem_id.as_bytes(), p.prompt.as_bytes()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    hex(&hasher.finalize())
}

/// The prompts of `files`, each problem id once (the first file's wins).
fn read_files(files: &[SourceFile]) -> Result<Vec<PromptRow>> {
    let mut prompts = Vec::new();
    for file in files {
        prompts.extend(read_prompt_source(&file.path)?);
    }
    let mut seen = HashSet::new();
    prompts.retain(|p| seen.insert(p.problem_id.clone()));
    Ok(prompts)
}

/// Whether the run chooses its prompts round by round (else every round samples the set).
pub(crate) fn per_round(config: &RunConfig) -> bool {
    config.data.prompts_per_round.is_some()
        || config.data.prompts.as_deref().is_some_and(is_growing)
}

/// What round `round` samples: from `all` (the run's fixed set) or the growing source, given
/// what the `earlier` rounds took. None: the source has nothing new and the run stops there.
pub(crate) fn choose(
    config: &RunConfig,
    all: &[PromptRow],
    round: u32,
    earlier: &[&RoundPrompts],
) -> Result<Option<(Vec<PromptRow>, RoundPrompts)>> {
    let seed = config.generate.seed;
    let (mut pool, files) = match config.data.prompts.as_deref().filter(|p| is_growing(p)) {
        None => (all.to_vec(), Vec::new()),
        Some(source) => {
            let used: HashSet<&str> = earlier
                .iter()
                .flat_map(|r| r.files.iter().map(|f| f.sha256.as_str()))
                .collect();
            let mut present = Vec::new();
            for path in list(source)? {
                let sha256 = sha256_of(&path)?;
                present.push(SourceFile { path, sha256 });
            }
            let new: Vec<SourceFile> = present
                .iter()
                .filter(|f| !used.contains(f.sha256.as_str()))
                .cloned()
                .collect();
            let files = match (new.is_empty(), config.data.when_exhausted) {
                (false, _) => new,
                (true, WhenExhausted::Stop) => return Ok(None),
                (true, WhenExhausted::Reuse) if present.is_empty() => {
                    return Err(PipelineError::Data {
                        path: source.to_owned(),
                        message: "holds no prompt files (JSONL, Parquet or stages)".into(),
                    });
                }
                (true, WhenExhausted::Reuse) => present,
            };
            let mut pool = read_files(&files)?;
            if let Some(limit) = config.data.limit {
                pool.truncate(limit);
            }
            (pool, files)
        }
    };
    if let Some(k) = config.data.prompts_per_round {
        pool = match files.is_empty() {
            // A fixed set: positions r·K.. of the prompt stream, one seeded shuffle per pass.
            true => slice(&pool, seed, round, k),
            // A growing source: K of this round's files, by a shuffle of the round's own.
            false => {
                let take = k.min(pool.len());
                prefloop_train::prompt_stream(pool.len(), seed ^ u64::from(round), 0, take)
                    .into_iter()
                    .map(|i| pool[i].clone())
                    .collect()
            }
        };
    }
    let record = RoundPrompts {
        files,
        problem_ids: pool.iter().map(|p| p.problem_id.clone()).collect(),
        hash: prompts_hash(&pool),
    };
    Ok(Some((pool, record)))
}

/// Positions `round·k .. (round+1)·k` of the prompt stream the online trainers draw from (a
/// seeded shuffle of `all` per pass); a prompt at most once a round.
fn slice(all: &[PromptRow], seed: u64, round: u32, k: usize) -> Vec<PromptRow> {
    let mut seen = HashSet::new();
    prefloop_train::prompt_stream(all.len(), seed, round as usize * k, k)
        .into_iter()
        .filter(|&i| seen.insert(i))
        .map(|i| all[i].clone())
        .collect()
}

/// The prompts a round recorded, read back for a resumed round: from its files (which must
/// be unchanged) or from the fixed set.
pub(crate) fn recorded(record: &RoundPrompts, all: &[PromptRow]) -> Result<Vec<PromptRow>> {
    let pool = match record.files.is_empty() {
        true => all.to_vec(),
        false => {
            for file in &record.files {
                if sha256_of(&file.path)? != file.sha256 {
                    return Err(PipelineError::Data {
                        path: file.path.clone(),
                        message: "changed since a round took prompts from it: restore it, or \
                                  start a new run"
                            .into(),
                    });
                }
            }
            read_files(&record.files)?
        }
    };
    let prompts: Vec<PromptRow> = record
        .problem_ids
        .iter()
        .filter_map(|id| pool.iter().find(|p| &p.problem_id == id).cloned())
        .collect();
    if prompts.len() != record.problem_ids.len() || prompts_hash(&prompts) != record.hash {
        return Err(PipelineError::Data {
            path: config_source(&record.files),
            message: "no longer holds the prompts a round recorded".into(),
        });
    }
    Ok(prompts)
}

fn config_source(files: &[SourceFile]) -> PathBuf {
    files
        .first()
        .map_or_else(|| PathBuf::from("data.prompts"), |f| f.path.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<PromptRow> {
        (0..n)
            .map(|i| PromptRow {
                problem_id: format!("p{i}"),
                prompt: format!("prompt {i}"),
                ..PromptRow::default()
            })
            .collect()
    }

    #[test]
    fn slices_are_disjoint_until_the_set_is_used_up_then_a_new_shuffle_begins() {
        let all = rows(10);
        let ids = |round| -> Vec<String> {
            slice(&all, 7, round, 3)
                .into_iter()
                .map(|p| p.problem_id)
                .collect()
        };
        let first_pass: Vec<String> = (0..3).flat_map(ids).collect();
        let distinct: HashSet<&String> = first_pass.iter().collect();
        assert_eq!(
            distinct.len(),
            9,
            "three rounds of 3 from 10: no prompt twice"
        );
        assert_eq!(ids(1), ids(1), "a round's slice is a function of the seed");
        // Round 3 straddles the pass: the tenth prompt, then the start of a new shuffle.
        assert!(!first_pass.contains(&ids(3)[0]));
    }
}
