//! `pairs`: samples ⋈ scores → one preference pair per (problem, round): the best-scored
//! sample against the worst, ties dropped, an optional minimum margin, and — as the paper does
//! for code — the problem's reference solution as the chosen answer when no sample passed.

use std::path::Path;
use std::sync::{Arc, Mutex};

use polars::prelude::*;
use prefloop_core::{Pair, PairSource, Scorer};

use super::{polars_error, scan_stage};
use crate::shard::WriterOptions;
use crate::stage::StageWriter;
use crate::{DataError, Manifest, Result};

/// Options of [`build_pairs`].
#[derive(Debug, Clone)]
pub struct PairsOptions {
    /// Keep a pair only if chosen_reward − rejected_reward ≥ this (and > 0: ties are dropped).
    pub min_margin: f32,
    /// The reward credited to a reference solution used as the chosen answer (the paper's
    /// reward for passing every test).
    pub reference_reward: f32,
}

impl Default for PairsOptions {
    fn default() -> Self {
        Self {
            min_margin: 0.0,
            reference_reward: 10.0,
        }
    }
}

/// Reads the samples and scores stages (and the problems stage, for the reference fallback),
/// writes the pairs stage `out`.
pub fn build_pairs(
    samples: &Path,
    scores: &Path,
    problems: Option<&Path>,
    out: &Path,
    options: &PairsOptions,
) -> Result<Manifest> {
    let keys = [col("problem_id"), col("sample_idx"), col("round")];
    let samples_lf = scan_stage(samples, "samples")?.select([
        col("problem_id"),
        col("prompt"),
        col("completion"),
        col("sample_idx"),
        col("round"),
    ]);
    let scores_lf = scan_stage(scores, "scores")?.select([
        col("problem_id"),
        col("sample_idx"),
        col("round"),
        col("reward"),
        col("scorer"),
        col("passed"),
        col("total"),
    ]);
    let joined = samples_lf.join(
        scores_lf,
        keys.clone(),
        keys,
        JoinArgs::new(JoinType::Inner),
    );

    // Best: highest reward, lowest sample_idx among equals; worst: lowest reward, likewise.
    let ranked = |column: &str, best: bool| {
        col(column)
            .sort_by(
                [col("reward"), col("sample_idx")],
                SortMultipleOptions::default().with_order_descending_multi([best, false]),
            )
            .first()
    };
    let passed = col("passed").eq(col("total")).and(col("total").gt(lit(0)));
    let mut per_problem = joined.group_by([col("problem_id"), col("round")]).agg([
        col("prompt").first(),
        ranked("completion", true).alias("chosen"),
        col("reward").max().alias("chosen_reward"),
        ranked("completion", false).alias("rejected"),
        col("reward").min().alias("rejected_reward"),
        passed.any(true).alias("any_passed"),
        col("scorer")
            .eq(lit(Scorer::Tests.as_str()))
            .all(true)
            .alias("tested"),
    ]);

    let mut use_reference = lit(false);
    if let Some(problems) = problems {
        let references = scan_stage(problems, "problems")?
            .select([col("problem_id"), col("reference_solution")]);
        per_problem = per_problem.join(
            references,
            [col("problem_id")],
            [col("problem_id")],
            JoinArgs::new(JoinType::Left),
        );
        // Only where tests scored every sample: a reward model's low scores are no failure.
        use_reference = col("tested")
            .and(col("any_passed").not())
            .and(col("reference_solution").is_not_null());
    }
    let chosen = when(use_reference.clone())
        .then(col("reference_solution"))
        .otherwise(col("chosen"));
    let chosen_reward = when(use_reference.clone())
        .then(lit(options.reference_reward))
        .otherwise(col("chosen_reward").cast(DataType::Float32));
    let source = when(use_reference)
        .then(lit(PairSource::Reference.as_str()))
        .otherwise(lit(PairSource::Policy.as_str()));
    let pairs = per_problem
        .with_columns([
            chosen.alias("chosen"),
            chosen_reward.alias("chosen_reward"),
            source.alias("source"),
        ])
        .with_column(
            (col("chosen_reward") - col("rejected_reward").cast(DataType::Float32)).alias("margin"),
        )
        .filter(
            col("margin")
                .gt(lit(0.0f32))
                .and(col("margin").gt_eq(lit(options.min_margin))),
        )
        .select([
            col("prompt"),
            col("chosen"),
            col("rejected"),
            col("chosen_reward"),
            col("rejected_reward").cast(DataType::Float32),
            col("margin"),
            col("problem_id"),
            col("round").cast(DataType::UInt32),
            col("source"),
        ]);

    // Streamed out chunk by chunk into our own stage writer (atomic shards, manifest, schema).
    let writer = Arc::new(Mutex::new(StageWriter::<Pair>::open(
        out,
        WriterOptions::default(),
    )?));
    let failure: Arc<Mutex<Option<DataError>>> = Arc::default();
    let (sink_writer, sink_failure) = (Arc::clone(&writer), Arc::clone(&failure));
    let callback = PlanCallback::new(move |chunk: DataFrame| -> PolarsResult<bool> {
        let written =
            pairs_of(&chunk).and_then(|rows| sink_writer.lock().expect("writer lock").write(&rows));
        match written {
            Ok(()) => Ok(false),
            Err(e) => {
                *sink_failure.lock().expect("failure lock") = Some(e);
                Ok(true) // stop
            }
        }
    });
    pairs
        .with_new_streaming(true)
        .sink_batches(callback, true, None)
        .and_then(LazyFrame::collect)
        .map_err(polars_error(out))?;
    if let Some(e) = failure.lock().expect("failure lock").take() {
        return Err(e);
    }
    let writer = Arc::try_unwrap(writer).map_err(|_| DataError::Manifest {
        path: out.to_owned(),
        message: "the batch job still holds the writer".into(),
    })?;
    writer.into_inner().expect("writer lock").finish()
}

