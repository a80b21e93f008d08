//! The optimisation loop every trainer shares, readable top to bottom: for each optimiser
//! step, take the step's examples (a seeded shuffle per epoch), run the algorithm's loss and
//! backward on each micro-batch, clip, update, log a metrics line, checkpoint. A run killed
//! at any point continues from its last checkpoint and ends with the same parameters as one
//! that never stopped.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use crate::checkpoint::{self, Part, TrainerState};
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, OptimConfig};

/// File of per-step metrics in the output directory, one JSON object a line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Settings of the loop itself, common to every trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Passes over the data. Default 1.
    pub epochs: u32,
    /// Examples per micro-batch (pairs for DPO and the reward model). Default 8.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimiser step. Default 1.
    pub accumulation_steps: usize,
    /// Stop after this many optimiser steps (the schedule still spans every epoch). Default:
    /// no limit.
    pub max_steps: Option<u64>,
    /// Seeds the data order. Default 0.
    pub seed: u64,
    /// Optimiser steps between checkpoints. Default 50.
    pub checkpoint_every: u64,
    pub optim: OptimConfig,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            accumulation_steps: 1,
            max_steps: None,
            seed: 0,
            checkpoint_every: 50,
            optim: OptimConfig::default(),
        }
    }
}

impl LoopConfig {
    /// The defaults with another peak learning rate.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            optim: OptimConfig {
                lr,
                ..OptimConfig::default()
            },
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = |v: u64, field: &'static str| {
            if v > 0 {
                Ok(())
            } else {
                Err(TrainError::Config {
                    field,
                    message: "must be at least 1".into(),
                })
            }
        };
        positive(self.epochs.into(), "epochs")?;
        positive(self.batch_size as u64, "batch_size")?;
        positive(self.accumulation_steps as u64, "accumulation_steps")?;
        positive(self.checkpoint_every, "checkpoint_every")?;
        self.optim.validate()
    }

    fn examples_per_step(&self) -> usize {
        self.batch_size * self.accumulation_steps
    }

    fn steps_per_epoch(&self, examples: usize) -> u64 {
        examples.div_ceil(self.examples_per_step()) as u64
    }

    /// Optimiser steps the schedule spans (every epoch).
    fn scheduled_steps(&self, examples: usize) -> u64 {
        self.steps_per_epoch(examples) * u64::from(self.epochs)
    }

    /// Micro-batches (example indices) of optimiser step `step`.
    fn micro_batches(&self, examples: usize, step: u64) -> Vec<Vec<usize>> {
        let per_epoch = self.steps_per_epoch(examples);
        let epoch = step / per_epoch;
        let mut order: Vec<usize> = (0..examples).collect();
        let mut rng = StdRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        let start = ((step % per_epoch) as usize) * self.examples_per_step();
        let end = (start + self.examples_per_step()).min(examples);
        order[start..end]
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }
}

/// What one micro-batch reports back to the loop.
#[derive(Debug, Default)]
pub struct MicroBatch {
    /// Metrics averaged over the micro-batch's examples (the loss under "loss").
    pub metrics: BTreeMap<String, f64>,
    /// Real tokens processed.
    pub tokens: usize,
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimiser steps completed, this one included.
    pub step: u64,
    pub epoch: u64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// Means over the step's micro-batches, weighted as the loss is.
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
}

/// How much each example counts in a step's loss, so that cutting a step into micro-batches
/// does not change its gradient.
#[derive(Debug, Clone, Copy)]
pub enum ExampleWeights<'a> {
    /// Every example alike: losses that are means over examples (pairs).
    Uniform,
    /// Example i weighs `tokens[i]`: losses that are means over tokens (SFT). A micro-batch's
    /// token mean, weighted by its share of the step's tokens, is the step's token mean, as
    /// ReaLHF weighs micro-batches.
    Tokens(&'a [usize]),
}

impl ExampleWeights<'_> {
    fn of(&self, indices: &[usize]) -> f64 {
        match self {
            Self::Uniform => indices.len() as f64,
            Self::Tokens(tokens) => indices.iter().map(|&i| tokens[i] as f64).sum(),
        }
    }
}

