# shellcheck shell=bash
# Shared by the hack/ scripts (sourced, not run): progress lines with timings, and Debian
# packages installed through apt-get one batch at a time.
#
# Progress goes to stderr, so that a script's stdout stays free for what it prints for its
# caller (a directory, `export` lines).

# The name in front of every message; the sourcing script may set it first.
: "${LOG_NAME:=$(basename "$0" .sh)}"

say() { printf '%s\n' "$*" >&2; }

# die MESSAGE [WHAT TO DO NEXT...]: the error, then each further argument on its own line.
die() {
  say "$LOG_NAME: error: $1"
  shift
  local line
  for line in "$@"; do say "  $line"; done
  exit 1
}

now_ms() {
  local t
  t=$(date +%s%N)
  echo $((t / 1000000))
}

# human_ms MILLISECONDS: 0.4s, 12s, 4m05s.
human_ms() {
  local ms=$1
  if ((ms < 10000)); then
    printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
  elif ((ms < 60000)); then
    printf '%ds' $((ms / 1000))
  else
    printf '%dm%02ds' $((ms / 60000)) $((ms % 60000 / 1000))
  fi
}

# stage TEXT: one line saying what the next step does; stage_done (or stage_end WORD) ends it
# with how long it took.
stage() {
  STAGE_T0=$(now_ms)
  say "==> $*"
}
stage_end() {
  say "    $1 in $(human_ms $(($(now_ms) - STAGE_T0)))"
}
stage_done() { stage_end "done"; }

# debian_missing PACKAGE...: prints the packages that dpkg does not have installed.
debian_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || echo "$p"
  done
}

# apt_install WHY PACKAGE...: installs the packages with apt-get when running as root
# (`apt-get update` first, once per run of the set-up: TOMBSTONE_APT_UPDATED is exported
# once it has run). Otherwise says which command to run, and stops.
apt_install() {
  local why=$1
  shift
  (($# > 0)) || return 0
  command -v apt-get >/dev/null ||
    die "these Debian packages are needed ($why) but this system has no apt-get: $*" \
      "Install the same tools with this system's package manager, then run this command again."
  if ((EUID != 0)); then
    die "these Debian packages are needed ($why): $*" \
      "Run this command as root, or install them first:" \
      "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $*" \
      "then run this command again."
  fi
  local log
  log=$(mktemp)
  export DEBIAN_FRONTEND=noninteractive
  # apt-get holds a lock: wait for another apt-get or dpkg to finish instead of failing.
  local apt=(apt-get -q -o DPkg::Lock::Timeout=600)
  if [[ -z ${TOMBSTONE_APT_UPDATED:-} ]]; then
    "${apt[@]}" update >"$log" 2>&1 ||
      { tail -n 20 "$log" >&2; rm -f "$log"; die "apt-get update failed (above)" \
        "Check that this machine reaches Debian's package mirrors, then run this command again."; }
    export TOMBSTONE_APT_UPDATED=1
  fi
  "${apt[@]}" install -y --no-install-recommends "$@" >"$log" 2>&1 ||
    { tail -n 20 "$log" >&2; rm -f "$log"; die "apt-get install $* failed (above)" \
      "Fix what apt-get reports (another package manager running? disk full?), then run this command again."; }
  rm -f "$log"
  # apt-get's exit status is not the proof: dpkg must now list every package.
  local still
  still=$(debian_missing "$@")
  [[ -z $still ]] || die "apt-get finished, but these packages are still not installed: $still" \
    "Install them by hand (apt-get install $still), then run this command again."
}

# What building the test API server needs from Debian (hack/envtest-assets.sh): Go 1.19 (the
# newest that builds Kubernetes 1.20 in GOPATH mode), etcd 3.4, and reflect2 1.0.2 to replace
# the vendored 1.0.1, which crashes under Go >= 1.18.
# shellcheck disable=SC2034 # used by the scripts that source this file
ENVTEST_BUILD_PACKAGES=(golang-1.19-go etcd-server golang-github-modern-go-reflect2-dev)
