#!/usr/bin/env bash
# The test command: formatting, lints, unit tests and the integration tests against a real
# kube-apiserver + etcd (envtest), real redis-servers and a real S3-compatible server (moto).
#
#   hack/test.sh                    everything
#   hack/test.sh --test e2e sweep   arguments go to `cargo test` (here: one e2e module)
#
# Installs what it needs first (hack/setup.sh): the first run takes minutes, later ones
# start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_NAME="test"
source hack/lib.sh

t0=$(now_ms)
env=$(hack/setup.sh)
eval "$env"

# skipped TOOL HOW: a missing rustfmt or clippy (a toolchain without the component, where none
# can be downloaded) skips its check loudly instead of failing the run, in CI too.
skipped() {
  say "    SKIPPED: $1 is not installed, so this check did NOT run (install it: $2)"
  say "    WARNING: the code was NOT checked by $1 in this run"
}

stage "cargo fmt --check"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check || die "the code is not formatted (diff above)" "Run cargo fmt, then hack/test.sh again."
  stage_done
else
  skipped rustfmt "rustup component add rustfmt"
fi

stage "cargo clippy --all-targets -- -D warnings"
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --quiet --all-targets --locked -- -D warnings || die "clippy found problems (above)" "Fix them, then run hack/test.sh again."
  stage_done
else
  skipped clippy "rustup component add clippy"
fi

stage "cargo test $* (builds the tests first: the first time takes several minutes)"
# A bound on the whole run, so a hung test fails CI instead of stalling it.
timeout 45m cargo test --locked "$@" || die "tests failed (above)" \
  "Rerun one with: eval \"\$(hack/setup.sh)\"; cargo test --test e2e NAME -- --nocapture"
stage_done
say "test: passed in $(human_ms $(($(now_ms) - t0)))"
