//! `prefloop pairs`, `stats`, `filter` and `export`: batch jobs over stages.

use std::path::PathBuf;

use anyhow::Result;
use prefloop_data::{PairsOptions, build_pairs, export_pairs, filter_stage, stage_stats};

/// Build preference pairs from a samples and a scores stage: per problem and round, the
/// best-scored sample is chosen and the worst rejected; ties are dropped. With --problems,
/// a problem where no sample passed its tests gets its reference solution as the chosen answer.
#[derive(Debug, clap::Args)]
pub struct PairsArgs {
    /// The samples stage (prefloop generate …).
    #[arg(long)]
    samples: PathBuf,
    /// The scores stage of those samples (prefloop score-tests …).
    #[arg(long)]
    scores: PathBuf,
    /// Problems stage, for the reference-solution fallback.
    #[arg(long)]
    problems: Option<PathBuf>,
    /// The pairs stage to write.
    #[arg(long)]
    out: PathBuf,
    /// Drop pairs whose reward margin is below this.
    #[arg(long, default_value_t = 0.0)]
    min_margin: f32,
    /// Reward credited to a reference solution used as the chosen answer.
    #[arg(long, default_value_t = 10.0)]
    reference_reward: f32,
    /// Drop pairs either of whose answers was cut at the token budget (kept, a cut answer is
    /// trained on as sampled, without an end-of-sequence token).
    #[arg(long)]
    drop_truncated: bool,
}

pub fn pairs(args: &PairsArgs) -> Result<()> {
    let options = PairsOptions {
        min_margin: args.min_margin,
        reference_reward: args.reference_reward,
        drop_truncated: args.drop_truncated,
    };
    let manifest = build_pairs(
        &args.samples,
        &args.scores,
        args.problems.as_deref(),
        &args.out,
        &options,
    )?;
    println!(
        "wrote {} pairs in {} shard(s) to {}",
        manifest.rows(),
        manifest.shards.len(),
        args.out.display()
    );
    Ok(())
}

/// Per-round statistics of a samples and a scores stage: reward mean and standard deviation,
/// unbiased pass@k, the verdict histogram and completion lengths.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The samples stage (prefloop generate …).
    #[arg(long)]
    samples: PathBuf,
    /// The scores stage of those samples (prefloop score-tests …).
    #[arg(long)]
    scores: PathBuf,
    /// Which pass@k to report, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    k: Vec<u32>,
}

pub fn stats(args: &StatsArgs) -> Result<()> {
    for round in stage_stats(&args.samples, &args.scores, &args.k)? {
        // pass@k only where tests scored the samples.
        let pass: String = round
            .pass_at
            .iter()
            .map(|(k, v)| format!("pass@{k} {v:.4}, "))
            .collect();
        let verdicts: Vec<String> = round
            .verdicts
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect();
        println!(
            "round {}: {} scores, reward {:.4} ± {:.4}, {pass}mean {:.1} tokens, verdicts: {}",
            round.round,
            round.scores,
            round.reward_mean,
            round.reward_std,
            round.mean_tokens,
            verdicts.join(", ")
        );
    }
    Ok(())
}

/// Export a pairs stage as one TRL-ready file: `.parquet`, or `.jsonl` (unknown rewards as
/// null), with TRL's `prompt`/`chosen`/`rejected` columns first.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The pairs stage directory.
    pairs: PathBuf,
    /// The file to write: name.parquet or name.jsonl.
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: &ExportArgs) -> Result<()> {
    let rows = export_pairs(&args.pairs, &args.out)?;
    println!("exported {rows} pairs to {}", args.out.display());
    Ok(())
}

/// Keep the rows of a stage (samples, scores, pairs or problems) that satisfy a SQL `WHERE`
/// expression over its columns, e.g. `--where "reward >= 5 AND verdict = 'OK'"` or
/// `--where "source = 'policy' AND margin > 2"`. Writes a stage of the same kind.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// The stage directory to read.
    stage: PathBuf,
    /// The predicate: a SQL expression; rows where it is false or null are dropped.
    #[arg(long = "where", value_name = "EXPR")]
    predicate: String,
    /// The stage to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn filter(args: &FilterArgs) -> Result<()> {
    let report = filter_stage(&args.stage, &args.predicate, &args.out)?;
    println!(
        "kept {} of {} {} rows in {}",
        report.rows_out,
        report.rows_in,
        report.kind,
        args.out.display()
    );
    Ok(())
}
