//! `prefloop doctor`: what this installation has and lacks, each missing piece with its fix.
//! Exits non-zero when something a default run needs is missing (libtorch, the embedded
//! model, the sandbox's Python runner, a writable compile cache); C++ and CUDA are optional.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use prefloop_core::TestCase;
use prefloop_core::paths;
use prefloop_model::{DEFAULT_MODEL_SHA256, Model, Precision, best_device, default_model_path};
use prefloop_sandbox::{
    Compare, JudgeOptions, Language, Program, Sandbox, TestStyle, default_runtime_dir, judge_run,
};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

/// Check this installation: libtorch (version and location), CUDA devices, bf16, the SDPA
/// kernels libtorch picks, the embedded model (hash-checked), the sandbox's Python runner and
/// C++ toolchain (each runs a program), and whether the caches are writable. Prints each with
/// the fix for what is missing; exits 1 when a default run could not work.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also load this model (a Hugging Face directory or a .gguf file) and say which family it
    /// was loaded as, its shape, and whether its chat template renders; a setting prefloop
    /// cannot honour is named with its field.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    /// Missing, but only optional features need it (C++ programs, a GPU).
    Optional,
    /// Missing, and a default run needs it.
    Missing,
}

struct Check {
    what: &'static str,
    level: Level,
    found: String,
    fix: Option<String>,
}

impl Check {
    fn ok(what: &'static str, found: impl Into<String>) -> Self {
        Self {
            what,
            level: Level::Ok,
            found: found.into(),
            fix: None,
        }
    }

    fn lacking(
        what: &'static str,
        level: Level,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            what,
            level,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }
}

const SETUP_FIX: &str = "run scripts/setup in the prefloop checkout (or point PREFLOOP_CACHE at \
                         the directory it filled)";

pub fn run(args: &Args) -> Result<()> {
    let cache = paths::cache_dir();
    println!("prefloop doctor");
    println!("cache directory: {} ({})", cache.display(), cache_origin());
    let mut checks = vec![libtorch(), cuda(), bf16()];
    let model = model();
    checks.push(model.0);
    checks.push(sdpa(model.1.as_ref()));
    if let Some(path) = &args.model {
        checks.push(user_model(path));
    }
    checks.extend(sandbox());
    checks.push(writable(&paths::sandbox_cache_dir()));
    for check in &checks {
        let tag = match check.level {
            Level::Ok => "ok",
            Level::Optional => "optional",
            Level::Missing => "MISSING",
        };
        println!("{tag:>8}  {:<18} {}", check.what, check.found);
        if let Some(fix) = &check.fix {
            println!("{:>8}  {:<18} fix: {fix}", "", "");
        }
    }
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| c.level == Level::Missing)
        .map(|c| c.what)
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "a default run needs what is missing: {}",
        missing.join(", ")
    );
    println!("everything a default run needs is here");
    Ok(())
}

/// How the cache directory was found, for the first line of the report.
fn cache_origin() -> &'static str {
    if std::env::var_os("PREFLOOP_CACHE").is_some() {
        "from PREFLOOP_CACHE"
    } else if paths::cache_dir() == paths::build_cache_dir() {
        "recorded when this binary was built"
    } else {
        "share/prefloop beside the installed binary"
    }
}

/// The libtorch this process loaded: its directory, read off the process's own mappings,
/// and the version torch's Python package records beside it.
fn libtorch() -> Check {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let Some(library) = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
    else {
        return Check::lacking(
            "libtorch",
            Level::Missing,
            "libtorch_cpu.so is not mapped into this process",
            SETUP_FIX,
        );
    };
    let dir = Path::new(library).parent().unwrap_or(Path::new("/"));
    let version = std::fs::read_to_string(dir.join("../version.py"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(['\'', '"']).to_owned())
        })
        .unwrap_or_else(|| "version unknown".into());
    let features: Vec<&str> = [
        ("MKL", tch::utils::has_mkl()),
        ("OpenMP", tch::utils::has_openmp()),
        ("CUDA", maps.contains("/libtorch_cuda.so")),
    ]
    .into_iter()
    .filter_map(|(name, has)| has.then_some(name))
    .collect();
    Check::ok(
        "libtorch",
        format!(
            "{version} from {} ({}; {} CPU threads)",
            dir.display(),
            features.join(", "),
            tch::utils::get_num_threads()
        ),
    )
}

