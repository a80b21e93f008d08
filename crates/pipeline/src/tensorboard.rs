//! The run's metrics as TensorBoard event files, so `tensorboard --logdir runs/` shows every
//! round's metrics (`round/…`, step = round) and every training step's (`train/…`, steps
//! numbered across rounds). Rewritten whole, atomically, from `metrics.jsonl` and the rounds'
//! training logs each time a round finishes, so it never holds a duplicate after a resume.
//!
//! The format is TensorFlow's: TFRecord framing (length, masked CRC-32C of the length, the
//! record, masked CRC-32C of the record) around `Event` protos holding `Summary` scalars.
//! Three messages with five fields are encoded by hand here; the Rust TensorBoard writers
//! (tensorboard-rs, syntaxdot-summary) are unmaintained and pull in far more than that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Result;
use crate::report::{read_jsonl, train_logs};
use crate::run_dir::METRICS_FILE;

/// Under the run directory: one run for TensorBoard.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// `tfevents` in the name is how TensorBoard finds event files.
const EVENTS_FILE: &str = "events.out.tfevents.prefloop";

/// Writes `<run>/tensorboard/events.out.tfevents.prefloop`; returns its path.
pub fn write_events(run: &Path) -> Result<PathBuf> {
    let wall_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut file = Vec::new();
    record(
        &mut file,
        &event(wall_time, 0, Payload::FileVersion("brain.Event:2")),
    );
    for line in read_jsonl(&run.join(METRICS_FILE))? {
        if let Some(&round) = line.get("round") {
            let values = scalars(&line, "round", "round");
            record(
                &mut file,
                &event(wall_time, round as i64, Payload::Scalars(&values)),
            );
        }
    }
    for (step, line) in train_logs(run)?.into_iter().enumerate() {
        let values = scalars(&line, "train", "step");
        let step = step as i64 + 1;
        record(
            &mut file,
            &event(wall_time, step, Payload::Scalars(&values)),
        );
    }
    let dir = run.join(TENSORBOARD_DIR);
    std::fs::create_dir_all(&dir).map_err(crate::error::PipelineError::io(&dir))?;
    let path = dir.join(EVENTS_FILE);
    prefloop_data::write_atomic(&path, &file)?;
    Ok(path)
}

/// A logged line's values as `prefix/<key>` scalars, less the key that is its step.
fn scalars(line: &BTreeMap<String, f64>, prefix: &str, step_key: &str) -> Vec<(String, f32)> {
    line.iter()
        .filter(|(k, _)| k.as_str() != step_key)
        .map(|(k, v)| (format!("{prefix}/{k}"), *v as f32))
        .collect()
}

enum Payload<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

/// An `Event` proto: wall_time (1, double), step (2, int64), then file_version (3, string) or
/// summary (5, `Summary`: repeated value (1, `Value`: tag (1, string), simple_value (2,
/// float))).
fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(&mut out, step as u64);
    match payload {
        Payload::FileVersion(version) => bytes_field(&mut out, 0x1a, version.as_bytes()),
        Payload::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                bytes_field(&mut v, 0x0a, tag.as_bytes());
                v.push(0x15);
                v.extend_from_slice(&value.to_le_bytes());
                bytes_field(&mut summary, 0x0a, &v);
            }
            bytes_field(&mut out, 0x2a, &summary);
        }
    }
    out
}

/// A length-delimited field: its key, the length as a varint, the bytes.
fn bytes_field(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One TFRecord.
fn record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's CRC: CRC-32C, rotated and offset so that a CRC of CRCs stays strong.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorBoard's own reader (from the venv scripts/setup made) over `dir`: every scalar
    /// tag with its (step, value) points.
    fn read_back(dir: &Path) -> Option<serde_json::Value> {
        let Some(python) = std::env::var_os("PREFLOOP_PYTHON") else {
            eprintln!("skipped: PREFLOOP_PYTHON is not set (source scripts/env.sh)");
            return None;
        };
        let script = "import json, sys\n\
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
            acc = EventAccumulator(sys.argv[1]); acc.Reload()\n\
            print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] \
                              for t in acc.Tags()['scalars']}))\n";
        let out = std::process::Command::new(python)
            .args(["-c", script])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    #[test]
    fn tensorboard_reads_back_every_rounds_metrics_and_every_training_step() {
        let run = tempfile::tempdir().unwrap();
        std::fs::write(
            run.path().join(METRICS_FILE),
            "{\"round\":0,\"reward/mean\":1.5,\"pairs\":6}\n\
             {\"round\":1,\"reward/mean\":2.25,\"pairs\":4}\n",
        )
        .unwrap();
        for (round, losses) in [(0, [0.69, 0.5]), (1, [0.4, 0.25])] {
            let train = run.path().join(format!("round-{round:04}/train"));
            std::fs::create_dir_all(&train).unwrap();
            let lines: String = losses
                .iter()
                .enumerate()
                .map(|(i, l)| format!("{{\"step\":{},\"loss\":{l}}}\n", i + 1))
                .collect();
            std::fs::write(train.join(prefloop_train::METRICS_FILE), lines).unwrap();
        }
        let path = write_events(run.path()).unwrap();
        assert!(path.starts_with(run.path().join(TENSORBOARD_DIR)));
        let Some(scalars) = read_back(&run.path().join(TENSORBOARD_DIR)) else {
            return;
        };
        assert_eq!(
            scalars["round/reward/mean"],
            serde_json::json!([[0, 1.5], [1, 2.25]])
        );
        assert_eq!(
            scalars["round/pairs"],
            serde_json::json!([[0, 6.0], [1, 4.0]])
        );
        // Steps numbered across rounds; f32 values as TensorBoard stores them.
        let loss: Vec<(i64, f64)> = scalars["train/loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        let want = [(1, 0.69), (2, 0.5), (3, 0.4), (4, 0.25)];
        assert_eq!(loss.len(), want.len());
        for ((step, value), (s, v)) in loss.iter().zip(want) {
            assert_eq!(*step, s);
            assert!((value - v).abs() < 1e-6, "{value} vs {v}");
        }
    }

    #[test]
    fn a_varint_is_seven_bits_a_byte_low_first() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn the_masked_crc_is_tensorflows() {
        // tensorboard's own: from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import
        // masked_crc32c; hex(masked_crc32c(b"123456789")) == '0xc78ab0e5'
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }
}
