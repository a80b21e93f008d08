//! DPO-Iter as rounds (docs/ARCHITECTURE.md): generate from the current policy → score →
//! pairs (best against worst, the reference solution where nothing passed) → DPO against the
//! policy the round started from → the next round samples from the trained policy. Each stage is written
//! whole and marked complete before the next, so a killed round continues where it stood.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::Pair;
use prefloop_data::{Manifest, PairsOptions, StageReader, StageWriter, WriterOptions, build_pairs};
use prefloop_model::{Batching, InProcess, Model, best_device};
use prefloop_train::{Encoder, train_dpo, with_lora};

use crate::config::Algorithm;
use crate::error::{PipelineError, Result};
use crate::generate::{generate_stage, row_seed};
use crate::inputs::program_fields;
use crate::metrics::RoundMetrics;
use crate::metrics::{mean_log_ratio, train_summary};
use crate::rounds::{Run, policy_name};
use crate::run_dir::Stage;
use crate::score::{Task, score_stage_with};
use crate::shard::Shard;

/// Under a round: the pairs its update trains on when earlier rounds' are replayed.
pub const REPLAY_DIR: &str = "replay";

/// The round metric of DPO-Iter's KL(π_k ‖ π_{k-1}) per sequence, on round k's samples: how
/// far the previous round's update moved the policy (PPO's and the group estimators' KL is
/// another: per token, to their reference, `prefloop_train::KL_TO_REFERENCE`).
pub const KL_TO_PREVIOUS: &str = "kl_to_previous";

impl Run<'_> {
    /// Runs (or continues) the DPO-Iter rounds; returns the last trained policy, or None
    /// where a growing prompts source has nothing new and the run stops to wait for it.
    pub(crate) fn dpo_iter_rounds(
        &mut self,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<Option<PathBuf>> {
        let mut policy = self.config.model.clone().unwrap_or_default();
        for round in 0..self.config.rounds {
            self.begin_round(round, &policy)?;
            if !self.plan_round(round)? {
                self.wait_for_prompts(round)?;
                return Ok(None);
            }
            let mut model = self.sample_round(round, &policy)?;
            policy = self.dpo_update(round, &mut model)?;
            self.finish_round(round, on_round)?;
        }
        Ok(Some(policy))
    }

    /// Begins round `round` from `policy`, then its generate and score stages and (DPO-Iter)
    /// its KL to the previous policy. Returns the policy if a stage loaded it, for the update.
    pub(crate) fn sample_round(&mut self, round: u32, policy: &Path) -> Result<Option<Model>> {
        self.begin_round(round, policy)?;
        let mut model = None;
        self.generate_and_score(round, &mut model)?;
        self.measure_kl(round, &mut model)?;
        self.evaluate(round, &mut model)?;
        Ok(model)
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
}
