#!/usr/bin/env bash
# Set up the project: a virtual environment in .venv with pigeon_utils installed in editable mode.
#
# torch is pinned in the SAME pip call as everything else (PIGEON_TORCH, default torch==2.13.0), so no other
# package can make pip swap it for a different build. On a GPU machine that pin resolves to PyPI's CUDA
# build; on a CPU-only machine with a local CPU wheel (as on our CI machines) to that wheel.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${PIGEON_TORCH:-torch==2.13.0}
stamp=.venv/.pigeon-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and pigeon_utils[dev] into .venv (about a minute) ..."
  log=$(mktemp)
  if ! .venv/bin/pip install --disable-pip-version-check --no-compile -q "$TORCH_SPEC" -e ".[dev]" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40
    echo "[setup] pip install failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  # pip byte-compiles one file at a time (40 of a 100-s set-up on 2 cores); compileall uses every core. Files this
  # Python cannot compile (torch's 3.12-only test helpers) are skipped, as pip skips them.
  .venv/bin/python -m compileall -qq -j 0 .venv/lib >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import pigeon_utils, torch, torchvision, transformers, diffusers, open_clip, peft, accelerate  # noqa: F401
print(f"[setup] ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, diffusers {diffusers.__version__}")
PY
