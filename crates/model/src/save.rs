//! Saving a model as a Hugging Face directory that `transformers` loads:
//! model.safetensors, config.json, tokenizer.json, tokenizer_config.json,
//! generation_config.json (a reward model, with its `score` head, as a sequence classifier).
//! A model with LoRA adapters is saved merged (base + (α / r) · B A), plus the adapters alone
//! in `adapter/`, a PEFT directory.
//! Written to a hidden sibling directory first and renamed into place,
//! so the directory either is complete or does not exist.

use std::path::Path;

use serde_json::{Value, json};
use tch::{Device, Tensor};

use crate::blocks::split_projections;
use crate::error::{ModelError, Result};
use crate::load::Model;

/// Where a saved model with LoRA adapters keeps them alone, as a PEFT directory.
pub const ADAPTER_DIR: &str = "adapter";

impl Model {
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ModelError::Io { path, source }
        };
        if dir.exists() {
            return Err(ModelError::Io {
                path: dir.to_owned(),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let temp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::create_dir_all(&temp).map_err(io(&temp))?;
        let written = self.write_files(&temp);
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
        std::fs::rename(&temp, dir).map_err(io(dir))
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        // With LoRA adapters attached: the base with the adapters merged in, and the adapters
        // alone as a PEFT directory beside it.
        let named: Vec<(String, Tensor)> = self
            .merged_weights()
            .into_iter()
            .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        if self.adapters.is_some() {
            self.save_adapter(&dir.join(ADAPTER_DIR))?;
        }
        // Hugging Face's names: the fused projections split back into q/k/v and gate/up, but
        // for a family whose checkpoints keep them fused.
        let named = if crate::arch::fused_checkpoint(self.decoder.config()) {
            named
        } else {
            split_projections(named, self.decoder.config())
        };
        Tensor::write_safetensors(&named, dir.join("model.safetensors"))?;

        let config = self.decoder.config();
        let family = crate::arch::family(config)?;
        // A reward model (a scalar `score` head on the trunk) is transformers' sequence
        // classifier with one label; anything else is a causal LM.
        let reward_model = named.iter().any(|(name, _)| name == "score.weight");
        let architecture = if reward_model {
            family.classifier
        } else {
            family.causal_lm
        };
        let dtype = match named.first().map(|(_, t)| t.kind()) {
            Some(tch::Kind::BFloat16) => "bfloat16",
            Some(tch::Kind::Half) => "float16",
            _ => "float32",
        };
        let mut config_json = serde_json::to_value(config).expect("a config serialises");
        config_json["architectures"] = json!([architecture]);
        if config.hidden_act.is_none() && config.hidden_activation.is_none() {
            config_json["hidden_act"] = json!("silu");
        }
        config_json["torch_dtype"] = json!(dtype);
        if reward_model {
            config_json["num_labels"] = json!(1);
            config_json["pad_token_id"] = json!(self.tokenizer.pad_id());
        }
        // Every EOS id (Llama 3.1's three), as one id where there is one, as transformers
        // writes them.
        let eos = self.tokenizer.eos_ids().to_vec();
        config_json["eos_token_id"] = match eos.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            ids => json!(ids),
        };
        let token = |id: Option<u32>| id.and_then(|id| self.tokenizer.token_text(id));
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.tokenizer.chat_template(),
            "bos_token": token(config.bos_token_id),
            "eos_token": token(self.tokenizer.end_of_turn_id()),
            "pad_token": token(Some(self.tokenizer.pad_id())),
            "model_max_length": config.max_position_embeddings,
            // A decoder takes no token_type_ids (PreTrainedTokenizerFast's default names
            // them, and generate() refuses the model_kwargs it cannot use).
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": false,
        });
        let generation_config = json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.tokenizer.pad_id(),
        });
        let files: [(&str, &Value); 4] = [
            ("config.json", &config_json),
            ("tokenizer.json", self.tokenizer.json()),
            ("tokenizer_config.json", &tokenizer_config),
            ("generation_config.json", &generation_config),
        ];
        for (file, value) in files {
            let path = dir.join(file);
            let text = serde_json::to_string_pretty(value).expect("JSON serialises");
            std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })?;
        }
        Ok(())
    }
}
