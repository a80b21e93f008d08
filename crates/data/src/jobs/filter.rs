//! `filter`: keep the rows of a stage that satisfy a predicate written as a SQL `WHERE`
//! expression over its columns (`reward >= 5 AND verdict = 'OK'`), into a new stage of the
//! same kind.
//!
//! polars evaluates the predicate shard by shard and returns the matching row numbers; the rows
//! themselves are then copied through our own typed reader and writer, so the output has
//! exactly the input's schema, shard format and manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;
use polars::sql::sql_expr;
use prefloop_core::{Pair, Problem, Record, ReferenceLogps, Sample, Score};

use super::{polars_error, streaming};
use crate::shard::{RecordReader, WriterOptions};
use crate::stage::StageWriter;
use crate::{DataError, Result};

const ROW: &str = "__prefloop_row";

/// Rows read and rows kept by [`filter_stage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReport {
    pub kind: String,
    pub rows_in: u64,
    pub rows_out: u64,
}

/// Writes the rows of the complete stage `input` for which `predicate` is true into the stage
/// `out`. A row where the predicate is null (a null column compared) is dropped, as in SQL.
pub fn filter_stage(input: &Path, predicate: &str, out: &Path) -> Result<FilterReport> {
    let source = crate::stage_files(input, None)?;
    let expr = sql_expr(predicate).map_err(|e| DataError::Manifest {
        path: input.to_owned(),
        message: format!("cannot parse the predicate {predicate:?}: {e}"),
    })?;
    let shards = &source.files;
    let kind = match &source.kind {
        Some(kind) => kind.clone(),
        // Another tool's files: the kind their columns make.
        None => {
            let first = crate::shard::ShardReader::open(&shards[0])?;
            match crate::kinds_matching(first.schema()).as_slice() {
                [kind] => (*kind).to_owned(),
                _ => {
                    return Err(DataError::Manifest {
                        path: shards[0].clone(),
                        message: "its columns are not those of one of prefloop's record kinds \
                                  (prefloop inspect shows them)"
                            .into(),
                    });
                }
            }
        }
    };
    let rows_out = match kind.as_str() {
        Problem::KIND => copy_matching::<Problem>(shards, &expr, out)?,
        Sample::KIND => copy_matching::<Sample>(shards, &expr, out)?,
        Score::KIND => copy_matching::<Score>(shards, &expr, out)?,
        Pair::KIND => copy_matching::<Pair>(shards, &expr, out)?,
        ReferenceLogps::KIND => copy_matching::<ReferenceLogps>(shards, &expr, out)?,
        other => {
            return Err(DataError::Manifest {
                path: input.to_owned(),
                message: format!("cannot filter a stage of kind {other:?}"),
            });
        }
    };
    Ok(FilterReport {
        kind,
        rows_in: source.rows,
        rows_out,
    })
}

fn copy_matching<R: Record>(shards: &[PathBuf], predicate: &Expr, out: &Path) -> Result<u64> {
    // Evaluated for every shard before anything is written: a predicate that fails on a column
    // leaves no output behind. Row numbers cost 4 bytes per kept row.
    let matching = shards
        .iter()
        .map(|shard| matching_rows(shard, predicate))
        .collect::<Result<Vec<_>>>()?;
    let mut writer = StageWriter::<R>::restart(out, WriterOptions::default())?;
    let mut kept = 0;
    for (shard, rows) in shards.iter().zip(matching) {
        let mut wanted = rows.into_iter().map(u64::from).peekable();
        let mut offset: u64 = 0;
        for rows in RecordReader::<R>::open(shard)? {
            let mut selected = Vec::new();
            for row in rows? {
                if wanted.next_if_eq(&offset).is_some() {
                    selected.push(row);
                }
                offset += 1;
            }
            writer.write(&selected)?;
            kept += selected.len() as u64;
        }
    }
    writer.finish()?;
    Ok(kept)
}

