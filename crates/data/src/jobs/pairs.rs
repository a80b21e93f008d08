//! `pairs`: samples ⋈ scores → one preference pair per (problem, round): the best-scored
//! sample against the worst, ties dropped, an optional minimum margin, and — as the paper does
//! for code — the problem's reference solution as the chosen answer when no sample passed.

use std::collections::HashMap;
use std::path::Path;

use polars::prelude::*;
use prefloop_core::{Finish, Pair, PairSource, Sample, Scorer};

use super::{polars_error, scan_stage, streaming};
use crate::shard::WriterOptions;
use crate::stage::{StageReader, StageWriter};
use crate::{DataError, Manifest, Result};

/// Options of [`build_pairs`].
#[derive(Debug, Clone)]
pub struct PairsOptions {
    /// Keep a pair only if chosen_reward − rejected_reward ≥ this (and > 0: ties are dropped).
    pub min_margin: f32,
    /// The reward credited to a reference solution used as the chosen answer (the paper's
    /// reward for passing every test).
    pub reference_reward: f32,
    /// Drop a pair either of whose sampled answers was cut at the token budget (`finish =
    /// length`). Kept, such an answer is trained on as sampled, without an end-of-sequence
    /// token.
    pub drop_truncated: bool,
}

impl Default for PairsOptions {
    fn default() -> Self {
        Self {
            min_margin: 0.0,
            reference_reward: 10.0,
            drop_truncated: false,
        }
    }
}

/// Reads the samples and scores stages (and the problems stage, for the reference fallback),
/// writes the pairs stage `out`.
///
/// Two passes keep memory to the size of the pairs rather than of the samples: the first, on
/// polars, decides every pair from the scores alone; the second streams the samples and keeps
/// the chosen and rejected ones, matching each pair's halves as they arrive.
pub fn build_pairs(
    samples: &Path,
    scores: &Path,
    problems: Option<&Path>,
    out: &Path,
    options: &PairsOptions,
) -> Result<Manifest> {
    let decided = streaming(decide(scores, problems, options)?).map_err(polars_error(scores))?;
    let mut matcher =
        Matcher::new(&decided, options.drop_truncated).map_err(polars_error(scores))?;
    drop(decided);
    // Our own batch-at-a-time reader for the text: polars' scan of the text columns peaked
    // at 1.5 GiB over 5M rows (docs/BENCHMARKS.md), ours stays within a row group.
    let reader = StageReader::<Sample>::open(samples)?;
    let mut writer = StageWriter::<Pair>::restart(out, WriterOptions::default())?;
    for rows in reader {
        let pairs: Vec<Pair> = rows?.into_iter().filter_map(|s| matcher.take(s)).collect();
        writer.write(&pairs)?;
    }
    if let Some(message) = matcher.unmatched() {
        return Err(DataError::Manifest {
            path: samples.to_owned(),
            message,
        });
    }
    writer.finish()
}

/// The first pass: one row per pair to make, with the sample_idx of its chosen and rejected
/// samples, their rewards and margin, and the reference solution where that is the chosen.
fn decide(scores: &Path, problems: Option<&Path>, options: &PairsOptions) -> Result<LazyFrame> {
    let scores_lf = scan_stage(scores, "scores")?.select([
        col("problem_id"),
        col("sample_idx"),
        col("round"),
        col("reward"),
        col("scorer"),
        col("passed"),
        col("total"),
    ]);

    // Best: highest reward, lowest sample_idx among equals; worst: lowest reward, likewise.
    let ranked = |best: bool| {
        col("sample_idx")
            .sort_by(
                [col("reward"), col("sample_idx")],
                SortMultipleOptions::default().with_order_descending_multi([best, false]),
            )
            .first()
    };
    let passed = col("passed").eq(col("total")).and(col("total").gt(lit(0)));
    let per_problem = scores_lf.group_by([col("problem_id"), col("round")]).agg([
        ranked(true).alias("chosen_idx"),
        col("reward").max().alias("chosen_reward"),
        ranked(false).alias("rejected_idx"),
        col("reward").min().alias("rejected_reward"),
        passed.any(true).alias("any_passed"),
        // Tests, alone or in a weighted sum (whose counts are the tests').
        col("scorer")
            .eq(lit(Scorer::Tests.as_str()))
            .or(col("scorer")
                .eq(lit(Scorer::Sum.as_str()))
                .and(col("total").gt(lit(0))))
            .all(true)
            .alias("tested"),
    ]);
    let per_problem = match problems {
        Some(problems) => {
            let references = scan_stage(problems, "problems")?
                .select([col("problem_id"), col("reference_solution")]);
            per_problem.join(
                references,
                [col("problem_id")],
                [col("problem_id")],
                JoinArgs::new(JoinType::Left),
            )
        }
        None => {
            per_problem.with_column(lit(NULL).cast(DataType::String).alias("reference_solution"))
        }
    };
    // Only where tests scored every sample: a reward model's low scores are no failure.
    let use_reference = col("tested")
        .and(col("any_passed").not())
        .and(col("reference_solution").is_not_null());
    let chosen_reward = when(use_reference.clone())
        .then(lit(options.reference_reward))
        .otherwise(col("chosen_reward").cast(DataType::Float32));
    let reference = when(use_reference)
        .then(col("reference_solution"))
        .otherwise(lit(NULL).cast(DataType::String));
    Ok(per_problem
        .with_columns([
            chosen_reward.alias("chosen_reward"),
            col("rejected_reward").cast(DataType::Float32),
            reference.alias("reference"),
        ])
        .with_column((col("chosen_reward") - col("rejected_reward")).alias("margin"))
        .filter(
            col("margin")
                .gt(lit(0.0f32))
                .and(col("margin").gt_eq(lit(options.min_margin))),
        )
        .select([
            col("problem_id"),
            col("round"),
            col("chosen_idx"),
            col("rejected_idx"),
            col("chosen_reward"),
            col("rejected_reward"),
            col("margin"),
            col("reference"),
        ]))
}

