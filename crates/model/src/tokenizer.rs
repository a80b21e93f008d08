//! The tokenizer and chat template of a model: from `tokenizer.json` + `tokenizer_config.json`
//! of a Hugging Face directory, or rebuilt from a GGUF file's `tokenizer.ggml.*` metadata as
//! the equivalent `tokenizer.json` (which is also what we save next to trained weights).

use std::path::Path;

use ggus::{GGuf, GGufMetaMap, GGufMetaMapExt};
use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};

/// llama.cpp's token type for control tokens (`<|im_start|>` …): added as special tokens.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The vocabulary a GGUF file carries.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub tokens: Vec<String>,
    merges: Vec<String>,
    token_types: Vec<i32>,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`).
    pre: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    pub(crate) fn from_gguf(gguf: &GGuf) -> Result<Self, String> {
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .map_err(|e| format!("tokenizer.ggml.model: {e:?}"))?;
        if model != "gpt2" {
            return Err(format!(
                "tokenizer `{model}` is not supported from GGUF (only byte-level BPE, `gpt2`); \
                 use the model's Hugging Face directory with its tokenizer.json"
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>, String> {
            gguf.get_str_arr(key)
                .map_err(|e| format!("{key}: {e:?}"))?
                .map(|s| s.map(str::to_owned).map_err(|e| format!("{key}: {e:?}")))
                .collect()
        };
        let id = |key: &str| gguf.get_u32(key).ok();
        let token_types = match gguf.get("tokenizer.ggml.token_type") {
            Some(_) => gguf
                .get_i32_arr("tokenizer.ggml.token_type")
                .map_err(|e| format!("tokenizer.ggml.token_type: {e:?}"))?
                .collect::<Result<Vec<i32>, _>>()
                .map_err(|e| format!("tokenizer.ggml.token_type: {e:?}"))?,
            None => Vec::new(),
        };
        Ok(Self {
            tokens: strings("tokenizer.ggml.tokens")?,
            merges: strings("tokenizer.ggml.merges")?,
            token_types,
            pre: gguf
                .get_str("tokenizer.ggml.pre")
                .unwrap_or("default")
                .to_owned(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            chat_template: gguf
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_owned),
        })
    }

    /// The Hugging Face `tokenizer.json` equivalent to this vocabulary.
    pub fn to_tokenizer_json(&self) -> Result<Value> {
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match self.pre.as_str() {
            "default" | "gpt2" | "gpt-2" => byte_level.clone(),
            // SmolLM, StarCoder: digits split one by one, then GPT-2's byte-level regex.
            "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level.clone(),
            ]}),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported; use the model's Hugging Face \
                     directory with its tokenizer.json"
                )));
            }
        };
        let vocab: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<Value> = self
            .token_types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == CONTROL || t == USER_DEFINED)
            .map(|(id, &t)| {
                json!({"id": id, "content": self.tokens[id], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": t == USER_DEFINED, "special": t == CONTROL})
            })
            .collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": self.merges},
        }))
    }
}

/// A tokenizer with the model's special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: Value,
    chat_template: Option<String>,
    bos: Option<u32>,
    /// Every id that ends generation.
    eos: Vec<u32>,
    /// The token a turn ends with (tokenizer_config.json's `eos_token`: Llama 3.1's
    /// `<|eot_id|>` among its three EOS ids), which trained answers are closed with.
    end_of_turn: Option<u32>,
}

impl Tokenizer {
    pub fn from_json(
        json: Value,
        chat_template: Option<String>,
        bos: Option<u32>,
        eos: Vec<u32>,
    ) -> Result<Self> {
        let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let end_of_turn = eos.first().copied();
        Ok(Self {
            inner,
            json,
            chat_template,
            bos,
            eos,
            end_of_turn,
        })
    }

    pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Self> {
        let eos = vocab.eos.into_iter().collect();
        Self::from_json(
            vocab.to_tokenizer_json()?,
            vocab.chat_template.clone(),
            vocab.bos,
            eos,
        )
    }

    /// `tokenizer.json` and, if present, `tokenizer_config.json` (chat template, special
    /// tokens) and `generation_config.json`, whose `eos_token_id` (one id or a list) wins over
    /// config.json's `eos_from_config` where it names any, as in transformers' `generate`.
    /// tokenizer_config.json's `eos_token` ends turns and generation too.
    pub fn from_hf_dir(dir: &Path, eos_from_config: Vec<u32>, bos: Option<u32>) -> Result<Self> {
        let read_json = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ModelError::Io { path, source }),
            }
        };
        let json = read_json("tokenizer.json")?.ok_or_else(|| {
            ModelError::Tokenizer(format!("{}: no tokenizer.json", dir.display()))
        })?;
        let config = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let chat_template = config
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let generation = read_json("generation_config.json")?
            .and_then(|g| g.get("eos_token_id").map(crate::config::token_ids))
            .filter(|ids| !ids.is_empty());
        let eos = generation.unwrap_or(eos_from_config);
        let mut tokenizer = Self::from_json(json, chat_template, bos, eos)?;
        let eos_token = config
            .get("eos_token")
            .and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()));
        if let Some(id) = eos_token.and_then(|t| tokenizer.inner.token_to_id(t)) {
            if !tokenizer.eos.contains(&id) {
                tokenizer.eos.push(id);
            }
            tokenizer.end_of_turn = Some(id);
        }
        Ok(tokenizer)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end a sequence.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The token the chat template ends a turn with (the tokenizer's `eos_token`, else the
    /// first EOS id): trained answers are closed with it, as TRL closes them.
    pub fn end_of_turn_id(&self) -> Option<u32> {
        self.end_of_turn
    }

    /// The id used to pad batches (the first EOS id; padding is masked out anyway).
    pub fn pad_id(&self) -> u32 {
        self.eos.first().copied().unwrap_or(0)
    }

    /// The `tokenizer.json` this tokenizer was built from, to save beside trained weights.
    pub fn json(&self) -> &Value {
        &self.json
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Renders one user message with the model's chat template, ready for the assistant's turn.
    pub fn apply_chat_template(&self, user: &str) -> Result<String> {
        self.render_chat(&[Message::new("user", user)], true)
    }

    /// Renders a conversation with the model's chat template as transformers'
    /// `apply_chat_template(..., tokenize=False)` does: the same variables (`messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`), Python's string methods (minijinja's
    /// pycompat), `raise_exception` and `strftime_now`.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Template("the model has no chat template; pass raw prompts".into())
        })?;
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        // Llama 3.x dates its system turn with it.
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template("chat", template)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let token = |id: Option<u32>| id.and_then(|id| self.token_text(id)).unwrap_or_default();
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => token(self.bos),
                    eos_token => token(self.end_of_turn),
                })
            })
            .map_err(|e| ModelError::Template(e.to_string()))
    }
}

/// One turn of a conversation, as chat templates read it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// "system", "user", "assistant" (or "tool").
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}
