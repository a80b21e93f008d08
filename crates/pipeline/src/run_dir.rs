//! The run directory (DESIGN §2): a lock so one process works on it at a time, the frozen
//! config and its hash, `state.json` (which stages of which rounds are complete) and the paths
//! of each round's stages.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{PipelineError, Result};
use crate::prompt_source::RoundPrompts;

pub const CONFIG_FILE: &str = "config.toml";
pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = ".lock";
/// `<run>/policy`: the newest trained policy, a symlink switched atomically after each round.
pub const POLICY_LINK: &str = "policy";
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
    /// The run stopped before this round: its growing prompt source had nothing new
    /// (`data.when_exhausted = "stop"`); the same command continues once a file arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_prompts: Option<u32>,
    /// Every `--rounds +N` extension, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<Extension>,
    /// SHA-256 of the reward program (`scorer = "program"`) as first read: every round is
    /// scored by the same program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_sha256: Option<String>,
}

/// `--rounds N` (set) or `--rounds +N` (that many more than the run has trained).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounds {
    Set(u32),
    More(u32),
}

impl std::str::FromStr for Rounds {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("{s:?}: expected N or +N (rounds)");
        match s.strip_prefix('+') {
            Some(n) => n.parse().map(Self::More).map_err(|_| bad()),
            None => s.parse().map(Self::Set).map_err(|_| bad()),
        }
    }
}

