//! Supervised fine-tuning: maximise the log-likelihood of answers (the chosen side of pairs, or
//! reference solutions) given their prompts; prompt and padding tokens carry no loss.

use std::collections::BTreeMap;
use std::path::Path;

use prefloop_model::{LoraConfig, Model};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::examples::{EncodeConfig, Encoder, sft_examples};
use crate::fit::{ExampleWeights, LoopConfig, MicroBatch, StepRecord, fit};
use crate::logprobs::{TokenBatch, TokenLogprobs};
use crate::losses::sft_loss;
use crate::{checkpoint, finish_policy};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub encode: EncodeConfig,
    /// The loop; its learning rate defaults to 1e-5 here.
    pub train: LoopConfig,
    /// LoRA adapters trained instead of every weight (`[lora]`); see [`crate::with_lora`].
    /// Default: none.
    pub lora: Option<LoraConfig>,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            encode: EncodeConfig::default(),
            train: LoopConfig::with_lr(1e-5),
            lora: None,
        }
    }
}

/// Fine-tunes `model` (its adapters if it has them) on the pairs or problems stage at `data`;
/// saves `<out>/policy`.
pub fn train_sft(
    model: &Model,
    data: &Path,
    config: &SftConfig,
    out: &Path,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<Vec<StepRecord>> {
    if out.join(crate::POLICY_DIR).exists() {
        return Ok(Vec::new());
    }
    crate::validate_lora(config.lora.as_ref())?;
    let encoder = Encoder::new(&model.tokenizer, config.encode.clone())?;
    let examples = sft_examples(data, &encoder)?;
    // The loss is a mean over answer tokens: micro-batches weigh by their tokens.
    let tokens: Vec<usize> = examples.iter().map(|e| e.loss_tokens()).collect();
    let mut extra = serde_json::Value::Null;
    let records = fit(
        model.trainable(),
        examples.len(),
        ExampleWeights::Tokens(&tokens),
        &config.train,
        out,
        &mut extra,
        |indices, weight, _| {
            let sequences: Vec<(&[u32], &[u32])> =
                indices.iter().map(|&i| examples[i].parts()).collect();
            let batch = TokenBatch::new(&sequences, model.tokenizer.pad_id(), model.vs.device());
            let logprobs = model
                .decoder
                .training(|| TokenLogprobs::forward(&model.decoder, &batch));
            let loss = sft_loss(&logprobs.values, &batch.loss_mask);
            (&loss * weight).backward();
            logprobs.backward(&model.decoder);
            Ok(MicroBatch {
                metrics: BTreeMap::from([("loss".to_string(), loss.double_value(&[]))]),
                tokens: batch.tokens,
            })
        },
        on_step,
    )?;
    finish_policy(model, out)?;
    checkpoint::remove_all(out)?;
    Ok(records)
}