fn cuda() -> Check {
    if !tch::Cuda::is_available() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let why = if maps.contains("/libtorch_cuda.so") {
            "this libtorch is built with CUDA but sees no GPU (no driver, or CUDA_VISIBLE_DEVICES \
             hides them)"
        } else {
            "this libtorch is a CPU build"
        };
        return Check::lacking(
            "CUDA",
            Level::Optional,
            format!("no device: {why}; everything runs on the CPU"),
            "on a CUDA machine, scripts/setup's torch==2.11.0 (a CUDA build) sees the GPU; \
             check nvidia-smi",
        );
    }
    Check::ok(
        "CUDA",
        format!(
            "{} device(s), cuDNN {}",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                "available"
            } else {
                "missing"
            }
        ),
    )
}

/// A bf16 matrix product on the best device against fp32: bf16 is a setting on either.
fn bf16() -> Check {
    let device = best_device();
    let result = (|| -> Result<f64, tch::TchError> {
        let a = Tensor::f_randn([128, 128], (Kind::Float, device))?;
        let exact = a.f_matmul(&a)?;
        let half = a.f_to_kind(Kind::BFloat16)?;
        let product = half.f_matmul(&half)?.f_to_kind(Kind::Float)?;
        let error = (product - &exact).f_abs()?.f_max()? / exact.f_abs()?.f_max()?;
        error.f_double_value(&[])
    })();
    match result {
        Ok(error) if error < 0.05 => Check::ok(
            "bf16",
            format!("matmul on {device:?}: max error {error:.1e} of the largest fp32 entry"),
        ),
        Ok(error) => Check::lacking(
            "bf16",
            Level::Optional,
            format!("matmul on {device:?} is off by {error:.1e}"),
            "use --dtype fp32",
        ),
        Err(e) => Check::lacking(
            "bf16",
            Level::Optional,
            format!("matmul on {device:?} failed: {e}"),
            "use --dtype fp32",
        ),
    }
}

/// The embedded default: present, hash-checked, loadable.
fn model() -> (Check, Option<Model>) {
    let path = default_model_path();
    let hash = match std::fs::File::open(&path).and_then(|mut file| {
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break Ok(format!("{:x}", hasher.finalize()));
            }
            hasher.update(&buffer[..n]);
        }
    }) {
        Ok(hash) => hash,
        Err(e) => {
            let check = Check::lacking(
                "embedded model",
                Level::Missing,
                format!("{}: {e}", path.display()),
                SETUP_FIX,
            );
            return (check, None);
        }
    };
    if hash != DEFAULT_MODEL_SHA256 {
        let check = Check::lacking(
            "embedded model",
            Level::Missing,
            format!(
                "{}: sha256 {hash}, not the wheel's {DEFAULT_MODEL_SHA256}",
                path.display()
            ),
            format!("delete it and {SETUP_FIX}"),
        );
        return (check, None);
    }
    match Model::load(None, best_device(), Precision::Auto) {
        Ok(model) => {
            let check = Check::ok(
                "embedded model",
                format!(
                    "{} (sha256 ok, loads in {})",
                    path.display(),
                    if model.kind() == Kind::BFloat16 {
                        "bf16"
                    } else {
                        "fp32"
                    }
                ),
            );
            (check, Some(model))
        }
        Err(e) => {
            let check = Check::lacking("embedded model", Level::Missing, e.to_string(), SETUP_FIX);
            (check, None)
        }
    }
}

/// A model the user names: its family and shape as loaded, and its chat template.
fn user_model(path: &std::path::Path) -> Check {
    match Model::load(Some(path), best_device(), Precision::Auto) {
        Ok(model) => {
            let template = match model.tokenizer.apply_chat_template("Hello") {
                Ok(_) => "its chat template renders".to_owned(),
                Err(e) => format!("its chat template does not render ({e})"),
            };
            Check::ok(
                "--model",
                format!(
                    "{}: {}; {template}",
                    path.display(),
                    model.decoder.describe()
                ),
            )
        }
        Err(e) => Check::lacking(
            "--model",
            Level::Missing,
            e.to_string(),
            "see the README's table of the families prefloop loads",
        ),
    }
}

/// The attention kernels libtorch picks for the default model's shapes on this device.
fn sdpa(model: Option<&Model>) -> Check {
    let Some(model) = model else {
        return Check::lacking(
            "SDPA backends",
            Level::Optional,
            "not checked: needs the embedded model",
            SETUP_FIX,
        );
    };
    let decoder = &model.decoder;
    Check::ok(
        "SDPA backends",
        format!(
            "training forward and prefill (causal): {}; decode step (query groups folded, \
             key mask): {}",
            decoder.causal_attention_backend(4, 256),
            decoder.decode_attention_backend(32, 256)
        ),
    )
}

