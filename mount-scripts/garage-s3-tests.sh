#!/usr/bin/env bash
# Runs the S3 tests (tests/remote_s3.rs) against Garage, a real distributed S3 store, instead
# of s3s-fs: starts a single-node Garage on loopback ports in a scratch directory, creates a
# key and the "images" bucket, runs the tests with VMFS_S3_ENDPOINT pointing at it, and stops
# Garage by its PID. Not part of `cargo test` (Garage takes ~25 minutes to build):
#
#   cargo install --locked garage --version 2.5.0     # once
#   mount-scripts/garage-s3-tests.sh [extra cargo test args]
#
# GARAGE=/path/to/garage picks the binary (default: garage on PATH, then ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

garage_bin=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
[ -x "$garage_bin" ] || {
  echo "garage not found: cargo install --locked garage --version 2.5.0 (or set GARAGE=)" >&2
  exit 2
}

work=$(mktemp -d /tmp/vmfs-garage.XXXXXX)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rpc_port=$(free_port); s3_port=$(free_port); admin_port=$(free_port)

cat > "$work/garage.toml" <<EOF
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
EOF
g() { "$garage_bin" -c "$work/garage.toml" "$@"; }

g server > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  g status > /dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done
node=$(g status 2>/dev/null | grep -oE '^[0-9a-f]{16}' | head -1)
[ -n "$node" ] || { g status >&2; exit 1; }
g layout assign -z dc1 -c 1G "$node" > /dev/null
g layout apply --version 1 > /dev/null
g key create vmfs-tests > "$work/key.txt"
key_id=$(awk -F': *' '/Key ID/ {print $2; exit}' "$work/key.txt")
secret=$(awk -F': *' '/Secret key/ {print $2; exit}' "$work/key.txt")
g bucket create images > /dev/null
g bucket allow --read --write --owner images --key vmfs-tests > /dev/null

echo "garage $("$garage_bin" --version 2>/dev/null | head -1) on 127.0.0.1:$s3_port (node $node)"
VMFS_S3_ENDPOINT="http://127.0.0.1:$s3_port" \
VMFS_S3_ACCESS_KEY="$key_id" \
VMFS_S3_SECRET_KEY="$secret" \
VMFS_S3_REGION=garage \
  cargo test --test remote_s3 "$@"
