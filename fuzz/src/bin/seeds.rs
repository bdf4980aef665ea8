//! Writes the seed inputs into `fuzz/corpus/<target>/seed-<name>` (existing files are
//! overwritten; inputs the fuzzer added are left alone).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, bytes) in instinfer_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}
