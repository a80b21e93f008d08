//! prefloop-pipeline: rounds over a run directory. Each round generates from the current
//! policy, scores (sandboxed tests or a reward model), pairs best against worst and trains the
//! next policy; every stage writes durably and records its completion, so a run killed at
//! any point continues with `prefloop resume`. The generate and score stages are also what
//! `prefloop generate` and `prefloop score-tests` run on their own.

mod config;
mod dpo_iter;
mod error;
mod eval;
mod generate;
mod inputs;
mod metrics;
mod online_rounds;
mod prompt_source;
mod report;
mod rounds;
mod run_dir;
mod score;
mod shard;
mod tensorboard;

pub use config::{
    Algorithm, DataConfig, EvalConfig, GenerateConfig, PairsConfig, RunConfig, ScoreConfig,
    ScorerKind, ScorerList, WhenExhausted, unknown_keys,
};
pub use dpo_iter::{KL_TO_PREVIOUS, REPLAY_DIR};
pub use error::{PipelineError, Result};
pub use eval::EVAL_DIR;
pub use generate::{GenerateReport, PromptRow, generate_stage, read_prompts, row_seed};
pub use inputs::PROBLEMS_DIR;
pub use metrics::RoundMetrics;
pub use online_rounds::{GROUP_DIR, PPO_DIR};
pub use prompt_source::{RoundPrompts, SourceFile};
pub use report::{REPORT_FILE, write_report};
pub use rounds::run_rounds;
pub use run_dir::{
    CONFIG_FILE, Extension, LOCK_FILE, METRICS_FILE, POLICY_LINK, RoundState, Rounds, RunDir,
    RunState, STATE_FILE, Stage, read_state,
};
pub use score::{
    ProgramFields, ScoreReport, Scorer, Task, read_problems, reward_options, rollout_samples,
    score_options, score_program_stage, score_rm_stage, score_stage_with, score_tests_stage,
};
pub use shard::{Shard, merge_shards};
pub use tensorboard::{TENSORBOARD_DIR, write_events};
