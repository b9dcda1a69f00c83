#!/usr/bin/env bash
# The local demo: a local control plane, Redis, S3 (moto), the Loki test double, a real
# OpenSearch node (the Elasticsearch test double, announced loudly, when Java or the launcher
# hack/setup.sh builds is missing), the operator and the samples; prints what
# `kubectl get tombstone` shows after the first sweeps. `hack/demo.sh --keep` stays up and prints the KUBECONFIG to look around with.
#
# Installs what it needs first (hack/setup.sh): the first run takes minutes, later ones
# start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_NAME=demo
source hack/lib.sh

t0=$(now_ms)
env=$(hack/setup.sh)
eval "$env"

stage "cargo: building the operator and the demo (the first build of the project takes several minutes)"
cargo build --quiet --bin tombstone --example demo ||
  die "cargo build failed (above)" "Fix the build, then run hack/demo.sh again."
stage_done
say "==> demo: starting (set-up and build took $(human_ms $(($(now_ms) - t0))))"

export TOMBSTONE_BIN
TOMBSTONE_BIN="$(pwd)/target/debug/tombstone"
for arg in "$@"; do
  # It stays up until Ctrl-C and prints the KUBECONFIG line itself.
  [[ $arg == --keep ]] && exec cargo run --quiet --example demo -- "$@"
done
cargo run --quiet --example demo -- "$@"
say ""
say "demo: done in $(human_ms $(($(now_ms) - t0))). To look around: hack/demo.sh --keep leaves everything running"
say "      and prints the line to use (export KUBECONFIG=...), then: kubectl get tombstone -n shop"
