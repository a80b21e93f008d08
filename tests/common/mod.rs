//! Helpers shared by the end-to-end tests: run the binary, read its output.

use std::process::{Command, Output};

/// Runs the `prefloop` binary built for this test run.
pub fn prefloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prefloop"))
        .args(args)
        .output()
        .expect("the binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
