//! Training checkpoints: `<out>/checkpoints/step-NNNNNNNN/` holding, for each trained part
//! (the policy; PPO adds its critic and EMA reference), its weights (`NAME.safetensors`) and
//! optimiser moments (`NAME.optimizer.safetensors`), and the loop's position (state.json).
//!
//! The weights saved are the exact ones: a bf16 model's fp32 master weights (or, for the EMA
//! reference, its fp32 shadow), an fp32 model's own. So a checkpoint resumes to the same
//! parameters in either precision: fp32 to bf16 rounds the weights into the model and keeps the
//! exact values as masters; bf16 to fp32 continues from the masters. Files are written and read
//! one tensor at a time (tensorfile.rs), so a save or a resume holds at most one tensor on the
//! host beyond the model's own states.
//!
//! Each checkpoint is written into a hidden temp directory, fsynced and renamed into place, so
//! a checkpoint directory that exists is whole; older ones are removed only after a newer one
//! is in place.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn::VarStore};

use crate::ema::EmaReference;
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::tensorfile::{self, TensorFile};

const CHECKPOINTS: &str = "checkpoints";
const PREFIX: &str = "step-";

/// Where the loop stands. Data order is a pure function of (seed, epoch), so the step count and
/// the seed are the whole random state a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    /// Examples the run trains on; a resumed run over different data is refused.
    pub examples: u64,
    /// Algorithm-specific state (PPO's value-normalisation moments).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let dir = out.join(CHECKPOINTS);
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(&dir).map_err(TrainError::io(&dir))? {
        let entry = entry.map_err(TrainError::io(&dir))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// One model in a checkpoint: with its optimiser when it is being trained, with its EMA
/// shadow when it is an EMA reference.
#[derive(Debug)]
pub struct Part<'a> {
    pub name: &'static str,
    pub vs: &'a VarStore,
    pub optimizer: Option<&'a mut AdamW>,
    pub ema: Option<&'a mut EmaReference>,
}

impl<'a> Part<'a> {
    /// A model trained by `optimizer`.
    pub fn trained(name: &'static str, vs: &'a VarStore, optimizer: &'a mut AdamW) -> Self {
        Self {
            name,
            vs,
            optimizer: Some(optimizer),
            ema: None,
        }
    }

    /// The weights to save, by name: the exact (fp32) value where the part keeps one.
    fn exact_weights(&self) -> Vec<(String, Tensor)> {
        let mut weights: std::collections::HashMap<String, Tensor> =
            self.vs.variables().into_iter().collect();
        let exact = self.optimizer.as_ref().map(|o| o.masters());
        let shadows = self.ema.as_ref().map(|e| e.shadows());
        for (name, t) in exact.into_iter().chain(shadows).flatten() {
            weights.insert(name, t);
        }
        let mut weights: Vec<(String, Tensor)> = weights.into_iter().collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        weights
    }
}

/// Writes a checkpoint of `parts` at `state.step`, then removes older ones and any temp
/// directory a killed writer left.
pub fn save(out: &Path, parts: &[Part], state: &TrainerState) -> Result<PathBuf> {
    let dir = out.join(CHECKPOINTS);
    fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let name = format!("{PREFIX}{:08}", state.step);
    let target = dir.join(&name);
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if temp.exists() {
        fs::remove_dir_all(&temp).map_err(TrainError::io(&temp))?;
    }
    fs::create_dir_all(&temp).map_err(TrainError::io(&temp))?;

    let mut files = vec!["state.json".to_string()];
    for part in parts {
        let file = format!("{}.safetensors", part.name);
        tensorfile::write(&temp.join(&file), part.exact_weights())?;
        files.push(file);
        if let Some(optimizer) = &part.optimizer {
            let file = format!("{}.optimizer.safetensors", part.name);
            tensorfile::write(&temp.join(&file), optimizer.state_tensors())?;
            files.push(file);
        }
    }
    let state_path = temp.join("state.json");
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    fs::write(&state_path, json).map_err(TrainError::io(&state_path))?;
    for file in files {
        let path = temp.join(file);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(TrainError::io(&path))?;
    }
    if target.exists() {
        fs::remove_dir_all(&target).map_err(TrainError::io(&target))?;
    }
    fs::rename(&temp, &target).map_err(TrainError::io(&target))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(TrainError::io(&dir))?;

    for entry in fs::read_dir(&dir).map_err(TrainError::io(&dir))? {
        let entry = entry.map_err(TrainError::io(&dir))?;
        let path = entry.path();
        if path != target {
            fs::remove_dir_all(&path).map_err(TrainError::io(&path))?;
        }
    }
    Ok(target)
}