/// A change of the run's `rounds` by `--rounds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub from: u32,
    pub to: u32,
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
    /// What the round samples, where the run chooses prompts round by round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<RoundPrompts>,
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
    /// `rounds` sets the rounds (`--rounds N`) or adds to those the run has trained
    /// (`--rounds +N`), the one difference from the frozen config allowed without
    /// `allow_change`; the frozen config and `state.json` record it.
    pub fn start(
        root: &Path,
        config: &RunConfig,
        allow_change: bool,
        rounds: Option<Rounds>,
    ) -> Result<(Self, RunConfig)> {
        let dir = Self::lock(root)?;
        let frozen_path = dir.root.join(CONFIG_FILE);
        let mut config = config.clone();
        if frozen_path.exists() {
            let frozen = RunConfig::load(&frozen_path)?;
            if let Some(rounds) = rounds {
                config.rounds = dir.rounds_after(rounds, &frozen)?;
                let mut unchanged = frozen.clone();
                unchanged.rounds = config.rounds;
                if unchanged.hash() == config.hash() {
                    dir.extend(&frozen, &config)?;
                    return Ok((dir, config));
                }
            }
            if frozen.hash() != config.hash() {
                if !allow_change {
                    return Err(PipelineError::ConfigChanged {
                        run: dir.root.clone(),
                        frozen: frozen.hash(),
                        given: config.hash(),
                    });
                }
                tracing::warn!(run = %dir.root.display(), "the run's config changes: later stages follow the new one");
                dir.freeze(&config)?;
            }
        } else {
            if let Some(rounds) = rounds {
                config.rounds = dir.rounds_after(rounds, &config)?;
            }
            dir.freeze(&config)?;
        }
        Ok((dir, config))
    }

    /// The rounds a run is to have after `--rounds`: N, or N more than it has trained.
    fn rounds_after(&self, rounds: Rounds, frozen: &RunConfig) -> Result<u32> {
        let state = self.state()?;
        let trained = (0..frozen.rounds)
            .take_while(|&r| state.is_complete(r, Stage::Train))
            .count() as u32;
        let target = match rounds {
            Rounds::Set(n) => n,
            Rounds::More(n) => trained + n,
        };
        if target < trained {
            return Err(PipelineError::Config {
                path: self.root.join(CONFIG_FILE),
                message: format!(
                    "the run has trained {trained} rounds: --rounds {target} would undo them"
                ),
            });
        }
        Ok(target)
    }

    /// Gives the run `config`'s rounds (its only change from `frozen`). A final generation
    /// that already ran becomes the first added round: where every round samples the same
    /// prompts its stages are that round's (same policy, prompts and seeds), and only its
    /// metrics are redone; where the run chooses prompts round by round, it moves aside to
    /// `round-NNNN-final` and the round samples its own.
    fn extend(&self, frozen: &RunConfig, config: &RunConfig) -> Result<()> {
        if frozen.rounds == config.rounds {
            return Ok(());
        }
        let mut state = self.state()?;
        let last = frozen.rounds;
        if frozen.final_generation && config.rounds > last {
            if crate::prompt_source::per_round(config) {
                let from = self.round_dir(last);
                if from.exists() {
                    let mut to = from.clone().into_os_string();
                    to.push("-final");
                    let to = PathBuf::from(to);
                    if to.exists() {
                        std::fs::remove_dir_all(&to).map_err(PipelineError::io(&to))?;
                    }
                    std::fs::rename(&from, &to).map_err(PipelineError::io(&from))?;
                }
                state.rounds.retain(|r| r.round != last);
            } else if let Some(entry) = state.rounds.iter_mut().find(|r| r.round == last) {
                entry.metrics.clear();
            }
        }
        tracing::info!(
            from = frozen.rounds,
            to = config.rounds,
            "the run's rounds change"
        );
        state.extensions.push(Extension {
            from: frozen.rounds,
            to: config.rounds,
        });
        self.save_state(&state)?;
        self.freeze(config)
    }

    /// Reopens a run that was started before, with its frozen config; `rounds` as
    /// [`RunDir::start`] takes it.
    pub fn resume(root: &Path, rounds: Option<Rounds>) -> Result<(Self, RunConfig)> {
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
        let frozen = RunConfig::load(&frozen_path)?;
        let Some(rounds) = rounds else {
            return Ok((dir, frozen));
        };
        let mut config = frozen.clone();
        config.rounds = dir.rounds_after(rounds, &frozen)?;
        dir.extend(&frozen, &config)?;
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
        round_path(&self.root, round)
    }

    /// The directory of `stage` in `round`.
    pub fn stage_dir(&self, round: u32, stage: Stage) -> PathBuf {
        self.round_dir(round).join(stage.dir_name())
    }

    /// Where a round's trained policy is published (DESIGN §2: `round-NNNN/policy`).
    pub fn policy_dir(&self, round: u32) -> PathBuf {
        self.round_dir(round).join(prefloop_train::POLICY_DIR)
    }

    /// Points `<run>/policy` at `target` (a trained policy inside the run): a relative
    /// symlink, made beside it and renamed over the old one, so a server that reads
    /// `<run>/policy` sees the previous policy or the new one, never a partial one.
    pub fn publish_policy(&self, target: &Path) -> Result<()> {
        let relative = target.strip_prefix(&self.root).unwrap_or(target);
        let link = self.root.join(POLICY_LINK);
        let temp = self.root.join(format!(".{POLICY_LINK}.tmp"));
        if temp.symlink_metadata().is_ok() {
            std::fs::remove_file(&temp).map_err(PipelineError::io(&temp))?;
        }
        std::os::unix::fs::symlink(relative, &temp).map_err(PipelineError::io(&temp))?;
        std::fs::rename(&temp, &link).map_err(PipelineError::io(&link))?;
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(PipelineError::io(&self.root))
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

/// `ROOT/round-NNNN`: the one place a round's directory is named.
pub fn round_path(root: &Path, round: u32) -> PathBuf {
    root.join(format!("round-{round:04}"))
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
        let (held, _) = RunDir::start(dir.path(), &config(), false, None).unwrap();
        let err = RunDir::resume(dir.path(), None).unwrap_err();
        assert!(matches!(err, PipelineError::Locked { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        drop(held);
        RunDir::resume(dir.path(), None).unwrap();
    }

    #[test]
    fn a_changed_config_is_an_error_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        drop(RunDir::start(dir.path(), &config(), false, None).unwrap());
        drop(RunDir::start(dir.path(), &config(), false, None).unwrap());
        let mut changed = config();
        changed.dpo.beta = 0.5;
        let err = RunDir::start(dir.path(), &changed, false, None).unwrap_err();
        assert!(matches!(err, PipelineError::ConfigChanged { .. }), "{err}");
        assert_eq!(err.exit_code(), 4);
        let (run, _) = RunDir::start(dir.path(), &changed, true, None).unwrap();
        assert_eq!(run.state().unwrap().config_hash, changed.hash());
        drop(run);
        let (_, frozen) = RunDir::resume(dir.path(), None).unwrap();
        assert_eq!(frozen, changed);
    }

    #[test]
    fn resuming_a_directory_that_is_not_a_run_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunDir::resume(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("not a run directory"), "{err}");
    }

    #[test]
    fn rounds_parse_as_a_count_or_as_more() {
        assert_eq!("3".parse::<Rounds>(), Ok(Rounds::Set(3)));
        assert_eq!("+1".parse::<Rounds>(), Ok(Rounds::More(1)));
        assert!(
            "+x".parse::<Rounds>()
                .unwrap_err()
                .contains("expected N or +N")
        );
        assert!("-1".parse::<Rounds>().is_err());
    }

    #[test]
    fn more_rounds_than_trained_extend_a_run_and_fewer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (run, frozen) = RunDir::start(dir.path(), &config(), false, None).unwrap();
        drop(run);
        let more = frozen.rounds + 1;
        let (run, extended) = RunDir::resume(dir.path(), Some(Rounds::More(more))).unwrap();
        assert_eq!(extended.rounds, more, "nothing trained yet: +N is N");
        let state = run.state().unwrap();
        let expected = Extension {
            from: frozen.rounds,
            to: more,
        };
        assert_eq!(state.extensions, vec![expected]);
        assert_eq!(state.config_hash, extended.hash());
        drop(run);
        // The frozen config records the change; the same config with --rounds is no change.
        let (_, again) =
            RunDir::start(dir.path(), &config(), false, Some(Rounds::Set(more))).unwrap();
        assert_eq!(again, extended);
        // A config that differs otherwise still needs --allow-config-change.
        let mut changed = config();
        changed.dpo.beta = 0.5;
        let err = RunDir::start(dir.path(), &changed, false, Some(Rounds::More(1))).unwrap_err();
        assert!(matches!(err, PipelineError::ConfigChanged { .. }), "{err}");
    }

    #[test]
    fn the_policy_link_switches_to_the_newest_policy_and_is_relative() {
        let dir = tempfile::tempdir().unwrap();
        let (run, _) = RunDir::start(dir.path(), &config(), false, None).unwrap();
        for round in 0..2 {
            let policy = run.policy_dir(round);
            std::fs::create_dir_all(&policy).unwrap();
            std::fs::write(policy.join("config.json"), format!("{round}")).unwrap();
            run.publish_policy(&policy).unwrap();
            let link = dir.path().join(POLICY_LINK);
            let target = std::fs::read_link(&link).unwrap();
            assert!(target.is_relative(), "{}", target.display());
            let text = std::fs::read_to_string(link.join("config.json")).unwrap();
            assert_eq!(text, round.to_string());
        }
        assert!(!dir.path().join(format!(".{POLICY_LINK}.tmp")).exists());
    }
}
