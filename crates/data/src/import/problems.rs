//! Coding datasets → `problems` rows: APPS, CodeContests, HumanEval, MBPP.

use prefloop_core::{Problem, ProblemSource, TestCase};
use serde_json::Value;

use super::source::RowRef;
use super::{BadField, ImportOptions};

pub(super) fn text<'a>(row: &'a Value, field: &str) -> Result<&'a str, BadField> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Null) | None => Err(BadField::new(field, "missing")),
        Some(other) => Err(BadField::new(
            field,
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

fn optional_text(row: &Value, field: &str) -> Result<Option<String>, BadField> {
    match row.get(field) {
        Some(Value::Null) | None => Ok(None),
        Some(_) => text(row, field).map(|s| Some(s.to_owned())),
    }
}

pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string field as is, any other JSON (an id number, a difficulty rating) as its JSON text.
fn id_text(row: &Value, field: &str) -> Result<String, BadField> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err(BadField::new(field, "missing")),
        Some(other) => Ok(other.to_string()),
    }
}

/// A field that holds JSON either parsed or as a JSON string (HF APPS stores strings).
fn embedded_json(row: &Value, field: &str) -> Result<Option<Value>, BadField> {
    match row.get(field) {
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| BadField::new(field, format!("not valid JSON: {e}"))),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Ok(Some(other.clone())),
    }
}

/// Test data as stored: stdin/stdout text stays text; call-based arguments and return values
/// (lists, numbers) become their JSON text.
fn test_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn zip_tests(field: &str, inputs: &[Value], outputs: &[Value]) -> Result<Vec<TestCase>, BadField> {
    if inputs.len() != outputs.len() {
        return Err(BadField::new(
            field,
            format!("{} inputs but {} outputs", inputs.len(), outputs.len()),
        ));
    }
    Ok(inputs
        .iter()
        .zip(outputs)
        .map(|(i, o)| TestCase {
            input: test_text(i),
            output: test_text(o),
        })
        .collect())
}

fn list<'a>(value: &'a Value, field: &str) -> Result<&'a [Value], BadField> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Null => Ok(&[]),
        other => Err(BadField::new(
            field,
            format!("expected a list, found {}", kind(other)),
        )),
    }
}

/// APPS, in the Hugging Face row schema (`problem_id, question, solutions, input_output,
/// difficulty, url, starter_code`; solutions and input_output as JSON strings) or assembled
/// from the original directory layout.
pub(super) fn apps(row: &Value, _: &RowRef, _: &ImportOptions) -> Result<Problem, BadField> {
    let io = embedded_json(row, "input_output")?.unwrap_or(Value::Null);
    let tests = zip_tests(
        "input_output",
        list(
            io.get("inputs").unwrap_or(&Value::Null),
            "input_output.inputs",
        )?,
        list(
            io.get("outputs").unwrap_or(&Value::Null),
            "input_output.outputs",
        )?,
    )?;
    let fn_name = match io.get("fn_name") {
        Some(Value::String(name)) => Some(name.clone()),
        _ => None,
    };
    let solutions = embedded_json(row, "solutions")?.unwrap_or(Value::Null);
    let reference_solution = list(&solutions, "solutions")?
        .iter()
        .find_map(|s| s.as_str().map(str::to_owned));
    Ok(Problem {
        problem_id: format!("apps/{}", id_text(row, "problem_id")?),
        source: ProblemSource::Apps,
        prompt: text(row, "question")?.to_owned(),
        tests,
        fn_name,
        starter_code: optional_text(row, "starter_code")?.unwrap_or_default(),
        reference_solution,
        difficulty: optional_text(row, "difficulty")?.unwrap_or_default(),
        time_limit_ms: None,
        memory_limit_bytes: None,
    })
}

/// CodeContests' language code for Python 3 in `solutions.language`.
const PYTHON3: i64 = 3;