/// The Python runner and the C++ toolchain, each proven by running a program.
fn sandbox() -> Vec<Check> {
    let dir = default_runtime_dir();
    let started = Instant::now();
    let sandbox = match Sandbox::open_default() {
        Ok(sandbox) => sandbox,
        Err(e) => {
            return vec![
                Check::lacking("sandbox (python)", Level::Missing, e.to_string(), SETUP_FIX),
                Check::lacking(
                    "sandbox (C++)",
                    Level::Optional,
                    "not checked: needs the sandbox",
                    SETUP_FIX,
                ),
            ];
        }
    };
    let opened = started.elapsed();
    let python = match run_check(&sandbox, Language::Python, "print(sum(range(10)))\n") {
        Ok(ms) => Check::ok(
            "sandbox (python)",
            format!(
                "{} (opened in {:.0} ms, a program ran in {ms:.1} ms)",
                dir.display(),
                opened.as_secs_f64() * 1e3
            ),
        ),
        Err(why) => Check::lacking("sandbox (python)", Level::Missing, why, SETUP_FIX),
    };
    let cpp = match sandbox.check_language(Language::Cpp) {
        Err(e) => Check::lacking(
            "sandbox (C++)",
            Level::Optional,
            e.to_string(),
            "run scripts/setup as root or with sudo (it installs clang-19 and the wasm32 \
             libraries with apt-get)",
        ),
        Ok(()) => {
            let source = "#include <cstdio>\nint main() { int s = 0; for (int i = 0; i < 10; \
                          ++i) s += i; std::printf(\"%d\\n\", s); }\n";
            match run_check(&sandbox, Language::Cpp, source) {
                Ok(ms) => Check::ok(
                    "sandbox (C++)",
                    format!("clang++-19 to wasm32-wasi, a program compiled and ran in {ms:.0} ms"),
                ),
                Err(why) => Check::lacking(
                    "sandbox (C++)",
                    Level::Optional,
                    why,
                    "run scripts/setup as root or with sudo",
                ),
            }
        }
    };
    vec![python, cpp]
}

/// Runs a program that prints 45 and judges it; the milliseconds it took, or what went wrong.
fn run_check(sandbox: &Sandbox, language: Language, source: &str) -> Result<f64, String> {
    let program = Program {
        language,
        source: source.to_owned(),
        style: TestStyle::Stdio,
    };
    let test = TestCase {
        input: String::new(),
        output: "45\n".into(),
    };
    let started = Instant::now();
    let run = sandbox
        .run_program(&program, &test, &JudgeOptions::default())
        .map_err(|e| e.to_string())?;
    let judged = judge_run(&run, &program, Some(&test.output), Compare::Tokens);
    match judged.verdict {
        prefloop_core::Verdict::Ok => Ok(started.elapsed().as_secs_f64() * 1e3),
        verdict => Err(format!(
            "a program that prints 45 was judged {} {}",
            verdict.as_str(),
            judged.detail
        )),
    }
}

/// The sandbox's compile cache must take new files (wasmtime writes compiled runners there).
fn writable(dir: &Path) -> Check {
    let probe: PathBuf = dir.join(format!(".doctor-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe));
    match result {
        Ok(()) => Check::ok("compile cache", format!("{} is writable", dir.display())),
        Err(e) => Check::lacking(
            "compile cache",
            Level::Missing,
            format!("{}: {e}", dir.display()),
            "set PREFLOOP_SANDBOX_CACHE to a directory only this user can write",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libtorch_this_process_loaded_is_found_with_its_version() {
        let check = libtorch();
        assert_eq!(check.level, Level::Ok, "{}", check.found);
        // The torch scripts/setup pins.
        assert!(check.found.starts_with("2.11.0"), "{}", check.found);
    }

    #[test]
    fn an_unwritable_cache_is_missing_with_its_fix() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // A directory cannot be made under a plain file.
        let check = writable(&file.path().join("cache"));
        assert_eq!(check.level, Level::Missing);
        assert!(check.fix.unwrap().contains("PREFLOOP_SANDBOX_CACHE"));
    }

    #[test]
    fn bf16_works_on_this_device() {
        assert_eq!(bf16().level, Level::Ok);
    }
}
