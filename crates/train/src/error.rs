//! Errors of the trainers: each names the file, row or setting at fault.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    Data { path: PathBuf, message: String },

    #[error("invalid setting `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },

    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged { step: u64, loss: f64 },

    #[error(transparent)]
    Model(#[from] prefloop_model::ModelError),

    #[error(transparent)]
    Stage(#[from] prefloop_data::DataError),

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// `Ok` when `ok`, else a config error naming `field`.
/// An error naming the first of `fields` that is 0: each must be at least 1.
pub(crate) fn at_least_one(fields: &[(&'static str, u64)]) -> Result<()> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => Err(TrainError::Config {
            field,
            message: "must be at least 1".into(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn ensure(ok: bool, field: &'static str, message: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(TrainError::Config {
            field,
            message: message.into(),
        })
    }
}
