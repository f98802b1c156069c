#!/usr/bin/env bash
# Build the separate benchmark environment bench/.venv (never touches the
# project's test venv /work/main/.venv).
#
# Contents: CPU torch 2.13.0 (the local wheel this machine ships; pip picks it
# up via find-links), torchvision (PyPI, installed so that it does NOT replace
# the CPU torch -- BackPACK imports it), the three peer libraries
# (PyHessian, hessian-eigenthings, curvlinops) plus BackPACK, Kronfluence (influence
# functions; it needs torchvision, kept on the CPU torch by the constraint, and pulls
# accelerate, safetensors and huggingface_hub), scikit-learn, numpy, scipy, tqdm and
# hesse itself (editable).
#
# Idempotent: re-running only installs what is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${BENCH_VENV:-$HERE/.venv}"
PY="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"   # the torchvision release paired with torch 2.13

STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$HERE/setup_env.sh" ] \
   && { [ ! -f "$ROOT/pyproject.toml" ] || [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; }; then
    echo "bench env up to date ($VENV); delete $STAMP to reinstall"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

# Pin torch for every later resolve so nothing drags in a CUDA build.
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# 1. torch: the CPU wheel from find-links if present, else the registry build.
$PIP install "torch==$TORCH_VERSION"

# 2. torchvision: try with deps under the constraint (keeps the installed torch);
#    if the resolver cannot, fall back to --no-deps (BackPACK only imports it).
#    (Its C++ ops do not load against the CPU torch -- "operator torchvision::nms does
#    not exist" on import -- which BackPACK does not need: it imports torchvision only
#    in backpack.utils.examples.)
if ! $VENV/bin/python -m pip show -q torchvision >/dev/null 2>&1; then
    $PIP install -c "$CONSTRAINTS" "torchvision==$TORCHVISION_VERSION" \
        || $PIP install --no-deps "torchvision==$TORCHVISION_VERSION"
fi

# 3. peers and helpers (pinned versions that resolve together)
$PIP install -c "$CONSTRAINTS" \
    "pyhessian==0.1" \
    "hessian-eigenthings==1.0.0a5" \
    "backpack-for-pytorch==1.7.1" \
    "curvlinops-for-pytorch==3.0.1" \
    "kronfluence==1.0.1" \
    "scikit-learn" "numpy" "scipy" "tqdm"

# 4. hesse itself, editable (its dependencies resolve under the same torch pin).
SITE="$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -f "$ROOT/pyproject.toml" ] || [ -f "$ROOT/setup.py" ]; then
    rm -f "$SITE/hesse_repo.pth"
    $PIP install -c "$CONSTRAINTS" -e "$ROOT"
else
    # No packaging metadata yet: make the source tree importable directly.
    echo "$ROOT" > "$SITE/hesse_repo.pth"
fi

$VENV/bin/python - <<'PY'
import importlib
for m in ["torch", "torchvision", "pyhessian", "hessian_eigenthings", "backpack",
          "curvlinops", "kronfluence", "sklearn", "scipy", "numpy", "tqdm", "hesse"]:
    try:
        mod = importlib.import_module(m)
        print(f"{m:22s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # report, do not fail: compare.py notes missing tools
        print(f"{m:22s} IMPORT FAILED: {type(e).__name__}: {e}")
PY
du -sh "$VENV" | sed 's/^/bench venv size: /'
touch "$STAMP"
