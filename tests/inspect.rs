//! End-to-end: `prefloop inspect` on our shards, on a file pyarrow wrote, and on bad files.

mod common;

use std::path::Path;
use std::process::Command;

use prefloop_core::{Pair, PairSource};
use prefloop_data::{ShardWriter, WriterOptions};

use common::{prefloop, text, venv_python};

fn write_pairs(path: &Path, n: u32) {
    let pairs: Vec<Pair> = (0..n)
        .map(|i| Pair {
            prompt: format!("Write a haiku about {i}.\nMake it short."),
            chosen: "A short poem".into(),
            rejected: "No.".into(),
            chosen_reward: 1.5,
            rejected_reward: -0.5,
            margin: 2.0,
            problem_id: format!("hh/{i}"),
            round: 0,
            source: PairSource::Policy,
            chosen_finish: None,
            rejected_finish: None,
        })
        .collect();
    let mut writer = ShardWriter::<Pair>::create(path, &WriterOptions::default()).unwrap();
    writer.write(&pairs).unwrap();
    writer.finish().unwrap();
}

#[test]
fn inspect_shows_schema_rows_and_first_rows_of_our_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.parquet");
    write_pairs(&path, 12);
    let out = prefloop(&["inspect", path.to_str().unwrap(), "-n", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("rows:       12\n"), "{stdout}");
    assert!(stdout.contains("dataset:    pairs\n"), "{stdout}");
    assert!(stdout.contains("  margin: Float32 not null\n"), "{stdout}");
    assert!(
        stdout.contains("row 2:\n  prompt: Write a haiku about 1.\\nMake it short.\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("row 3:"), "{stdout}");
}

#[test]
fn inspect_reads_a_file_written_by_pyarrow() {
    let Some(python) = venv_python() else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set to a venv with pyarrow (run scripts/setup)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trl.parquet");
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
t = pa.table({
    "prompt": ["2+2?", "Capital of France?"],
    "chosen": ["4", "Paris"],
    "rejected": ["5", "Lyon"],
    "chosen_reward": pa.array([1.0, 2.0], pa.float64()),
    "rejected_reward": [0.0, 0.5],
    "margin": [1.0, 1.5],
    "problem_id": ["a", "b"],
    "round": pa.array([0, 0], pa.int64()),
    "source": ["policy", "policy"],
})
pq.write_table(t, sys.argv[1])  # snappy, int64, float64: pyarrow's defaults
"#;
    let status = Command::new(python)
        .args(["-c", script, path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = prefloop(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("written by: parquet-cpp-arrow"), "{stdout}");
    assert!(stdout.contains("dataset:    pairs\n"), "{stdout}");
    assert!(stdout.contains("  chosen: Paris\n"), "{stdout}");

    // And our typed reader takes it as pairs, converting int64/float64.
    let pairs: Vec<Pair> = prefloop_data::RecordReader::<Pair>::open(&path)
        .unwrap()
        .flat_map(Result::unwrap)
        .collect();
    assert_eq!(pairs[1].chosen, "Paris");
    assert_eq!(pairs[1].margin, 1.5);
}

fn assert_fails_naming(args: &[&str], needles: &[&str]) {
    let out = prefloop(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    assert!(
        out.stdout.is_empty(),
        "nothing printed on stdout for a bad file"
    );
    let stderr = text(&out.stderr);
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
}

#[test]
fn inspect_names_the_file_when_it_is_not_parquet_or_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("data.parquet");
    std::fs::write(&csv, "prompt,chosen\nhi,hello\n").unwrap();
    let csv = csv.to_str().unwrap();
    assert_fails_naming(&["inspect", csv], &[csv, "not a readable Parquet file"]);

    let cut = dir.path().join("cut.parquet");
    write_pairs(&cut, 100);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let cut = cut.to_str().unwrap();
    assert_fails_naming(&["inspect", cut], &[cut, "not a readable Parquet file"]);

    let missing = dir.path().join("nope.parquet");
    let missing = missing.to_str().unwrap();
    assert_fails_naming(&["inspect", missing], &[missing, "No such file"]);
}

#[test]
fn exported_pairs_load_in_pyarrow_with_trl_column_names() {
    let Some(python) = venv_python() else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set to a venv with pyarrow (run scripts/setup)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("pairs.jsonl");
    std::fs::write(
        &src,
        "{\"prompt\": \"2+2?\", \"chosen\": \"4\", \"rejected\": \"5\", \"score_chosen\": 9.0, \"score_rejected\": 1.0}\n\
         {\"prompt\": \"Hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}\n",
    )
    .unwrap();
    let stage = dir.path().join("stage");
    let out = prefloop(&[
        "import",
        "trl",
        src.to_str().unwrap(),
        "--out",
        stage.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (parquet, jsonl) = (dir.path().join("trl.parquet"), dir.path().join("trl.jsonl"));
    for file in [&parquet, &jsonl] {
        let out = prefloop(&[
            "export",
            stage.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let script = r#"
import json, sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
assert t.column_names[:3] == ["prompt", "chosen", "rejected"], t.column_names
rows = t.to_pylist()
assert rows[0]["chosen"] == "4" and rows[0]["margin"] == 8.0, rows[0]
lines = [json.loads(l) for l in open(sys.argv[2])]
assert [l["prompt"] for l in lines] == ["2+2?", "Hi"], lines
assert lines[1]["margin"] is None and lines[0]["chosen_reward"] == 9.0, lines
"#;
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&parquet)
        .arg(&jsonl)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "pyarrow could not read the export as TRL pairs"
    );
}