fn pairs_of(chunk: &DataFrame) -> Result<Vec<Pair>> {
    let failed = |e: PolarsError| DataError::Manifest {
        path: "pairs".into(),
        message: e.to_string(),
    };
    let text = |name: &str| -> Result<Vec<String>> {
        let column = chunk
            .column(name)
            .map_err(failed)?
            .str()
            .map_err(failed)?
            .clone();
        Ok(column
            .into_iter()
            .map(|v| v.unwrap_or_default().to_owned())
            .collect())
    };
    let float = |name: &str| -> Result<Vec<f32>> {
        let column = chunk
            .column(name)
            .map_err(failed)?
            .f32()
            .map_err(failed)?
            .clone();
        Ok(column.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
    };
    let rounds: Vec<u32> = chunk
        .column("round")
        .map_err(failed)?
        .u32()
        .map_err(failed)?
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let (prompt, chosen, rejected) = (text("prompt")?, text("chosen")?, text("rejected")?);
    let (problem_id, source) = (text("problem_id")?, text("source")?);
    let (chosen_reward, rejected_reward, margin) = (
        float("chosen_reward")?,
        float("rejected_reward")?,
        float("margin")?,
    );
    let mut pairs = Vec::with_capacity(chunk.height());
    for i in 0..chunk.height() {
        pairs.push(Pair {
            prompt: prompt[i].clone(),
            chosen: chosen[i].clone(),
            rejected: rejected[i].clone(),
            chosen_reward: chosen_reward[i],
            rejected_reward: rejected_reward[i],
            margin: margin[i],
            problem_id: problem_id[i].clone(),
            round: rounds[i],
            source: source[i].parse().map_err(|e: String| DataError::Manifest {
                path: "pairs".into(),
                message: e,
            })?,
        });
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use prefloop_core::{Finish, Problem, ProblemSource, Sample, Score, Verdict};

    use super::*;
    use crate::StageReader;
    use crate::jobs::write_test_stage;

    /// (problem, sample_idx, reward, all tests passed); d is scored by a reward model.
    const CASES: &[(&str, u32, f32, bool)] = &[
        ("a", 0, 0.0, false),
        ("a", 1, 10.0, true),
        ("a", 2, 0.0, false),
        ("a", 3, 10.0, true),
        ("b", 0, 0.0, false),
        ("b", 1, 0.0, false),
        ("c", 0, 10.0, true),
        ("c", 1, 10.0, true),
        ("d", 0, 3.0, false),
        ("d", 1, 2.5, false),
        ("e", 0, 0.0, false),
        ("e", 1, 0.0, false),
    ];

    fn run(min_margin: f32) -> Vec<Pair> {
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = CASES
            .iter()
            .map(|&(p, i, _, _)| Sample {
                problem_id: p.into(),
                prompt: format!("prompt {p}"),
                completion: format!("{p}{i}"),
                sample_idx: i,
                round: 1,
                policy: "init".into(),
                seed: 0,
                num_tokens: 1,
                logprob_sum: -1.0,
                finish: Finish::Stop,
            })
            .collect();
        // Scores in another order than the samples: the join must not care.
        let scores: Vec<Score> = CASES
            .iter()
            .rev()
            .map(|&(p, i, reward, ok)| Score {
                problem_id: p.into(),
                sample_idx: i,
                round: 1,
                reward,
                scorer: if p == "d" {
                    Scorer::RewardModel
                } else {
                    Scorer::Tests
                },
                passed: if p == "d" {
                    0
                } else if ok {
                    3
                } else {
                    1
                },
                total: if p == "d" { 0 } else { 3 },
                verdict: if ok {
                    Verdict::Ok
                } else {
                    Verdict::WrongAnswer
                },
                wall_ms: 1.0,
            })
            .collect();
        let problems: Vec<Problem> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|&p| Problem {
                problem_id: p.into(),
                source: ProblemSource::Apps,
                prompt: format!("prompt {p}"),
                tests: Vec::new(),
                fn_name: None,
                starter_code: String::new(),
                reference_solution: (p != "e").then(|| format!("reference {p}")),
                difficulty: String::new(),
                time_limit_ms: None,
                memory_limit_bytes: None,
            })
            .collect();
        let [s, c, p, out] = ["samples", "scores", "problems", "pairs"].map(|n| dir.path().join(n));
        write_test_stage(&s, &samples);
        write_test_stage(&c, &scores);
        write_test_stage(&p, &problems);
        let options = PairsOptions {
            min_margin,
            ..PairsOptions::default()
        };
        build_pairs(&s, &c, Some(&p), &out, &options).unwrap();
        let mut pairs: Vec<Pair> = StageReader::open(&out)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        pairs.sort_by(|x, y| x.problem_id.cmp(&y.problem_id));
        pairs
    }

    #[test]
    fn pairs_pick_best_against_worst_drop_ties_and_fall_back_to_the_reference() {
        let pairs = run(0.0);
        let summary: Vec<(&str, &str, &str, f32, PairSource)> = pairs
            .iter()
            .map(|p| {
                (
                    p.problem_id.as_str(),
                    p.chosen.as_str(),
                    p.rejected.as_str(),
                    p.margin,
                    p.source,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                // Best is the lowest-indexed of the passing samples, worst likewise.
                ("a", "a1", "a0", 10.0, PairSource::Policy),
                // No sample passed: the reference solution is chosen, credited 10.
                ("b", "reference b", "b0", 10.0, PairSource::Reference),
                // c: every sample scored 10 — a tie, dropped. e: nothing passed, no reference, tie.
                // d: reward-model scores; no reference fallback however low they are.
                ("d", "d0", "d1", 0.5, PairSource::Policy),
            ]
        );
        assert_eq!(
            (pairs[1].chosen_reward, pairs[1].rejected_reward),
            (10.0, 0.0)
        );
        assert_eq!(pairs[0].prompt, "prompt a");
        assert_eq!(pairs[0].round, 1);
    }

    #[test]
    fn a_minimum_margin_drops_close_pairs() {
        let ids: Vec<String> = run(1.0).into_iter().map(|p| p.problem_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
