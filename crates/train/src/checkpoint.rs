//! Training checkpoints: `<out>/checkpoints/step-NNNNNNNN/` holding, for each trained part
//! (the policy; PPO adds its critic and EMA reference), its weights (`NAME.safetensors`) and
//! optimiser moments and master weights (`NAME.optimizer.safetensors`), and the loop's position
//! (state.json). Each is written into a hidden temp directory, fsynced and
//! renamed into place, so a checkpoint directory that exists is whole; older ones are removed
//! only after a newer one is in place.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor, nn::VarStore};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;

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

/// One model in a checkpoint, with its optimiser when it is being trained.
#[derive(Debug)]
pub struct Part<'a> {
    pub name: &'static str,
    pub vs: &'a VarStore,
    pub optimizer: Option<&'a mut AdamW>,
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

    let cpu = |named: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
        named
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
            .collect()
    };
    let mut files = vec!["state.json".to_string()];
    for part in parts {
        let mut weights = cpu(part.vs.variables().into_iter().collect());
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        let file = format!("{}.safetensors", part.name);
        Tensor::write_safetensors(&weights, temp.join(&file))?;
        files.push(file);
        if let Some(optimizer) = &part.optimizer {
            let file = format!("{}.optimizer.safetensors", part.name);
            Tensor::write_safetensors(&cpu(optimizer.state_tensors()), temp.join(&file))?;
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
    let read = |file: &Path| -> Result<Vec<(String, Tensor)>> {
        Tensor::read_safetensors(file).map_err(|e| TrainError::Checkpoint {
            path: file.to_owned(),
            message: format!("not a readable safetensors file: {e}"),
        })
    };
    for part in parts.iter_mut() {
        let weights_path = path.join(format!("{}.safetensors", part.name));
        prefloop_model::fill(part.vs, read(&weights_path)?, &weights_path)?;
        if let Some(optimizer) = part.optimizer.as_deref_mut() {
            let file = path.join(format!("{}.optimizer.safetensors", part.name));
            optimizer.load_state(read(&file)?, &file)?;
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
