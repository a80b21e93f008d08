//! Stages across machines: `--shard i/n` gives a process one contiguous slice of a stage's
//! input and its own directory, `<stage>/shard-IIIII-of-NNNNN/`; `merge` then checks that
//! every slice is there, whole and disjoint, and writes the stage's manifest over the slices'
//! files (no copying), so readers see one stage equal to an unsharded run with the same seeds.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use prefloop_core::{Sample, Score};
use prefloop_data::{Manifest, StageReader};

use crate::error::{PipelineError, Result};

/// Slice `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The whole input, in the stage directory itself.
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// This slice of `len` items: contiguous, so the slices in order are the whole.
    pub fn range(&self, len: u64) -> Range<u64> {
        let (i, n) = (u64::from(self.index), u64::from(self.count));
        len * i / n..len * (i + 1) / n
    }

    /// Where this slice of a stage is written, under the stage's directory.
    pub fn dir(&self, stage: &Path) -> std::path::PathBuf {
        if *self == Self::WHOLE {
            stage.to_owned()
        } else {
            stage.join(format!("shard-{:05}-of-{:05}", self.index, self.count))
        }
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}`: expected i/n with 0 ≤ i < n, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// Merges the slices under the stage directory `dir` into its manifest: all `n` slices of one
/// `n` present and complete, files matching their checksums, one record kind, and no row twice
/// (samples and scores by problem, sample and round). Returns the merged manifest.
pub fn merge_shards(dir: &Path) -> Result<Manifest> {
    let bad = |message: String| PipelineError::Data {
        path: dir.to_owned(),
        message,
    };
    let mut slices: Vec<(Shard, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(PipelineError::io(dir))? {
        let name = entry.map_err(PipelineError::io(dir))?.file_name();
        let name = name.to_string_lossy();
        if let Some(rest) = name.strip_prefix("shard-")
            && let Some((i, n)) = rest.split_once("-of-")
        {
            let shard = format!("{i}/{n}")
                .parse::<Shard>()
                .map_err(|e| bad(format!("{name}: {e}")))?;
            slices.push((shard, name.into_owned()));
        }
    }
    slices.sort_by_key(|(s, _)| s.index);
    let Some(count) = slices.first().map(|(s, _)| s.count) else {
        return Err(bad("no shard-IIIII-of-NNNNN directories to merge".into()));
    };
    let indices: Vec<u32> = slices.iter().map(|(s, _)| s.index).collect();
    if slices.iter().any(|(s, _)| s.count != count) || indices != (0..count).collect::<Vec<_>>() {
        let names: Vec<&str> = slices.iter().map(|(_, n)| n.as_str()).collect();
        return Err(bad(format!(
            "expected shards 0..{count} of {count}, found {}",
            names.join(", ")
        )));
    }

    let mut merged: Option<Manifest> = None;
    for (_, name) in &slices {
        let slice_dir = dir.join(name);
        let manifest = Manifest::load(&slice_dir)?
            .filter(|m| m.complete)
            .ok_or_else(|| {
                bad(format!(
                    "{name}: not a complete stage (is it still running?)"
                ))
            })?;
        manifest.verify(&slice_dir)?;
        let merged = merged.get_or_insert_with(|| Manifest::new(&manifest.kind));
        if merged.kind != manifest.kind {
            return Err(bad(format!(
                "{name} holds {}, the others {}",
                manifest.kind, merged.kind
            )));
        }
        merged
            .shards
            .extend(manifest.shards.into_iter().map(|mut info| {
                info.path = format!("{name}/{}", info.path);
                info
            }));
    }
    let mut merged = merged.expect("at least one slice");
    merged.complete = true;
    let duplicate = match merged.kind.as_str() {
        "samples" => first_duplicate::<Sample, _>(dir, &slices, |s| {
            (s.problem_id.clone(), s.sample_idx, s.round)
        })?,
        "scores" => first_duplicate::<Score, _>(dir, &slices, |s| {
            (s.problem_id.clone(), s.sample_idx, s.round)
        })?,
        _ => None,
    };
    if let Some((problem, sample, round)) = duplicate {
        return Err(bad(format!(
            "problem {problem} sample {sample} round {round} is in more than one shard"
        )));
    }
    merged.save(dir)?;
    Ok(merged)
}

/// The first key that two rows of the slices share.
fn first_duplicate<R: prefloop_core::Record, K: std::hash::Hash + Eq>(
    dir: &Path,
    slices: &[(Shard, String)],
    key: impl Fn(&R) -> K,
) -> Result<Option<K>> {
    let mut seen = HashSet::new();
    for (_, name) in slices {
        for rows in StageReader::<R>::open(dir.join(name))? {
            for row in rows? {
                let k = key(&row);
                if seen.contains(&k) {
                    return Ok(Some(k));
                }
                seen.insert(k);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_contiguous_and_cover_the_whole() {
        for len in [0u64, 1, 7, 100] {
            for n in 1..6 {
                let ranges: Vec<Range<u64>> = (0..n)
                    .map(|i| Shard { index: i, count: n }.range(len))
                    .collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().unwrap().end, len);
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }

    #[test]
    fn shard_specs_parse_or_say_what_is_expected() {
        assert_eq!("2/4".parse(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("i/n"), "{err}");
        }
    }
}
