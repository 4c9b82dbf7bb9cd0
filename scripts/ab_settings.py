"""A/B of two values of module constants that parsicore reads at call time (thread thresholds), on one loaded
model in one process: rounds alternate A B, B A, ... and each round's median B/A is taken, so a change in the
machine's speed hits both alike::

    python scripts/ab_settings.py MODEL.h5 --threads 2 --a "conv.PARALLEL_WINOGRAD_MACS=4611686018427387904" \
        --b "conv.PARALLEL_WINOGRAD_MACS=16777216" [--rounds 12] [--calls 10]

A setting is ``MODULE.NAME=INT``: MODULE is a module under parsicore.kernels.numpy_backend or
parsicore.kernels.numba_backend (``conv``, ``winograd``, ``parallel``: numpy_backend first) or a full dotted
name; several are separated by spaces. A constant fixed at load (a kernel's path or tile size) needs
scripts/profile_steps.py --a-set instead. Prints both medians and the median (and range) of the ratios B/A.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parsicore  # noqa: E402

Setting = tuple[ModuleType, str, int]


def parse_settings(text: str) -> list[Setting]:
    """``"conv.X=1 parallel.Y=2"`` -> [(module, "X", 1), ...]; an unknown module or constant is an error."""
    out = []
    for item in text.split():
        name, value = item.split("=")
        module_name, attr = name.rsplit(".", 1)
        candidates = [module_name] if module_name.startswith("parsicore.") else [
            f"parsicore.kernels.numpy_backend.{module_name}", f"parsicore.kernels.numba_backend.{module_name}"]
        for candidate in candidates:
            try:
                module = importlib.import_module(candidate)
            except ModuleNotFoundError:
                continue
            if hasattr(module, attr):
                out.append((module, attr, int(value)))
                break
        else:
            raise SystemExit(f"no constant {name} in {' or '.join(candidates)}")
    return out


def apply(settings: list[Setting]) -> None:
    for module, attr, value in settings:
        setattr(module, attr, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--a", default="", help="settings of A (default: the constants as they are)")
    ap.add_argument("--b", required=True, help="settings of B")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=10, help="calls per setting and round (median taken)")
    args = ap.parse_args()
    a_settings, b_settings = parse_settings(args.a), parse_settings(args.b)
    defaults = [(module, attr, getattr(module, attr)) for module, attr, _ in a_settings + b_settings]
    runs = {"a": defaults + a_settings, "b": defaults + b_settings}
    model = parsicore.load(args.model, backend="numba", threads=args.threads)
    x = np.random.default_rng(0).standard_normal((1, *model.inputs[0].shape[1:]), dtype=np.float32)
    medians: dict[str, list[float]] = {"a": [], "b": []}
    try:
        for settings in runs.values():  # warm-up: every kernel either setting reaches is compiled
            apply(settings)
            for _ in range(5):
                model(x)
        for r in range(args.rounds):
            for name in ("a", "b") if r % 2 else ("b", "a"):
                apply(runs[name])
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t0)
                medians[name].append(float(np.median(times)))
    finally:
        apply(defaults)
    a, b = np.array(medians["a"]), np.array(medians["b"])
    ratios = b / a
    print(f"{args.model.name}, {args.threads} thread(s): A [{args.a or 'as is'}] {np.median(a) * 1e3:.2f} ms, "
          f"B [{args.b}] {np.median(b) * 1e3:.2f} ms, B/A {np.median(ratios):.3f} "
          f"(rounds {ratios.min():.2f}-{ratios.max():.2f})")


if __name__ == "__main__":
    main()
