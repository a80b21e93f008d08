//! `prefloop inspect`: what is in a Parquet file, ours or another tool's.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use arrow_array::RecordBatch;
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::Schema;
use prefloop_data::ShardReader;

/// Show a Parquet file's schema, row count and first rows.
///
/// Works on any Parquet file. When the columns are those of one of prefloop's datasets
/// (samples, scores, pairs, problems) it says so, so you know the file can feed that stage.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Parquet file.
    file: PathBuf,
    /// How many rows to print.
    #[arg(short = 'n', long, default_value_t = 5)]
    rows: usize,
    /// Cut printed values to this many characters (0: never).
    #[arg(long, default_value_t = 100)]
    width: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let mut reader = ShardReader::open(&args.file)?;
    let meta = reader.metadata().file_metadata();
    let mut out = String::new();
    writeln!(out, "file:       {}", args.file.display())?;
    writeln!(out, "rows:       {}", reader.rows())?;
    writeln!(out, "row groups: {}", reader.metadata().num_row_groups())?;
    writeln!(
        out,
        "written by: {}",
        meta.created_by().unwrap_or("unknown")
    )?;
    writeln!(out, "dataset:    {}", dataset_kind(reader.schema()))?;
    writeln!(out, "schema:")?;
    for field in reader.schema().fields() {
        let null = if field.is_nullable() { "" } else { " not null" };
        writeln!(out, "  {}: {}{null}", field.name(), field.data_type())?;
    }
    let mut shown = 0;
    while shown < args.rows {
        let Some(batch) = reader.next().transpose()? else {
            break;
        };
        let take = (args.rows - shown).min(batch.num_rows());
        print_rows(&mut out, &batch.slice(0, take), shown, args.width)?;
        shown += take;
    }
    print!("{out}");
    Ok(())
}

/// Which of our record schemas the file can be read as.
fn dataset_kind(schema: &Schema) -> String {
    let matching = prefloop_data::kinds_matching(schema);
    if matching.is_empty() {
        "none of prefloop's (samples, scores, pairs, problems, reference_logps)".into()
    } else {
        matching.join(", ")
    }
}

fn print_rows(out: &mut String, batch: &RecordBatch, first: usize, width: usize) -> Result<()> {
    let options = FormatOptions::default().with_null("null");
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    let schema = batch.schema();
    for row in 0..batch.num_rows() {
        // Rows as a person counts them, from 1.
        writeln!(out, "row {}:", first + row + 1)?;
        for (field, formatter) in schema.fields().iter().zip(&formatters) {
            let value = formatter.value(row).to_string();
            writeln!(out, "  {}: {}", field.name(), shorten(&value, width))?;
        }
    }
    Ok(())
}

/// One line per value: newlines escaped, long values cut with a note of their length.
fn shorten(value: &str, width: usize) -> String {
    let escaped: String = value.escape_debug().collect();
    let chars = escaped.chars().count();
    if width == 0 || chars <= width {
        return escaped;
    }
    let cut: String = escaped.chars().take(width).collect();
    format!("{cut}… ({chars} chars)")
}
