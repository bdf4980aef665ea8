#!/usr/bin/env bash
# flexgen's read bandwidth against fio's, paired: each round runs fio (sequential 256 KiB
# reads, QD 64, O_DIRECT, io_uring: the KV store's request size and depth) on the store's
# filesystem, then decode-bench's flexgen rows, then fio again, and prints flexgen's
# bandwidth over the mean of the two fio runs around it. On a disk whose speed drifts
# between minutes (a shared virtio disk), paired rounds are the fair comparison.
#
#   benches/scripts/flexgen_vs_fio.sh [ROUNDS] [CONTEXTS] [BATCHES]
#
# Defaults: 3 rounds, contexts 16384,32768, batches 1,8. Needs fio and a decode-bench store
# with those contexts persisted (decode-bench prefills them on first use).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3} contexts=${2:-16384,32768} batches=${3:-1,8}
store=${STORE:-bench-results/decode-bench.kv}
command -v fio >/dev/null || { echo "fio not found: apt-get install -y fio" >&2; exit 2; }
cargo build --release -p instinfer-benches --bin decode-bench >/dev/null
dir=$(dirname "$store")
out=$(mktemp -d)
trap 'rm -rf "$out" "$dir/fio-pair.tmp"' EXIT
fio --name=layout --filename="$dir/fio-pair.tmp" --size=4g --rw=write --bs=1m --iodepth=8 \
    --direct=1 --ioengine=io_uring --output-format=terse >/dev/null
fio_bw() {
  fio --name=seqread --filename="$dir/fio-pair.tmp" --size=4g --rw=read --bs=256k --iodepth=64 \
      --direct=1 --ioengine=io_uring --runtime=10 --time_based --output-format=json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"])'
}
echo "# $(lscpu | sed -n 's/^Model name: *//p'), store $store; each round: fio, flexgen, fio"
for r in $(seq "$rounds"); do
  before=$(fio_bw)
  target/release/decode-bench --store "$store" --contexts "$contexts" --batches "$batches" \
    --modes flexgen --seconds 5 --no-llamacpp --no-fio --no-prefill-compare \
    --out "$out/round$r.json" --plots "$out" >/dev/null 2>&1
  after=$(fio_bw)
  python3 - "$out/round$r.json" "$before" "$after" "$r" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
before, after, r = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
fio = (before + after) / 2
for row in rep["results"]:
    bw = row["read_bytes_per_s"]
    print(f"round {r}: {row['context']:>6} ctx x{row['sequences']}: flexgen {bw/1e9:.2f} GB/s, "
          f"fio {before/1e9:.2f}/{after/1e9:.2f} GB/s, ratio {bw/fio:.2f}")
PY
done
