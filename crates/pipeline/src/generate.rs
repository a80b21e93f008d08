//! The generate stage: N completions per prompt from a policy into a samples stage, resumable
//! shard by shard with a seed per row, so a resumed stage writes the rows an uninterrupted one
//! would have. Also where prompts come from (JSONL, Parquet, or a problems stage).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::Sample;
use prefloop_data::{ShardReader, StageWriter, WriterOptions};
use prefloop_model::{Generation, Generator, Request, SamplingParams};
use prefloop_train::Encoder;

use crate::config::GenerateConfig;
use crate::error::{PipelineError, Result};
use crate::shard::Shard;

/// A prompt to sample from, the problem it belongs to, and the row's other fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptRow {
    pub problem_id: String,
    pub prompt: String,
    /// Every other field of the prompt's row (JSONL keys, Parquet columns): what a reward
    /// program receives by name (`reward(prompt, completion, answer=…)`).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// What a generate stage did in this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateReport {
    /// Rows in the finished stage.
    pub rows: u64,
    /// Rows sampled by this call (the rest were there from an earlier, killed call).
    pub new_rows: u64,
    pub tokens: u64,
    pub seconds: f64,
}

impl GenerateReport {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Samples `config.n` completions of every prompt of `shard` from `generator` into the samples
/// stage `out` (the shard's directory under it), after the rows it already holds, writing
/// `config.batch_size` finished rows at a time. Prompts are
/// encoded by `encoder`, the trainer's, so a policy is trained on the prompt tokens it sampled
/// from (templated or raw alike, cut to the same length). `policy` goes into the `policy`
/// column; `seed` with the row's number in the whole stage seeds each sample, so the shards of
/// a stage hold the rows an unsharded run would.
#[allow(clippy::too_many_arguments)] // each is one of the stage's independent inputs
pub fn generate_stage(
    generator: &mut impl Generator,
    encoder: &Encoder,
    prompts: &[PromptRow],
    config: &GenerateConfig,
    policy: &str,
    round: u32,
    seed: u64,
    shard: Shard,
    out: &Path,
) -> Result<GenerateReport> {
    let out = &shard.dir(out);
    let options = WriterOptions::default().with_shard_rows(config.shard_rows);
    let mut writer = StageWriter::<Sample>::open(out, options)?;
    let n = config.n as u64;
    let block = shard.range(prompts.len() as u64);
    let (first, total) = (block.start * n, (block.end - block.start) * n);
    let done = writer.committed_rows();
    if done > total {
        return Err(PipelineError::Data {
            path: out.to_owned(),
            message: format!("holds {done} rows, more than the {total} these prompts make"),
        });
    }
    let templated: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| encoder.prompt(&p.prompt))
        .collect::<Result<_, _>>()?;
    let params = SamplingParams {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        max_new_tokens: config.max_new_tokens,
        stop: config.stop.clone(),
        ignore_eos: false,
    };

    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(
            "generate {bar:40} {pos}/{len} samples {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("a valid template"),
    );
    let (start, mut tokens) = (Instant::now(), 0u64);
    let rows: Vec<u64> = (first + done..first + total).collect();
    let requests: Vec<Request> = rows
        .iter()
        .map(|&row| Request {
            prompt: templated[(row / n) as usize].clone(),
            seed: row_seed(seed, row),
        })
        .collect();
    // Rows finish out of order (continuous batching); they are written in order, a batch's
    // worth at a time, so a killed stage resumes after the rows it wrote.
    let mut finished: BTreeMap<usize, Generation> = BTreeMap::new();
    let mut written = 0;
    generator.generate_each(&requests, &params, |index, generation| {
        finished.insert(index, generation);
        let ready = (written..).take_while(|i| finished.contains_key(i)).count();
        if ready < config.batch_size && written + ready < requests.len() {
            return Ok::<(), PipelineError>(());
        }
        let samples: Vec<Sample> = (written..written + ready)
            .map(|i| {
                let (row, g) = (rows[i], finished.remove(&i).expect("ready"));
                let p = &prompts[(row / n) as usize];
                tokens += g.tokens.len() as u64;
                Sample {
                    problem_id: p.problem_id.clone(),
                    prompt: p.prompt.clone(),
                    completion: g.text,
                    sample_idx: (row % n) as u32,
                    round,
                    policy: policy.to_owned(),
                    seed: row_seed(seed, row),
                    num_tokens: g.tokens.len() as u32,
                    logprob_sum: g.logprobs.iter().sum(),
                    finish: g.finish,
                }
            })
            .collect();
        writer.write(&samples)?;
        written += ready;
        bar.inc(samples.len() as u64);
        bar.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / start.elapsed().as_secs_f64()
        ));
        Ok(())
    })?;
    let manifest = writer.finish()?;
    bar.finish_and_clear();
    Ok(GenerateReport {
        rows: manifest.rows(),
        new_rows: total - done,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// SplitMix64 of a seed and an index: neighbouring rows (or rounds) get unrelated streams.
pub fn row_seed(seed: u64, row: u64) -> u64 {
    let mut z = seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Prompts from JSONL (`{"prompt": …, "problem_id": …}` a line) or Parquet (a `prompt`
/// column, `problem_id` if present: a problems shard works).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let is_parquet = path.extension().is_some_and(|e| e == "parquet");
    let rows = if is_parquet {
        read_parquet_prompts(path)?
    } else {
        read_jsonl_prompts(path)?
    };
    if rows.is_empty() {
        return Err(bad(path, "no prompts".into()));
    }
    Ok(rows)
}

fn bad(path: &Path, message: String) -> PipelineError {
    PipelineError::Data {
        path: path.to_owned(),
        message,
    }
}

fn read_jsonl_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let file = std::fs::File::open(path).map_err(PipelineError::io(path))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(PipelineError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |message: String| bad(path, format!("line {}: {message}", i + 1));
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        if !value
            .get("prompt")
            .is_some_and(serde_json::Value::is_string)
        {
            return Err(at("no string field `prompt`".into()));
        }
        let problem_id = match value.get("problem_id") {
            Some(id) => id
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| id.to_string()),
            None => format!("prompt-{}", rows.len()),
        };
        let mut fields = match value {
            serde_json::Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        };
        let prompt = fields
            .remove("prompt")
            .and_then(|p| p.as_str().map(str::to_owned))
            .unwrap_or_default();
        fields.remove("problem_id");
        rows.push(PromptRow {
            problem_id,
            prompt,
            fields,
        });
    }
    Ok(rows)
}

/// Row `i` of a Parquet column as JSON: strings as strings, numbers, booleans and lists as
/// themselves, anything else as the text Arrow shows for it.
fn json_value(
    column: &dyn Array,
    i: usize,
) -> std::result::Result<serde_json::Value, arrow_schema::ArrowError> {
    if column.is_null(i) {
        return Ok(serde_json::Value::Null);
    }
    let options = arrow_cast::display::FormatOptions::default();
    let text = arrow_cast::display::ArrayFormatter::try_new(column, &options)?
        .value(i)
        .to_string();
    Ok(match column.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            serde_json::Value::String(text)
        }
        _ => serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    })
}

