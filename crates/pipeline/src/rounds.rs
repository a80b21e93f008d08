//! The round loop (DESIGN §4). DPO-Iter: generate from the current policy → score → pairs
//! (best against worst, the reference solution where nothing passed) → DPO against the
//! policy the round started from → the next round samples from the trained policy. PPO and
//! the group estimators run one iteration of the online core per round (online_rounds.rs).
//! Either way an optional last round generates and scores with the final policy.
//!
//! Every stage writes durably and is marked complete in `state.json` only after its output is
//! whole, so the same call after a kill at any point continues where the run stood.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::{Pair, Problem, Sample, Score};
use prefloop_data::{
    DatasetKind, ImportOptions, Manifest, PairsOptions, StageReader, StageWriter, WriterOptions,
    build_pairs, stage_stats,
};
use prefloop_model::{Batching, InProcess, Model, best_device};
use prefloop_train::{Encoder, log_ratios, train_dpo, with_lora};

use crate::config::{Algorithm, RunConfig, ScorerKind};
use crate::error::{PipelineError, Result};
use crate::generate::{PromptRow, generate_stage, row_seed};
use crate::prompt_source::{
    RoundPrompts, choose, is_growing, per_round, read_prompt_source, recorded,
};
use crate::run_dir::{METRICS_FILE, RoundState, RunDir, RunState, Stage};
use crate::score::{ProgramFields, Scorer, Task, read_problems, score_stage_with};
use crate::shard::Shard;

/// Where an imported dataset's problems stage lives in the run directory.
pub const PROBLEMS_DIR: &str = "problems";

/// Under a round: the pairs its update trains on when earlier rounds' are replayed.
pub const REPLAY_DIR: &str = "replay";

/// The round metric of DPO-Iter's KL(π_k ‖ π_{k-1}) per sequence, on round k's samples: how
/// far the previous round's update moved the policy (PPO's and the group estimators' KL is
/// another: per token, to their reference, `prefloop_train::KL_TO_REFERENCE`).
pub const KL_TO_PREVIOUS: &str = "kl_to_previous";

/// What one round measured: one line of the run's `metrics.jsonl`.
pub type RoundMetrics = BTreeMap<String, f64>;

/// What every round samples from and scores against.
#[derive(Debug)]
pub(crate) struct Inputs {
    /// The problems stage (for the reference fallback of pairs); none for bare prompts.
    pub problems_dir: Option<PathBuf>,
    pub prompts: Vec<PromptRow>,
    pub by_id: HashMap<String, Problem>,
}

impl Inputs {
    fn load(dir: &RunDir, config: &RunConfig) -> Result<Self> {
        if let Some(path) = config.data.prompts.as_deref().filter(|p| is_growing(p)) {
            // Rounds read a growing source as they begin (prompt_source.rs).
            tracing::info!(source = %path.display(), "prompts from a growing source");
            return Ok(Self {
                problems_dir: None,
                prompts: Vec::new(),
                by_id: HashMap::new(),
            });
        }
        if let Some(path) = &config.data.prompts {
            let mut prompts = read_prompt_source(path)?;
            let mut seen = std::collections::HashSet::new();
            prompts.retain(|p| seen.insert(p.problem_id.clone()));
            if let Some(limit) = config.data.limit {
                prompts.truncate(limit);
            }
            return Ok(Self {
                problems_dir: None,
                prompts,
                by_id: HashMap::new(),
            });
        }
        let problems_dir = problems_stage(dir, config)?;
        let problems = select_problems(read_problems(&problems_dir)?, config, &problems_dir)?;
        let prompts = problems
            .iter()
            .map(|p| PromptRow {
                problem_id: p.problem_id.clone(),
                prompt: p.prompt.clone(),
                ..PromptRow::default()
            })
            .collect();
        let by_id = problems
            .into_iter()
            .map(|p| (p.problem_id.clone(), p))
            .collect();
        Ok(Self {
            problems_dir: Some(problems_dir),
            prompts,
            by_id,
        })
    }

