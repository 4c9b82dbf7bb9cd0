"""Single-thread sgemm GFLOP/s of numpy's OpenBLAS under different OPENBLAS_CORETYPE values.

OpenBLAS picks its kernel set once, when it loads, so each value runs in its own subprocess. Rounds are
interleaved and the best of each is kept, to be fair on a machine other work shares. Use it to check a
board profile's ``openblas_coretype`` (boards/*.json) on the real board::

    python scripts/bench_openblas_coretype.py                      # auto vs this board's usual candidates
    python scripts/bench_openblas_coretype.py auto NEOVERSEN1 CORTEXA73 --size 1024 --rounds 5

"auto" leaves the variable unset (OpenBLAS detects the CPU). The kernel set OpenBLAS really used is
printed beside each figure (from threadpoolctl when installed): an unknown name falls back silently.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

CHILD = r"""
import sys, time
import numpy as np
n, repeat = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), dtype=np.float32)
np.matmul(a, b, out=c)
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter()
    np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - t)
try:
    import threadpoolctl
    arch = next(i.get("architecture", "?") for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
except (ImportError, StopIteration):
    arch = "?"
print(f"{2 * n ** 3 / best / 1e9:.2f} {arch}")
"""

DEFAULT_CANDIDATES = {"x86_64": ["auto", "SkylakeX", "Haswell"], "aarch64": ["auto", "ARMV8", "NEOVERSEN1"]}


def run_one(coretype: str, size: int, repeat: int) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["OPENBLAS_NUM_THREADS"] = "1"
    if coretype != "auto":
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(repeat)], env=env, capture_output=True,
                         text=True, check=True, timeout=600).stdout.split()
    return float(out[0]), out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("coretypes", nargs="*", help="OPENBLAS_CORETYPE values ('auto' = unset)")
    parser.add_argument("--size", type=int, default=512, help="square matrix size (default 512: big enough for the "
                        "kernels to reach full speed, short enough to dodge other jobs' time slices)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per value (default 8)")
    parser.add_argument("--repeat", type=int, default=30, help="timed products per round (default 30)")
    args = parser.parse_args()
    machine = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    coretypes = args.coretypes or DEFAULT_CANDIDATES.get(machine, ["auto"])
    results: dict[str, list[float]] = {c: [] for c in coretypes}
    arches: dict[str, str] = {}
    for _ in range(args.rounds):
        for c in coretypes:
            gflops, arch = run_one(c, args.size, args.repeat)
            results[c].append(gflops)
            arches[c] = arch
    print(f"sgemm {args.size}x{args.size}, 1 thread, best of {args.rounds} rounds x {args.repeat} "
          f"({platform.machine()}, {platform.python_version()})")
    for c in coretypes:
        values = sorted(results[c])
        print(f"  OPENBLAS_CORETYPE={c:<12} kernels {arches[c]:<12} best {values[-1]:7.1f} GFLOP/s  "
              f"median {values[len(values) // 2]:7.1f}")


if __name__ == "__main__":
    main()
