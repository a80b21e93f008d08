//! prefloop-sandbox: untrusted programs run against unit tests inside wasmtime, in-process.
//!
//! Python programs run in CPython compiled to a WASI component (scripts/setup builds it with
//! componentize-py from `sandbox/python/app.py`, with the interpreter initialised and the
//! common standard library imported ahead of time). C++ programs are compiled by clang-19 to
//! wasm32-wasi modules, once per source. Each test gets a fresh instance, its
//! input on stdin and nothing else: no files, no network, no threads or processes, bounded
//! time, memory and output. What the program does becomes a [`Verdict`](prefloop_core::Verdict);
//! only a failure of the sandbox itself is an error.

mod cpp;
mod error;
mod judge;
mod reward;
mod runtime;
mod score;

pub use error::SandboxError;
pub use judge::{
    Compare, JudgeOptions, Judgement, Language, Program, TestResult, TestStyle, apps_match,
    json_answer_matches, judge_run, tokens_match,
};
pub use reward::{RewardOptions, RewardProgram};
pub use runtime::{Exit, Limits, PYTHON_RUNNER, RunOutput, Sandbox, default_runtime_dir};
pub use score::{
    Calibration, ScoreOptions, TimePolicy, compare_for, extract_program, program_for, score_samples,
};

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
