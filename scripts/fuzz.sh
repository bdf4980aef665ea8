#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: libFuzzer (libfuzzer-sys) without a
# sanitizer, with the instrumentation flags cargo-fuzz passes for `--sanitizer none`.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   fuzz each target (default: all four) SECONDS each
#                                           (default 30); new inputs go to a scratch folder
#   FUZZ_MERGE=1 scripts/fuzz.sh ...        then merge what was found into fuzz/corpus/TARGET
#                                           (only inputs that add coverage)
#   scripts/fuzz.sh minimize [TARGET...]    shrink each corpus to a subset with the same
#                                           coverage (libFuzzer's -set_cover_merge=1)
#
# A crash leaves its input in target/fuzz/artifacts/TARGET/ and fails the script. Targets:
# request, gguf, tokenizer, store (see fuzz/src/lib.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=fuzz
if [ "${1:-}" = minimize ]; then
  mode=minimize
  shift
  secs=0
else
  secs="${1:-30}"
  shift || true
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request gguf tokenizer store)

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/fuzz"
# With --target, these flags reach only the fuzzed code, not build scripts or proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --locked -p instinfer-fuzz --features libfuzzer --target "$host" \
  $(printf -- '--bin %s ' "${targets[@]}")

bin="$CARGO_TARGET_DIR/$host/release"
for t in "${targets[@]}"; do
  scratch="$CARGO_TARGET_DIR/new/$t"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t/"
  mkdir -p "$scratch" "$artifacts"
  # Store images are a template patched by the input; model files need room for a vocabulary.
  max_len=4096
  case "$t" in gguf) max_len=65536 ;; store) max_len=16384 ;; esac
  if [ "$mode" = minimize ]; then
    kept="$CARGO_TARGET_DIR/minimized/$t"
    rm -rf "$kept" && mkdir -p "$kept"
    "$bin/$t" -set_cover_merge=1 "$kept" "fuzz/corpus/$t" -max_len="$max_len" 2>&1 | tail -1
    rm -rf "fuzz/corpus/$t" && cp -r "$kept" "fuzz/corpus/$t"
    echo "$t: $(ls "fuzz/corpus/$t" | wc -l) inputs kept"
    continue
  fi
  log="$CARGO_TARGET_DIR/$t.log"
  echo "fuzzing $t for ${secs}s (log: $log)"
  rc=0
  # fuzz/regressions/TARGET: inputs that once crashed, kept apart so that minimizing never
  # drops them; they seed the run too.
  dirs=("$scratch" "fuzz/corpus/$t")
  [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
  "$bin/$t" "${dirs[@]}" -max_total_time="$secs" -max_len="$max_len" \
    -timeout=20 -rss_limit_mb=4096 -artifact_prefix="$artifacts" -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  grep -E '^(#[0-9]+ +(INITED|DONE)|stat::|==[0-9]+==|SUMMARY|Done)' "$log" || true
  if [ "$rc" != 0 ] || [ -n "$(ls -A "$artifacts")" ]; then
    grep -E -A20 'panicked at' "$log" | head -40 >&2 || true
    echo "fuzz target $t failed (exit $rc): inputs in $artifacts, log in $log" >&2
    exit 1
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    "$bin/$t" -merge=1 "fuzz/corpus/$t" "$scratch" -max_len="$max_len" 2>&1 | tail -1
  fi
done
