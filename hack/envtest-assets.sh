#!/usr/bin/env bash
# Prints a directory holding `kube-apiserver` and `etcd`, for the integration tests and the
# demo (the envtest convention):
#
#   export KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh)
#
# Looks, in order, at: $KUBEBUILDER_ASSETS; `setup-envtest` if it is on PATH; the directory
# /usr/local/kubebuilder/bin; PATH; and its own cache. When none has both binaries, it
# builds them the way a machine that cannot download envtest's binaries can: kube-apiserver
# from Debian's `kubernetes` source package (Kubernetes 1.20.2) with Debian's Go 1.19, and
# etcd from Debian's `etcd-server` package. The result is cached under
# ${XDG_CACHE_HOME:-~/.cache}/tombstone/envtest/, so only the first run takes minutes
# (about 4 on 2 cores). Installing the Debian packages needs root; without it the script
# prints the command to run.
#
#   hack/envtest-assets.sh --find    prints the directory only if it needs no build; else exits 1
#
# Progress and errors go to stderr; stdout carries only the directory.
set -euo pipefail
LOG_NAME=envtest-assets
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/lib.sh
source "$root/hack/lib.sh"

VERSION=1.20.2
# Debian bookworm's source package of Kubernetes 1.20.2 and the SHA-256 of its upstream
# tarball (apt checks it against the signed index; this pins the version the binary claims).
SOURCE_PACKAGE=kubernetes
ORIG_TARBALL=kubernetes_1.20.5+really1.20.2.orig.tar.gz
ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
GO=/usr/lib/go-1.19/bin/go
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2

cache=${XDG_CACHE_HOME:-$HOME/.cache}/tombstone/envtest
built=$cache/$VERSION

find_only=false
case ${1:-} in
  --find) find_only=true ;;
  "") ;;
  *) die "unknown argument '$1'" "usage: hack/envtest-assets.sh [--find]" ;;
esac

has_both() { [[ -n $1 && -x $1/kube-apiserver && -x $1/etcd ]]; }
found() {
  echo "$1"
  exit 0
}

# 1. The envtest convention: KUBEBUILDER_ASSETS, setup-envtest, /usr/local/kubebuilder/bin, PATH.
if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  has_both "$KUBEBUILDER_ASSETS" && found "$KUBEBUILDER_ASSETS"
  say "envtest-assets: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; looking elsewhere"
fi
if command -v setup-envtest >/dev/null; then
  if dir=$(setup-envtest use -p path "${ENVTEST_K8S_VERSION:-1.20.x}" 2>/dev/null) && has_both "$dir"; then
    found "$dir"
  fi
  say "envtest-assets: setup-envtest found no binaries for ${ENVTEST_K8S_VERSION:-1.20.x}; looking elsewhere"
fi
has_both /usr/local/kubebuilder/bin && found /usr/local/kubebuilder/bin
if apiserver=$(command -v kube-apiserver) && etcd=$(command -v etcd); then
  # The two may sit in different directories: gather them behind symlinks.
  dir=$cache/from-path
  mkdir -p "$dir"
  ln -sfn "$(readlink -f "$apiserver")" "$dir/kube-apiserver"
  ln -sfn "$(readlink -f "$etcd")" "$dir/etcd"
  found "$dir"
fi

# 2. Our own cache.
has_both "$built" && found "$built"
$find_only && exit 1

# 3. Build. One build at a time: a second run waits for the first and then finds its result.
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
  say "envtest-assets: another run is building the binaries; waiting for it"
  flock 9
fi
has_both "$built" && found "$built"

say "envtest-assets: no kube-apiserver and etcd found (KUBEBUILDER_ASSETS, setup-envtest, /usr/local/kubebuilder/bin, PATH);"
say "envtest-assets: building them from Debian's packages into $built (first time only)"

missing=$(debian_missing "${ENVTEST_BUILD_PACKAGES[@]}")
if [[ -n $missing ]]; then
  mapfile -t missing <<<"$missing"
  stage "envtest: installing the Debian packages for the build: ${missing[*]}"
  apt_install "to build the test API server" "${missing[@]}"
  stage_done
fi
for f in "$GO" "$REFLECT2/reflect2.go" /usr/bin/etcd; do
  [[ -e $f ]] || die "$f is missing although its Debian package is installed" \
    "Reinstall it: apt-get install --reinstall ${ENVTEST_BUILD_PACKAGES[*]}"
done

log=$cache/build.log
: >"$log"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# fail STEP: the end of the build log, and what to do next.
fail() {
  tail -n 25 "$log" >&2
  die "$1 failed (the last lines of $log are above)" \
    "The whole log is $log. Fix what it reports, then run this command again: it starts the build over."
}

