//! Preference datasets → `pairs` rows: HH-RLHF, PKU-SafeRLHF, and generic TRL files. Human
//! labels carry no reward: those rows get NaN rewards and margin (unknown, not zero), and
//! source `reference` (the chosen answer comes from the dataset, not from a policy).

use prefloop_core::{Pair, PairSource};
use serde_json::Value;

use super::problems::{kind, text};
use super::source::RowRef;
use super::{BadField, ImportOptions, SafePreference};

const ASSISTANT: &str = "\n\nAssistant:";

fn human_labelled(prompt: &str, chosen: &str, rejected: &str, problem_id: String) -> Pair {
    Pair {
        prompt: prompt.to_owned(),
        chosen: chosen.to_owned(),
        rejected: rejected.to_owned(),
        chosen_reward: f32::NAN,
        rejected_reward: f32::NAN,
        margin: f32::NAN,
        problem_id,
        round: 0,
        source: PairSource::Reference,
        chosen_finish: None,
        rejected_finish: None,
    }
}

/// HH-RLHF: two full transcripts; the prompt is their shared prefix up to and including the
/// last "\n\nAssistant:" in it, the answers are what follows. (Looking in the shared prefix, not
/// in `chosen` alone, matters: some answers themselves contain an "\n\nAssistant:" turn.)
pub(super) fn hh(row: &Value, at: &RowRef, _: &ImportOptions) -> Result<Pair, BadField> {
    let chosen = text(row, "chosen")?;
    let rejected = text(row, "rejected")?;
    let mut shared = chosen
        .bytes()
        .zip(rejected.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !chosen.is_char_boundary(shared) {
        shared -= 1;
    }
    let cut = chosen[..shared].rfind(ASSISTANT).ok_or_else(|| {
        BadField::new(
            "chosen",
            "no \"\\n\\nAssistant:\" turn shared with `rejected`",
        )
    })? + ASSISTANT.len();
    Ok(human_labelled(
        &chosen[..cut],
        &chosen[cut..],
        &rejected[cut..],
        format!("hh/{}", at.row),
    ))
}

/// PKU-SafeRLHF: `prompt`, `response_0`, `response_1` and which of them is better
/// (`better_response_id`) or safer (`safer_response_id`).
pub(super) fn safe(row: &Value, at: &RowRef, options: &ImportOptions) -> Result<Pair, BadField> {
    let field = match options.safe_preference {
        SafePreference::Better => "better_response_id",
        SafePreference::Safer => "safer_response_id",
    };
    let responses = [text(row, "response_0")?, text(row, "response_1")?];
    let chosen = match row.get(field).and_then(Value::as_i64) {
        Some(id @ (0 | 1)) => id as usize,
        _ => return Err(BadField::new(field, "expected 0 or 1")),
    };
    let prompt = text(row, "prompt")?;
    Ok(human_labelled(
        prompt,
        responses[chosen],
        responses[1 - chosen],
        format!("safe/{}", at.row),
    ))
}

fn optional_f32(row: &Value, field: &str) -> Result<Option<f32>, BadField> {
    match row.get(field) {
        Some(Value::Null) | None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
        Some(other) => Err(BadField::new(
            field,
            format!("expected a number, found {}", kind(other)),
        )),
    }
}

/// Any file with TRL's `prompt`/`chosen`/`rejected` string columns. Rewards are kept where the
/// file has them (ours: `chosen_reward`/`rejected_reward`; UltraFeedback: `score_chosen`/
/// `score_rejected`), as are `problem_id`, `round` and `source`.
pub(super) fn trl(row: &Value, at: &RowRef, _: &ImportOptions) -> Result<Pair, BadField> {
    let chosen_reward = optional_f32(row, "chosen_reward")?.or(optional_f32(row, "score_chosen")?);
    let rejected_reward =
        optional_f32(row, "rejected_reward")?.or(optional_f32(row, "score_rejected")?);
    let source = match row.get("source").and_then(Value::as_str) {
        Some(label) => label
            .parse()
            .map_err(|e: String| BadField::new("source", e))?,
        None => PairSource::Reference,
    };
    let round = match row.get("round") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|r| u32::try_from(r).ok())
            .ok_or_else(|| BadField::new("round", "not a u32"))?,
        _ => 0,
    };
    let (chosen_reward, rejected_reward) = (
        chosen_reward.unwrap_or(f32::NAN),
        rejected_reward.unwrap_or(f32::NAN),
    );
    Ok(Pair {
        prompt: text(row, "prompt")?.to_owned(),
        chosen: text(row, "chosen")?.to_owned(),
        rejected: text(row, "rejected")?.to_owned(),
        chosen_reward,
        rejected_reward,
        margin: chosen_reward - rejected_reward,
        problem_id: match row.get("problem_id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => format!("trl/{}", at.row),
        },
        round,
        source,
        chosen_finish: None,
        rejected_finish: None,
    })
}
