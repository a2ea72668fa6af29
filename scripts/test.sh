#!/usr/bin/env bash
# The whole test suite: unit, property and fake-side tests, then real Docker + CRIU end-to-end
# tests on the local test bed. Installs what is missing first. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
FERRY_E2E=1 cargo test --release --workspace -- --test-threads=1
