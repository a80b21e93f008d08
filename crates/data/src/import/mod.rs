//! `prefloop import`: datasets in their own formats → our `problems` or `pairs` stages.
//!
//! Every source is read as a stream of JSON rows (JSONL, JSONL.gz, Parquet through arrow-json,
//! or the APPS directory layout) and one converter per dataset maps a row to a record. A bad row
//! is an error naming the file, the row and the field, or with `skip_bad` it is counted and
//! skipped. The output stage is written beside its final place and renamed into it at the end,
//! so an import either produces the whole stage or nothing.

mod pairs;
mod problems;
mod source;

use std::fs;
use std::path::{Path, PathBuf};

use prefloop_core::Record;
use serde_json::Value;

use crate::shard::WriterOptions;
use crate::stage::StageWriter;
use crate::{DataError, Manifest, Result};

/// The datasets prefloop imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// APPS: the original `train/NNNN/` directory layout, or Hugging Face rows.
    Apps,
    /// CodeContests in the Hugging Face row schema.
    CodeContests,
    HumanEval,
    Mbpp,
    /// HH-RLHF `chosen`/`rejected` transcripts → pairs.
    HhRlhf,
    /// PKU-SafeRLHF → pairs, preferring the better (or the safer) response.
    SafeRlhf,
    /// Any `prompt`/`chosen`/`rejected` file (TRL's format) → pairs.
    Trl,
}

impl DatasetKind {
    pub const NAMES: &'static [&'static str] = &[
        "apps",
        "codecontests",
        "humaneval",
        "mbpp",
        "hh",
        "safe",
        "trl",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "apps" => Self::Apps,
            "codecontests" => Self::CodeContests,
            "humaneval" => Self::HumanEval,
            "mbpp" => Self::Mbpp,
            "hh" => Self::HhRlhf,
            "safe" => Self::SafeRlhf,
            "trl" => Self::Trl,
            _ => return None,
        })
    }
}

/// For SafeRLHF: which label makes a response the chosen one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SafePreference {
    #[default]
    Better,
    Safer,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Count and skip rows that do not convert, instead of failing on the first.
    pub skip_bad: bool,
    pub safe_preference: SafePreference,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    pub kind: &'static str,
    pub rows: u64,
    pub skipped: u64,
    /// The first few skipped rows' errors, for the user to look at.
    pub examples: Vec<String>,
}

/// A row that does not convert: which field, and why.
#[derive(Debug)]
pub(crate) struct BadField {
    pub field: String,
    pub message: String,
}

