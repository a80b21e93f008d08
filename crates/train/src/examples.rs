//! Training examples from stages: prompts rendered with the model's chat template and
//! tokenised, answers tokenised and closed with the token the template ends a turn with (the
//! tokenizer's `eos_token`, as TRL closes them; where a sampled answer was cut at the budget
//! or a stop string, as sampled, without it), both cut to the configured lengths.

use std::path::Path;

use prefloop_core::{Pair, Problem, Record};
use prefloop_data::{Manifest, StageReader};
use prefloop_model::{Model, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::logprobs::TokenBatch;

/// How prompts and answers become token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncodeConfig {
    /// Prompt tokens kept (the start of a longer prompt is cut). Default 512.
    pub max_prompt_tokens: usize,
    /// Prompt plus answer tokens kept (the end of a longer answer is cut). Default 1024.
    pub max_length: usize,
    /// Feed prompts as they are instead of through the chat template (HH-RLHF's
    /// "\n\nHuman: … \n\nAssistant:" transcripts). Default false.
    pub raw_prompts: bool,
}

impl EncodeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_prompt_tokens == 0 || self.max_length <= self.max_prompt_tokens {
            return Err(TrainError::Config {
                field: "max_length",
                message: format!(
                    "must exceed max_prompt_tokens ({} ≥ {} here)",
                    self.max_prompt_tokens, self.max_length
                ),
            });
        }
        Ok(())
    }
}

impl Default for EncodeConfig {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 512,
            max_length: 1024,
            raw_prompts: false,
        }
    }
}

/// A tokenised prompt and answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    /// Ends with the end-of-sequence token unless it was cut.
    pub answer: Vec<u32>,
}

impl Sequence {
    pub fn parts(&self) -> (&[u32], &[u32]) {
        (&self.prompt, &self.answer)
    }

    /// Positions that carry a loss in a [`crate::TokenBatch`]: the answer's tokens (the first
    /// token has no prediction when the prompt is empty).
    pub fn loss_tokens(&self) -> usize {
        let n = self.prompt.len() + self.answer.len();
        n.saturating_sub(self.prompt.len().max(1))
    }
}

/// One preference pair, tokenised.
#[derive(Debug, Clone)]
pub struct PairExample {
    pub chosen: Sequence,
    pub rejected: Sequence,
    pub problem_id: String,
}

#[derive(Debug)]
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    config: EncodeConfig,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, config: EncodeConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { tokenizer, config })
    }

    pub fn prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = if self.config.raw_prompts {
            prompt.to_owned()
        } else {
            self.tokenizer.apply_chat_template(prompt)?
        };
        let mut ids = self.tokenizer.encode(&text)?;
        if ids.len() > self.config.max_prompt_tokens {
            ids.drain(..ids.len() - self.config.max_prompt_tokens);
        }
        Ok(ids)
    }

    pub fn sequence(&self, prompt: &[u32], answer: &str) -> Result<Sequence> {
        self.sampled(prompt, answer, true)
    }

    /// A sampled answer as the policy made it: ending with EOS only if the policy ended it
    /// (`ended`), not when it was cut at the token budget.
    pub fn sampled(&self, prompt: &[u32], answer: &str, ended: bool) -> Result<Sequence> {
        let mut ids = self.tokenizer.encode(answer)?;
        if ended {
            ids.extend(self.tokenizer.end_of_turn_id());
        }
        ids.truncate(self.config.max_length - prompt.len());
        Ok(Sequence {
            prompt: prompt.to_vec(),
            answer: ids,
        })
    }
}

/// Every row of a complete stage of kind `R`.
pub fn read_stage<R: Record>(dir: &Path) -> Result<Vec<R>> {
    let mut rows = Vec::new();
    for batch in StageReader::<R>::open(dir)? {
        rows.extend(batch?);
    }
    Ok(rows)
}

/// Tokenises every pair of a pairs stage.
pub fn pair_examples(pairs: &[Pair], encoder: &Encoder) -> Result<Vec<PairExample>> {
    pairs
        .iter()
        .map(|p| {
            let prompt = encoder.prompt(&p.prompt)?;
            // Each answer as the policy made it: closed by EOS only where the policy ended it.
            Ok(PairExample {
                chosen: encoder.sampled(&prompt, &p.chosen, Pair::ended(p.chosen_finish))?,
                rejected: encoder.sampled(&prompt, &p.rejected, Pair::ended(p.rejected_finish))?,
                problem_id: p.problem_id.clone(),
            })
        })
        .collect()
}

/// SFT data: the chosen side of a pairs stage, or the reference solutions of a problems stage
/// (problems without one are skipped).
pub fn sft_examples(dir: &Path, encoder: &Encoder) -> Result<Vec<Sequence>> {
    let kind = Manifest::load(dir)?.map(|m| m.kind).unwrap_or_default();
    // (prompt, answer, whether the answer is whole: closed by the end of the turn).
    let texts: Vec<(String, String, bool)> = match kind.as_str() {
        Pair::KIND => read_stage::<Pair>(dir)?
            .into_iter()
            .map(|p| (p.prompt, p.chosen, Pair::ended(p.chosen_finish)))
            .collect(),
        Problem::KIND => read_stage::<Problem>(dir)?
            .into_iter()
            .filter_map(|p| p.reference_solution.map(|r| (p.prompt, r, true)))
            .collect(),
        other => {
            return Err(TrainError::Data {
                path: dir.to_owned(),
                message: format!(
                    "SFT reads a pairs or problems stage, this one is {}",
                    if other.is_empty() {
                        "not a stage"
                    } else {
                        other
                    }
                ),
            });
        }
    };
    texts
        .iter()
        .map(|(prompt, answer, ended)| encoder.sampled(&encoder.prompt(prompt)?, answer, *ended))
        .collect()
}

/// The chosen sequences of `indices` followed by their rejected ones: one batch of 2B rows.
pub fn pair_batch(examples: &[PairExample], indices: &[usize], model: &Model) -> TokenBatch {
    let sequences: Vec<(&[u32], &[u32])> = indices
        .iter()
        .map(|&i| examples[i].chosen.parts())
        .chain(indices.iter().map(|&i| examples[i].rejected.parts()))
        .collect();
    TokenBatch::new(&sequences, model.tokenizer.pad_id(), model.vs.device())
}
