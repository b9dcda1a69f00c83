#!/usr/bin/env bash
# The local demo: a local control plane, Redis, the operator and the samples; prints what
# `kubectl get tombstone` shows after the first sweep. `hack/demo.sh --keep` stays up.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in redis-server redis-cli kubectl openssl; do
  command -v "$tool" >/dev/null || { echo "demo.sh: $tool is needed (apt-get install redis-server redis-tools openssl; kubectl)" >&2; exit 1; }
done
python3 -c 'import moto.server' 2>/dev/null || { echo "demo.sh: the S3 test server is needed (python3 -m pip install 'moto[server]')" >&2; exit 1; }
if [[ -z "${KUBEBUILDER_ASSETS:-}" ]]; then
  KUBEBUILDER_ASSETS="$(hack/envtest-assets.sh)"
  export KUBEBUILDER_ASSETS
fi
cargo build --quiet --bin tombstone
TOMBSTONE_BIN="$(pwd)/target/debug/tombstone" exec cargo run --quiet --example demo -- "$@"
