#!/usr/bin/env bash
# The main job: two local Docker hosts, a stateful server on host a with a client connected,
# live-migrated to host b while the client keeps counting on the same connection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/ferry demo "$@"
