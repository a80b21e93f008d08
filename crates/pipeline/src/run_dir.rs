//! The run directory (DESIGN §2): a lock so one process works on it at a time, the frozen
//! config and its hash, `state.json` (which stages of which rounds are complete) and the paths
//! of each round's stages.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{PipelineError, Result};

pub const CONFIG_FILE: &str = "config.toml";
pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = ".lock";
/// One line per round: what the round measured (reward, pass@k, losses, times).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A stage of a round, in the order a round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Generate,
    Score,
    Pairs,
    Train,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Score => "score",
            Self::Pairs => "pairs",
            Self::Train => "train",
        }
    }

    /// The stage's directory under its round.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Generate => "samples",
            Self::Score => "scores",
            Self::Pairs => "pairs",
            Self::Train => "train",
        }
    }
}

/// What is complete. Written atomically after every stage, so it never claims more than the
/// stages' own manifests hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Hash of the frozen config the run works to.
    pub config_hash: String,
    pub rounds: Vec<RoundState>,
    /// Every round, and the final generation if configured, is complete.
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundState {
    pub round: u32,
    /// The policy the round samples from; for DPO-Iter also the reference of its update.
    pub policy: PathBuf,
    /// Completed stages with their wall time in seconds.
    pub completed: BTreeMap<Stage, f64>,
    /// The policy the round trained, once `train` is complete: the next round's policy.
    pub trained: Option<PathBuf>,
    /// What the stages measured so far (tokens/s, pairs, the update's summary).
    #[serde(default)]
    pub measured: BTreeMap<String, f64>,
    /// The round's line of `metrics.jsonl`, once all its stages are complete.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

impl RunState {
    pub fn round(&self, round: u32) -> Option<&RoundState> {
        self.rounds.iter().find(|r| r.round == round)
    }

    pub fn is_complete(&self, round: u32, stage: Stage) -> bool {
        self.round(round)
            .is_some_and(|r| r.completed.contains_key(&stage))
    }
}

/// An open run directory. Holding one holds the run's lock; dropping it (or the process dying,
/// even by kill -9) releases it.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Opens `root` (creating it) and takes its lock, or fails with `Locked` at once.
    pub fn lock(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(PipelineError::io(root))?;
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(PipelineError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(PipelineError::Locked {
                    run: root.to_owned(),
                    lock: path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(PipelineError::io(&path)(e)),
        }
        Ok(Self {
            root: root.to_owned(),
            _lock: file,
        })
    }

    /// Starts the run with `config`, or, when it was started before, checks that `config`
    /// is the one it was frozen with (`allow_change` replaces the frozen copy instead).
    pub fn start(root: &Path, config: &RunConfig, allow_change: bool) -> Result<(Self, RunConfig)> {
        let dir = Self::lock(root)?;
        let frozen_path = dir.root.join(CONFIG_FILE);
        if frozen_path.exists() {
            let frozen = RunConfig::load(&frozen_path)?;
            if frozen.hash() != config.hash() {
                if !allow_change {
                    return Err(PipelineError::ConfigChanged {
                        run: dir.root.clone(),
                        frozen: frozen.hash(),
                        given: config.hash(),
                    });
                }
                tracing::warn!(run = %dir.root.display(), "the run's config changes: later stages follow the new one");
                dir.freeze(config)?;
            }
        } else {
            dir.freeze(config)?;
        }
        Ok((dir, config.clone()))
    }

    /// Reopens a run that was started before, with its frozen config.
    pub fn resume(root: &Path) -> Result<(Self, RunConfig)> {
        let frozen_path = root.join(CONFIG_FILE);
        if !frozen_path.exists() {
            return Err(PipelineError::Config {
                path: frozen_path,
                message:
                    "not a run directory: it has no frozen config (start it with `prefloop run`)"
                        .into(),
            });
        }
        let dir = Self::lock(root)?;
        let config = RunConfig::load(&frozen_path)?;
        Ok((dir, config))
    }

    fn freeze(&self, config: &RunConfig) -> Result<()> {
        let path = self.root.join(CONFIG_FILE);
        prefloop_data::write_atomic(&path, config.to_toml().as_bytes())?;
        let mut state = self.state()?;
        state.config_hash = config.hash();
        // A changed config may add rounds to a run that had finished.
        state.finished = false;
        self.save_state(&state)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `round-NNNN/`.
    pub fn round_dir(&self, round: u32) -> PathBuf {
        self.root.join(format!("round-{round:04}"))
    }

    /// The directory of `stage` in `round`.
    pub fn stage_dir(&self, round: u32, stage: Stage) -> PathBuf {
        self.round_dir(round).join(stage.dir_name())
    }

    /// Where a round's trained policy is published (DESIGN §2: `round-NNNN/policy`).
    pub fn policy_dir(&self, round: u32) -> PathBuf {
        self.round_dir(round).join(prefloop_train::POLICY_DIR)
    }

    pub fn state(&self) -> Result<RunState> {
        read_state(&self.root)
    }

    pub fn save_state(&self, state: &RunState) -> Result<()> {
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        prefloop_data::write_atomic(&self.root.join(STATE_FILE), &json)?;
        Ok(())
    }
}

/// The state of the run at `root`, without taking its lock (for `prefloop status`).
pub fn read_state(root: &Path) -> Result<RunState> {
    let path = root.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PipelineError::Data {
            path,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunState::default()),
        Err(e) => Err(PipelineError::io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        let mut config = RunConfig::default();
        config.data.problems = PathBuf::from("/problems");
        config
    }

    #[test]
    fn a_second_process_on_the_same_run_is_refused_while_the_first_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let (held, _) = RunDir::start(dir.path(), &config(), false).unwrap();
        let err = RunDir::resume(dir.path()).unwrap_err();
        assert!(matches!(err, PipelineError::Locked { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        drop(held);
        RunDir::resume(dir.path()).unwrap();
    }

    #[test]
    fn a_changed_config_is_an_error_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        drop(RunDir::start(dir.path(), &config(), false).unwrap());
        drop(RunDir::start(dir.path(), &config(), false).unwrap());
        let mut changed = config();
        changed.dpo.beta = 0.5;
        let err = RunDir::start(dir.path(), &changed, false).unwrap_err();
        assert!(matches!(err, PipelineError::ConfigChanged { .. }), "{err}");
        assert_eq!(err.exit_code(), 4);
        let (run, _) = RunDir::start(dir.path(), &changed, true).unwrap();
        assert_eq!(run.state().unwrap().config_hash, changed.hash());
        drop(run);
        let (_, frozen) = RunDir::resume(dir.path()).unwrap();
        assert_eq!(frozen, changed);
    }

    #[test]
    fn resuming_a_directory_that_is_not_a_run_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunDir::resume(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a run directory"), "{err}");
    }
}
