#!/usr/bin/env bash
# Run the same jobs with fio and with kvbench on the same file and print kvbench/fio ratios.
#
#   benches/scripts/fio_compare.sh [FILE]
#
# Environment: SIZE (default 4g), RUNTIME seconds per run (default 15), REPEATS (default 3,
# alternating fio and kvbench; "ratio" compares the medians, "paired" is the median of the
# ratios of back-to-back runs), KVBENCH (default
# target/release/kvbench), FIO_EXTRA (extra fio flags, e.g. "--fixedbufs --registerfiles"
# to match kvbench's registered buffers and fixed file). Needs fio (Debian: apt-get install -y fio) and python3.
set -euo pipefail

FILE=${1:-${KVBENCH_FILE:-/var/tmp/kvbench/testfile}}
SIZE=${SIZE:-4g}
RUNTIME=${RUNTIME:-15}
REPEATS=${REPEATS:-3}
KVBENCH=${KVBENCH:-target/release/kvbench}

command -v fio >/dev/null || { echo "fio not found: apt-get install -y fio" >&2; exit 2; }
[ -x "$KVBENCH" ] || { echo "$KVBENCH missing: cargo build -p instinfer-benches --release" >&2; exit 2; }
mkdir -p "$(dirname "$FILE")"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "# file=$FILE size=$SIZE runtime=${RUNTIME}s repeats=$REPEATS fio extra flags: ${FIO_EXTRA:-none}"
echo "# $(fio --version), kvbench $("$KVBENCH" --version | awk '{print $2}')"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# Lay the file out once so both tools read the same written blocks.
fio --name=layout --filename="$FILE" --size="$SIZE" --rw=write --bs=1m --iodepth=8 \
    --direct=1 --ioengine=io_uring --output-format=terse >/dev/null

COMMON=(--filename="$FILE" --size="$SIZE" --runtime="$RUNTIME" --time_based --direct=1
        --ioengine=io_uring --numjobs=1 --output-format=json)
JOBS=(
  "randread-4k-qd64 read --rw=randread --bs=4k --iodepth=64"
  "read-128k-qd32 read --rw=read --bs=128k --iodepth=32"
  "write-1m-qd8 write --rw=write --bs=1m --iodepth=8"
)

extract() { # file dir -> "bw_bytes p50_ns p99_ns"
  python3 - "$1" "$2" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index('{'):])["jobs"][0][sys.argv[2]]
p = j["clat_ns"]["percentile"]
print(j["bw_bytes"], p["50.000000"], p["99.000000"])
PY
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

printf "%-18s %12s %12s %8s %8s %22s %22s\n" job "fio MB/s" "kvbench MB/s" ratio "paired" "fio p50/p99 us" "kvbench p50/p99 us"
for spec in "${JOBS[@]}"; do
  set -- $spec
  name=$1; dir=$2; shift 2
  : >"$OUT/fio.$name"; : >"$OUT/kvb.$name"
  for r in $(seq 1 "$REPEATS"); do
    # shellcheck disable=SC2086
    fio --name="$name" "$@" "${COMMON[@]}" ${FIO_EXTRA:-} >"$OUT/f.json"
    extract "$OUT/f.json" "$dir" >>"$OUT/fio.$name"
    "$KVBENCH" --name="$name" "$@" "${COMMON[@]}" >"$OUT/k.json"
    extract "$OUT/k.json" "$dir" >>"$OUT/kvb.$name"
  done
  fbw=$(cut -d' ' -f1 "$OUT/fio.$name" | median)
  kbw=$(cut -d' ' -f1 "$OUT/kvb.$name" | median)
  fp50=$(cut -d' ' -f2 "$OUT/fio.$name" | median); fp99=$(cut -d' ' -f3 "$OUT/fio.$name" | median)
  kp50=$(cut -d' ' -f2 "$OUT/kvb.$name" | median); kp99=$(cut -d' ' -f3 "$OUT/kvb.$name" | median)
  # Median of the ratios of back-to-back runs: robust to slow drift in background load.
  paired=$(paste -d' ' "$OUT/kvb.$name" "$OUT/fio.$name" | awk '{print $1/$4}' | median)
  awk -v n="$name" -v f="$fbw" -v k="$kbw" -v p="$paired" -v a="$fp50" -v b="$fp99" -v c="$kp50" -v d="$kp99" 'BEGIN {
    printf "%-18s %12.0f %12.0f %8.3f %8.3f %22s %22s\n", n, f/1e6, k/1e6, k/f, p,
      sprintf("%.0f/%.0f", a/1e3, b/1e3), sprintf("%.0f/%.0f", c/1e3, d/1e3) }'
  echo "#   runs (bw_bytes p50_ns p99_ns): fio [$(paste -sd';' "$OUT/fio.$name")] kvbench [$(paste -sd';' "$OUT/kvb.$name")]"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
