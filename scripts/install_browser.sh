#!/usr/bin/env bash
# Install what the end-to-end browser test (tests/test_browser_inspector.py) needs, idempotently:
#   * Debian's chromium (apt) at /usr/bin/chromium, when it is missing;
#   * the PyPI `playwright` package (the Python driver only) into .venv, when it is missing.
# Never runs `playwright install`: the test drives Debian's browser via executable_path=/usr/bin/chromium.
# Run after scripts/setup.sh (it needs .venv). Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "[install_browser] .venv is missing: run scripts/setup.sh first" >&2
  exit 1
fi

if [ -x /usr/bin/chromium ]; then
  echo "[install_browser] chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
else
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "[install_browser] need root (or sudo) to apt-get install chromium" >&2; exit 1
    fi
  fi
  echo "[install_browser] chromium: installing Debian's package (apt, ~0.5 GB) ..."
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || $SUDO apt-get install -y --no-install-recommends chromium  # again, loudly, to show why it failed
  echo "[install_browser] chromium: installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
fi

if "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "[install_browser] playwright: already installed ($("$PY" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
else
  echo "[install_browser] playwright: installing the PyPI package into .venv (no browser download) ..."
  log=$(mktemp)
  if ! "$PY" -m pip install --disable-pip-version-check -q playwright >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40
    echo "[install_browser] pip install playwright failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "[install_browser] playwright: installed ($("$PY" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
fi
