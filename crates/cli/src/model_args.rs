//! The flags of every command that loads one model: which weights, in which precision.

use std::path::PathBuf;

use anyhow::Result;
use prefloop_model::{Model, Precision};
use tch::Device;

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face directory; the embedded default when omitted.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Precision: auto (bf16 on a CUDA GPU, fp32 on the CPU), bf16 or fp32. Baselines a
    /// command runs beside it use the same one.
    #[arg(long, default_value_t = Precision::Auto)]
    pub dtype: Precision,
}

impl ModelArgs {
    /// The model on `device` in the chosen precision.
    pub fn load(&self, device: Device) -> Result<Model> {
        Ok(Model::load(self.model.as_deref(), device, self.dtype)?)
    }
}
