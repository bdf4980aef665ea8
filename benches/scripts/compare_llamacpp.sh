#!/usr/bin/env bash
# Runs `instinfer bench` and llama.cpp (llama-cpp-python, built on this machine) on the same
# GGUF, thread count and prompt shapes, back to back, and prints tok/s and ratios.
#
#   benches/scripts/compare_llamacpp.sh [--threads N] [--model PATH] [--repeat R]
#
# Needs: `pip install llama-cpp-python` (compiles llama.cpp for this CPU). Run it on a quiet
# machine: the numbers are throughput, so anything else running skews both sides.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=2 model="" repeat=5
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --bin instinfer >/dev/null
bin=target/release/instinfer
if [ -z "$model" ]; then
  # Resolves (and if needed fetches) the default model; prints its path.
  model=$("$bin" --json model-path | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
fi
python3 -c 'import llama_cpp' 2>/dev/null || { echo "llama-cpp-python is not installed: pip install llama-cpp-python" >&2; exit 1; }

run_ours() { "$bin" --model "$model" --threads "$threads" --json bench --prompt-tokens "$1" --gen-tokens "$2"; }
run_llama() { python3 benches/llamacpp/bench_llamacpp.py "$model" --threads "$threads" --prompt-tokens "$1" --gen-tokens "$2" --text README.md; }

median() { python3 -c "import json,sys,statistics; rows=[json.loads(l) for l in sys.stdin if l.strip()]; print(statistics.median(r['$1'] for r in rows))"; }

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads $threads; model $(basename "$model")"
echo "runs alternate between the two engines; each figure is the median of $repeat runs"
printf '%-30s %12s %12s %8s\n' metric instinfer llama.cpp ratio
for shape in "32 128 decode_tok_per_s decode@short" "2048 64 decode_tok_per_s decode@2048" "2048 16 prefill_tok_per_s prefill@2048"; do
  set -- $shape
  ours_runs="" llama_runs=""
  for _ in $(seq "$repeat"); do
    llama_runs+="$(run_llama "$1" "$2")"$'\n'
    ours_runs+="$(run_ours "$1" "$2")"$'\n'
  done
  ours=$(printf '%s' "$ours_runs" | median "$3")
  theirs=$(printf '%s' "$llama_runs" | median "$3")
  printf '%-30s %12.1f %12.1f %8.2f\n' "$4 (tok/s)" "$ours" "$theirs" "$(python3 -c "print($ours/$theirs)")"
done
