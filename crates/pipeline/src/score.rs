//! The score stage: a samples stage into a scores stage, by running each completion against
//! its problem's unit tests in the sandbox, with a reward model, or with a reward program in
//! the sandbox. Resumable: a killed stage continues after the scores already written.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::{Problem, Sample, Score, Scorer, Verdict};
use prefloop_data::{StageReader, StageWriter, WriterOptions};
use prefloop_sandbox::{
    Calibration, JudgeOptions, Limits, RewardOptions, RewardProgram, Sandbox, ScoreOptions,
    TimePolicy, score_samples,
};
use prefloop_train::{Encoder, RewardModel};

use crate::config::ScoreConfig;
use crate::error::Result;
use crate::shard::Shard;

/// What a score stage did in this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreReport {
    /// Rows in the finished stage.
    pub rows: u64,
    /// Rows scored by this call.
    pub new_rows: u64,
    /// Of those, how many got the verdict OK: passed every test, or a reward program returned
    /// a number (every reward-model score is OK).
    pub passed: u64,
    pub seconds: f64,
}

/// The sandbox options of a config's `[score]` section.
pub fn score_options(config: &ScoreConfig) -> ScoreOptions {
    ScoreOptions {
        judge: JudgeOptions {
            limits: Limits {
                fuel: config.fuel,
                ..Limits::default()
            },
            ..JudgeOptions::default()
        },
        time: TimePolicy {
            floor: Duration::from_millis(config.time_floor_ms),
            problem_scale: config.time_scale,
            calibration_ceiling: Duration::from_millis(config.calibration_ceiling_ms),
            ..TimePolicy::default()
        },
        partial_credit: config.partial_credit,
        calibrate: config.calibrate,
    }
}

/// The reward program options of a config's `[score]` section.
pub fn reward_options(config: &ScoreConfig) -> RewardOptions {
    RewardOptions {
        limits: Limits {
            time: Duration::from_millis(config.program_time_limit_ms),
            fuel: config.fuel,
            ..Limits::default()
        },
        failure_reward: config.failure_reward,
    }
}

/// A problem's fields for its reward program, by problem id.
pub type ProgramFields = HashMap<String, serde_json::Map<String, serde_json::Value>>;

/// Scores the samples of `shard` with a reward program into the scores stage `out`, `batch`
/// samples at a time; `fields` holds each problem's fields (those it lacks get none).
#[allow(clippy::too_many_arguments)] // each is one of the stage's independent inputs
pub fn score_program_stage(
    sandbox: &Sandbox,
    program: &RewardProgram,
    fields: &ProgramFields,
    samples: &Path,
    options: &RewardOptions,
    batch: usize,
    shard: Shard,
    out: &Path,
) -> Result<ScoreReport> {
    score_stage(samples, batch, shard, out, |batch| {
        Ok(program.score(sandbox, batch, &|id| fields.get(id).cloned(), options)?)
    })
}

/// Every problem of a problems stage, by id.
pub fn read_problems(dir: &Path) -> Result<Vec<Problem>> {
    let mut problems = Vec::new();
    for rows in StageReader::<Problem>::open(dir)? {
        problems.extend(rows?);
    }
    Ok(problems)
}

/// Scores the samples of `shard` (a slice of the stage's rows) against `problems`' tests into
/// the scores stage `out` (the shard's directory under it), `batch` samples at a time (each
/// batch's scores are written together). `calibration` keeps the reference solutions' times
/// across calls, so each problem's reference runs once per process.
#[allow(clippy::too_many_arguments)] // each is one of the stage's independent inputs
pub fn score_tests_stage(
    sandbox: &Sandbox,
    problems: &HashMap<String, Problem>,
    samples: &Path,
    options: &ScoreOptions,
    calibration: &Calibration,
    batch: usize,
    shard: Shard,
    out: &Path,
) -> Result<ScoreReport> {
    score_stage(samples, batch, shard, out, |batch| {
        Ok(score_samples(
            sandbox,
            problems,
            batch,
            options,
            calibration,
        )?)
    })
}

/// Scores the samples stage `samples` with a reward model into the scores stage `out`.
pub fn score_rm_stage(
    reward_model: &RewardModel,
    encoder: &Encoder,
    samples: &Path,
    batch: usize,
    out: &Path,
) -> Result<ScoreReport> {
    score_stage(samples, batch, Shard::WHOLE, out, |batch| {
        rm_scores(reward_model, encoder, batch, batch.len())
    })
}

/// Reward-model scores of `samples`, `batch_size` sequences per forward pass; `wall_ms` is
/// the time per sample.
pub fn rm_scores(
    reward_model: &RewardModel,
    encoder: &Encoder,
    samples: &[Sample],
    batch_size: usize,
) -> Result<Vec<Score>> {
    let began = Instant::now();
    let texts: Vec<(&str, &str)> = samples
        .iter()
        .map(|s| (s.prompt.as_str(), s.completion.as_str()))
        .collect();
    let rewards = reward_model.score(encoder, &texts, batch_size)?;
    let wall_ms = began.elapsed().as_secs_f32() * 1e3 / samples.len().max(1) as f32;
    Ok(samples
        .iter()
        .zip(rewards)
        .map(|(s, reward)| Score {
            problem_id: s.problem_id.clone(),
            sample_idx: s.sample_idx,
            round: s.round,
            reward,
            scorer: Scorer::RewardModel,
            passed: 0,
            total: 0,
            verdict: Verdict::Ok,
            wall_ms,
        })
        .collect())
}

/// The resumable loop the scorers share: skip what `out` holds, score the rest in batches.
fn score_stage(
    samples: &Path,
    batch_size: usize,
    shard: Shard,
    out: &Path,
    mut score: impl FnMut(&[Sample]) -> Result<Vec<Score>>,
) -> Result<ScoreReport> {
    let reader = StageReader::<Sample>::open(samples)?;
    let slice = shard.range(reader.rows());
    let total = slice.end - slice.start;
    let mut writer = StageWriter::open(shard.dir(out), WriterOptions::default())?;
    let done = writer.committed_rows();
    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(
            "score {bar:40} {pos}/{len} samples {per_sec} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("a valid template"),
    );
    let started = Instant::now();
    let (mut seen, mut batch) = (0u64, Vec::with_capacity(batch_size));
    let mut passed = 0;
    let mut flush = |batch: &mut Vec<Sample>| -> Result<()> {
        if !batch.is_empty() {
            let scores = score(batch)?;
            passed += scores.iter().filter(|s| s.verdict == Verdict::Ok).count() as u64;
            writer.write(&scores)?;
            bar.inc(batch.len() as u64);
            batch.clear();
        }
        Ok(())
    };
    // Rows before the slice, and those of it already scored, are skipped.
    let skip = slice.start + done;
    'rows: for rows in reader {
        for sample in rows? {
            seen += 1;
            if seen <= skip {
                continue;
            }
            if seen > slice.end {
                break 'rows;
            }
            batch.push(sample);
            if batch.len() == batch_size {
                flush(&mut batch)?;
            }
        }
    }
    flush(&mut batch)?;
    bar.finish_and_clear();
    let manifest = writer.finish()?;
    Ok(ScoreReport {
        rows: manifest.rows(),
        new_rows: total - done,
        passed,
        seconds: started.elapsed().as_secs_f64(),
    })
}
