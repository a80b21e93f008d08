//! Where the files scripts/setup installs live: the embedded default model, the sandbox's
//! runners and their compile cache, the demo's data. Every path is absolute and found the same
//! way from any working directory, so the binary runs from anywhere.

use std::path::{Path, PathBuf};

/// The cache directory of the checkout this binary was built in, as scripts/env.sh set it
/// for the build (`$PREFLOOP_CACHE`), else the checkout's `.prefloop`.
const BUILD_CACHE: Option<&str> = option_env!("PREFLOOP_CACHE");

/// The cache directory scripts/setup fills: `$PREFLOOP_CACHE`; else `share/prefloop` beside
/// an installed binary (`PREFIX/bin/prefloop` → `PREFIX/share/prefloop`, the layout
/// scripts/install makes); else the one recorded when this binary was built.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PREFLOOP_CACHE") {
        return absolute(Path::new(&dir));
    }
    let installed = std::env::current_exe().ok().and_then(|exe| {
        let share = exe.parent()?.parent()?.join("share/prefloop");
        share.is_dir().then_some(share)
    });
    installed.unwrap_or_else(build_cache_dir)
}

/// The cache directory recorded at build time.
pub fn build_cache_dir() -> PathBuf {
    BUILD_CACHE.map_or_else(
        || {
            // crates/core → the workspace root.
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            let root = manifest.parent().and_then(Path::parent).unwrap_or(manifest);
            root.join(".prefloop")
        },
        PathBuf::from,
    )
}

/// The embedded default model's directory: `$PREFLOOP_MODEL_DIR`, else `<cache>/models`.
pub fn models_dir() -> PathBuf {
    dir_from("PREFLOOP_MODEL_DIR", "models")
}

/// The sandbox's runners and compile cache: `$PREFLOOP_SANDBOX_DIR`, else `<cache>/sandbox`.
pub fn sandbox_dir() -> PathBuf {
    dir_from("PREFLOOP_SANDBOX_DIR", "sandbox")
}

/// The sandbox's compile cache: machine code of the Python runner and of C++ programs, which
/// the sandbox loads and runs, so never a directory other users can write into.
/// `$PREFLOOP_SANDBOX_CACHE`; else, for an installed binary whose shared files are not this
/// user's, the user's own `$XDG_CACHE_HOME/prefloop/sandbox` (`~/.cache/…`); else
/// `<sandbox>/cache` beside the runners.
pub fn sandbox_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PREFLOOP_SANDBOX_CACHE") {
        return absolute(Path::new(&dir));
    }
    let beside = sandbox_dir().join("cache");
    if std::env::var_os("PREFLOOP_SANDBOX_DIR").is_some() || owned_by_this_user(&sandbox_dir()) {
        return beside;
    }
    let user_cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
    user_cache.map_or(beside, |dir| absolute(&dir.join("prefloop/sandbox")))
}

/// Whether `dir` belongs to the user running this process (true when that cannot be told,
/// as for a directory that does not exist yet: the user will create it).
fn owned_by_this_user(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(dir) else {
        return true;
    };
    let me = std::fs::metadata("/proc/self").map(|m| m.uid());
    me.is_ok_and(|uid| uid == meta.uid())
}

/// Datasets scripts/setup unpacked (HumanEval): `$PREFLOOP_DATA_DIR`, else `<cache>/data`.
pub fn data_dir() -> PathBuf {
    dir_from("PREFLOOP_DATA_DIR", "data")
}

fn dir_from(variable: &str, under_cache: &str) -> PathBuf {
    std::env::var_os(variable).map_or_else(
        || cache_dir().join(under_cache),
        |dir| absolute(Path::new(&dir)),
    )
}

/// `path` against the current directory when relative (wasmtime's cache, for one, refuses
/// relative directories); unchanged when that cannot be known.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_directory_is_absolute() {
        for dir in [
            cache_dir(),
            build_cache_dir(),
            models_dir(),
            sandbox_dir(),
            sandbox_cache_dir(),
            data_dir(),
        ] {
            assert!(dir.is_absolute(), "{}", dir.display());
        }
    }
}