/// CodeContests in the Hugging Face row schema: tests from public, private and generated
/// tests in that order; the first Python 3 solution as the reference.
pub(super) fn codecontests(
    row: &Value,
    _: &RowRef,
    _: &ImportOptions,
) -> Result<Problem, BadField> {
    let mut tests = Vec::new();
    for field in ["public_tests", "private_tests", "generated_tests"] {
        let Some(group) = row.get(field).filter(|g| !g.is_null()) else {
            continue;
        };
        let inputs = list(
            group.get("input").unwrap_or(&Value::Null),
            &format!("{field}.input"),
        )?;
        let outputs = list(
            group.get("output").unwrap_or(&Value::Null),
            &format!("{field}.output"),
        )?;
        tests.extend(zip_tests(field, inputs, outputs)?);
    }
    let solutions = row.get("solutions").cloned().unwrap_or(Value::Null);
    let languages = list(
        solutions.get("language").unwrap_or(&Value::Null),
        "solutions.language",
    )?;
    let programs = list(
        solutions.get("solution").unwrap_or(&Value::Null),
        "solutions.solution",
    )?;
    let reference_solution = languages
        .iter()
        .zip(programs)
        .find(|(language, _)| language.as_i64() == Some(PYTHON3))
        .and_then(|(_, program)| program.as_str().map(str::to_owned));
    let time_limit_ms = match row.get("time_limit") {
        Some(Value::Object(limit)) => {
            let seconds = limit.get("seconds").and_then(Value::as_u64).unwrap_or(0);
            let nanos = limit.get("nanos").and_then(Value::as_u64).unwrap_or(0);
            Some((seconds * 1000 + nanos / 1_000_000) as u32).filter(|&ms| ms > 0)
        }
        Some(Value::Null) | None => None,
        Some(other) => {
            return Err(BadField::new(
                "time_limit",
                format!("expected {{seconds, nanos}}, found {}", kind(other)),
            ));
        }
    };
    let memory_limit_bytes = row
        .get("memory_limit_bytes")
        .and_then(Value::as_u64)
        .filter(|&b| b > 0);
    Ok(Problem {
        problem_id: format!("codecontests/{}", text(row, "name")?),
        source: ProblemSource::CodeContests,
        prompt: text(row, "description")?.to_owned(),
        tests,
        fn_name: None,
        starter_code: String::new(),
        reference_solution,
        difficulty: row.get("difficulty").map(test_text).unwrap_or_default(),
        time_limit_ms,
        memory_limit_bytes,
    })
}

/// HumanEval and MBPP (`task_id, prompt, entry_point, canonical_solution, test`): one test
/// whose input is the test program defining `check(candidate)`, to be run as
/// `check(<entry_point>)` after the completed function; the prompt is also the starter code.
fn check_style(row: &Value, source: ProblemSource) -> Result<Problem, BadField> {
    let prompt = text(row, "prompt")?;
    // Some MBPP entry points carry a trailing space ("is_Power_Of_Two ").
    let entry_point = text(row, "entry_point")?.trim();
    let canonical = text(row, "canonical_solution")?;
    let test = match source {
        // MBPP's tests call math.isclose: the original rows import math in `test_imports`,
        // which the HumanEval-form conversion dropped.
        ProblemSource::Mbpp => format!("import math\n{}", text(row, "test")?),
        _ => text(row, "test")?.to_owned(),
    };
    Ok(Problem {
        problem_id: text(row, "task_id")?.to_owned(),
        source,
        prompt: prompt.to_owned(),
        tests: vec![TestCase {
            input: test,
            output: String::new(),
        }],
        fn_name: Some(entry_point.to_owned()),
        starter_code: prompt.to_owned(),
        reference_solution: Some(reference(prompt, entry_point, canonical, source)),
        difficulty: String::new(),
        time_limit_ms: None,
        memory_limit_bytes: None,
    })
}

/// The canonical solution as a whole program. HumanEval's continues its prompt. MBPP's (in
/// HumanEval form) is indented differently from the prompt's docstring, so the two do not
/// concatenate; it continues the prompt's signature line instead, docstring dropped.
fn reference(prompt: &str, entry_point: &str, canonical: &str, source: ProblemSource) -> String {
    let signature_end = (source == ProblemSource::Mbpp)
        .then(|| {
            let def = prompt.find(&format!("def {entry_point}"))?;
            let mut end = def;
            for line in prompt[def..].split_inclusive('\n') {
                end += line.len();
                if line.trim_end().ends_with(':') {
                    return Some(end);
                }
            }
            None
        })
        .flatten();
    match signature_end {
        Some(end) => format!("{}{canonical}", &prompt[..end]),
        None => format!("{prompt}{canonical}"),
    }
}

pub(super) fn humaneval(row: &Value, _: &RowRef, _: &ImportOptions) -> Result<Problem, BadField> {
    check_style(row, ProblemSource::HumanEval)
}

pub(super) fn mbpp(row: &Value, _: &RowRef, _: &ImportOptions) -> Result<Problem, BadField> {
    check_style(row, ProblemSource::Mbpp)
}