    /// Refuses held-out prompts (`eval.prompts`) that are also training prompts, by problem id
    /// or by text: a policy measured on what it trained on says nothing about what it learnt.
    /// (A growing prompts source is read round by round and not checked here.)
    fn check_held_out(&self, config: &RunConfig) -> Result<()> {
        let Some(path) = config.eval.prompts.as_deref() else {
            return Ok(());
        };
        let ids: std::collections::HashSet<&str> =
            self.prompts.iter().map(|p| p.problem_id.as_str()).collect();
        let texts: std::collections::HashSet<&str> =
            self.prompts.iter().map(|p| p.prompt.as_str()).collect();
        let overlap: Vec<String> = crate::generate::read_prompts(path)?
            .into_iter()
            .filter(|p| ids.contains(p.problem_id.as_str()) || texts.contains(p.prompt.as_str()))
            .map(|p| p.problem_id)
            .collect();
        if overlap.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = overlap.iter().take(5).map(String::as_str).collect();
        Err(PipelineError::Config {
            path: path.to_owned(),
            message: format!(
                "{} held-out prompt(s) are also training prompts (same problem_id or text): {}{}",
                overlap.len(),
                shown.join(", "),
                if overlap.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        })
    }
}

/// Runs (or continues) every round of the run at `dir` under `config`. `on_round` sees each
/// round's metrics as the round completes.
pub fn run_rounds(
    dir: &RunDir,
    config: &RunConfig,
    mut on_round: impl FnMut(u32, &RoundMetrics),
) -> Result<RunState> {
    let state = dir.state()?;
    let inputs = Inputs::load(dir, config)?;
    inputs.check_held_out(config)?;
    let mut run = Run {
        dir,
        config,
        inputs,
        scorer: Scorer::new(&config.score, config.dtype, config.score_encoding()),
        state,
    };
    if config.score.uses(ScorerKind::Program) && !run.state.finished {
        // A changed reward program stops the run before anything is sampled with it.
        run.check_program()?;
    }
    let start = config.model.clone().unwrap_or_default();
    let last_policy = match config.algorithm {
        Algorithm::DpoIter => {
            let mut policy = start;
            for round in 0..config.rounds {
                run.begin_round(round, &policy)?;
                if !run.plan_round(round)? {
                    return run.wait_for_prompts(round);
                }
                let mut model = run.sample_round(round, &policy)?;
                policy = run.dpo_update(round, &mut model)?;
                run.finish_round(round, &mut on_round)?;
            }
            policy
        }
        Algorithm::Ppo | Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp => {
            run.online_rounds(&mut on_round)?
        }
    };
    if config.final_generation {
        let round = config.rounds;
        run.begin_round(round, &last_policy)?;
        run.plan_final_round(round)?;
        run.sample_round(round, &last_policy)?;
        run.finish_round(round, &mut on_round)?;
    }
    if !run.state.finished {
        run.state.finished = true;
        dir.save_state(&run.state)?;
    }
    Ok(run.state)
}

/// A run in progress: where it lives, what it was configured with, what its rounds sample
/// from and score with, and how far it has come.
pub(crate) struct Run<'a> {
    pub dir: &'a RunDir,
    pub config: &'a RunConfig,
    pub inputs: Inputs,
    pub scorer: Scorer,
    pub state: RunState,
}