impl BadField {
    pub(crate) fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

pub(crate) type Convert<R> = fn(&Value, &source::RowRef, &ImportOptions) -> Result<R, BadField>;

/// Imports `src` (a file, or an APPS directory) as `kind` into the stage directory `out`,
/// which must not exist yet.
pub fn import(
    kind: DatasetKind,
    src: &Path,
    out: &Path,
    options: &ImportOptions,
) -> Result<ImportReport> {
    match kind {
        DatasetKind::Apps => run(src, out, options, problems::apps),
        DatasetKind::CodeContests => run(src, out, options, problems::codecontests),
        DatasetKind::HumanEval => run(src, out, options, problems::humaneval),
        DatasetKind::Mbpp => run(src, out, options, problems::mbpp),
        DatasetKind::HhRlhf => run(src, out, options, pairs::hh),
        DatasetKind::SafeRlhf => run(src, out, options, pairs::safe),
        DatasetKind::Trl => run(src, out, options, pairs::trl),
    }
}

/// How many skipped rows' messages the report keeps.
const EXAMPLES: usize = 5;

fn run<R: Record>(
    src: &Path,
    out: &Path,
    options: &ImportOptions,
    convert: Convert<R>,
) -> Result<ImportReport> {
    if out.exists() {
        return Err(DataError::Manifest {
            path: out.to_owned(),
            message: "already exists; import into a new directory".into(),
        });
    }
    let staging = staging_dir(out);
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(DataError::io(&staging))?;
    }
    let result = write_stage(src, &staging, options, convert);
    match result {
        Ok(report) => {
            fs::rename(&staging, out).map_err(DataError::io(out))?;
            Ok(report)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn staging_dir(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(".{name}.importing"))
}

fn write_stage<R: Record>(
    src: &Path,
    dir: &Path,
    options: &ImportOptions,
    convert: Convert<R>,
) -> Result<ImportReport> {
    let mut writer = StageWriter::<R>::open(dir, WriterOptions::default())?;
    let mut report = ImportReport {
        kind: R::KIND,
        rows: 0,
        skipped: 0,
        examples: Vec::new(),
    };
    let mut chunk = Vec::with_capacity(4096);
    for row in source::rows(src)? {
        let (value, at) = row?;
        let converted = value
            .map_err(|message| BadField::new("(json)", message))
            .and_then(|value| convert(&value, &at, options));
        match converted {
            Ok(record) => chunk.push(record),
            Err(bad) => {
                let error = DataError::BadRow {
                    path: at.file.clone(),
                    row: at.row,
                    field: bad.field,
                    message: bad.message,
                };
                if !options.skip_bad {
                    return Err(error);
                }
                report.skipped += 1;
                if report.examples.len() < EXAMPLES {
                    report.examples.push(error.to_string());
                }
            }
        }
        if chunk.len() == chunk.capacity() {
            writer.write(&chunk)?;
            report.rows += chunk.len() as u64;
            chunk.clear();
        }
    }
    writer.write(&chunk)?;
    report.rows += chunk.len() as u64;
    let manifest: Manifest = writer.finish()?;
    debug_assert_eq!(manifest.rows(), report.rows);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
    use prefloop_core::{Pair, PairSource, Problem, ProblemSource};

    use super::*;
    use crate::StageReader;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// ../shared/data beside the checkout, if this machine has it.
    fn shared(path: &str) -> Option<PathBuf> {
        let path = repo().join("../shared/data").join(path);
        if !path.exists() {
            eprintln!("skipped: {} is absent", path.display());
            return None;
        }
        Some(path)
    }

    fn imported<R: Record>(
        kind: DatasetKind,
        src: &Path,
        options: &ImportOptions,
    ) -> (ImportReport, Vec<R>) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stage");
        let report = import(kind, src, &out, options).unwrap();
        let rows: Vec<R> = StageReader::open(&out)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        assert_eq!(rows.len() as u64, report.rows);
        (report, rows)
    }

    fn problems(kind: DatasetKind, src: &Path) -> Vec<Problem> {
        let (report, rows) = imported(kind, src, &ImportOptions::default());
        assert_eq!(report.skipped, 0);
        rows
    }

    #[test]
    fn codecontests_subset_imports() {
        let Some(src) = shared("codecontests/codeforces_subset.jsonl") else {
            return;
        };
        let rows = problems(DatasetKind::CodeContests, &src);
        assert_eq!(rows.len(), 480);
        assert_eq!(
            rows[0].problem_id,
            "codecontests/1041_E. Tree Reconstruction"
        );
        assert_eq!(rows[0].source, ProblemSource::CodeContests);
        assert_eq!(rows[0].difficulty, "11");
        assert!(
            rows.iter()
                .all(|p| p.reference_solution.is_some() && (1..=10).contains(&p.tests.len()))
        );
        assert!(
            rows.iter()
                .all(|p| p.time_limit_ms.is_none() && p.memory_limit_bytes.is_none())
        );
    }

    #[test]
    fn apps_directory_layout_imports() {
        let Some(src) = shared("apps/train") else {
            return;
        };
        let rows = problems(DatasetKind::Apps, &src);
        let ids: Vec<&str> = rows.iter().map(|p| p.problem_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "apps/0001",
                "apps/0111",
                "apps/2287",
                "apps/2404",
                "apps/4184"
            ]
        );
        let call_based: Vec<&str> = rows
            .iter()
            .filter(|p| p.fn_name.is_some())
            .map(|p| p.problem_id.as_str())
            .collect();
        assert_eq!(call_based, ["apps/2404", "apps/4184"]);
        assert!(
            rows.iter()
                .all(|p| !p.tests.is_empty() && p.reference_solution.is_some())
        );
        assert!(!rows[3].starter_code.is_empty());
    }

    #[test]
    fn humaneval_and_mbpp_import() {
        if let Some(src) = shared("humaneval/HumanEval.jsonl.gz") {
            let rows = problems(DatasetKind::HumanEval, &src);
            assert_eq!(rows.len(), 164);
            assert_eq!(rows[0].problem_id, "HumanEval/0");
            assert_eq!(rows[0].fn_name.as_deref(), Some("has_close_elements"));
            assert!(rows[0].tests[0].input.contains("def check(candidate)"));
            assert!(
                rows[0]
                    .reference_solution
                    .as_ref()
                    .unwrap()
                    .starts_with(&rows[0].prompt)
            );
        }
        if let Some(src) = shared("mbpp/mbpp_sanitized.jsonl") {
            let rows = problems(DatasetKind::Mbpp, &src);
            assert_eq!(rows.len(), 427);
            assert_eq!(rows[0].fn_name.as_deref(), Some("similar_elements"));
            assert_eq!(rows[0].source, ProblemSource::Mbpp);
            // The signature, then the 2-space-indented canonical body; the docstring is gone.
            assert_eq!(
                rows[0].reference_solution.as_deref(),
                Some(
                    "def similar_elements(test_tup1, test_tup2):\n  \
                     res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) \n"
                )
            );
        }
    }

