#!/usr/bin/env bash
# The test command: formatting, lints, unit tests and the integration tests against a real
# kube-apiserver + etcd (envtest) and real redis-servers.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KUBEBUILDER_ASSETS:-}" ]]; then
  KUBEBUILDER_ASSETS="$(hack/envtest-assets.sh)"
  export KUBEBUILDER_ASSETS
fi
for tool in redis-server redis-cli kubectl openssl; do
  command -v "$tool" >/dev/null || { echo "test.sh: $tool is needed (apt-get install redis-server redis-tools openssl; kubectl)" >&2; exit 1; }
done
python3 -c 'import moto.server' 2>/dev/null || { echo "test.sh: the S3 test server is needed (python3 -m pip install 'moto[server]')" >&2; exit 1; }

cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
# A bound on the whole run, so a hung test fails CI instead of stalling it.
timeout 45m cargo test --locked