impl Run<'_> {
    /// Adds round `round` to the state, sampling from `policy` (empty: the embedded default).
    pub(crate) fn begin_round(&mut self, round: u32, policy: &Path) -> Result<()> {
        if self.state.round(round).is_none() {
            self.state.rounds.push(RoundState {
                round,
                policy: policy.to_owned(),
                completed: BTreeMap::new(),
                trained: None,
                measured: BTreeMap::new(),
                metrics: BTreeMap::new(),
                prompts: None,
            });
            self.dir.save_state(&self.state)?;
        }
        Ok(())
    }

    /// Reads the reward program and records its hash in the run's state the first time; a
    /// later process (a resume) refuses a program that changed, so every round of a run is
    /// scored by the same function.
    fn check_program(&mut self) -> Result<()> {
        let program = self.scorer.program()?;
        let sha256 = program.sha256().to_owned();
        match &self.state.program_sha256 {
            Some(recorded) if *recorded != sha256 => Err(PipelineError::Config {
                path: self.config.score.program.clone().expect("validated"),
                message: format!(
                    "the reward program changed since the run first read it (sha256 \
                     {recorded}, now {sha256}): restore it, or start a new run"
                ),
            }),
            Some(_) => Ok(()),
            None => {
                self.state.program_sha256 = Some(sha256);
                self.dir.save_state(&self.state)
            }
        }
    }

    /// Chooses and records the prompts of round `round` when the run chooses them round by
    /// round (prompt_source.rs) and the round has not yet; false when a growing source has
    /// nothing new and the run is to stop.
    fn plan_round(&mut self, round: u32) -> Result<bool> {
        if !per_round(self.config) || self.state.rounds[round as usize].prompts.is_some() {
            return Ok(true);
        }
        let earlier: Vec<&RoundPrompts> = self
            .state
            .rounds
            .iter()
            .filter(|r| r.round < round)
            .filter_map(|r| r.prompts.as_ref())
            .collect();
        let Some((prompts, record)) = choose(self.config, &self.inputs.prompts, round, &earlier)?
        else {
            return Ok(false);
        };
        tracing::info!(
            round,
            prompts = prompts.len(),
            files = record.files.len(),
            "round prompts chosen"
        );
        self.state.rounds[round as usize].prompts = Some(record);
        self.state.waiting_for_prompts = None;
        self.dir.save_state(&self.state)?;
        Ok(true)
    }

    /// The final generation measures the final policy on the last trained round's prompts.
    fn plan_final_round(&mut self, round: u32) -> Result<()> {
        if !per_round(self.config) || self.state.rounds[round as usize].prompts.is_some() {
            return Ok(());
        }
        let last = round
            .checked_sub(1)
            .and_then(|r| self.state.round(r))
            .and_then(|r| r.prompts.clone());
        self.state.rounds[round as usize].prompts = last;
        self.dir.save_state(&self.state)
    }

    /// Stops the run at `round`: its source has no new prompts (`when_exhausted = "stop"`).
    fn wait_for_prompts(mut self, round: u32) -> Result<RunState> {
        tracing::info!(round, "no new prompts: the run stops before this round");
        self.state.waiting_for_prompts = Some(round);
        self.dir.save_state(&self.state)?;
        Ok(self.state)
    }

    /// What round `round` samples: its recorded choice, or every prompt of the run.
    fn round_prompts(&self, round: u32) -> Result<Vec<PromptRow>> {
        match self.state.round(round).and_then(|r| r.prompts.as_ref()) {
            Some(record) => recorded(record, &self.inputs.prompts),
            None => Ok(self.inputs.prompts.clone()),
        }
    }

    /// Begins round `round` from `policy`, then its generate and score stages and (DPO-Iter)
    /// its KL to the previous policy. Returns the policy if a stage loaded it, for the update.
    fn sample_round(&mut self, round: u32, policy: &Path) -> Result<Option<Model>> {
        self.begin_round(round, policy)?;
        let mut model = None;
        self.generate_and_score(round, &mut model)?;
        self.measure_kl(round, &mut model)?;
        self.evaluate(round, &mut model)?;
        Ok(model)
    }

    /// Loads the round's policy into `model` unless it is there already.
    pub(crate) fn load_policy(&self, round: u32, model: &mut Option<Model>) -> Result<()> {
        if model.is_none() {
            let policy = &self.state.round(round).expect("begun").policy;
            let path = (!policy.as_os_str().is_empty()).then_some(policy.as_path());
            *model = Some(Model::load(path, best_device(), self.config.dtype)?);
        }
        Ok(())
    }

    /// The generate and score stages of a round, each unless already complete. Stage times
    /// include loading what the stage needs (the policy, the sandbox, the reward model): that is
    /// what a round costs.
    fn generate_and_score(&mut self, round: u32, model: &mut Option<Model>) -> Result<()> {
        let (dir, config) = (self.dir, self.config);
        self.adopt_written(round, Stage::Generate)?;
        if !self.state.is_complete(round, Stage::Generate) {
            let began = Instant::now();
            self.load_policy(round, model)?;
            let seed = row_seed(config.generate.seed, u64::from(round));
            let prompts = self.round_prompts(round)?;
            let policy = model.as_ref().expect("loaded");
            let encoder = Encoder::new(&policy.tokenizer, config.score_encoding())?;
            let mut generator = InProcess::new(policy, Batching::new(config.generate.batch_size));
            let report = generate_stage(
                &mut generator,
                &encoder,
                &prompts,
                &config.generate,
                &policy_name(config, round),
                round,
                seed,
                Shard::WHOLE,
                &dir.stage_dir(round, Stage::Generate),
            )?;
            let detail = [("generate/tokens_per_s", report.tokens_per_s())];
            let seconds = began.elapsed().as_secs_f64();
            self.complete(round, Stage::Generate, seconds, &detail)?;
        }
        self.adopt_written(round, Stage::Score)?;
        if !self.state.is_complete(round, Stage::Score) {
            let began = Instant::now();
            let samples = dir.stage_dir(round, Stage::Generate);
            let out = dir.stage_dir(round, Stage::Score);
            let fields = program_fields(&self.round_prompts(round)?);
            let task = Task {
                problems: &self.inputs.by_id,
                fields: &fields,
            };
            let report = score_stage_with(&mut self.scorer, task, &samples, Shard::WHOLE, &out)?;
            tracing::debug!(scored = report.new_rows, passed = report.passed, "scored");
            let seconds = began.elapsed().as_secs_f64();
            self.complete_score(round, seconds)?;
        }
        Ok(())
    }

    /// DPO-Iter: KL(π_k ‖ π_{k-1}) on round k's own samples (drawn from π_k), the k1 estimate:
    /// how far round k-1's update moved the policy. Round 0 has nothing to compare with;
    /// `kl_to_previous = false` skips it.
    fn measure_kl(&mut self, round: u32, model: &mut Option<Model>) -> Result<()> {
        let (dir, config) = (self.dir, self.config);
        let measured = self.state.rounds[round as usize]
            .measured
            .contains_key(KL_TO_PREVIOUS);
        let wanted = config.algorithm == Algorithm::DpoIter && config.kl_to_previous;
        if round == 0 || !wanted || measured {
            return Ok(());
        }
        let began = Instant::now();
        let reference_path = self
            .state
            .round(round - 1)
            .expect("earlier round")
            .policy
            .clone();
        let kl = if reference_path == self.state.round(round).expect("begun").policy {
            0.0 // the previous round had nothing to train on
        } else {
            self.load_policy(round, model)?;
            let policy = model.as_ref().expect("loaded");
            let path = (!reference_path.as_os_str().is_empty()).then_some(reference_path.as_path());
            let reference = Model::load(path, best_device(), config.dtype)?;
            mean_log_ratio(
                config,
                policy,
                &reference,
                &dir.stage_dir(round, Stage::Generate),
            )?
        };
        let entry = &mut self.state.rounds[round as usize];
        entry.measured.insert(KL_TO_PREVIOUS.into(), kl);
        entry
            .measured
            .insert("time/kl".into(), began.elapsed().as_secs_f64());
        dir.save_state(&self.state)
    }

    /// Pairs and the DPO update of a round; returns the next round's policy.
    fn dpo_update(&mut self, round: u32, model: &mut Option<Model>) -> Result<PathBuf> {
        let (dir, config) = (self.dir, self.config);
        self.adopt_written(round, Stage::Pairs)?;
        if !self.state.is_complete(round, Stage::Pairs) {
            let began = Instant::now();
            let fallback = self
                .inputs
                .problems_dir
                .as_deref()
                .filter(|_| config.pairs.reference_fallback);
            let options = PairsOptions {
                min_margin: config.pairs.min_margin,
                drop_truncated: config.pairs.drop_truncated,
                ..PairsOptions::default()
            };
            let manifest = build_pairs(
                &dir.stage_dir(round, Stage::Generate),
                &dir.stage_dir(round, Stage::Score),
                fallback,
                &dir.stage_dir(round, Stage::Pairs),
                &options,
            )?;
            let detail = [("pairs", manifest.rows() as f64)];
            let seconds = began.elapsed().as_secs_f64();
            self.complete(round, Stage::Pairs, seconds, &detail)?;
        }
        if !self.state.is_complete(round, Stage::Train) {
            let began = Instant::now();
            let trained = dir.policy_dir(round);
            let (pairs_dir, pairs) = self.training_pairs(round)?;
            let next = if pairs == 0 {
                // Every problem tied: nothing to learn from, the policy carries over.
                tracing::warn!(
                    round,
                    "no preference pairs: the next round keeps this policy"
                );
                self.state.round(round).expect("begun").policy.clone()
            } else {
                if !trained.exists() {
                    self.load_policy(round, model)?;
                    let train_dir = dir.stage_dir(round, Stage::Train);
                    // With `[dpo.lora]`, each round trains a fresh adapter on the policy it
                    // started from (saved merged), so the reference stays the round's start.
                    let policy = model.take().expect("loaded");
                    let seed = config.dpo.train.seed ^ u64::from(round);
                    let model = &with_lora(policy, config.dpo.lora.as_ref(), seed)?;
                    let bar = ProgressBar::new(0);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "train {bar:40} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
                        )
                        .expect("a valid template"),
                    );
                    train_dpo(model, &pairs_dir, &config.dpo, &train_dir, |step, total| {
                        bar.set_length(total);
                        bar.set_position(step.step);
                        if let Some(loss) = step.metrics.get("loss") {
                            bar.set_message(format!("loss {loss:.4}"));
                        }
                    })?;
                    bar.finish_and_clear();
                    let saved = train_dir.join(prefloop_train::POLICY_DIR);
                    std::fs::rename(&saved, &trained).map_err(PipelineError::io(&saved))?;
                }
                trained.clone()
            };
            self.state.rounds[round as usize].trained = Some(next.clone());
            let detail = train_summary(&dir.stage_dir(round, Stage::Train))?;
            let seconds = began.elapsed().as_secs_f64();
            self.complete(round, Stage::Train, seconds, &detail)?;
            if next == trained {
                dir.publish_policy(&trained)?;
            }
        }
        Ok(self.state.rounds[round as usize]
            .trained
            .clone()
            .expect("set when train completed"))
    }

    /// The pairs round `round`'s update trains on and how many: its own stage, or with
    /// `pairs.replay_rounds = k` a stage joining them with the k rounds' before (written once,
    /// under the round, and reused when the round is resumed).
    fn training_pairs(&self, round: u32) -> Result<(PathBuf, u64)> {
        let own = self.dir.stage_dir(round, Stage::Pairs);
        let k = self.config.pairs.replay_rounds;
        if k == 0 || round == 0 {
            let rows = Manifest::load(&own)?.map_or(0, |m| m.rows());
            return Ok((own, rows));
        }
        let replay = self.dir.round_dir(round).join(REPLAY_DIR);
        if let Some(manifest) = Manifest::load(&replay)?.filter(|m| m.complete) {
            return Ok((replay, manifest.rows()));
        }
        let mut writer = StageWriter::<Pair>::restart(&replay, WriterOptions::default())?;
        for earlier in round.saturating_sub(k)..=round {
            let stage = self.dir.stage_dir(earlier, Stage::Pairs);
            if Manifest::load(&stage)?.is_none_or(|m| !m.complete) {
                continue; // a round that made no pairs stage (PPO never does)
            }
            for rows in StageReader::<Pair>::open(&stage)? {
                writer.write(&rows?)?;
            }
        }
        let manifest = writer.finish()?;
        Ok((replay, manifest.rows()))
    }

    /// Records the round's metrics once its stages are complete, rewrites `metrics.jsonl`, and
    /// tells `on_round`.
    pub(crate) fn finish_round(
        &mut self,
        round: u32,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<()> {
        let state = &mut self.state;
        if state.rounds[round as usize].metrics.is_empty() {
            let metrics = round_metrics(self.dir, self.config, &state.rounds[round as usize])?;
            state.rounds[round as usize].metrics = metrics;
            self.dir.save_state(state)?;
            write_metrics(self.dir, state)?;
        }
        on_round(round, &state.rounds[round as usize].metrics);
        Ok(())
    }

    /// Marks a stage complete if its shards are all written and its manifest says so. A run
    /// killed after that but before `state.json` recorded it finds the stage done: writing it
    /// again would be refused (and would waste the work). Its wall time went with the killed
    /// process and is recorded as 0; the pairs stage's row count comes from its manifest.
    fn adopt_written(&mut self, round: u32, stage: Stage) -> Result<()> {
        if self.state.is_complete(round, stage) {
            return Ok(());
        }
        let Some(manifest) =
            Manifest::load(&self.dir.stage_dir(round, stage))?.filter(|m| m.complete)
        else {
            return Ok(());
        };
        let detail = match stage {
            Stage::Pairs => vec![("pairs", manifest.rows() as f64)],
            _ => Vec::new(),
        };
        self.complete(round, stage, 0.0, &detail)
    }

    /// The samples' scores from the run's scorer.
    pub(crate) fn score(&mut self, samples: &[Sample]) -> Result<Vec<Score>> {
        let fields = program_fields(&self.inputs.prompts);
        let task = Task {
            problems: &self.inputs.by_id,
            fields: &fields,
        };
        self.scorer.score(samples, task)
    }

    /// Marks round `round`'s score stage complete after `seconds`, with what the scorer
    /// measured (its calibration, each of several scorers' mean).
    pub(crate) fn complete_score(&mut self, round: u32, seconds: f64) -> Result<()> {
        let means = self.scorer.part_means();
        let mut detail = self.scorer.calibration_detail();
        detail.extend(means.iter().map(|(k, v)| (k.as_str(), *v)));
        self.complete(round, Stage::Score, seconds, &detail)
    }

    /// Marks `stage` of `round` complete, with its wall time and what it measured.
    pub(crate) fn complete(
        &mut self,
        round: u32,
        stage: Stage,
        seconds: f64,
        detail: &[(&str, f64)],
    ) -> Result<()> {
        let entry = &mut self.state.rounds[round as usize];
        entry.completed.insert(stage, seconds);
        for (key, value) in detail {
            entry.measured.insert((*key).to_owned(), *value);
        }
        tracing::info!(round, stage = stage.name(), seconds, "stage complete");
        self.dir.save_state(&self.state)
    }
}

