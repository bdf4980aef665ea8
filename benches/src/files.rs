//! Files the benchmarks read and write: the long English text their prompts are drawn from,
//! and their JSON results.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where long English text is found when none is given: the license texts Debian-family
/// systems ship.
pub const DEFAULT_TEXT_DIR: &str = "/usr/share/common-licenses";

/// The files in `dir` (links followed; subdirectories left out), sorted by path.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Writes `value` as pretty JSON and a newline to `path`, creating its folder if missing.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).context("encoding the result")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
