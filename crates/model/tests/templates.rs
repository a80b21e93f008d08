//! The published chat templates (../shared/data/chat-templates: Qwen3, Gemma 2, Gemma 3,
//! Llama 3.x, Phi-3.5) render the same text in prefloop as in transformers'
//! `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, for a system + user +
//! assistant + user conversation and for one without the system turn; where transformers
//! refuses a conversation (Gemma has no system role), prefloop refuses it too. Skipped with a
//! message when the templates or the venv are absent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::venv_python;
use prefloop_model::{Message, Tokenizer};

/// transformers' rendering of `template` for each conversation, one JSON value per line: the
/// text, or null where the template raised.
const RENDER: &str = r#"
import json, sys
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
template_file, conversations, tokenizer_json = sys.argv[1:]
vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(tokenizer_json)
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<bos>", eos_token="<eos>")
template = open(template_file).read()
for messages in json.loads(conversations):
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
    except Exception:
        text = None
    print(json.dumps(text))
"#;

fn templates_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/chat-templates");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: needs ../shared/data/chat-templates");
        None
    }
}

#[test]
fn published_chat_templates_render_as_transformers_renders_them() {
    let (Some(python), Some(dir)) = (venv_python(&["transformers"]), templates_dir()) else {
        return;
    };
    let conversations = vec![
        vec![
            Message::new("system", "You are terse."),
            Message::new("user", "What is 2 + 3?"),
            Message::new("assistant", "5"),
            Message::new("user", "  And 4 + 4?\n"),
        ],
        vec![
            Message::new("user", "Name a prime."),
            Message::new("assistant", "<think>\nsmall ones\n</think>\n\n7"),
            Message::new("user", "Another."),
        ],
    ];
    let scratch = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the five published templates");
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let model = scratch.path().join(&name);
        std::fs::create_dir(&model).unwrap();
        let output = Command::new(&python)
            .args(["-c", RENDER])
            .arg(&file)
            .arg(serde_json::to_string(&conversations).unwrap())
            .arg(model.join("tokenizer.json"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "transformers on {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let template = std::fs::read_to_string(&file).unwrap();
        let config = serde_json::json!({ "chat_template": template, "eos_token": "<eos>" });
        std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
        let tokenizer = Tokenizer::from_hf_dir(&model, vec![2], Some(1)).unwrap();
        let theirs = String::from_utf8(output.stdout).unwrap();
        for (messages, theirs) in conversations.iter().zip(theirs.lines()) {
            let theirs: Option<String> = serde_json::from_str(theirs).unwrap();
            let ours = tokenizer.render_chat(messages, true);
            match theirs {
                Some(theirs) => {
                    assert_eq!(ours.unwrap(), theirs, "{name}: {} turns", messages.len())
                }
                None => assert!(
                    ours.is_err(),
                    "{name}: transformers refuses {} turns, prefloop renders them",
                    messages.len()
                ),
            }
        }
        eprintln!("{name}: renders as in transformers");
    }
}
