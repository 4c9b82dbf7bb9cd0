"""Numba stays out of the process unless the numba backend is chosen; without Numba everything still works.

Each check runs in a fresh interpreter: whether a module was imported is a property of the whole process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUILD_MODEL = """
import numpy as np
from parsicore.builder import ModelBuilder
b = ModelBuilder("t")
b.add_input("x", (None, 2, 6, 6))
b.add_node("Conv", ["x"], ["c"], name="conv", attrs={"pads": (1, 1, 1, 1)},
           weights={"weight": np.ones((3, 2, 3, 3), np.float32)})
b.add_node("MaxPool", ["c"], ["p"], attrs={"kernel": (2, 2), "stride": (2, 2)})
b.add_output("p")
"""

BLOCK_NUMBA = "import sys\nsys.modules['numba'] = None  # import numba -> ImportError, find_spec -> None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "NUMBA_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_numpy_backend_never_imports_numba(tmp_path):
    code = BUILD_MODEL + f"""
import sys, parsicore
b.save({str(tmp_path / "m.h5")!r})
model = parsicore.load({str(tmp_path / "m.h5")!r}, backend="numpy", threads=2)
model(np.ones((2, 2, 6, 6), np.float32))
from parsicore.kernels import numba_available
numba_available()
import parsicore.cli, parsicore.boards
parsicore.boards.resolve()
print(sorted(m for m in sys.modules if m == "numba" or m.startswith(("numba.", "llvmlite"))))
"""
    assert run_python(code).stdout.strip().splitlines()[-1] == "[]"


def test_without_numba_the_default_backend_is_numpy():
    code = BLOCK_NUMBA + BUILD_MODEL + """
import parsicore
from parsicore.kernels import default_backend, numba_available
model = parsicore.load(b.build())
y = model(np.ones((1, 2, 6, 6), np.float32))
print(numba_available(), default_backend(), model.backend, float(y.sum()))
"""
    available, default, used, total = run_python(code).stdout.split()
    assert (available, default, used) == ("False", "numpy", "numpy")
    # all-ones 3x3 conv over 2 channels, then 2x2 max pooling: every pooled window holds a pixel that
    # sees all 9 taps of both channels (18), for 3 output channels x 3x3 positions
    assert float(total) == 18 * 3 * 3 * 3


def test_warmup_without_numba_says_so_and_succeeds(tmp_path):
    code = BLOCK_NUMBA + BUILD_MODEL + f"""
b.save({str(tmp_path / "m.h5")!r})
from click.testing import CliRunner
from parsicore.cli import cli
result = CliRunner().invoke(cli, ["warmup", {str(tmp_path / "m.h5")!r}])
print(result.exit_code)
print(result.output.strip())
"""
    code_line, message = run_python(code).stdout.strip().split("\n", 1)
    assert code_line == "0" and "numba is not installed: nothing to compile" in message