# apt-get source needs a deb-src entry; machines often ship only `deb` ones.
deb_src_entry() {
  grep -rqsE '^[[:space:]]*(Types:.*deb-src|deb-src[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/
}
if ! deb_src_entry; then
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    from=/etc/apt/sources.list.d/debian.sources
    to=/etc/apt/sources.list.d/tombstone-deb-src.sources
    edit='s/^Types: deb$/Types: deb-src/'
  else
    from=/etc/apt/sources.list
    to=/etc/apt/sources.list.d/tombstone-deb-src.list
    edit='/^deb /!d; s/^deb /deb-src /'
  fi
  if ((EUID != 0)); then
    die "apt has no deb-src entry, which downloading Debian's kubernetes source package needs" \
      "Add one (as root) and run this command again:" \
      "  sudo sh -c \"sed -e '$edit' $from > $to\" && sudo apt-get update"
  fi
  stage "envtest: adding a deb-src entry for Debian's source packages ($to)"
  sed -e "$edit" "$from" >"$to"
  apt-get -q -o DPkg::Lock::Timeout=600 update >>"$log" 2>&1 || fail "apt-get update"
  stage_done
fi

stage "envtest: downloading Debian's $SOURCE_PACKAGE source package (Kubernetes $VERSION, 34 MB)"
get_source() { (cd "$work" && apt-get -q source --download-only "$SOURCE_PACKAGE") >>"$log" 2>&1; }
if ! get_source; then
  # The index of source packages may be missing or stale: refresh it once, as root.
  ((EUID == 0)) || fail "apt-get source $SOURCE_PACKAGE (as root this script would run apt-get update and retry)"
  apt-get -q -o DPkg::Lock::Timeout=600 update >>"$log" 2>&1 || fail "apt-get update"
  get_source || fail "apt-get source $SOURCE_PACKAGE"
fi
[[ -f $work/$ORIG_TARBALL ]] || fail "the download of $ORIG_TARBALL (not found after apt-get source)"
echo "$ORIG_SHA256  $work/$ORIG_TARBALL" | sha256sum --check --quiet >>"$log" 2>&1 ||
  fail "the check of $ORIG_TARBALL against its pinned SHA-256 (Debian's package changed?)"
stage_done

stage "envtest: unpacking; replacing the vendored reflect2 1.0.1 (crashes under Go >= 1.18) by Debian's 1.0.2"
gopath=$work/gopath
src=$gopath/src/k8s.io/kubernetes
mkdir -p "$gopath/src/k8s.io"
tar -xzf "$work/$ORIG_TARBALL" -C "$gopath/src/k8s.io" >>"$log" 2>&1 || fail "unpacking $ORIG_TARBALL"
mv "$gopath/src/k8s.io"/kubernetes-* "$src"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r "$REFLECT2" "$src/vendor/github.com/modern-go/reflect2"
stage_done

# Go 1.19 in GOPATH mode, whatever Go is on PATH and however the user's Go is configured.
unset GOROOT GOFLAGS GOBIN GOTOOLCHAIN GOOS GOARCH
export GO111MODULE=off GOPATH=$gopath GOCACHE=$work/go-build CGO_ENABLED=0
export PATH=/usr/lib/go-1.19/bin:$PATH
cd "$src"

stage "envtest: generating the OpenAPI definitions the source package lacks"
"$GO" build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen >>"$log" 2>&1 ||
  fail "building openapi-gen"
dirs=$( (find pkg cmd plugin -name '*.go'
         find -L vendor/k8s.io -name '*.go' -not -path 'vendor/k8s.io/code-generator/*' \
              -not -path 'vendor/k8s.io/sample-apiserver/*') |
        xargs grep -l '^// *+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u |
        sed 's#^#k8s.io/kubernetes/#' | paste -sd,) || true # grep -l exits 1 on batches without a tag
[[ -n $dirs ]] || fail "finding the packages tagged +k8s:openapi-gen"
"$work/openapi-gen" -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi \
  -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
  -r "$work/violations.report" >>"$log" 2>&1 || fail "openapi-gen"
[[ -s pkg/generated/openapi/zz_generated.openapi.go ]] || fail "openapi-gen (it wrote no definitions)"
stage_done

stage "envtest: compiling kube-apiserver $VERSION with Go 1.19 (the long step: about 3-4 minutes on 2 cores)"
v=k8s.io/kubernetes/vendor/k8s.io/component-base/version
"$GO" build -ldflags "-X $v.gitVersion=v$VERSION -X $v.gitMajor=1 -X $v.gitMinor=20" \
  -o "$work/kube-apiserver" ./cmd/kube-apiserver >>"$log" 2>&1 || fail "compiling kube-apiserver"
stage_done

cd /
# Install through a temporary directory renamed into place, so that an interrupted run never
# leaves a half-written directory that looks complete.
rm -rf "$built.new"
mkdir -p "$built.new"
install -m 0755 "$work/kube-apiserver" "$built.new/kube-apiserver"
ln -s /usr/bin/etcd "$built.new/etcd"
# Exit codes are not the proof: both binaries must be there and say what they are.
version=$("$built.new/kube-apiserver" --version 2>&1) || true
[[ $version == "Kubernetes v$VERSION" ]] ||
  fail "the check of the built kube-apiserver (--version does not say v$VERSION)"
"$built.new/etcd" --version >/dev/null 2>&1 || fail "the check of etcd (/usr/bin/etcd --version)"
rm -rf "$built"
mv "$built.new" "$built"
has_both "$built" || die "$built lacks kube-apiserver or etcd after the build" "Run this command again."
say "envtest-assets: kube-apiserver $VERSION and etcd are in $built"
found "$built"
