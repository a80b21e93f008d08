//! Errors of the pipeline. Each names the run, file or setting at fault, and maps to an exit
//! code a scheduler can act on (see [`PipelineError::exit_code`]).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A config that does not parse or holds a bad value.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// The run directory was started with another config.
    #[error(
        "{}: the run was started with another config (frozen hash {frozen}, this one {given}); \
         resume it as it is with `prefloop resume`, or pass --allow-config-change",
        run.display()
    )]
    ConfigChanged {
        run: PathBuf,
        frozen: String,
        given: String,
    },

    /// Another process holds the run directory.
    #[error("{}: another prefloop process is working on this run (lock {})", run.display(), lock.display())]
    Locked { run: PathBuf, lock: PathBuf },

    #[error("{}: {message}", path.display())]
    Data { path: PathBuf, message: String },

    #[error(transparent)]
    Stage(#[from] prefloop_data::DataError),

    #[error(transparent)]
    Model(#[from] prefloop_model::ModelError),

    #[error(transparent)]
    Sandbox(#[from] prefloop_sandbox::SandboxError),

    #[error(transparent)]
    Train(#[from] prefloop_train::TrainError),
}

impl PipelineError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// The process exit code for this error: 3 the run is locked by another process (try
    /// later), 4 the config or the run's frozen config is at fault (a person must look),
    /// 1 anything else (a failed stage: `prefloop resume` continues once it is fixed).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Locked { .. } => 3,
            Self::Config { .. } | Self::ConfigChanged { .. } => 4,
            _ => 1,
        }
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
