#!/usr/bin/env bash
# The Termux path on a PC: the whole test suite, and `parsicore run` on the shipped samples, in a virtual
# environment WITHOUT Numba (numpy backend only), with pyfive at its oldest supported version beside h5py.
#
#   bash scripts/test_without_numba.sh [--fresh] [VENV_DIR]
#
# VENV_DIR defaults to ${PARSICORE_NONUMBA_VENV:-${TMPDIR:-/tmp}/parsicore-nonumba-venv} and is reused when
# present (--fresh recreates it, but only a directory this script created). The venv gets numpy, h5py,
# pillow, click, pytest, hypothesis and pyfive from PyPI, then parsicore itself with `pip install --no-deps .`
# (its requirements include numba). When the Python running this script has Numba, the numpy backend's
# `parsicore run --json` results are compared with the numba backend's.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fresh=0
if [ "${1:-}" = "--fresh" ]; then fresh=1; shift; fi
venv=${1:-${PARSICORE_NONUMBA_VENV:-${TMPDIR:-/tmp}/parsicore-nonumba-venv}}
host_python=${PYTHON:-python3}
marker="$venv/.parsicore-nonumba-venv"
unset PYTHONPATH
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

step_start=0
step() { step_start=$(date +%s); echo "== $*"; }
done_step() { echo "   ($(( $(date +%s) - step_start )) s)"; }
total_start=$(date +%s)

if [ "$fresh" = 1 ] && [ -f "$marker" ]; then
    step "removing the previous venv $venv"
    rm -rf "$venv"
    done_step
fi
if [ ! -x "$venv/bin/python" ]; then
    if [ -e "$venv" ]; then echo "error: $venv exists but is not a virtual environment" >&2; exit 2; fi
    step "creating the venv $venv with $host_python ($($host_python --version 2>&1))"
    "$host_python" -m venv "$venv"
    touch "$marker"
    done_step
fi
py="$venv/bin/python"

step "installing numpy h5py pillow click pytest hypothesis pyfive==0.4.0 (no numba)"
"$py" -m pip install -q numpy h5py pillow click pytest hypothesis "pyfive==0.4.0"
done_step

step "installing parsicore from $repo without its dependencies"
"$py" -m pip install -q --no-deps --force-reinstall "$repo"
done_step

if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('numba') is None)"; then
    echo "error: numba is importable in $venv; this check needs an environment without it" >&2
    exit 1
fi
echo "   numba: absent; $("$py" -c 'import numpy, h5py, pyfive; print("numpy", numpy.__version__, "h5py", h5py.__version__, "pyfive", pyfive.__version__)')"

step "python -m pytest -q -p no:cacheprovider (in $repo, numba absent)"
(cd "$repo" && "$py" -m pytest -q -p no:cacheprovider)
done_step

# The installed package (not the checkout): run from a directory that does not hold it.
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
step "parsicore boards (installed package data)"
(cd "$workdir" && "$venv/bin/parsicore" boards)
done_step

samples=("$repo"/weights/samples/*.png)
default_model=$(cd "$workdir" && "$py" -c "from parsicore.api import default_model_path; print(default_model_path())")
if [ ! -e "${samples[0]}" ] || [ ! -f "$default_model" ]; then
    echo "== parsicore run: skipped (no shipped samples or no default model at $default_model)"
else
    step "parsicore run --json on ${#samples[@]} shipped sample(s) (numpy backend)"
    (cd "$workdir" && "$venv/bin/parsicore" run --json "${samples[@]}") > "$workdir/numpy.jsonl"
    head -n 3 "$workdir/numpy.jsonl"
    "$py" - "$workdir/numpy.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
assert rows and all(r["backend"] == "numpy" for r in rows), "expected the numpy backend"
print(f"   {len(rows)} image(s) classified with the numpy backend")
EOF
    done_step
    if "$host_python" -c "import numba" 2>/dev/null; then
        step "same samples with the numba backend ($host_python, checkout): outputs must agree"
        (cd "$repo" && "$host_python" -m parsicore run --json --backend numba --model "$default_model" "${samples[@]}") \
            > "$workdir/numba.jsonl"
        "$py" - "$workdir/numpy.jsonl" "$workdir/numba.jsonl" <<'EOF'
import json, sys
numpy_rows = [json.loads(line) for line in open(sys.argv[1])]
numba_rows = [json.loads(line) for line in open(sys.argv[2])]
assert len(numpy_rows) == len(numba_rows)
worst = 0.0
for a, b in zip(numpy_rows, numba_rows):
    assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]], (a["image"], a["top"], b["top"])
    worst = max(worst, max(abs(x["prob"] - y["prob"]) for x, y in zip(a["top"], b["top"])))
    assert a["kernels_on"] == b["kernels_on"], (a["image"], a["kernels_on"], b["kernels_on"])
assert worst < 1e-4, f"top-k probabilities differ by {worst}"
print(f"   same top-k labels and gated kernels; probabilities within {worst:.1e}")
EOF
        done_step
    fi
fi
echo "== without numba: all steps passed in $(( $(date +%s) - total_start )) s"
