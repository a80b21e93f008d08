//! End-to-end: a process killed (SIGKILL) while writing a stage leaves only whole shards, each
//! listed in the manifest, and the stage resumes from there.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prefloop_core::{Finish, Sample};
use prefloop_data::{Manifest, StageReader, StageWriter, WriterOptions};

/// Starts `prefloop bench shards` on `dir`, waits until `shards` shards are listed in its
/// manifest and the next one is being written, then kills it.
fn sample(i: u32) -> Sample {
    Sample {
        problem_id: format!("resumed/{i}"),
        prompt: "p".into(),
        completion: "c".into(),
        sample_idx: i,
        round: 0,
        policy: "test".into(),
        seed: 0,
        num_tokens: 1,
        logprob_sum: -1.0,
        finish: Finish::Stop,
    }
}

fn kill_after_shards(dir: &Path, shards: usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prefloop"))
        .args([
            "bench",
            "shards",
            "--rows",
            "100000000",
            "--shard-rows",
            "20000",
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = Manifest::load(dir)
            .ok()
            .flatten()
            .map_or(0, |m| m.shards.len());
        if listed >= shards && writing(dir) {
            break;
        }
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Whether a shard is being written: its hidden temp file exists.
fn writing(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".part-"))
    })
}

fn visible_parts(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_killed_writer_leaves_only_listed_whole_shards_and_resumes() {
    for shards in [0, 1, 3] {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("samples");
        kill_after_shards(&dir, shards);

        let manifest = Manifest::load(&dir)
            .unwrap()
            .unwrap_or_else(|| Manifest::new("samples"));
        assert!(!manifest.complete);
        manifest.verify(&dir).unwrap();
        let listed: Vec<String> = manifest.shards.iter().map(|s| s.path.clone()).collect();
        // The only visible shard the manifest may not list is one renamed into place an instant
        // before the kill; the next writer removes it.
        let visible = visible_parts(&dir);
        assert!(
            visible.len() <= listed.len() + 1,
            "{visible:?} vs {listed:?}"
        );
        assert_eq!(visible[..listed.len()], listed[..]);

        let mut writer = StageWriter::<Sample>::open(&dir, WriterOptions::default()).unwrap();
        let done = writer.committed_rows();
        assert_eq!(done, 20_000 * listed.len() as u64);
        let more: Vec<Sample> = (0..10).map(sample).collect();
        writer.write(&more).unwrap();
        let manifest = writer.finish().unwrap();
        manifest.verify(&dir).unwrap();
        assert_eq!(manifest.rows(), done + more.len() as u64);
        assert_eq!(visible_parts(&dir).len(), manifest.shards.len());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            manifest.shards.len() + 1
        );
        let back: Vec<Sample> = StageReader::open(&dir)
            .unwrap()
            .flat_map(Result::unwrap)
            .collect();
        assert_eq!(back.len() as u64, manifest.rows());
        assert_eq!(back[back.len() - 10..], more[..]);
    }
}
