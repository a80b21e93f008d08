//! Called from the build script of every package whose binaries or tests link tch.
//!
//! The binaries record where libtorch is (an rpath to the torch library directory they were
//! linked against), so they start without `LD_LIBRARY_PATH` from any shell.
//!
//! torch-sys asks for `-ltorch_cuda`, but the linker's default `--as-needed` drops it (no
//! symbol of ours points into it) and tch then reports no CUDA. Re-listing it after
//! `--no-as-needed` keeps it. `rustc-link-arg` reaches only the calling package's own binaries
//! and tests (the `-as-needed` link modifier that would reach all is nightly-only), hence one
//! call per package. Where the venv's torch has no CUDA build, nothing is added.

use std::path::PathBuf;
use std::process::Command;

/// libtorch's lib directory, found the way torch-sys finds it.
fn torch_lib_dir() -> Option<PathBuf> {
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        return Some(PathBuf::from(libtorch).join("lib"));
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let script = "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))";
    let output = Command::new(python).args(["-c", script]).output().ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let Some(dir) = torch_lib_dir() else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
