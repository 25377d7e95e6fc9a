#!/usr/bin/env bash
# Create .venv with every pinned dependency and the project installed; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "setup: TorchServe needs Java 17, and 'java' is not on PATH." >&2
  echo "       Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y openjdk-17-jre-headless" >&2
  exit 1
fi
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
if [ "${java_major:-0}" -lt 17 ]; then
  echo "setup: TorchServe needs Java 17 or newer; found Java ${java_major:-unknown}." >&2
  exit 1
fi
if ! command -v curl >/dev/null 2>&1; then
  echo "setup: the demo's last step uses curl; install it (apt-get install -y curl)." >&2
  exit 1
fi

# The traffic router (HAProxy) and the proxy the load-generator tests hit (nginx) are Debian's.
missing=()
for tool in haproxy:haproxy nginx:nginx; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} from Debian"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Only the binaries are needed: the project runs its own instances on loopback ports.
    for svc in "${missing[@]}"; do service "$svc" stop >/dev/null 2>&1 || true; done
  else
    echo "setup: please install ${missing[*]} (Debian/Ubuntu: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv (first time: a few minutes)"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install pip==26.3 \
         && .venv/bin/python -m pip install -r requirements.txt \
         && .venv/bin/python -m pip install --no-deps -e .; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -30 >&2
    echo "setup: pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
