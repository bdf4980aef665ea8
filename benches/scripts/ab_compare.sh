#!/usr/bin/env bash
# Before/after comparison of two builds of the benchmarks on this machine, alternated
# (ABBA for decode-bench, ABAB for kvbench) so drift of a shared VM hits both alike.
#
#   benches/scripts/ab_compare.sh BEFORE_BIN_DIR AFTER_BIN_DIR [SCRATCH_DIR]
#
# Each BIN_DIR holds decode-bench and kvbench (e.g. copies of target/release from two
# commits). decode-bench runs at 8K context, 1/4/8 sequences, flexgen and sparse; its
# prefill is persisted in SCRATCH_DIR/decode.kv by the first run and restored by the others
# (both builds must read the same store format). kvbench runs its KV-store workload
# (4 × 8192 tokens) and two raw O_DIRECT io_uring jobs (4 KiB random and 256 KiB sequential
# reads at queue depth 64).
set -u
before=${1:?before bin dir}
after=${2:?after bin dir}
scratch=${3:-/var/tmp/instinfer-ab}
mkdir -p "$scratch"
bin() { if [ "$1" = B ]; then echo "$before"; else echo "$after"; fi; }

for who in B A A B; do
  echo "=== decode-bench $who $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  "$(bin $who)/decode-bench" --seconds 5 --page-cache-bytes 33554432 --contexts 8192 \
    --batches 1,4,8 --modes flexgen,sparse --no-llamacpp \
    --store "$scratch/decode.kv" --store-bytes 4294967296 \
    --out "$scratch/decode-$who-$RANDOM.json" --plots "$scratch/plots" 2>&1 |
    grep -E "sparse vs flexgen|prefill|error"
done
for who in B A B A; do
  echo "=== kvbench kv $who $(date +%T)"
  rm -f "$scratch/kv.store"
  "$(bin $who)/kvbench" kv --filename "$scratch/kv.store" --sequences 4 --tokens 8192 \
    --steps 8 --fractions 1,0.25,0.125 --threads 2 2>&1 | tail -6
done
for who in B A B A; do
  echo "=== kvbench raw $who $(date +%T)"
  for job in "randread 4k" "read 256k"; do
    set -- $job
    "$(bin $who)/kvbench" --name "$1-$2" --filename "$scratch/raw" --rw "$1" --bs "$2" \
      --iodepth 64 --direct 1 --size 2g --runtime 5 --time_based 2>&1 | grep "read:"
  done
done
rm -f "$scratch/kv.store" "$scratch/raw"
