//! What PPO and the group estimators share: the prompts an iteration draws (a seeded shuffle
//! per pass over the prompt set), sampling from the actor, the rollouts as text for the reward,
//! the packed token batch the update trains on, and the bookkeeping of iterations (resuming
//! from a checkpoint, logging, checkpointing).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prefloop_core::Finish;
use prefloop_model::{Generator, Model, Request, SamplingParams};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::checkpoint::{self, Part, TrainerState};
use crate::error::{Result, TrainError};
use crate::examples::{EncodeConfig, Encoder};
use crate::fit::open_metrics;
use crate::logprobs::TokenBatch;
use crate::optim::AdamW;

/// A prompt to roll out from.
#[derive(Debug, Clone)]
pub struct PromptExample {
    pub problem_id: String,
    pub prompt: String,
}

/// One sampled completion, for the reward function (and, with what sampled it, for whoever
/// keeps rollouts as a samples stage).
#[derive(Debug, Clone)]
pub struct Rollout {
    pub problem_id: String,
    pub prompt: String,
    pub completion: String,
    /// Which of its problem's rollouts in this iteration it is (0, 1, …): with the problem id,
    /// the rollout's key within the iteration.
    pub sample_idx: u32,
    /// The sampling seed of this rollout.
    pub seed: u64,
    /// Completion tokens, the end-of-sequence token excluded (as `Sample::num_tokens`).
    pub num_tokens: u32,
    /// Sum of those tokens' log-probs under the actor at temperature 1 over the whole
    /// vocabulary (as `Sample::logprob_sum`).
    pub logprob_sum: f32,
    pub finish: Finish,
}

/// The rewards of rollouts of an iteration (0-based), in order. PPO asks once per
/// iteration; the group estimators once per draw of prompts. Called again for the same
/// rollouts only when a killed run redoes an iteration it had not checkpointed.
pub type RewardFn<'a, E = TrainError> =
    dyn FnMut(u64, &[Rollout]) -> std::result::Result<Vec<f32>, E> + 'a;

/// Every rollout of an iteration with its reward, once the group estimators' sampling is done
/// and before the update: for whoever keeps the rollouts (the pipeline writes them as the
/// round's samples and scores).
pub type SampledFn<'a, E = TrainError> =
    dyn FnMut(u64, &[Rollout], &[f32]) -> std::result::Result<(), E> + 'a;

/// Per-iteration metrics, one line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IterationRecord {
    /// Iterations completed, this one included.
    pub step: u64,
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
}

impl IterationRecord {
    /// The iteration's mean reward and KL to the reference, for a progress line.
    pub fn summary(&self) -> String {
        let metric = |key: &str| self.metrics.get(key).copied().unwrap_or(f64::NAN);
        let kl = crate::KL_TO_REFERENCE;
        format!(
            "reward/mean {:.3} · {kl} {:.4}",
            metric("reward/mean"),
            metric(kl)
        )
    }
}

/// The prompts encoded for the actor, or None where `out` already holds the trained policy
/// (the run is done).
pub(crate) fn encode_prompts(
    actor: &Model,
    prompts: &[PromptExample],
    encode: &EncodeConfig,
    out: &Path,
) -> Result<Option<Vec<Vec<u32>>>> {
    if prompts.is_empty() {
        return Err(TrainError::Config {
            field: "prompts",
            message: "there is nothing to roll out from".into(),
        });
    }
    if out.join(crate::POLICY_DIR).exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let encoder = Encoder::new(&actor.tokenizer, encode.clone())?;
    let encoded = prompts
        .iter()
        .map(|p| encoder.prompt(&p.prompt))
        .collect::<Result<_>>()?;
    Ok(Some(encoded))
}

/// The bookkeeping of an online trainer's iterations: its metrics file, and when it
/// checkpoints. A checkpoint is tied to the run's seed and prompt count, and carries the
/// algorithm's own state (`extra`: PPO's value-normalisation moments, the group estimators'
/// prompt cursor).
#[derive(Debug)]
pub(crate) struct Iterations {
    out: PathBuf,
    seed: u64,
    prompts: usize,
    total: u64,
    checkpoint_every: u64,
    file: File,
    path: PathBuf,
}

impl Iterations {
    /// Restores `parts` from the newest checkpoint under `out`, if any; returns the
    /// bookkeeping, the first iteration to run and the algorithm's state (its default when the
    /// run starts afresh).
    pub(crate) fn resume<T: DeserializeOwned + Default>(
        out: &Path,
        parts: &mut [Part],
        (seed, prompts): (u64, usize),
        (total, checkpoint_every): (u64, u64),
    ) -> Result<(Self, u64, T)> {
        let (mut start, mut extra) = (0, T::default());
        if let Some(path) = checkpoint::latest(out)? {
            let state = checkpoint::load(&path, parts)?;
            if state.seed != seed || state.examples != prompts as u64 {
                return Err(TrainError::Checkpoint {
                    path,
                    message: "saved for other prompts or another seed".into(),
                });
            }
            extra = serde_json::from_value(state.extra).map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                message: format!("the trainer's state: {e}"),
            })?;
            start = state.step;
            tracing::info!(checkpoint = %path.display(), iteration = start, "resuming");
        }
        let (file, path) = open_metrics(out, start)?;
        let iterations = Self {
            out: out.to_owned(),
            seed,
            prompts,
            total,
            checkpoint_every,
            file,
            path,
        };
        Ok((iterations, start, extra))
    }

    /// Logs iteration `record` and checkpoints `parts` with the algorithm's `extra` state
    /// when one is due.
    pub(crate) fn finish(
        &mut self,
        record: &IterationRecord,
        parts: &[Part],
        extra: &impl Serialize,
    ) -> Result<()> {
        let line = serde_json::to_string(record).expect("a record serialises");
        writeln!(self.file, "{line}").map_err(TrainError::io(&self.path))?;
        let done = record.step;
        if done.is_multiple_of(self.checkpoint_every) || done == self.total {
            self.file.sync_data().map_err(TrainError::io(&self.path))?;
            let state = TrainerState {
                step: done,
                total_steps: self.total,
                seed: self.seed,
                examples: self.prompts as u64,
                extra: serde_json::to_value(extra).expect("the trainer's state serialises"),
            };
            checkpoint::save(&self.out, parts, &state)?;
        }
        Ok(())
    }
}

