//! Every input of every corpus in `fuzz/corpus/`, and every input that once crashed a
//! target (`fuzz/regressions/`), run once through its target as a plain test: what the
//! fuzzer found once stays fixed. Each target must have a corpus.

use std::path::PathBuf;

/// The files of `fuzz/<folder>/<target>/`, sorted; none if the folder does not exist and
/// `required` is false.
fn inputs(folder: &str, target: &str, required: bool) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(folder)
        .join(target);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(_) if !required => return Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("an entry").path()).collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, run) = instinfer_fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let corpus = inputs("corpus", target, true);
    // The seeds alone are a handful per target; a corpus that shrank to them lost the
    // fuzzer's findings.
    assert!(corpus.len() >= 20, "{target}: only {} inputs", corpus.len());
    for f in corpus.iter().chain(&inputs("regressions", target, false)) {
        let data = std::fs::read(f).expect("read a corpus input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", f.display());
    }
}

#[test]
fn request_corpus() {
    replay("request");
}

#[test]
fn gguf_corpus() {
    replay("gguf");
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer");
}

#[test]
fn store_corpus() {
    replay("store");
}

#[test]
fn the_tiny_model_seed_loads_whole() {
    use instinfer_runtime::model::{GgufFile, Model};
    let (_, _, bytes) = instinfer_fuzz::seeds::all()
        .into_iter()
        .find(|(t, _, _)| *t == "gguf")
        .expect("a GGUF seed");
    let file = GgufFile::from_bytes(std::path::Path::new("tiny.gguf"), bytes).expect("parses");
    let tok = instinfer_runtime::tokenizer::Tokenizer::from_gguf(&file).expect("tokenizer");
    assert_eq!(
        tok.decode(&tok.encode("the heat", false).unwrap()),
        "the heat"
    );
    assert!(instinfer_runtime::chat::ChatTemplate::from_gguf(&file)
        .expect("template")
        .is_some());
    Model::from_gguf(file).expect("the model loads");
}