/// One half of a pair, waiting for the other.
#[derive(Debug)]
struct Half {
    prompt: String,
    completion: String,
    finish: Finish,
}

/// A pair decided by the first pass, and what the second has found of it so far.
#[derive(Debug)]
struct Decision {
    round: u32,
    chosen_idx: u32,
    rejected_idx: u32,
    chosen_reward: f32,
    rejected_reward: f32,
    margin: f32,
    /// The reference solution, where it is the chosen answer.
    reference: Option<String>,
    /// The half already seen: (is it the chosen one, its text).
    seen: Option<(bool, Half)>,
    done: bool,
}

/// Picks the chosen and rejected samples out of the stream of all samples and pairs them up,
/// in whatever order the samples come.
#[derive(Debug)]
struct Matcher {
    /// By problem_id: a problem has a decision per round, so the vectors are short.
    decisions: HashMap<String, Vec<Decision>>,
    /// [`PairsOptions::drop_truncated`].
    drop_truncated: bool,
}

impl Matcher {
    fn new(decided: &DataFrame, drop_truncated: bool) -> PolarsResult<Self> {
        let problem_id = decided.column("problem_id")?.str()?;
        let round = decided.column("round")?.u32()?;
        let (chosen_idx, rejected_idx) = (
            decided.column("chosen_idx")?.u32()?,
            decided.column("rejected_idx")?.u32()?,
        );
        let (chosen_reward, rejected_reward, margin) = (
            decided.column("chosen_reward")?.f32()?,
            decided.column("rejected_reward")?.f32()?,
            decided.column("margin")?.f32()?,
        );
        let reference = decided.column("reference")?.str()?;
        let mut decisions: HashMap<String, Vec<Decision>> = HashMap::new();
        for i in 0..decided.height() {
            let id = problem_id.get(i).unwrap_or_default().to_owned();
            decisions.entry(id).or_default().push(Decision {
                round: round.get(i).unwrap_or_default(),
                chosen_idx: chosen_idx.get(i).unwrap_or_default(),
                rejected_idx: rejected_idx.get(i).unwrap_or_default(),
                chosen_reward: chosen_reward.get(i).unwrap_or(f32::NAN),
                rejected_reward: rejected_reward.get(i).unwrap_or(f32::NAN),
                margin: margin.get(i).unwrap_or(f32::NAN),
                reference: reference.get(i).map(str::to_owned),
                seen: None,
                done: false,
            });
        }
        Ok(Self {
            decisions,
            drop_truncated,
        })
    }

    /// The pair this sample completes, if it does; a chosen or rejected sample whose partner
    /// has not come yet is kept until it does.
    fn take(&mut self, sample: Sample) -> Option<Pair> {
        let decision = self
            .decisions
            .get_mut(&sample.problem_id)?
            .iter_mut()
            .find(|d| d.round == sample.round)?;
        let is_chosen = decision.reference.is_none() && sample.sample_idx == decision.chosen_idx;
        if decision.done || !(is_chosen || sample.sample_idx == decision.rejected_idx) {
            return None;
        }
        let half = Half {
            prompt: sample.prompt,
            completion: sample.completion,
            finish: sample.finish,
        };
        let (chosen, chosen_finish, rejected, source) =
            match (decision.reference.take(), decision.seen.take()) {
                (Some(reference), _) => (reference, None, half, PairSource::Reference),
                (None, None) => {
                    decision.seen = Some((is_chosen, half));
                    return None;
                }
                (None, Some((_, other))) if is_chosen => (
                    half.completion,
                    Some(half.finish),
                    other,
                    PairSource::Policy,
                ),
                (None, Some((_, other))) => (
                    other.completion,
                    Some(other.finish),
                    half,
                    PairSource::Policy,
                ),
            };
        decision.done = true;
        let cut = [chosen_finish, Some(rejected.finish)].contains(&Some(Finish::Length));
        if self.drop_truncated && cut {
            return None;
        }
        Some(Pair {
            prompt: rejected.prompt,
            chosen,
            rejected: rejected.completion,
            chosen_reward: decision.chosen_reward,
            rejected_reward: decision.rejected_reward,
            margin: decision.margin,
            problem_id: sample.problem_id,
            round: sample.round,
            source,
            chosen_finish,
            rejected_finish: Some(rejected.finish),
        })
    }

