//! Errors of the sandbox itself. A program's misbehaviour is never an error: it is a verdict.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{}: the sandbox runtime is missing; run scripts/setup (it builds the runners)", .0.display())]
    MissingRuntime(PathBuf),
    #[error("unsupported language {0:?}: the sandbox runs python and cpp")]
    UnsupportedLanguage(String),
    #[error("C++ is not available: {0} (scripts/setup installs clang-19 and the wasm32 libraries)")]
    MissingToolchain(String),
    #[error("sample for problem {0:?}, which the problems stage does not have")]
    UnknownProblem(String),
    #[error("wasmtime: {0}")]
    Wasmtime(String),
    #[error("{0}")]
    Io(String),
}
