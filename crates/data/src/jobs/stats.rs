//! `stats`: per round — reward mean and standard deviation, unbiased pass@k, the verdict
//! histogram and completion lengths — over samples and scores stages of any size.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;

use super::{polars_error, scan_stage, streaming};
use crate::Result;

/// What one round's samples and scores look like.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    pub round: u32,
    pub scores: u64,
    pub reward_mean: f64,
    /// Sample standard deviation (n − 1).
    pub reward_std: f64,
    /// (k, pass@k averaged over problems with at least k samples).
    pub pass_at: Vec<(u32, f64)>,
    /// Verdict → count, in label order.
    pub verdicts: BTreeMap<String, u64>,
    /// Mean completion length in tokens (from the samples stage).
    pub mean_tokens: f64,
}

/// The unbiased estimator of the Codex paper (Chen et al. 2021): the chance that at least one
/// of k samples drawn without replacement from n, of which c are correct, is correct:
/// 1 − C(n−c, k) / C(n, k), computed as a product to stay finite.
pub fn pass_at_k(n: u64, c: u64, k: u64) -> f64 {
    assert!(
        k >= 1 && k <= n && c <= n,
        "pass@{k} needs 1 ≤ k ≤ n and c ≤ n (n = {n}, c = {c})"
    );
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

fn collect(lf: LazyFrame, path: &Path) -> Result<DataFrame> {
    streaming(lf).map_err(polars_error(path))
}

fn u32s(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<u32>> {
    let column = df
        .column(name)
        .and_then(|c| c.cast(&DataType::UInt32))
        .map_err(polars_error(path))?;
    Ok(column
        .u32()
        .map_err(polars_error(path))?
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect())
}

fn f64s(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<f64>> {
    let column = df
        .column(name)
        .and_then(|c| c.cast(&DataType::Float64))
        .map_err(polars_error(path))?;
    Ok(column
        .f64()
        .map_err(polars_error(path))?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// Statistics of every round in the samples and scores stages; pass@k for each `ks`.
pub fn stage_stats(samples: &Path, scores: &Path, ks: &[u32]) -> Result<Vec<RoundStats>> {
    let scores_lf = scan_stage(scores, "scores")?;
    let per_round = collect(
        scores_lf.clone().group_by([col("round")]).agg([
            len().alias("scores"),
            col("reward").cast(DataType::Float64).mean().alias("mean"),
            col("reward").cast(DataType::Float64).std(1).alias("std"),
        ]),
        scores,
    )?;
    let mut rounds: BTreeMap<u32, RoundStats> = BTreeMap::new();
    let (round, count) = (
        u32s(&per_round, "round", scores)?,
        u32s(&per_round, "scores", scores)?,
    );
    let (mean, std) = (
        f64s(&per_round, "mean", scores)?,
        f64s(&per_round, "std", scores)?,
    );
    for i in 0..per_round.height() {
        rounds.insert(
            round[i],
            RoundStats {
                round: round[i],
                scores: count[i] as u64,
                reward_mean: mean[i],
                reward_std: std[i],
                pass_at: Vec::new(),
                verdicts: BTreeMap::new(),
                mean_tokens: f64::NAN,
            },
        );
    }

    let verdicts = collect(
        scores_lf
            .clone()
            .group_by([col("round"), col("verdict")])
            .agg([len().alias("n")]),
        scores,
    )?;
    let (round, n) = (
        u32s(&verdicts, "round", scores)?,
        u32s(&verdicts, "n", scores)?,
    );
    let labels = verdicts
        .column("verdict")
        .map_err(polars_error(scores))?
        .str()
        .map_err(polars_error(scores))?
        .clone();
    for ((round, n), label) in round.into_iter().zip(n).zip(&labels) {
        if let Some(stats) = rounds.get_mut(&round) {
            stats
                .verdicts
                .insert(label.unwrap_or_default().to_owned(), n as u64);
        }
    }

    // pass@k over test-scored samples only: a reward model or program runs no tests.
    let passed = col("passed").eq(col("total"));
    let problems = collect(
        scores_lf
            .filter(col("total").gt(lit(0)))
            .group_by([col("round"), col("problem_id")])
            .agg([
                len().alias("n"),
                passed.cast(DataType::UInt32).sum().alias("c"),
            ]),
        scores,
    )?;
    let (round, n, c) = (
        u32s(&problems, "round", scores)?,
        u32s(&problems, "n", scores)?,
        u32s(&problems, "c", scores)?,
    );
    for stats in rounds.values_mut() {
        for &k in ks {
            let values: Vec<f64> = (0..problems.height())
                .filter(|&i| round[i] == stats.round && n[i] >= k)
                .map(|i| pass_at_k(n[i] as u64, c[i] as u64, k as u64))
                .collect();
            if !values.is_empty() {
                stats
                    .pass_at
                    .push((k, values.iter().sum::<f64>() / values.len() as f64));
            }
        }
    }

    let lengths = collect(
        scan_stage(samples, "samples")?
            .group_by([col("round")])
            .agg([col("num_tokens")
                .cast(DataType::Float64)
                .mean()
                .alias("tokens")]),
        samples,
    )?;
    let (round, tokens) = (
        u32s(&lengths, "round", samples)?,
        f64s(&lengths, "tokens", samples)?,
    );
    for (round, tokens) in round.into_iter().zip(tokens) {
        if let Some(stats) = rounds.get_mut(&round) {
            stats.mean_tokens = tokens;
        }
    }
    Ok(rounds.into_values().collect())
}

#[cfg(test)]
mod tests {
    use prefloop_core::{Finish, Sample, Score, Scorer, Verdict};

    use super::*;
    use crate::jobs::write_test_stage;

    #[test]
    fn stats_of_a_hand_built_round() {
        // Two problems, 4 samples each; only p1's sample 0 passes.
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(String, u32)> = ["p1", "p2"]
            .iter()
            .flat_map(|p| (0..4).map(move |i| (p.to_string(), i)))
            .collect();
        let samples: Vec<Sample> = rows
            .iter()
            .map(|(p, i)| Sample {
                problem_id: p.clone(),
                prompt: String::new(),
                completion: String::new(),
                sample_idx: *i,
                round: 0,
                policy: String::new(),
                seed: 0,
                num_tokens: 10 + i,
                logprob_sum: 0.0,
                finish: Finish::Stop,
            })
            .collect();
        let scores: Vec<Score> = rows
            .iter()
            .map(|(p, i)| {
                let ok = p == "p1" && *i == 0;
                Score {
                    problem_id: p.clone(),
                    sample_idx: *i,
                    round: 0,
                    reward: if ok { 10.0 } else { 0.0 },
                    scorer: Scorer::Tests,
                    passed: if ok { 5 } else { 2 },
                    total: 5,
                    verdict: if ok {
                        Verdict::Ok
                    } else {
                        Verdict::WrongAnswer
                    },
                    wall_ms: 1.0,
                }
            })
            .collect();
        let (s, c) = (dir.path().join("samples"), dir.path().join("scores"));
        write_test_stage(&s, &samples);
        write_test_stage(&c, &scores);
        let stats = stage_stats(&s, &c, &[1, 4, 8]).unwrap();
        assert_eq!(stats.len(), 1);
        let round = &stats[0];
        assert_eq!((round.round, round.scores), (0, 8));
        assert!((round.reward_mean - 1.25).abs() < 1e-9);
        assert!((round.reward_std - 12.5f64.sqrt()).abs() < 1e-9);
        // pass@1 = (1/4 + 0) / 2, pass@4 = (1 + 0) / 2; no problem has 8 samples.
        assert_eq!(round.pass_at, [(1, 0.125), (4, 0.5)]);
        assert_eq!(round.verdicts.get("OK"), Some(&1));
        assert_eq!(round.verdicts.get("WA"), Some(&7));
        assert!((round.mean_tokens - 11.5).abs() < 1e-9);
    }

    #[test]
    fn a_round_scored_without_tests_has_no_pass_at_k() {
        // A reward program's scores are OK with no tests behind them: no pass@k, not 1.0.
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = (0..2)
            .map(|i| Sample {
                problem_id: "p".into(),
                prompt: String::new(),
                completion: String::new(),
                sample_idx: i,
                round: 0,
                policy: String::new(),
                seed: 0,
                num_tokens: 1,
                logprob_sum: 0.0,
                finish: Finish::Stop,
            })
            .collect();
        let scores: Vec<Score> = (0..2)
            .map(|i| Score {
                problem_id: "p".into(),
                sample_idx: i,
                round: 0,
                reward: i as f32,
                scorer: Scorer::Program,
                passed: 0,
                total: 0,
                verdict: Verdict::Ok,
                wall_ms: 1.0,
            })
            .collect();
        let (s, c) = (dir.path().join("samples"), dir.path().join("scores"));
        write_test_stage(&s, &samples);
        write_test_stage(&c, &scores);
        let stats = stage_stats(&s, &c, &[1, 2]).unwrap();
        assert_eq!(stats[0].pass_at, []);
        assert!((stats[0].reward_mean - 0.5).abs() < 1e-9);
    }

    #[test]
    fn pass_at_k_matches_hand_computed_cases() {
        // n = 5, c = 2, k = 1: 2/5.
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        // n = 5, c = 2, k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // n = 10, c = 1, k = 5: 1 − C(9,5)/C(10,5) = 1 − 126/252.
        assert!((pass_at_k(10, 1, 5) - 0.5).abs() < 1e-12);
        // No correct sample, or fewer wrong samples than k.
        assert_eq!(pass_at_k(4, 0, 2), 0.0);
        assert_eq!(pass_at_k(4, 3, 2), 1.0);
        assert_eq!(pass_at_k(4, 4, 4), 1.0);
    }
}
