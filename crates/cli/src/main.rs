//! The `prefloop` binary: a thin clap layer over the library crates. The only crate that
//! uses anyhow; it turns every error into one line on stderr and a non-zero exit code.

mod bench;
mod doctor;
mod generate;
mod import;
mod inspect;
mod jobs;
mod model_args;
mod run;
mod sandbox;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// prefloop aligns language models with fresh, on-policy preference data.
///
/// One round samples answers from the current policy, scores them (a reward model, or unit
/// tests run in a wasmtime sandbox), writes Parquet shards of samples, scores and preference
/// pairs, and trains the next policy with DPO or PPO.
///
/// Start with `prefloop generate --prompts prompts.jsonl --out samples/` to sample from the
/// embedded default model, and `prefloop inspect FILE.parquet` to look at any shard.
#[derive(Debug, Parser)]
#[command(name = "prefloop", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Inspect(inspect::Args),
    Generate(generate::Args),
    Import(import::Args),
    Pairs(jobs::PairsArgs),
    Stats(jobs::StatsArgs),
    Filter(jobs::FilterArgs),
    Export(jobs::ExportArgs),
    ScoreTests(sandbox::ScoreTestsArgs),
    ScoreProgram(sandbox::ScoreProgramArgs),
    #[command(subcommand)]
    Sandbox(sandbox::Command),
    #[command(subcommand)]
    Train(train::Command),
    #[command(subcommand)]
    Bench(bench::Command),
    Run(run::RunArgs),
    Resume(run::ResumeArgs),
    Status(run::StatusArgs),
    Report(run::ReportArgs),
    Merge(run::MergeArgs),
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    if std::env::var_os("MKL_DYNAMIC").is_none() {
        // MKL picks fewer threads when the machine is busy, and its matrix products then round
        // differently; a run resumed after a kill must repeat the same arithmetic. MKL reads
        // this when it loads, so the process starts again with it set.
        use std::os::unix::process::CommandExt as _;
        let error = std::process::Command::new(std::env::current_exe().unwrap_or_default())
            .args(std::env::args_os().skip(1))
            .env("MKL_DYNAMIC", "FALSE")
            .exec();
        eprintln!("error: restarting with MKL_DYNAMIC=FALSE: {error}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PREFLOOP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Import(args) => import::run(&args),
        Command::Pairs(args) => jobs::pairs(&args),
        Command::Stats(args) => jobs::stats(&args),
        Command::Filter(args) => jobs::filter(&args),
        Command::Export(args) => jobs::export(&args),
        Command::ScoreTests(args) => sandbox::score_tests(&args),
        Command::ScoreProgram(args) => sandbox::score_program(&args),
        Command::Sandbox(command) => sandbox::run(&command),
        Command::Train(command) => train::run(&command),
        Command::Bench(command) => bench::run(command),
        Command::Run(args) => run::run(&args),
        Command::Resume(args) => run::resume(&args),
        Command::Status(args) => run::status(&args),
        Command::Report(args) => run::report(&args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Merge(args) => run::merge(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // The pipeline's exit codes tell a scheduler what to do (see `prefloop run`).
            let code = e
                .downcast_ref::<prefloop_pipeline::PipelineError>()
                .map_or(1, |e| e.exit_code());
            ExitCode::from(code as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and argument of every command, with the path of commands that reach it, that
    /// `--help` would list without a word of help.
    fn undocumented(command: &clap::Command, path: &str, found: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let builtin = ["help", "version"].contains(&arg.get_id().as_str());
            if !builtin && arg.get_help().is_none() && !arg.is_hide_set() {
                found.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in command.get_subcommands() {
            if sub.get_about().is_none() && sub.get_name() != "help" {
                found.push(format!("{path} {} (the command)", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), found);
        }
    }

    #[test]
    fn every_flag_of_every_command_has_help_text() {
        let mut found = Vec::new();
        undocumented(&Cli::command(), "prefloop", &mut found);
        assert!(found.is_empty(), "no help text: {found:#?}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
