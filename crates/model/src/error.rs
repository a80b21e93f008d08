//! Errors of the model crate: each names the file, tensor or setting at fault.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: not a readable GGUF file: {message}", path.display())]
    Gguf { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    #[error("unknown architecture `{model_type}`: prefloop runs {known}")]
    UnknownArchitecture { model_type: String, known: String },

    #[error("{model_type}: {message}")]
    Unsupported { model_type: String, message: String },

    #[error("{}: missing weight `{name}`", path.display())]
    MissingWeight { path: PathBuf, name: String },

    #[error("{}: weight `{name}` has shape {found:?}, the config implies {expected:?}", path.display())]
    WeightShape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("{}: tensor `{name}` is stored as {kind}, which prefloop cannot dequantise (F32, F16, BF16, Q8_0, Q4_0, Q4_1)", path.display())]
    UnsupportedQuant {
        path: PathBuf,
        name: String,
        kind: String,
    },

    #[error("the tokenizer has {tokenizer} tokens but the embeddings have {embeddings} rows")]
    VocabMismatch { tokenizer: usize, embeddings: usize },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("no model given and the embedded default is not installed at {}: run scripts/setup, or pass --model", .0.display())]
    NoDefaultModel(PathBuf),

    /// A generator could not sample (generator.rs): what it was asked and why not.
    #[error("generator: {0}")]
    Generator(String),

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
