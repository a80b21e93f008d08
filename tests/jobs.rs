//! End-to-end: the batch-job commands chained as a user would run them — import a TRL file,
//! filter its pairs, export the result — and their errors for bad input.

mod common;

use std::path::Path;

use common::{prefloop, text};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// `prefloop import trl` of the TRL fixture into the pairs stage `out`.
fn import_trl_fixture(out: &str) {
    let out = prefloop(&["import", "trl", &fixture("trl_pairs.jsonl"), "--out", out]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn import_filter_export_keeps_the_matching_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    import_trl_fixture(&path("pairs"));

    // Rows without scores carry NaN rewards, and NaN > 5 is false: only the scored pair stays.
    let out = prefloop(&[
        "filter",
        &path("pairs"),
        "--where",
        "margin > 5 AND prompt LIKE '%2 + 2%'",
        "--out",
        &path("kept"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("kept 1 of "), "{stdout}");

    let out = prefloop(&["export", &path("kept"), "--out", &path("kept.jsonl")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exported = std::fs::read_to_string(path("kept.jsonl")).unwrap();
    assert_eq!(exported.lines().count(), 1);
    assert!(
        exported.contains(r#""prompt":"What is 2 + 2?""#),
        "{exported}"
    );
}

#[test]
fn filter_names_the_unknown_column_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    import_trl_fixture(&path("pairs"));
    let out = prefloop(&[
        "filter",
        &path("pairs"),
        "--where",
        "score > 1",
        "--out",
        &path("kept"),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("score") && stderr.contains("part-00000"),
        "{stderr}"
    );
    assert!(!dir.path().join("kept").exists());
}

/// pyarrow writes samples and scores as a pandas user would (int64, float64, large strings),
/// the scores split over two files of different integer types.
const PYARROW_FILES: &str = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
out = sys.argv[1]
pq.write_table(pa.table({
    "problem_id": pa.array(["p1", "p1", "p2", "p2"], pa.large_string()),
    "prompt": ["Add.", "Add.", "Sort.", "Sort."],
    "completion": ["a + b", "a - b", "sorted(x)", "x.sort()"],
    "sample_idx": [0, 1, 0, 1], "round": [0, 0, 0, 0], "policy": ["vllm"] * 4,
    "seed": [1, 2, 3, 4], "num_tokens": [3, 3, 4, 3],
    "logprob_sum": [-1.5, -2.5, -1.0, -3.0], "finish": ["stop"] * 4,
}), f"{out}/samples.parquet")
def scores(rows, ints):
    return pa.table({
        "problem_id": [r[0] for r in rows], "sample_idx": pa.array([r[1] for r in rows], ints),
        "round": pa.array([0] * len(rows), ints), "reward": [r[2] for r in rows],
        "scorer": ["tests"] * len(rows), "passed": pa.array([r[3] for r in rows], ints),
        "total": pa.array([1] * len(rows), ints), "verdict": [r[4] for r in rows],
        "wall_ms": [1.0] * len(rows),
    })
import os
os.makedirs(f"{out}/scores")
pq.write_table(scores([("p1", 0, 10.0, 1, "OK"), ("p1", 1, 0.0, 0, "WA")], pa.int64()),
               f"{out}/scores/a.parquet")
pq.write_table(scores([("p2", 0, 10.0, 1, "OK"), ("p2", 1, 10.0, 1, "OK")], pa.uint32()),
               f"{out}/scores/b.parquet")
pq.write_table(pa.table({"problem_id": ["p1"], "reward": [1.0]}), f"{out}/short.parquet")
"#;

#[test]
fn stats_and_pairs_read_pyarrow_files_whose_types_differ_from_ours_and_from_each_other() {
    let Some(python) = common::venv_python() else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set to a venv with pyarrow (run scripts/setup)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new(python)
        .args(["-c", PYARROW_FILES])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (samples, scores) = (path("samples.parquet"), path("scores/*.parquet"));

    let stats = prefloop(&[
        "stats",
        "--samples",
        &samples,
        "--scores",
        &scores,
        "--k",
        "1",
    ]);
    assert!(stats.status.success(), "{}", text(&stats.stderr));
    let stdout = text(&stats.stdout);
    assert!(
        stdout.contains("round 0: 4 scores, reward 7.5000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("OK 3") && stdout.contains("WA 1"),
        "{stdout}"
    );

    let pairs = prefloop(&[
        "pairs",
        "--samples",
        &samples,
        "--scores",
        &scores,
        "--out",
        &path("pairs"),
    ]);
    assert!(pairs.status.success(), "{}", text(&pairs.stderr));
    // p1: 10 against 0; p2's samples tie and make no pair.
    let rows: Vec<prefloop_core::Pair> = prefloop_data::StageReader::open(path("pairs"))
        .unwrap()
        .flat_map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].chosen.as_str(), rows[0].rejected.as_str()),
        ("a + b", "a - b")
    );

    // A file without the scores' columns: an error naming the file and the column.
    let bad = prefloop(&[
        "stats",
        "--samples",
        &samples,
        "--scores",
        &path("short.parquet"),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = text(&bad.stderr);
    assert!(
        stderr.contains("short.parquet") && stderr.contains("sample_idx"),
        "{stderr}"
    );
}