    /// A pair whose samples never came (a score without its sample), as an error message.
    fn unmatched(&self) -> Option<String> {
        let (id, decision) = self
            .decisions
            .iter()
            .flat_map(|(id, d)| d.iter().map(move |d| (id, d)))
            .find(|(_, d)| !d.done)?;
        let missing = match &decision.seen {
            Some((true, _)) => decision.rejected_idx,
            Some((false, _)) => decision.chosen_idx,
            None => decision.rejected_idx,
        };
        Some(format!(
            "problem {id} round {}: sample {missing} is scored but not in the samples stage",
            decision.round
        ))
    }
}

#[cfg(test)]
mod tests {
    use prefloop_core::{Finish, Problem, ProblemSource, Score, Verdict};

    use super::*;
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

    fn run(min_margin: f32, with_problems: bool) -> Vec<Pair> {
        let options = PairsOptions {
            min_margin,
            ..PairsOptions::default()
        };
        run_without(&options, with_problems, None).unwrap()
    }

    /// How each sample of CASES ended: a1 at a stop string, d1 at the token budget.
    fn finish(problem: &str, idx: u32) -> Finish {
        match (problem, idx) {
            ("a", 1) => Finish::StopString,
            ("d", 1) => Finish::Length,
            _ => Finish::Stop,
        }
    }

    /// Builds the pairs of CASES, with one sample left out of the samples stage if asked.
    fn run_without(
        options: &PairsOptions,
        with_problems: bool,
        missing: Option<(&str, u32)>,
    ) -> Result<Vec<Pair>> {
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = CASES
            .iter()
            .filter(|&&(p, i, _, _)| missing != Some((p, i)))
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
                finish: finish(p, i),
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
        let problems = with_problems.then_some(p.as_path());
        build_pairs(&s, &c, problems, &out, options)?;
        let mut pairs: Vec<Pair> = StageReader::open(&out)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        pairs.sort_by(|x, y| x.problem_id.cmp(&y.problem_id));
        Ok(pairs)
    }

    #[test]
    fn pairs_pick_best_against_worst_drop_ties_and_fall_back_to_the_reference() {
        let pairs = run(0.0, true);
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
    fn pairs_carry_how_each_sampled_answer_ended_and_can_drop_truncated_ones() {
        let finishes: Vec<(String, Option<Finish>, Option<Finish>)> = run(0.0, true)
            .into_iter()
            .map(|p| (p.problem_id, p.chosen_finish, p.rejected_finish))
            .collect();
        assert_eq!(
            finishes,
            [
                ("a".into(), Some(Finish::StopString), Some(Finish::Stop)),
                // A reference solution was not sampled.
                ("b".into(), None, Some(Finish::Stop)),
                ("d".into(), Some(Finish::Stop), Some(Finish::Length)),
            ]
        );
        let options = PairsOptions {
            drop_truncated: true,
            ..PairsOptions::default()
        };
        let ids: Vec<String> = run_without(&options, true, None)
            .unwrap()
            .into_iter()
            .map(|p| p.problem_id)
            .collect();
        assert_eq!(ids, ["a", "b"], "d's rejected answer was cut at the budget");
    }

    #[test]
    fn a_minimum_margin_drops_close_pairs() {
        let ids: Vec<String> = run(1.0, true).into_iter().map(|p| p.problem_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn pairs_without_a_problems_stage_do_not_look_for_reference_solutions() {
        let ids: Vec<(String, PairSource)> = run(0.0, false)
            .into_iter()
            .map(|p| (p.problem_id, p.source))
            .collect();
        // b had no passing sample and, without its reference, only ties: no pair.
        assert_eq!(
            ids,
            [
                ("a".into(), PairSource::Policy),
                ("d".into(), PairSource::Policy)
            ]
        );
    }

    #[test]
    fn a_scored_sample_missing_from_the_samples_stage_is_an_error_naming_it() {
        let e = run_without(&PairsOptions::default(), true, Some(("a", 1)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("problem a round 1: sample 1 is scored but not in the samples stage"),
            "{e}"
        );
    }
}
