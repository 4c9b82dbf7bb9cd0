"""``parsicore warmup``: compiles the model's Numba kernels into the cache once; a second run finds them there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parsicore.builder import ModelBuilder

REPO = Path(__file__).resolve().parent.parent


def warmup(model: Path, cache_root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "NUMBA_"))}
    env.update(PYTHONPATH=str(REPO), PARSICORE_CACHE_DIR=str(cache_root))
    return subprocess.run([sys.executable, "-m", "parsicore", "warmup", str(model)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_warmup_fills_the_cache_once(tmp_path):
    pytest.importorskip("numba")
    b = ModelBuilder("warm")
    b.add_input("x", (None, 2, 8, 8))
    b.add_node("Conv", ["x"], ["c"], name="conv", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": np.ones((4, 2, 3, 3), np.float32)})
    b.add_node("MaxPool", ["c"], ["p"], attrs={"kernel": (2, 2), "stride": (2, 2)})
    b.add_output("p")
    model = tmp_path / "m.h5"
    b.save(model)
    first = warmup(model, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    cache_line = next(line for line in first.stdout.splitlines() if line.startswith("cache dir:"))
    assert str(tmp_path / "cache" / "numba") in cache_line
    compiled = int(re.search(r"\((\d+) kernel\(s\) newly compiled", cache_line).group(1))
    assert compiled > 0 and re.search(r"first runs [\d.]+ s", first.stdout)
    second = warmup(model, tmp_path / "cache")
    assert second.returncode == 0, second.stderr
    assert f"(0 kernel(s) newly compiled and cached, {compiled} cached before)" in second.stdout
