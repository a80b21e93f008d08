//! Reward programs: a user's Python file defining `reward(prompt, completion, **fields) ->
//! float` (format checks, exact answers, length penalties, rubrics), run in the sandbox with
//! the usual limits, one fresh instance per sample, as TRL's, OpenRLHF's and veRL's users
//! write their rewards, but never in the trainer's process.
//!
//! A program that raises, runs out of time or memory, or returns something other than a
//! finite number does not stop anything: the sample gets the failure reward and a verdict
//! saying why (RE with the exception's type, TLE, MLE, OLE; RE "returned …" for a value that
//! is not a number; CE for a program that does not compile).

use std::path::{Path, PathBuf};

use prefloop_core::{Sample, Score, Scorer, TestCase, Verdict};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::judge::{Compare, JudgeOptions, Language, Program, TestStyle, judge_run};
use crate::runtime::{Limits, Sandbox};
use crate::{Result, SandboxError};

/// The function the runner calls: the user's `reward` with the problem's fields by name.
const ENTRY: &str = "__prefloop_reward";

/// A reward program, read once.
#[derive(Debug, Clone)]
pub struct RewardProgram {
    path: PathBuf,
    /// The user's source with the entry point appended.
    program: Program,
    sha256: String,
}

/// How reward programs run.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardOptions {
    /// Per sample; `fuel` makes the verdicts reproducible as for tests.
    pub limits: Limits,
    /// The reward of a sample whose program failed (raised, timed out, returned a
    /// non-number). Default 0.
    pub failure_reward: f32,
}

impl Default for RewardOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            failure_reward: 0.0,
        }
    }
}

impl RewardProgram {
    /// Reads the program at `path` (it must define `reward`; whether it does is found when it
    /// runs, as any other failure of the program).
    pub fn read(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| SandboxError::Io(format!("{}: {e}", path.display())))?;
        let sha256 = format!("{:x}", Sha256::digest(source.as_bytes()));
        // Appended, so the user's line numbers stay those of their file in tracebacks.
        let source = format!(
            "{source}\n\n\ndef {ENTRY}(prompt, completion, fields):\n    \
             return reward(prompt, completion, **fields)\n"
        );
        Ok(Self {
            path: path.to_owned(),
            program: Program {
                language: Language::Python,
                source,
                style: TestStyle::Call {
                    fn_name: ENTRY.into(),
                },
            },
            sha256,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the file as read: what a run records, so a changed program is noticed.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Scores `samples` in parallel, each in a fresh instance; `fields` gives a sample's
    /// problem fields (passed to `reward` by name), none when it has none.
    pub fn score(
        &self,
        sandbox: &Sandbox,
        samples: &[Sample],
        fields: &(dyn Fn(&str) -> Option<serde_json::Map<String, serde_json::Value>> + Sync),
        options: &RewardOptions,
    ) -> Result<Vec<Score>> {
        samples
            .par_iter()
            .map(|sample| {
                let fields = fields(&sample.problem_id).unwrap_or_default();
                self.score_one(sandbox, sample, fields, options)
            })
            .collect()
    }

    fn score_one(
        &self,
        sandbox: &Sandbox,
        sample: &Sample,
        fields: serde_json::Map<String, serde_json::Value>,
        options: &RewardOptions,
    ) -> Result<Score> {
        let arguments = serde_json::json!([sample.prompt, sample.completion, fields]);
        let test = TestCase {
            input: arguments.to_string(),
            output: String::new(),
        };
        let judge = JudgeOptions {
            limits: options.limits,
            ..JudgeOptions::default()
        };
        let run = sandbox.run_program(&self.program, &test, &judge)?;
        let judged = judge_run(&run, &self.program, None, Compare::Tokens);
        let (verdict, reward) = match judged.verdict {
            Verdict::Ok => match reward_value(&run.stdout) {
                Ok(reward) => (Verdict::Ok, reward),
                Err(why) => {
                    tracing::debug!(problem = %sample.problem_id, why, "reward program");
                    (Verdict::RuntimeError, options.failure_reward)
                }
            },
            verdict => {
                tracing::debug!(problem = %sample.problem_id, ?verdict, detail = judged.detail, "reward program");
                (verdict, options.failure_reward)
            }
        };
        Ok(Score {
            problem_id: sample.problem_id.clone(),
            sample_idx: sample.sample_idx,
            round: sample.round,
            reward,
            scorer: Scorer::Program,
            // No tests ran (as for a reward model): pass@k is not this scorer's to report.
            passed: 0,
            total: 0,
            verdict,
            wall_ms: judged.wall.as_secs_f32() * 1e3,
        })
    }
}

/// The number `reward` returned (the runner prints the JSON of the returned value), or what it
/// returned instead.
fn reward_value(stdout: &[u8]) -> std::result::Result<f32, String> {
    let text = String::from_utf8_lossy(stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|_| format!("returned {}, not a number", text.trim()))?;
    let kind = match &value {
        serde_json::Value::Number(n) => {
            let reward = n.as_f64().unwrap_or(f64::NAN) as f32;
            return if reward.is_finite() {
                Ok(reward)
            } else {
                Err(format!("returned {n}, not a finite f32"))
            };
        }
        serde_json::Value::Null => "None",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::String(_) => "a str",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a dict",
    };
    Err(format!("returned {kind}, not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finite_numbers_are_rewards() {
        assert_eq!(reward_value(b"1.5"), Ok(1.5));
        assert_eq!(reward_value(b"-3"), Ok(-3.0));
        for (out, says) in [
            (&b"\"10\""[..], "a str"),
            (b"true", "a bool"),
            (b"null", "None"),
            (b"NaN", "NaN"),
            (b"Infinity", "Infinity"),
            (b"[1]", "a list"),
            (b"1e300", "finite"),
        ] {
            let why = reward_value(out).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }
}