/// The numbers of the rows of one shard where the predicate holds, ascending.
fn matching_rows(shard: &Path, predicate: &Expr) -> Result<Vec<IdxSize>> {
    let path = PlPath::Local(Arc::from(shard));
    let rows = LazyFrame::scan_parquet(path, ScanArgsParquet::default())
        .map(|lf| {
            lf.with_row_index(ROW, None)
                .filter(predicate.clone())
                .select([col(ROW)])
        })
        .and_then(streaming)
        .and_then(|df| {
            let column = df.column(ROW)?.idx()?.clone();
            Ok(column.into_no_null_iter().collect::<Vec<_>>())
        })
        .map_err(polars_error(shard))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use prefloop_core::{ProblemSource, Scorer, Verdict};

    use super::*;
    use crate::Manifest;
    use crate::jobs::write_test_stage;
    use crate::stage::StageReader;

    fn score(problem: &str, idx: u32, reward: f32, verdict: Verdict) -> Score {
        Score {
            problem_id: problem.into(),
            sample_idx: idx,
            round: 0,
            reward,
            scorer: Scorer::Tests,
            passed: u32::from(verdict == Verdict::Ok),
            total: 1,
            verdict,
            wall_ms: 1.0,
        }
    }

    fn scores() -> Vec<Score> {
        vec![
            score("a", 0, 10.0, Verdict::Ok),
            score("a", 1, 0.0, Verdict::WrongAnswer),
            score("b", 0, 0.0, Verdict::TimeLimit),
            score("b", 1, 10.0, Verdict::Ok),
            score("c", 0, 0.0, Verdict::RuntimeError),
            score("c", 1, 10.0, Verdict::Ok),
            score("c", 2, 0.0, Verdict::WrongAnswer),
        ]
    }

    #[test]
    fn keeps_exactly_the_matching_rows_across_shards_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (input, out) = (dir.path().join("scores"), dir.path().join("kept"));
        write_test_stage(&input, &scores()); // three rows a shard
        let report = filter_stage(&input, "reward > 5 AND problem_id <> 'a'", &out).unwrap();
        assert_eq!((report.rows_in, report.rows_out), (7, 2));
        let kept: Vec<Score> = StageReader::open(&out)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        let expected: Vec<Score> = scores()
            .into_iter()
            .filter(|s| s.reward > 5.0 && s.problem_id != "a")
            .collect();
        assert_eq!(kept, expected);

        let out = dir.path().join("failed");
        let report = filter_stage(&input, "verdict IN ('WA', 'TLE')", &out).unwrap();
        assert_eq!(report.rows_out, 3);
    }

    #[test]
    fn null_predicate_drops_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let (input, out) = (dir.path().join("problems"), dir.path().join("kept"));
        let problem = |id: &str, time_limit_ms| Problem {
            problem_id: id.into(),
            source: ProblemSource::Apps,
            prompt: "p".into(),
            tests: vec![],
            fn_name: None,
            starter_code: String::new(),
            reference_solution: None,
            difficulty: "easy".into(),
            time_limit_ms,
            memory_limit_bytes: None,
        };
        write_test_stage(&input, &[problem("a", None), problem("b", Some(2000))]);
        let report = filter_stage(&input, "time_limit_ms >= 1000", &out).unwrap();
        assert_eq!(report.rows_out, 1);
    }

    #[test]
    fn a_bad_predicate_or_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("scores");
        write_test_stage(&input, &scores());
        let out = dir.path().join("kept");
        let e = filter_stage(&input, "reward >", &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot parse the predicate"), "{e}");
        let e = filter_stage(&input, "rewrd > 1", &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rewrd") && e.contains("part-00000"), "{e}");
        let e = filter_stage(&input, "reward + 1", &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("part-00000"), "{e}");
    }

    #[test]
    fn a_killed_filter_run_again_writes_each_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let (input, out) = (dir.path().join("scores"), dir.path().join("kept"));
        write_test_stage(&input, &scores());
        // A killed run leaves an unfinished stage with one committed shard.
        let options = WriterOptions::default().with_shard_rows(1);
        let mut partial = StageWriter::<Score>::open(&out, options).unwrap();
        partial.write(&scores()[..2]).unwrap();
        drop(partial);
        assert_eq!(Manifest::load(&out).unwrap().unwrap().rows(), 2);
        let report = filter_stage(&input, "reward > 5", &out).unwrap();
        assert_eq!(report.rows_out, 3);
        let kept = StageReader::<Score>::open(&out)
            .unwrap()
            .flat_map(Result::unwrap)
            .count();
        assert_eq!(kept, 3);
    }
}