fn read_parquet_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let reader = ShardReader::open(path)?;
    let schema = reader.schema().clone();
    let string_column = |name: &str| -> Result<bool> {
        match schema.field_with_name(name) {
            Err(_) => Ok(false),
            Ok(f) if f.data_type() == &DataType::Utf8 => Ok(true),
            Ok(f) => Err(bad(
                path,
                format!("column `{name}` has type {}, expected Utf8", f.data_type()),
            )),
        }
    };
    if !string_column("prompt")? {
        return Err(bad(path, "no column `prompt`".into()));
    }
    let has_id = string_column("problem_id")?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let prompts = batch
            .column_by_name("prompt")
            .expect("checked")
            .as_string::<i32>();
        let ids = has_id.then(|| {
            batch
                .column_by_name("problem_id")
                .expect("checked")
                .as_string::<i32>()
        });
        let others: Vec<(&str, &dyn Array)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| !["prompt", "problem_id"].contains(&f.name().as_str()))
            .map(|(f, c)| (f.name().as_str(), c.as_ref()))
            .collect();
        for i in 0..batch.num_rows() {
            let row = rows.len();
            if !prompts.is_valid(i) {
                return Err(bad(path, format!("row {}, column `prompt`: null", row + 1)));
            }
            let problem_id = match ids {
                Some(ids) if ids.is_valid(i) => ids.value(i).to_owned(),
                _ => format!("prompt-{row}"),
            };
            let fields = others
                .iter()
                .map(|(name, column)| Ok(((*name).to_owned(), json_value(*column, i)?)))
                .collect::<std::result::Result<_, arrow_schema::ArrowError>>()
                .map_err(|e| bad(path, format!("row {}: {e}", row + 1)))?;
            rows.push(PromptRow {
                problem_id,
                prompt: prompts.value(i).to_owned(),
                fields,
            });
        }
    }
    Ok(rows)
}
