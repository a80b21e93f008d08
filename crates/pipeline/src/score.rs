//! Scoring: the [`Scorer`] seam (unit tests in the sandbox, a reward model, a reward program in
//! the sandbox, or a weighted sum of several), built once from `[score]` and used by every
//! round kind, the held-out evaluation and the `prefloop train` commands; and the score stage,
//! a samples stage into a scores stage, resumable: a killed stage continues after the scores
//! already written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::{Problem, Sample, Score, Verdict};
use prefloop_data::{StageReader, StageWriter, WriterOptions};
use prefloop_model::{Model, Precision, best_device};
use prefloop_sandbox::{
    Calibration, JudgeOptions, Limits, RewardOptions, RewardProgram, Sandbox, ScoreOptions,
    TimePolicy, score_samples,
};
use prefloop_train::{EncodeConfig, Encoder, RewardModel, Rollout};

use crate::config::{ScoreConfig, ScorerKind};
use crate::error::Result;
use crate::shard::Shard;

/// What samples answer, for the scorers that need it: each problem with its tests, by id (the
/// tests scorer), and each prompt row's other fields, by problem id (a reward program).
#[derive(Debug, Clone, Copy)]
pub struct Task<'a> {
    pub problems: &'a HashMap<String, Problem>,
    pub fields: &'a ProgramFields,
}

/// Scores samples as `[score]` says: built once, it opens what its scorers need the first
/// time they are asked (the sandbox, the reward model, the reward program), keeps the tests'
/// calibration for the whole process, and sums the rewards of several scorers with their
/// weights (TRL's `reward_funcs` and `reward_weights`), keeping each scorer's mean.
pub struct Scorer {
    config: ScoreConfig,
    /// The precision the reward model loads in, and how it encodes prompts.
    dtype: Precision,
    encode: EncodeConfig,
    sandbox: Option<Sandbox>,
    /// Reference solutions' times, measured once per problem.
    calibration: Calibration,
    reward_model: Option<RewardModel>,
    program: Option<RewardProgram>,
    /// With several scorers: each one's sum of rewards and count since the last
    /// [`Scorer::part_means`].
    part_sums: BTreeMap<ScorerKind, (f64, u64)>,
}

impl Scorer {
    /// The scorer of `config` (already validated); a reward model loads in `dtype` and
    /// encodes prompts as `encode` says.
    pub fn new(config: &ScoreConfig, dtype: Precision, encode: EncodeConfig) -> Self {
        Self {
            config: config.clone(),
            dtype,
            encode,
            sandbox: None,
            calibration: Calibration::default(),
            reward_model: None,
            program: None,
            part_sums: BTreeMap::new(),
        }
    }

    /// The scores of `samples`, in order.
    pub fn score(&mut self, samples: &[Sample], task: Task) -> Result<Vec<Score>> {
        let parts = self.config.parts();
        if let [(kind, weight)] = parts[..] {
            let mut scores = self.score_part(kind, samples, task)?;
            if weight != 1.0 {
                scores.iter_mut().for_each(|s| s.reward *= weight as f32);
            }
            return Ok(scores);
        }
        let mut scored = Vec::with_capacity(parts.len());
        for &(kind, _) in &parts {
            let scores = self.score_part(kind, samples, task)?;
            let (sum, count) = self.part_sums.entry(kind).or_default();
            *sum += scores.iter().map(|s| f64::from(s.reward)).sum::<f64>();
            *count += scores.len() as u64;
            scored.push(scores);
        }
        Ok((0..samples.len())
            .map(|i| summed(&parts, scored.iter().map(|scores| &scores[i])))
            .collect())
    }

    /// The rewards of rollouts of round `round`, in order.
    pub fn score_rollouts(
        &mut self,
        rollouts: &[Rollout],
        round: u32,
        task: Task,
    ) -> Result<Vec<f32>> {
        let samples = rollout_samples(rollouts, round, "");
        Ok(self
            .score(&samples, task)?
            .iter()
            .map(|s| s.reward)
            .collect())
    }

