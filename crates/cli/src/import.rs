//! `prefloop import`: a dataset in its own format → a problems or pairs stage.

use std::path::PathBuf;

use anyhow::{Result, bail};
use prefloop_data::{DatasetKind, ImportOptions, SafePreference, import};

/// Import a dataset into a problems stage (apps, codecontests, humaneval, mbpp) or a pairs
/// stage (hh, safe, trl).
///
/// SRC is a JSONL, JSONL.gz or Parquet file; for apps also the original directory layout
/// (a problem directory with question.txt, or a folder of them such as train/). A row that
/// does not convert stops the import with its file, row and field, unless --skip-bad. The
/// output directory appears only when the import succeeded.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// apps, codecontests, humaneval, mbpp, hh, safe or trl.
    kind: String,
    /// The dataset file (JSONL, JSONL.gz, Parquet) or, for apps, its directory.
    src: PathBuf,
    /// The stage directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Count and skip rows that do not convert.
    #[arg(long)]
    skip_bad: bool,
    /// safe: prefer the safer response instead of the better one.
    #[arg(long)]
    safer: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let Some(kind) = DatasetKind::parse(&args.kind) else {
        bail!(
            "unknown dataset `{}`; expected one of {}",
            args.kind,
            DatasetKind::NAMES.join(", ")
        );
    };
    let options = ImportOptions {
        skip_bad: args.skip_bad,
        safe_preference: if args.safer {
            SafePreference::Safer
        } else {
            SafePreference::Better
        },
    };
    let report = import(kind, &args.src, &args.out, &options)?;
    println!(
        "imported {} {} rows into {}",
        report.rows,
        report.kind,
        args.out.display()
    );
    if report.skipped > 0 {
        println!("skipped {} bad rows, for example:", report.skipped);
        for example in &report.examples {
            println!("  {example}");
        }
    }
    Ok(())
}