/// The `policy` column of round `round`'s samples.
pub(crate) fn policy_name(config: &RunConfig, round: u32) -> String {
    match (config.algorithm, round) {
        (_, 0) => "base".into(),
        (Algorithm::DpoIter, _) => format!("round-{:04}", round - 1),
        (Algorithm::Ppo, _) => format!("ppo-iteration-{round:04}"),
        (Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp, _) => {
            format!("group-iteration-{round:04}")
        }
    }
}

/// The problems stage: the configured one, or the configured dataset imported into the run.
fn problems_stage(dir: &RunDir, config: &RunConfig) -> Result<PathBuf> {
    let Some(kind) = &config.data.import else {
        return Ok(config.data.problems.clone());
    };
    let out = dir.root().join(PROBLEMS_DIR);
    if !Manifest::load(&out)?.is_some_and(|m| m.complete) {
        let kind = DatasetKind::parse(kind).expect("validated with the config");
        let report =
            prefloop_data::import(kind, &config.data.problems, &out, &ImportOptions::default())?;
        tracing::info!(rows = report.rows, problems = %out.display(), "imported");
    }
    Ok(out)
}

/// The first `data.limit` problems, or all; at least one.
fn select_problems(
    mut problems: Vec<Problem>,
    config: &RunConfig,
    from: &Path,
) -> Result<Vec<Problem>> {
    if let Some(limit) = config.data.limit {
        problems.truncate(limit);
    }
    if problems.is_empty() {
        return Err(PipelineError::Data {
            path: from.to_owned(),
            message: "no problems to sample from".into(),
        });
    }
    Ok(problems)
}

