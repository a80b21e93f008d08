//! The Bradley–Terry reward model: the policy's trunk with a scalar head read at the last real
//! token, trained so that r(x, y_w) > r(x, y_l). Saved as a Hugging Face
//! `LlamaForSequenceClassification` directory (head weight `score.weight`).

use std::collections::BTreeMap;
use std::path::Path;

use prefloop_model::{LoraConfig, Model, ScalarHead};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint;
use crate::error::{Result, TrainError};
use crate::examples::{EncodeConfig, Encoder, PairExample, pair_batch, pair_examples, read_stage};
use crate::fit::{ExampleWeights, LoopConfig, MicroBatch, StepRecord, fit};
use crate::losses::bradley_terry_loss;

/// Where the trained reward model is saved under the output directory.
pub const REWARD_MODEL_DIR: &str = "reward_model";
/// Held-out results, written when training ends.
pub const EVAL_FILE: &str = "eval.json";

/// A model with its reward head.
#[derive(Debug)]
pub struct RewardModel {
    pub model: Model,
    pub head: ScalarHead,
}

impl RewardModel {
    /// Adds a reward head to `model`: the saved one when the model's directory has a
    /// `score.weight` (a prefloop or transformers reward model), else a new zero head. On a
    /// model with LoRA adapters the head is trained whole beside them, in their store and
    /// dtype (fp32); otherwise it is one more weight of the model, in its dtype.
    pub fn new(model: Model) -> Result<Self> {
        // The head is declared in fp32 and, without adapters, takes the trunk's dtype below.
        let kind = model.kind();
        let store = model.trainable();
        let head = ScalarHead::new(store.root() / "score", model.decoder.config().hidden_size);
        let file = model.source.join("model.safetensors");
        if model.source.is_dir() && file.exists() {
            let saved = Tensor::read_safetensors(&file).map_err(|e| TrainError::Checkpoint {
                path: file.clone(),
                message: e.to_string(),
            })?;
            if let Some((_, weight)) = saved.into_iter().find(|(n, _)| n == "score.weight") {
                let mut variables = store.variables();
                let var = variables.get_mut("score.weight").expect("declared above");
                if weight.size() != var.size() {
                    return Err(TrainError::Checkpoint {
                        path: file,
                        message: format!(
                            "score.weight has shape {:?}, expected {:?}",
                            weight.size(),
                            var.size()
                        ),
                    });
                }
                tch::no_grad(|| var.copy_(&weight));
            }
        }
        let mut model = model;
        if kind != Kind::Float && model.adapters.is_none() {
            model.vs.set_kind(kind);
        }
        Ok(Self { model, head })
    }

    /// The reward of each (prompt, answer), `batch_size` at a time, as the scorer of PPO or of
    /// a pipeline round: prompts go through `encoder` as in training.
    pub fn score(
        &self,
        encoder: &Encoder,
        texts: &[(&str, &str)],
        batch_size: usize,
    ) -> Result<Vec<f32>> {
        let sequences: Vec<crate::examples::Sequence> = texts
            .iter()
            .map(|(prompt, answer)| encoder.sequence(&encoder.prompt(prompt)?, answer))
            .collect::<Result<_>>()?;
        let mut scores = Vec::with_capacity(texts.len());
        for chunk in sequences.chunks(batch_size.max(1)) {
            let parts: Vec<(&[u32], &[u32])> = chunk.iter().map(|s| s.parts()).collect();
            let batch = crate::logprobs::TokenBatch::new(
                &parts,
                self.model.tokenizer.pad_id(),
                self.model.vs.device(),
            );
            let batch_scores = tch::no_grad(|| self.scores(&batch));
            scores.extend(Vec::<f32>::try_from(
                &batch_scores.to_device(tch::Device::Cpu),
            )?);
        }
        Ok(scores)
    }

    /// Scores of the sequences of a batch, (B,) fp32.
    fn scores(&self, batch: &crate::logprobs::TokenBatch) -> Tensor {
        let hidden = batch.hidden(&self.model.decoder);
        self.head
            .at_last_token(&hidden, &batch.attention_mask)
            .to_kind(Kind::Float)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Share of the pairs held out for evaluation (chosen by the loop's seed). Default 0.1.
    pub eval_fraction: f64,
    pub encode: EncodeConfig,
    /// The loop; its learning rate defaults to 1e-5 here.
    pub train: LoopConfig,
    /// LoRA adapters trained with the `score` head instead of every weight (`[lora]`); the
    /// reward model is saved merged, with the adapter and head beside it as a PEFT `SEQ_CLS`
    /// directory. Default: none, full fine-tuning.
    pub lora: Option<LoraConfig>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            eval_fraction: 0.1,
            encode: EncodeConfig::default(),
            train: LoopConfig::with_lr(1e-5),
            lora: None,
        }
    }
}

