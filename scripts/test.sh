#!/usr/bin/env bash
# The whole test suite: unit, property and fake-side tests, then real Docker + CRIU end-to-end
# tests on the local test bed. Installs what is missing first. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
# unwrap/expect are denied outside tests (workspace lints): clippy is what enforces that.
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --workspace --all-targets --quiet
elif [ -n "${CI:-}" ]; then
  echo "cargo clippy is missing: CI must check the workspace lints" >&2; exit 1
else
  echo "cargo clippy is missing: the unwrap/expect lint check was not run" >&2
fi
target/release/ferry testbed up --with-incompatible-host --with-userns-hosts >/dev/null
# The Engine API client's live test runs against test-bed host c, on reserved test subnets.
export FERRY_DOCKER_TEST_HOST=unix:///run/ferry-testbed/c/docker.sock
export FERRY_DOCKER_TEST_SUBNET=198.19.70.0/24 FERRY_DOCKER_TEST_MACVLAN_SUBNET=198.19.71.0/24
FERRY_E2E=1 cargo test --release --workspace -- --test-threads=1
# Pre-copy and hybrid migrations of real containers need soft-dirty tracking: where this
# kernel lacks it, the same e2e test runs in a QEMU guest whose kernel has it (a few minutes
# under TCG), so these strategies are proven on every run rather than skipped.
if criu check --feature mem_dirty_track >/dev/null 2>&1; then
  echo "soft-dirty tracking is available here: the pre-copy e2e test ran on this host"
else
  bash scripts/vm-e2e.sh pre_copy_then_hybrid
fi
