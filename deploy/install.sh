#!/usr/bin/env bash
# Install instinferd as a systemd service: the binaries, the configuration, the unit, a
# dedicated system user, and the default model in the service's cache directory.
#
#   deploy/install.sh [--no-build] [--no-model] [--enable]
#
#   --no-build   use the binaries already in ${CARGO_TARGET_DIR:-target}/release (or $BIN_DIR)
#   --no-model   do not fetch the default model (set `model` in the config instead)
#   --enable     enable and start the service
#
# DESTDIR=/some/root stages everything under that directory instead (no user, no systemctl),
# for packaging or for checking the unit with `systemd-analyze verify --root`.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1 model=1 enable=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --no-model) model=0 ;;
    --enable) enable=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

root="${DESTDIR:-}"
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi

bin_dir="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
if [ "$build" = 1 ] && [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --bin instinferd --bin instinfer
fi
for b in instinferd instinfer; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b is missing (build first)" >&2; exit 1; }
done

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -m 0755 "$bin_dir/instinferd" "$bin_dir/instinfer" "$root/usr/local/bin/"
install -d -m 0755 "$root/etc/instinferd"
if [ -e "$root/etc/instinferd/instinferd.toml" ]; then
  echo "keeping the existing $root/etc/instinferd/instinferd.toml"
else
  install -m 0644 deploy/instinferd.toml "$root/etc/instinferd/instinferd.toml"
fi
install -m 0644 deploy/instinferd.service "$root/etc/systemd/system/instinferd.service"

if [ -z "$root" ]; then
  if ! id instinferd >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/instinferd \
      --shell /usr/sbin/nologin instinferd
  fi
fi

if [ "$model" = 1 ]; then
  cache="$root/var/cache/instinferd"
  install -d -m 0750 "$cache"
  INSTINFER_CACHE_DIR="$cache" "$root/usr/local/bin/instinfer" model-path
  if [ -z "$root" ]; then chown -R instinferd:instinferd "$cache"; fi
fi

if [ -z "$root" ]; then
  systemctl daemon-reload
  systemd-analyze verify /etc/systemd/system/instinferd.service
  if [ "$enable" = 1 ]; then
    systemctl enable --now instinferd.service
  else
    echo "installed; start with: systemctl enable --now instinferd.service"
  fi
fi
