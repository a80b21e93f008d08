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
    /// A PEFT LoRA adapter directory applied on top of --model, unmerged (peft's
    /// `save_pretrained`, or the `adapter/` of a policy prefloop trained with LoRA).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The model on `device` in the chosen precision.
    pub fn load(&self, device: Device) -> Result<Model> {
        let model = Model::load(self.model.as_deref(), device, self.dtype)?;
        Ok(match &self.adapter {
            Some(dir) => model.load_adapter(dir)?,
            None => model,
        })
    }
}