    /// With several scorers, each one's mean reward over what was scored since the last call
    /// (`score/<scorer>/mean`, before weighting); nothing with one.
    pub fn part_means(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.part_sums)
            .into_iter()
            .filter(|(_, (_, count))| *count > 0)
            .map(|(kind, (sum, count))| (format!("score/{}/mean", kind.name()), sum / count as f64))
            .collect()
    }

    /// Opens now what each scorer needs (the sandbox, the reward model and its encoding, the
    /// reward program), so that a missing or bad one is an error before any sampling.
    pub fn open(&mut self) -> Result<()> {
        for (kind, _) in self.config.parts() {
            match kind {
                ScorerKind::Tests => {
                    self.sandbox()?;
                }
                ScorerKind::Rm => {
                    let encode = self.encode.clone();
                    Encoder::new(&self.reward_model()?.model.tokenizer, encode)?;
                }
                ScorerKind::Program => {
                    self.sandbox()?;
                    self.program()?;
                }
            }
        }
        Ok(())
    }

    /// The reward program, read once; an error names the file.
    pub fn program(&mut self) -> Result<&RewardProgram> {
        if self.program.is_none() {
            let path = self
                .config
                .program
                .as_deref()
                .expect("validated with the config");
            let program = RewardProgram::read(path)?;
            tracing::info!(program = %path.display(), sha256 = program.sha256(), "reward program");
            self.program = Some(program);
        }
        Ok(self.program.as_ref().expect("read"))
    }

    /// How many samples a score stage scores (and writes) at a time: the reward model's batch
    /// when it scores alone, else `batch_size`.
    pub fn stage_batch(&self) -> usize {
        match self.config.parts()[..] {
            [(ScorerKind::Rm, _)] => self.config.rm_batch_size,
            _ => self.config.batch_size,
        }
    }

    /// With the tests calibrated, how many problems kept the default limit (their reference
    /// is missing or fails its tests): a round metric, as the log names them.
    pub fn calibration_detail(&self) -> Vec<(&'static str, f64)> {
        match self.config.uses(ScorerKind::Tests) && self.config.calibrate {
            true => vec![(
                "calibration/uncalibrated",
                self.calibration.uncalibrated().len() as f64,
            )],
            false => Vec::new(),
        }
    }

    fn reward_model(&mut self) -> Result<&RewardModel> {
        if self.reward_model.is_none() {
            let path = self.config.reward_model.as_deref();
            let model = Model::load(path, best_device(), self.dtype)?;
            self.reward_model = Some(RewardModel::new(model)?);
        }
        Ok(self.reward_model.as_ref().expect("loaded"))
    }

    fn sandbox(&mut self) -> Result<&Sandbox> {
        if self.sandbox.is_none() {
            self.sandbox = Some(Sandbox::open_default()?);
        }
        Ok(self.sandbox.as_ref().expect("opened"))
    }

    /// One scorer's scores of `samples`.
    fn score_part(
        &mut self,
        kind: ScorerKind,
        samples: &[Sample],
        task: Task,
    ) -> Result<Vec<Score>> {
        match kind {
            ScorerKind::Tests => {
                self.sandbox()?;
                let options = score_options(&self.config);
                let sandbox = self.sandbox.as_ref().expect("opened");
                Ok(score_samples(
                    sandbox,
                    task.problems,
                    samples,
                    &options,
                    &self.calibration,
                )?)
            }
            ScorerKind::Rm => {
                self.reward_model()?;
                let rm = self.reward_model.as_ref().expect("loaded");
                let encoder = Encoder::new(&rm.model.tokenizer, self.encode.clone())?;
                rm_scores(rm, &encoder, samples, self.config.rm_batch_size)
            }
            ScorerKind::Program => {
                self.sandbox()?;
                self.program()?;
                let options = reward_options(&self.config);
                let (sandbox, program) = (
                    self.sandbox.as_ref().expect("opened"),
                    self.program.as_ref().expect("read"),
                );
                let fields = |id: &str| task.fields.get(id).cloned();
                Ok(program.score(sandbox, samples, &fields, &options)?)
            }
        }
    }
}

impl std::fmt::Debug for Scorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scorer")
            .field("parts", &self.config.parts())
            .field("sandbox", &self.sandbox.is_some())
            .field("reward_model", &self.reward_model.is_some())
            .field("program", &self.program.as_ref().map(|p| p.sha256()))
            .finish()
    }
}

/// One sample's scores by each of `parts` as their weighted sum: `passed`, `total` and
/// `verdict` are the tests' where tests are a part, else the first part's whose verdict is not
/// OK (else the first part's).
fn summed<'s>(parts: &[(ScorerKind, f64)], scores: impl Iterator<Item = &'s Score>) -> Score {
    let scores: Vec<&Score> = scores.collect();
    let tests = parts.iter().position(|(k, _)| *k == ScorerKind::Tests);
    let failed = scores.iter().position(|s| s.verdict != Verdict::Ok);
    let outcome = scores[tests.or(failed).unwrap_or(0)];
    let reward = parts
        .iter()
        .zip(&scores)
        .map(|((_, weight), s)| f64::from(s.reward) * weight)
        .sum::<f64>();
    Score {
        reward: reward as f32,
        scorer: prefloop_core::Scorer::Sum,
        wall_ms: scores.iter().map(|s| s.wall_ms).sum(),
        ..outcome.clone()
    }
}

/// Rollouts as sample rows of round `round`, sampled by `policy`.
pub fn rollout_samples(rollouts: &[Rollout], round: u32, policy: &str) -> Vec<Sample> {
    rollouts
        .iter()
        .map(|r| Sample {
            problem_id: r.problem_id.clone(),
            prompt: r.prompt.clone(),
            completion: r.completion.clone(),
            sample_idx: r.sample_idx,
            round,
            policy: policy.to_owned(),
            seed: r.seed,
            num_tokens: r.num_tokens,
            logprob_sum: r.logprob_sum,
            finish: r.finish,
        })
        .collect()
}

/// Scores the samples of `shard` with `scorer` into the scores stage `out`, a stage batch at
/// a time.
pub fn score_stage_with(
    scorer: &mut Scorer,
    task: Task,
    samples: &Path,
    shard: Shard,
    out: &Path,
) -> Result<ScoreReport> {
    let batch = scorer.stage_batch();
    score_stage(samples, batch, shard, out, |rows| scorer.score(rows, task))
}

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
            scorer: prefloop_core::Scorer::RewardModel,
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