/// Runs the loop over `examples` items. `micro_batch(indices, weight, step)` computes the loss
/// of those examples, multiplies it by `weight` (their share of the step, by `weights`) and
/// calls backward; `step` holds every example of the optimiser step, for a loss term weighed
/// otherwise (DPO's SFT term, by tokens). `on_step` sees every record as it is logged. Returns
/// the records of this call.
#[allow(clippy::too_many_arguments)] // the loop's inputs, each documented above
pub fn fit(
    vs: &VarStore,
    examples: usize,
    weights: ExampleWeights,
    config: &LoopConfig,
    out: &Path,
    extra_state: &mut serde_json::Value,
    mut micro_batch: impl FnMut(&[usize], f64, &[usize]) -> Result<MicroBatch>,
    mut on_step: impl FnMut(&StepRecord, u64),
) -> Result<Vec<StepRecord>> {
    config.validate()?;
    if examples == 0 {
        return Err(TrainError::Config {
            field: "data",
            message: "there is nothing to train on".into(),
        });
    }
    fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let scheduled = config.scheduled_steps(examples);
    let total = config.max_steps.map_or(scheduled, |m| m.min(scheduled));
    let mut optimizer = AdamW::new(vs, config.optim.clone())?;
    let mut start = 0;
    if let Some(path) = checkpoint::latest(out)? {
        let state = checkpoint::load(&path, &mut [Part::trained("policy", vs, &mut optimizer)])?;
        if state.examples != examples as u64 || state.seed != config.seed {
            return Err(TrainError::Checkpoint {
                path,
                message: format!(
                    "saved for {} examples with seed {}, this run has {examples} with seed {}",
                    state.examples, state.seed, config.seed
                ),
            });
        }
        tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
        start = state.step;
        *extra_state = state.extra;
    }
    let (mut metrics_file, metrics_path) = open_metrics(out, start)?;

    let mut records = Vec::new();
    for step in start..total {
        let began = Instant::now();
        let lr = config.optim.lr_at(step, scheduled);
        let batches = config.micro_batches(examples, step);
        // libtorch's generator (LoRA's dropout) is seeded per step, so a resumed run draws the
        // masks an unbroken one would.
        tch::manual_seed((config.seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407)) as i64);
        let step_weight: f64 = batches.iter().map(|b| weights.of(b)).sum();
        let step_examples = batches.concat();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut tokens = 0;
        for indices in &batches {
            let weight = weights.of(indices) / step_weight.max(f64::MIN_POSITIVE);
            let result = micro_batch(indices, weight, &step_examples)?;
            optimizer.accumulate();
            tokens += result.tokens;
            for (name, value) in result.metrics {
                *sums.entry(name).or_default() += value * weight;
            }
        }
        let loss = sums.get("loss").copied().unwrap_or(0.0);
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let grad_norm = optimizer.clip_grad_norm();
        optimizer.step(lr);
        optimizer.zero_grad();

        let seconds = began.elapsed().as_secs_f64();
        let record = StepRecord {
            step: step + 1,
            epoch: step / config.steps_per_epoch(examples),
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            seconds,
            metrics: sums,
        };
        let line = serde_json::to_string(&record).expect("a record serialises");
        writeln!(metrics_file, "{line}").map_err(TrainError::io(&metrics_path))?;
        on_step(&record, total);
        records.push(record);

        let done = step + 1;
        if done % config.checkpoint_every == 0 || done == total {
            let state = TrainerState {
                step: done,
                total_steps: total,
                seed: config.seed,
                examples: examples as u64,
                extra: extra_state.clone(),
            };
            metrics_file
                .sync_data()
                .map_err(TrainError::io(&metrics_path))?;
            checkpoint::save(out, &[Part::trained("policy", vs, &mut optimizer)], &state)?;
        }
    }
    Ok(records)
}

/// Opens `<out>/metrics.jsonl` for appending after dropping the lines of steps past `start`
/// (those a resumed run will log again).
pub(crate) fn open_metrics(out: &Path, start: u64) -> Result<(fs::File, std::path::PathBuf)> {
    let path = out.join(METRICS_FILE);
    truncate_metrics(&path, start)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(TrainError::io(&path))?;
    Ok((file, path))
}

/// Drops metrics lines of steps after `step` (written after the checkpoint a run resumes
/// from), so a resumed run's log has each step once.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let file = fs::File::open(path).map_err(TrainError::io(path))?;
    let mut kept = String::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(TrainError::io(path))?;
        let logged = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|record| record["step"].as_u64());
        // A line cut short by a kill, or one from after the checkpoint, ends what is kept.
        if logged.is_none_or(|logged| logged > step) {
            break;
        }
        kept.push_str(&line);
        kept.push('\n');
    }
    fs::write(path, kept).map_err(TrainError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_is_seen_once_per_epoch_and_the_order_changes() {
        let config = LoopConfig {
            batch_size: 3,
            accumulation_steps: 2,
            epochs: 2,
            ..LoopConfig::default()
        };
        assert_eq!(config.scheduled_steps(10), 4);
        let epoch = |e: u64| -> Vec<usize> {
            (e * 2..e * 2 + 2)
                .flat_map(|s| config.micro_batches(10, s).concat())
                .collect()
        };
        let (first, second) = (epoch(0), epoch(1));
        let sorted = |mut v: Vec<usize>| {
            v.sort();
            v
        };
        assert_eq!(sorted(first.clone()), (0..10).collect::<Vec<_>>());
        assert_eq!(sorted(second.clone()), (0..10).collect::<Vec<_>>());
        assert_ne!(first, second);
        // The last step of an epoch holds the remainder: micro-batches of 3 and 1.
        let last: Vec<usize> = config.micro_batches(10, 1).iter().map(Vec::len).collect();
        assert_eq!(last, [3, 1]);
    }
}
