//! DPO and IPO (DESIGN §4). The reference model is the policy as it starts: its sequence
//! log-probs are computed once into a `reference_logps` stage beside the run's output, so it
//! is never in memory while the policy trains.

use std::collections::BTreeMap;
use std::path::Path;

use prefloop_core::{Pair, ReferenceLogps};
use prefloop_data::{Manifest, StageWriter, WriterOptions};
use prefloop_model::{LoraConfig, Model};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::examples::{EncodeConfig, Encoder, PairExample, pair_batch, pair_examples, read_stage};
use crate::fit::{ExampleWeights, LoopConfig, MicroBatch, StepRecord, fit};
use crate::logprobs::{TokenBatch, TokenLogprobs, sequence_sum, token_logprobs};
use crate::losses::{PreferenceLoss, preference_loss};
use crate::{checkpoint, finish_policy};

/// Directory under the output that holds the reference log-probs stage.
pub const REFERENCE_DIR: &str = "reference";

const REFERENCE_SHARD_ROWS: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// β, the strength of the pull towards the reference. Default 0.1.
    pub beta: f64,
    /// `sigmoid` (DPO, on summed log-probs) or `ipo` (on log-probs averaged per answer
    /// token, as TRL and the IPO authors write it). Default sigmoid.
    pub loss: PreferenceLoss,
    /// Weight of an SFT term on the chosen answers, the paper's "additional SFT" (0 = off).
    /// Default 0.
    pub sft_weight: f64,
    pub encode: EncodeConfig,
    pub train: LoopConfig,
    /// LoRA adapters trained instead of every weight (`[lora]`, e.g. `rank = 16`); the
    /// trained policy is saved merged, with the adapter beside it. Default: none, full
    /// fine-tuning.
    pub lora: Option<LoraConfig>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: PreferenceLoss::Sigmoid,
            sft_weight: 0.0,
            encode: EncodeConfig::default(),
            train: LoopConfig::default(),
            lora: None,
        }
    }
}

impl DpoConfig {
    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        crate::error::ensure(self.beta > 0.0, "beta", "must be positive")?;
        crate::validate_lora(self.lora.as_ref())?;
        self.encode.validate()?;
        self.train.validate()
    }
}

/// Sequence log-probs of every pair under `model` as it is now, written to (or, when
/// complete, read from) the stage at `dir`. Resumable shard by shard.
pub fn reference_logps(
    model: &Model,
    examples: &[PairExample],
    batch_size: usize,
    dir: &Path,
) -> Result<Vec<ReferenceLogps>> {
    let complete = Manifest::load(dir)?.is_some_and(|m| m.complete);
    if !complete {
        // Small shards: a killed run loses at most one shard's worth of forward passes.
        let options = WriterOptions::default().with_shard_rows(REFERENCE_SHARD_ROWS);
        let mut writer = StageWriter::<ReferenceLogps>::open(dir, options)?;
        let done = writer.committed_rows() as usize;
        if done > examples.len() {
            return Err(TrainError::Data {
                path: dir.to_owned(),
                message: format!(
                    "holds {done} reference rows for {} pairs: it belongs to other data",
                    examples.len()
                ),
            });
        }
        let indices: Vec<usize> = (done..examples.len()).collect();
        for chunk in indices.chunks(batch_size) {
            let batch = pair_batch(examples, chunk, model);
            let sums = sequence_sum(&token_logprobs(&model.decoder, &batch), &batch.loss_mask);
            let sums: Vec<f32> = Vec::try_from(&sums.to_device(tch::Device::Cpu))?;
            let b = chunk.len();
            let rows: Vec<ReferenceLogps> = chunk
                .iter()
                .enumerate()
                .map(|(k, &i)| ReferenceLogps {
                    pair: i as u64,
                    problem_id: examples[i].problem_id.clone(),
                    ref_chosen_logps: sums[k],
                    ref_rejected_logps: sums[b + k],
                })
                .collect();
            writer.write(&rows)?;
        }
        writer.finish()?;
    }
    let rows = read_stage::<ReferenceLogps>(dir)?;
    if rows.len() != examples.len() || rows.iter().enumerate().any(|(i, r)| r.pair != i as u64) {
        return Err(TrainError::Data {
            path: dir.to_owned(),
            message: "reference rows do not line up with the pairs".into(),
        });
    }
    Ok(rows)
}

