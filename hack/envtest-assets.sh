#!/usr/bin/env bash
# Prints a directory holding `kube-apiserver` and `etcd`, for the integration tests (the
# envtest convention):
#
#   KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh) cargo test --test e2e
#
# Looks, in order, at: $KUBEBUILDER_ASSETS; PATH and /usr/local/kubebuilder/bin; and, on
# machines that have it, the sibling checkout's ../shared/tools/envtest-assets.sh, which
# builds the binaries from Debian's packages.
set -euo pipefail

die() { echo "envtest-assets: $*" >&2; exit 1; }
has_both() { [[ -x $1/kube-apiserver && -x $1/etcd ]]; }

if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  if has_both "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  echo "envtest-assets: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; looking elsewhere" >&2
fi

if apiserver=$(command -v kube-apiserver) && etcd=$(command -v etcd); then
  # The binaries may sit in different directories: gather them behind symlinks.
  dir=${XDG_CACHE_HOME:-$HOME/.cache}/tombstone/envtest
  mkdir -p "$dir"
  ln -sfn "$(readlink -f "$apiserver")" "$dir/kube-apiserver"
  ln -sfn "$(readlink -f "$etcd")" "$dir/etcd"
  echo "$dir"
  exit 0
fi

if has_both /usr/local/kubebuilder/bin; then
  echo /usr/local/kubebuilder/bin
  exit 0
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
builder=$(cd "$root/.." && pwd)/shared/tools/envtest-assets.sh
if [[ -f $builder ]]; then
  echo "envtest-assets: no kube-apiserver/etcd found; falling back to $builder" >&2
  dir=$(bash "$builder") || die "$builder failed"
  dir=$(printf '%s\n' "$dir" | tail -n 1)
  # That script can report success without having built kube-apiserver (e.g. when apt is
  # locked by another process): check what it printed.
  for bin in kube-apiserver etcd; do
    [[ -n $dir && -x $dir/$bin ]] ||
      die "$builder printed '$dir', but $bin is missing or not executable there; run it again once apt is free"
  done
  echo "$dir"
  exit 0
fi

die "kube-apiserver and etcd not found.
Install them with setup-envtest and point KUBEBUILDER_ASSETS at them:
  go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest
  export KUBEBUILDER_ASSETS=\$(setup-envtest use -p path 1.30.x)
or put both binaries in /usr/local/kubebuilder/bin or on PATH."
