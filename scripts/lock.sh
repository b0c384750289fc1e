#!/usr/bin/env bash
# Write requirements-lock.txt: the exact version of every package in a venv the suite just passed
# in (default .venv-latest, built and tested by `make test-latest`). scripts/setup.sh installs
# with it as a pip constraints file, so `make test` / `make train` on a fresh machine get exactly
# these versions. Refresh deliberately: `make test-latest` green, then `make lock`, then commit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
[ -x "$VENV/bin/python" ] || { echo "lock: no venv at '$VENV'; run make test-latest first" >&2; exit 2; }
out=requirements-lock.txt
tmp=$out.tmp
{
  echo "# Exact versions the suite passed with; written by scripts/lock.sh from $VENV on $(date -u +%F)."
  echo "# $("$VENV/bin/python" --version), $(uname -m). Used by scripts/setup.sh as a pip constraints file (-c)."
  echo "# The supported ranges are pyproject.toml's; refresh: make test-latest && make lock."
  "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(slimtune)(==| @)' | LC_ALL=C sort -f
} > "$tmp"
mv "$tmp" "$out"
echo "lock: wrote $out ($(grep -vc '^#' "$out") packages) from $VENV"
