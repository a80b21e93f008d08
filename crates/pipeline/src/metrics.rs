//! What a round measured: its line of `metrics.jsonl` (reward and pass@k of its samples,
//! what its stages recorded, the DPO update's summary), rewritten from the run's state as each
//! round finishes, with the TensorBoard events; and the KL estimate DPO-Iter and the held-out
//! evaluation measure.

use std::collections::BTreeMap;
use std::path::Path;

use prefloop_core::Sample;
use prefloop_data::{StageReader, stage_stats};
use prefloop_model::Model;
use prefloop_train::{Encoder, log_ratios};

use crate::config::{RunConfig, ScorerKind};
use crate::error::{PipelineError, Result};
use crate::rounds::Run;
use crate::run_dir::{METRICS_FILE, RoundState, RunDir, RunState, Stage};

/// What one round measured: one line of the run's `metrics.jsonl`.
pub type RoundMetrics = BTreeMap<String, f64>;

impl Run<'_> {
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

/// The DPO update's summary from its `metrics.jsonl`: steps, and the last step's loss and
/// TRL metrics. Empty when the round had no pairs to train on.
pub(crate) fn train_summary(train_dir: &Path) -> Result<Vec<(&'static str, f64)>> {
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
