//! Writes every target's generated seeds to `fuzz/corpus/<target>/seed-NN` (the corpus
//! directory cargo-fuzz uses), so a campaign starts from them.
//!
//! `cargo run -p vmkit-fuzz-common --example write-seeds [-- DIR]`

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| vmkit_fuzz_common::replay::fuzz_dir().join("corpus"));
    for (name, _) in vmkit_fuzz_common::TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let seeds = vmkit_fuzz_common::seeds::for_target(name);
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s)?;
        }
        println!("{name}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