    #[test]
    fn hh_rlhf_imports_as_pairs_split_at_the_last_assistant_turn() {
        let Some(src) = shared("hh-rlhf/harmless-base-test.jsonl.gz") else {
            return;
        };
        let (report, rows) = imported::<Pair>(DatasetKind::HhRlhf, &src, &ImportOptions::default());
        assert_eq!((report.rows, report.skipped), (2312, 0));
        let first = &rows[0];
        assert!(
            first
                .prompt
                .starts_with("\n\nHuman: what are some pranks with a pen i can do?")
        );
        assert!(first.prompt.ends_with("\n\nAssistant:"));
        assert!(!first.chosen.contains("\n\nAssistant:"));
        assert!(first.margin.is_nan() && first.source == PairSource::Reference);
        assert_eq!(rows[2311].problem_id, "hh/2311");
        // Row 1254's chosen answer contains a turn of its own: the prompt ends where the two
        // transcripts part.
        assert!(
            rows[1254]
                .prompt
                .ends_with("Isn't that drag kings?\n\nAssistant:")
        );
        assert!(rows[1254].chosen.starts_with(" No. Men who impersonate"));
        assert!(
            rows.iter()
                .all(|p| p.prompt.ends_with("\n\nAssistant:") && p.chosen != p.rejected)
        );
    }

    #[test]
    fn apps_hugging_face_rows_import_call_based_tests_as_json() {
        let rows = problems(
            DatasetKind::Apps,
            &repo().join("datasets/fixtures/apps_hf.jsonl"),
        );
        assert_eq!(rows[0].problem_id, "apps/4184");
        assert_eq!(rows[0].fn_name.as_deref(), Some("sum_even"));
        assert_eq!(
            (
                rows[0].tests[0].input.as_str(),
                rows[0].tests[0].output.as_str()
            ),
            ("[[1,2,3,4]]", "[6]")
        );
        assert_eq!(
            (
                rows[1].tests[1].input.as_str(),
                rows[1].tests[1].output.as_str()
            ),
            ("10\n", "100\n")
        );
        assert_eq!(
            rows[1].reference_solution.as_deref(),
            Some("n = int(input())\nprint(n * n)\n")
        );
    }

    #[test]
    fn safe_rlhf_prefers_the_better_or_the_safer_response() {
        let src = repo().join("datasets/fixtures/safe_rlhf.jsonl");
        let (_, better) = imported::<Pair>(DatasetKind::SafeRlhf, &src, &ImportOptions::default());
        assert!(better[0].chosen.starts_with("Insert a tension wrench"));
        let safer = ImportOptions {
            safe_preference: SafePreference::Safer,
            ..Default::default()
        };
        let (_, safer) = imported::<Pair>(DatasetKind::SafeRlhf, &src, &safer);
        assert!(safer[0].chosen.starts_with("I can't help"));
        assert_eq!(safer[1].chosen, better[1].chosen);
    }

    #[test]
    fn trl_pairs_import_from_jsonl_and_parquet_keeping_scores() {
        let (_, rows) = imported::<Pair>(
            DatasetKind::Trl,
            &repo().join("datasets/fixtures/trl_pairs.jsonl"),
            &ImportOptions::default(),
        );
        assert_eq!(
            (
                rows[0].chosen_reward,
                rows[0].rejected_reward,
                rows[0].margin
            ),
            (9.0, 2.5, 6.5)
        );
        assert!(rows[1].margin.is_nan());

        let dir = tempfile::tempdir().unwrap();
        let parquet = dir.path().join("ultrafeedback.parquet");
        let strings = |v: [&str; 2]| Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
        let batch = RecordBatch::try_from_iter([
            ("prompt", strings(["a?", "b?"])),
            ("chosen", strings(["yes", "no"])),
            ("rejected", strings(["no", "yes"])),
            (
                "score_chosen",
                Arc::new(Float64Array::from(vec![Some(8.0), None])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            fs::File::create(&parquet).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let (_, rows) = imported::<Pair>(DatasetKind::Trl, &parquet, &ImportOptions::default());
        assert_eq!(
            (rows[0].prompt.as_str(), rows[0].chosen_reward),
            ("a?", 8.0)
        );
        assert!(rows[1].chosen_reward.is_nan());
        assert_eq!(rows[1].problem_id, "trl/1");
    }

    #[test]
    fn a_bad_row_names_file_row_and_field_and_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pairs.jsonl");
        let good = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
        let lines = [
            good,
            good,
            r#"{"prompt": "p", "chosen": 3, "rejected": "b"}"#,
            "{not json",
            good,
        ];
        fs::write(&src, lines.join("\n")).unwrap();
        let out = dir.path().join("pairs");
        let err = import(DatasetKind::Trl, &src, &out, &ImportOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: row 3, field `chosen`: expected a string, found a number",
                src.display()
            )
        );
        assert!(!out.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging directory left"
        );

        let skip = ImportOptions {
            skip_bad: true,
            ..Default::default()
        };
        let report = import(DatasetKind::Trl, &src, &out, &skip).unwrap();
        assert_eq!((report.rows, report.skipped), (3, 2));
        assert!(
            report.examples[1].contains("row 4, field `(json)`"),
            "{:?}",
            report.examples
        );
        let err = import(DatasetKind::Trl, &src, &out, &skip)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("already exists; import into a new directory"),
            "{err}"
        );
    }
}