/// Prompt indices at positions `start..start + count` of the run's prompt stream: pass p over
/// the `n` prompts is a shuffle seeded by (`seed`, p), so every prompt comes once per pass.
pub fn prompt_stream(n: usize, seed: u64, start: usize, count: usize) -> Vec<usize> {
    let mut passes: HashMap<usize, Vec<usize>> = HashMap::new();
    (start..start + count)
        .map(|k| {
            let order = passes.entry(k / n).or_insert_with(|| {
                let mut order: Vec<usize> = (0..n).collect();
                let pass = (k / n) as u64;
                order.shuffle(&mut StdRng::seed_from_u64(
                    seed ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                order
            });
            order[k % n]
        })
        .collect()
}

/// One rollout to sample: which prompt, with which seed, as which of its problem's samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RolloutRequest {
    pub prompt: usize,
    pub seed: u64,
    pub sample_idx: u32,
}

/// Rollouts sampled from the actor, with the token ids the update trains on.
#[derive(Debug)]
pub(crate) struct Generated {
    pub rollouts: Vec<Rollout>,
    /// Completion token ids of each rollout, ended by the EOS token the policy sampled (an
    /// action too: the policy chose to stop) when it stopped.
    pub answers: Vec<Vec<u32>>,
}

/// Samples `requests` from `generator`.
pub(crate) fn sample(
    generator: &mut impl Generator,
    encoded: &[Vec<u32>],
    prompts: &[PromptExample],
    requests: &[RolloutRequest],
    params: &SamplingParams,
) -> Result<Generated> {
    let batch: Vec<Request> = requests
        .iter()
        .map(|r| Request {
            prompt: encoded[r.prompt].clone(),
            seed: r.seed,
        })
        .collect();
    let completions = generator.collect(&batch, params)?;
    let answers = completions
        .iter()
        .map(|g| g.tokens.iter().copied().chain(g.eos).collect())
        .collect();
    let rollouts = requests
        .iter()
        .zip(completions)
        .map(|(r, g)| Rollout {
            problem_id: prompts[r.prompt].problem_id.clone(),
            prompt: prompts[r.prompt].prompt.clone(),
            completion: g.text,
            sample_idx: r.sample_idx,
            seed: r.seed,
            num_tokens: g.tokens.len() as u32,
            logprob_sum: g.logprobs.iter().sum(),
            finish: g.finish,
        })
        .collect();
    Ok(Generated { rollouts, answers })
}

/// Prompts plus answers of the rows `prompt_of` names, packed for the update and scored at
/// `params`' temperature, the distribution they were sampled from.
pub(crate) fn pack(
    actor: &Model,
    encoded: &[Vec<u32>],
    prompt_of: &[usize],
    answers: &[Vec<u32>],
    params: &SamplingParams,
) -> TokenBatch {
    let sequences: Vec<(&[u32], &[u32])> = prompt_of
        .iter()
        .zip(answers)
        .map(|(&i, a)| (encoded[i].as_slice(), a.as_slice()))
        .collect();
    TokenBatch::new(&sequences, actor.tokenizer.pad_id(), actor.vs.device())
        .at_temperature(params.temperature)
}

/// 1.0 for each rollout cut at `max_new_tokens` before the policy ended it.
pub(crate) fn truncated(rollouts: &[Rollout]) -> Vec<f32> {
    rollouts
        .iter()
        .map(|r| f32::from(u8::from(r.finish == Finish::Length)))
        .collect()
}

/// The actor's weights in fp32, by name: its optimiser's master weights where the actor
/// computes in bf16, its own parameters where it is fp32. The EMA moves towards these.
pub(crate) fn exact_weights(actor: &Model, optimizer: &AdamW) -> HashMap<String, Tensor> {
    let mut weights: HashMap<String, Tensor> = actor.vs.variables().into_iter().collect();
    weights.extend(optimizer.masters());
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pass_of_the_stream_holds_every_prompt_once_in_a_new_order() {
        let stream = prompt_stream(5, 3, 0, 15);
        let passes: Vec<Vec<usize>> = stream.chunks(5).map(<[usize]>::to_vec).collect();
        for pass in &passes {
            let mut sorted = pass.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4]);
        }
        assert_ne!(passes[0], passes[1]);
        // Any window of the stream is the same slice of it.
        assert_eq!(prompt_stream(5, 3, 7, 4), stream[7..11]);
    }
}