/// The mean over the samples at `samples` (drawn from `policy`) of log π(y|x) − log π_ref(y|x):
/// the k1 estimate of KL(π ‖ π_ref), prompts templated as generation templated them.
pub(crate) fn mean_log_ratio(
    config: &RunConfig,
    policy: &Model,
    reference: &Model,
    samples: &Path,
) -> Result<f64> {
    let mut rows = Vec::new();
    for shard in StageReader::<Sample>::open(samples)? {
        rows.extend(shard?);
    }
    // A completion the policy ended with EOS is scored ending with it; one cut at the budget
    // or at a stop string as sampled, without it.
    let texts: Vec<(&str, &str, bool)> = rows
        .iter()
        .map(|s| {
            let ended = s.finish == prefloop_core::Finish::Stop;
            (s.prompt.as_str(), s.completion.as_str(), ended)
        })
        .collect();
    let encoder = Encoder::new(&policy.tokenizer, config.score_encoding())?;
    let ratios = log_ratios(
        policy,
        reference,
        &encoder,
        &texts,
        config.dpo.train.batch_size,
    )?;
    Ok(ratios.iter().map(|&r| f64::from(r)).sum::<f64>() / ratios.len().max(1) as f64)
}

/// Each prompt row's fields by problem id, for a reward program.
pub(crate) fn program_fields(prompts: &[PromptRow]) -> ProgramFields {
    prompts
        .iter()
        .map(|p| (p.problem_id.clone(), p.fields.clone()))
        .collect()
}

