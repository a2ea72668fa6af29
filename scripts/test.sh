#!/usr/bin/env bash
# The whole test suite: unit, property and fake-side tests, then real Docker + CRIU end-to-end
# tests on the local test bed. Installs what is missing first. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
target/release/ferry testbed up --with-incompatible-host --with-userns-hosts >/dev/null
# The Engine API client's live test runs against test-bed host c, on reserved test subnets.
export FERRY_DOCKER_TEST_HOST=unix:///run/ferry-testbed/c/docker.sock
export FERRY_DOCKER_TEST_SUBNET=198.19.70.0/24 FERRY_DOCKER_TEST_MACVLAN_SUBNET=198.19.71.0/24
FERRY_E2E=1 cargo test --release --workspace -- --test-threads=1