/// Trains `model` (the policy, which is also the reference) on the pairs stage `pairs_dir`:
/// its adapters if it has them ([`crate::with_lora`]), else every weight. The reference is the
/// model as it starts, adapters and all, so a continued adapter's reference is where it began.
/// The trained policy is saved to `<out>/policy`; a run that finds it there has nothing to do.
pub fn train_dpo(
    model: &Model,
    pairs_dir: &Path,
    config: &DpoConfig,
    out: &Path,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<Vec<StepRecord>> {
    config.validate()?;
    let policy_dir = out.join(crate::POLICY_DIR);
    if policy_dir.exists() {
        tracing::info!(policy = %policy_dir.display(), "already trained");
        return Ok(Vec::new());
    }
    let pairs: Vec<Pair> = read_stage(pairs_dir)?;
    let encoder = Encoder::new(&model.tokenizer, config.encode.clone())?;
    let examples = pair_examples(&pairs, &encoder)?;
    let reference = reference_logps(
        model,
        &examples,
        config.train.batch_size,
        &out.join(REFERENCE_DIR),
    )?;
    let device = model.vs.device();

    let mut extra = serde_json::Value::Null;
    let records = fit(
        model.trainable(),
        examples.len(),
        ExampleWeights::Uniform,
        &config.train,
        out,
        &mut extra,
        |indices, weight, step| {
            let batch = pair_batch(&examples, indices, model);
            let chosen_tokens: usize = step.iter().map(|&i| examples[i].chosen.loss_tokens()).sum();
            let gather = |f: fn(&ReferenceLogps) -> f32| {
                let v: Vec<f32> = indices.iter().map(|&i| f(&reference[i])).collect();
                Tensor::from_slice(&v).to_device(device)
            };
            let reference = (
                gather(|r| r.ref_chosen_logps),
                gather(|r| r.ref_rejected_logps),
            );
            let share = Share {
                pairs: weight,
                chosen_tokens: chosen_tokens as f64,
            };
            Ok(dpo_backward(model, &batch, &reference, config, share))
        },
        on_step,
    )?;
    finish_policy(model, out)?;
    checkpoint::remove_all(out)?;
    Ok(records)
}

/// What one micro-batch is of its optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    /// Its pairs' share of the step's pairs: the weight of its preference loss.
    pub pairs: f64,
    /// The chosen answers' loss tokens in the whole step: the SFT term is their token mean,
    /// the same however the step is cut into micro-batches.
    pub chosen_tokens: f64,
}

/// The DPO (or IPO) loss of one micro-batch, weighed by its `share` of the step and
/// back-propagated into the policy's gradients. `batch` holds the B chosen sequences then the B rejected ones;
/// `reference` their reference sequence log-probs summed over the answer, each (B,). Returns
/// TRL's metrics (for IPO, of per-token mean log-probs, as TRL's).
pub fn dpo_backward(
    model: &Model,
    batch: &TokenBatch,
    reference: &(Tensor, Tensor),
    config: &DpoConfig,
    share: Share,
) -> MicroBatch {
    let b = batch.input_ids.size()[0] / 2;
    let logprobs = model
        .decoder
        .training(|| TokenLogprobs::forward(&model.decoder, batch));
    let tokens = batch
        .loss_mask
        .sum_dim_intlist([1].as_slice(), false, Kind::Float); // (2B,)
    let sums = sequence_sum(&logprobs.values, &batch.loss_mask); // (2B,)
    let logps = config.loss.sequence_logps(&sums, &tokens);
    let (chosen, rejected) = (logps.narrow(0, 0, b), logps.narrow(0, b, b));
    let reference = (
        config
            .loss
            .sequence_logps(&reference.0, &tokens.narrow(0, 0, b)),
        config
            .loss
            .sequence_logps(&reference.1, &tokens.narrow(0, b, b)),
    );
    let out = preference_loss(
        config.loss,
        config.beta,
        &chosen,
        &rejected,
        &reference.0,
        &reference.1,
    );
    // The step's loss: this micro-batch's share of the pairs' mean, plus its share of the
    // SFT term's token mean over every chosen answer of the step. `loss` is what it reports,
    // per pair share as the loop weighs it.
    let mut weighted = &out.loss * share.pairs;
    if config.sft_weight > 0.0 {
        let chosen_logprobs = logprobs.values.narrow(0, 0, b);
        let nll =
            -sequence_sum(&chosen_logprobs, &batch.loss_mask.narrow(0, 0, b)).sum(Kind::Float);
        weighted += nll / share.chosen_tokens.max(1.0) * config.sft_weight;
    }
    weighted.backward();
    let loss = weighted.detach() / share.pairs.max(f64::MIN_POSITIVE);
    logprobs.backward(&model.decoder);

    let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
    let margins = &out.chosen_rewards - &out.rejected_rewards;
    let metrics = BTreeMap::from([
        ("loss".to_string(), loss.double_value(&[])),
        ("rewards/chosen".into(), mean(&out.chosen_rewards)),
        ("rewards/rejected".into(), mean(&out.rejected_rewards)),
        ("rewards/margins".into(), mean(&margins)),
        (
            "rewards/accuracies".into(),
            mean(&margins.gt(0.0).to_kind(Kind::Float)),
        ),
        ("logps/chosen".into(), mean(&chosen.detach())),
        ("logps/rejected".into(), mean(&rejected.detach())),
    ]);
    MicroBatch {
        metrics,
        tokens: batch.tokens,
    }
}