/// Loads the checkpoint at `path` into `parts`; returns the loop's state.
pub fn load(path: &Path, parts: &mut [Part]) -> Result<TrainerState> {
    let state_path = path.join("state.json");
    let text = fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    for part in parts.iter_mut() {
        let weights_path = path.join(format!("{}.safetensors", part.name));
        let mut weights = TensorFile::open(&weights_path)?;
        let mut variables: Vec<(String, Tensor)> = part.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in variables {
            let exact = weights.read(&name, &var)?;
            if part
                .ema
                .as_deref_mut()
                .is_some_and(|ema| ema.restore(&name, &exact))
            {
                continue;
            }
            tch::no_grad(|| var.copy_(&exact));
            if let Some(optimizer) = part.optimizer.as_deref_mut() {
                optimizer.set_master(&name, &exact);
            }
        }
        if let Some(optimizer) = part.optimizer.as_deref_mut() {
            let file = path.join(format!("{}.optimizer.safetensors", part.name));
            let mut moments = TensorFile::open(&file)?;
            optimizer.load_state(&mut |name, like| moments.read(name, like))?;
        }
    }
    Ok(state)
}

/// Removes every checkpoint under `out` (once the final model is saved).
pub fn remove_all(out: &Path) -> Result<()> {
    let dir = out.join(CHECKPOINTS);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(TrainError::io(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tch::nn::Init;
    use tch::{Device, Kind};

    use super::*;
    use crate::optim::OptimConfig;

    /// A store with one matrix and one vector of weights that bf16 cannot hold exactly.
    fn store(kind: Kind) -> VarStore {
        let mut vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let mut w = root.var("w", &[8, 16], Init::Const(0.0));
        let mut b = root.var("b", &[16], Init::Const(0.0));
        tch::no_grad(|| {
            w.copy_(&(Tensor::arange(128, (Kind::Float, Device::Cpu)).view([8, 16]) * 1e-3 + 0.1));
            b.copy_(&(Tensor::arange(16, (Kind::Float, Device::Cpu)) * 1.234e-4 - 0.3));
        });
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs
    }

    fn state() -> TrainerState {
        TrainerState {
            step: 1,
            total_steps: 2,
            seed: 0,
            examples: 1,
            extra: serde_json::Value::Null,
        }
    }

    fn weights(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    #[test]
    fn an_fp32_checkpoint_resumes_into_bf16_and_back_without_losing_a_bit() {
        let dir = tempfile::tempdir().unwrap();
        let fp32 = store(Kind::Float);
        let exact: Vec<(String, Tensor)> = weights(&fp32)
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let mut opt = AdamW::new(&fp32, OptimConfig::default()).unwrap();
        let first = save(
            dir.path(),
            &[Part::trained("policy", &fp32, &mut opt)],
            &state(),
        )
        .unwrap();

        // Into bf16: the model computes with the rounded weights, the masters keep every bit.
        let bf16 = store(Kind::BFloat16);
        let mut opt = AdamW::new(&bf16, OptimConfig::default()).unwrap();
        load(&first, &mut [Part::trained("policy", &bf16, &mut opt)]).unwrap();
        let masters: std::collections::HashMap<String, Tensor> =
            opt.masters().into_iter().collect();
        for ((name, var), (_, value)) in weights(&bf16).iter().zip(&exact) {
            assert_eq!(var.kind(), Kind::BFloat16);
            assert!(var.equal(&value.to_kind(Kind::BFloat16)), "{name} rounded");
            assert!(
                masters[name].equal(value),
                "{name}'s master is the fp32 weight"
            );
        }

        // A bf16 checkpoint saves the masters, so fp32 continues from the exact weights.
        let second = save(
            dir.path(),
            &[Part::trained("policy", &bf16, &mut opt)],
            &state(),
        )
        .unwrap();
        let back = store(Kind::Float);
        tch::no_grad(|| {
            for (_, mut t) in back.variables() {
                let _ = t.zero_();
            }
        });
        let mut opt = AdamW::new(&back, OptimConfig::default()).unwrap();
        load(&second, &mut [Part::trained("policy", &back, &mut opt)]).unwrap();
        for ((name, var), (_, value)) in weights(&back).iter().zip(&exact) {
            assert!(var.equal(value), "{name} round-trips through bf16 exactly");
        }
        assert!(opt.masters().is_empty(), "an fp32 model needs no masters");
    }
}
