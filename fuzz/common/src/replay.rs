//! Replaying inputs outside libFuzzer: the checked-in reproducers, the generated seeds and
//! whatever corpus a local campaign left, through the same `fuzz` function the targets call.

use std::path::{Path, PathBuf};

/// `fuzz/` of this repository.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/common has a parent")
        .to_path_buf()
}

/// The files right in `dir` (not its subfolders), sorted; none if it does not exist.
pub fn inputs_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `run` on every file in `dir`, naming the file if it panics; returns how many ran.
pub fn replay_dir(target: &str, dir: &Path, limit: usize, run: fn(&[u8])) -> usize {
    let files = inputs_in(dir);
    for f in files.iter().take(limit) {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| run(&data));
        if let Err(e) = outcome {
            eprintln!("{target}: {} fails", f.display());
            std::panic::resume_unwind(e);
        }
    }
    files.len().min(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{seeds, TARGETS};

    /// Every checked-in reproducer, every generated seed, and (when a local campaign left
    /// one) up to 500 inputs of the local corpus, through every target's oracles.
    #[test]
    fn every_reproducer_seed_and_local_corpus_input_passes_its_oracles() {
        for (name, run) in TARGETS {
            let repros = replay_dir(
                name,
                &fuzz_dir().join("regressions").join(name),
                usize::MAX,
                *run,
            );
            let generated = seeds::for_target(name);
            for (i, s) in generated.iter().enumerate() {
                let outcome = std::panic::catch_unwind(|| run(s));
                if let Err(e) = outcome {
                    eprintln!("{name}: generated seed {i} fails");
                    std::panic::resume_unwind(e);
                }
            }
            let local = replay_dir(name, &fuzz_dir().join("corpus").join(name), 500, *run);
            eprintln!(
                "{name}: {repros} reproducers, {} seeds, {local} local corpus inputs",
                generated.len()
            );
        }
    }
}