/// The DPO update's summary from its `metrics.jsonl`: steps, and the last step's loss and
/// TRL metrics. Empty when the round had no pairs to train on.
fn train_summary(train_dir: &Path) -> Result<Vec<(&'static str, f64)>> {
    let path = train_dir.join(prefloop_train::METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PipelineError::io(path)(e)),
    };
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| PipelineError::Data {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let Some(last) = steps.last() else {
        return Ok(Vec::new());
    };
    let mut summary = vec![("train/steps", steps.len() as f64)];
    for (key, name) in [
        ("loss", "train/loss"),
        ("rewards/accuracies", "train/rewards/accuracies"),
        ("rewards/margins", "train/rewards/margins"),
        ("tokens_per_s", "train/tokens_per_s"),
    ] {
        if let Some(value) = last.get(key).and_then(|v| v.as_f64()) {
            summary.push((name, value));
        }
    }
    Ok(summary)
}

/// Reward and pass@k of the round's samples, with what its stages recorded.
fn round_metrics(dir: &RunDir, config: &RunConfig, round: &RoundState) -> Result<RoundMetrics> {
    let n = config.generate.n;
    let ks: Vec<u32> = [1, 4, 10, n].into_iter().filter(|&k| k <= n).collect();
    let stats = stage_stats(
        &dir.stage_dir(round.round, Stage::Generate),
        &dir.stage_dir(round.round, Stage::Score),
        &ks,
    )?;
    let mut metrics = round.measured.clone();
    metrics.insert("round".into(), f64::from(round.round));
    if let Some(stats) = stats.first() {
        metrics.insert("reward/mean".into(), stats.reward_mean);
        metrics.insert("reward/std".into(), stats.reward_std);
        metrics.insert("completion_tokens".into(), stats.mean_tokens);
        if config.score.uses(ScorerKind::Tests) {
            for (k, value) in &stats.pass_at {
                metrics.insert(format!("pass@{k}"), *value);
            }
        }
    }
    for (stage, seconds) in &round.completed {
        metrics.insert(format!("time/{}", stage.name()), *seconds);
    }
    Ok(metrics)
}

/// Rewrites the run's `metrics.jsonl` from the state, and the TensorBoard events from it: one
/// line per finished round, never a duplicate however often the run was resumed.
fn write_metrics(dir: &RunDir, state: &RunState) -> Result<()> {
    let mut text = String::new();
    for round in state.rounds.iter().filter(|r| !r.metrics.is_empty()) {
        let mut line = serde_json::to_value(&round.metrics).expect("serialises");
        if let Some(sha256) = &state.program_sha256 {
            line["score/program_sha256"] = serde_json::json!(sha256);
        }
        if let Some(prompts) = &round.prompts {
            // Which files the round sampled and a hash of what it sampled.
            line["prompts/files"] = serde_json::json!(prompts.files);
            line["prompts/hash"] = serde_json::json!(prompts.hash);
            line["prompts/count"] = serde_json::json!(prompts.problem_ids.len());
        }
        text.push_str(&serde_json::to_string(&line).expect("serialises"));
        text.push('\n');
    }
    prefloop_data::write_atomic(&dir.root().join(METRICS_FILE), text.as_bytes())?;
    crate::tensorboard::write_events(dir.root())?;
    Ok(())
}
