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