/// Held-out accuracy (share of pairs with r(chosen) > r(rejected)), mean margin and loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardEval {
    pub pairs: usize,
    pub accuracy: f64,
    pub margin: f64,
    pub loss: f64,
}

/// Evaluates on `indices` of `examples` without a graph.
pub fn evaluate(
    rm: &RewardModel,
    examples: &[PairExample],
    indices: &[usize],
    batch_size: usize,
) -> RewardEval {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        for chunk in indices.chunks(batch_size.max(1)) {
            let b = chunk.len() as i64;
            let scores = rm.scores(&pair_batch(examples, chunk, &rm.model));
            chosen.push(scores.narrow(0, 0, b));
            rejected.push(scores.narrow(0, b, b));
        }
    });
    if chosen.is_empty() {
        return RewardEval {
            pairs: 0,
            accuracy: f64::NAN,
            margin: f64::NAN,
            loss: f64::NAN,
        };
    }
    let (chosen, rejected) = (Tensor::cat(&chosen, 0), Tensor::cat(&rejected, 0));
    let margins = &chosen - &rejected;
    RewardEval {
        pairs: indices.len(),
        accuracy: margins
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]),
        margin: margins.mean(Kind::Float).double_value(&[]),
        loss: bradley_terry_loss(&chosen, &rejected).double_value(&[]),
    }
}

/// What a reward-model run reports: its steps and the held-out results before and after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardReport {
    pub before: RewardEval,
    pub after: RewardEval,
}

/// Trains a reward model on the pairs stage `pairs_dir`: its adapters and head when `rm` was
/// made from a model with LoRA adapters ([`crate::with_lora`] per `config.lora`), else every
/// weight. Saves `<out>/reward_model` and `<out>/eval.json`. A run that finds the saved model
/// has nothing to do.
pub fn train_reward_model(
    rm: &RewardModel,
    pairs_dir: &Path,
    config: &RewardConfig,
    out: &Path,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<(Vec<StepRecord>, Option<RewardReport>)> {
    if !(0.0..1.0).contains(&config.eval_fraction) {
        return Err(TrainError::Config {
            field: "eval_fraction",
            message: "must be in [0, 1)".into(),
        });
    }
    crate::validate_lora(config.lora.as_ref())?;
    if out.join(REWARD_MODEL_DIR).exists() {
        return Ok((Vec::new(), None));
    }
    let encoder = Encoder::new(&rm.model.tokenizer, config.encode.clone())?;
    let examples = pair_examples(&read_stage(pairs_dir)?, &encoder)?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(config.train.seed));
    let held_out = (examples.len() as f64 * config.eval_fraction).ceil() as usize;
    let (eval_indices, train_indices) = order.split_at(held_out.min(examples.len()));
    let batch_size = config.train.batch_size;
    let before = evaluate(rm, &examples, eval_indices, batch_size);

    let mut extra = serde_json::Value::Null;
    let records = fit(
        rm.model.trainable(),
        train_indices.len(),
        ExampleWeights::Uniform,
        &config.train,
        out,
        &mut extra,
        |positions, weight, _| {
            let indices: Vec<usize> = positions.iter().map(|&p| train_indices[p]).collect();
            let b = indices.len() as i64;
            let batch = pair_batch(&examples, &indices, &rm.model);
            let scores = rm.model.decoder.training(|| rm.scores(&batch));
            let (chosen, rejected) = (scores.narrow(0, 0, b), scores.narrow(0, b, b));
            let loss = bradley_terry_loss(&chosen, &rejected);
            (&loss * weight).backward();
            let margins = (&chosen - &rejected).detach();
            let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
            Ok(MicroBatch {
                metrics: BTreeMap::from([
                    ("loss".to_string(), loss.double_value(&[])),
                    (
                        "accuracy".into(),
                        mean(&margins.gt(0.0).to_kind(Kind::Float)),
                    ),
                    ("margin".into(), mean(&margins)),
                ]),
                tokens: batch.tokens,
            })
        },
        on_step,
    )?;
    let after = evaluate(rm, &examples, eval_indices, batch_size);
    let report = RewardReport { before, after };
    let eval_path = out.join(EVAL_FILE);
    let json = serde_json::to_string_pretty(&report).expect("serialises");
    std::fs::write(&eval_path, json).map_err(TrainError::io(&eval_path))?;
    rm.model.save(&out.join(REWARD_MODEL_DIR))?;
    checkpoint::remove_all(out)?;
    Ok((records, Some(report)))
}
