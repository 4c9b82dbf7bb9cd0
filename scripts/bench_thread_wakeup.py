"""How long the first parallel region of Numba's pool takes after an idle spell, under several wait policies.

A model call is a burst of parallel regions; what its first region costs depends on whether the pool's threads
still spin from the last call or sleep. Each policy runs in its own process (libgomp reads the environment once):
a one-element-per-thread region is timed after a sleep of each gap, and its median printed::

    python scripts/bench_thread_wakeup.py                                   # PASSIVE against GOMP_SPINCOUNT values
    python scripts/bench_thread_wakeup.py --policies "OMP_WAIT_POLICY=PASSIVE" "GOMP_SPINCOUNT=3000" --gaps 0.5,5

Measured on the fourteenth session's 2-vCPU Zen 4 VM (median us of a region after a gap of 0.5 / 2 / 5 / 20 ms):
PASSIVE 43 / 14 / 27 / 68; GOMP_SPINCOUNT=30000 2 / 48 / 1507 / 1539; 10000 25 / 319 / 498 / 426; 3000 40 / 185 /
200 / 224. Spinning threads hand a region over in microseconds while they spin, but once asleep the first region
after the gap cost about as long as the spin itself: the woken thread is placed on the CPU of the thread that woke
it, which then spins in the region's end barrier on that CPU until its count runs out. With the threads bound to
CPUs (GOMP_SPINCOUNT=30000 OMP_PROC_BIND=true): 2 / 35 / 57 / 108. OpenMP's binding also pins the calling
(main) thread, and every thread it starts afterwards inherits that mask (an application's own threads, another
engine's pool), so parsicore pins only the pool's workers, off the caller's CPU
(parsicore.kernels.numba_backend.pool_pinning), and spins by default on x86-64 only (parsicore.threads). This
script times libgomp alone, without that pinning. Run it on a board before choosing a spin count there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time
import numpy as np
import numba

@numba.njit(parallel=True)
def touch(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0

a = np.zeros(numba.config.NUMBA_NUM_THREADS, np.float32)
for _ in range(100):
    touch(a)
out = []
for gap_ms in [float(g) for g in sys.argv[1].split(",")]:
    times = []
    for _ in range(int(sys.argv[2])):
        time.sleep(gap_ms / 1000)
        t0 = time.perf_counter()
        touch(a)
        times.append(time.perf_counter() - t0)
    out.append(f"{float(np.median(times)) * 1e6:8.0f}")
print(" ".join(out), numba.threading_layer())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", metavar="VAR=VALUE",
                    default=["OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=3000", "GOMP_SPINCOUNT=10000",
                             "GOMP_SPINCOUNT=30000", "GOMP_SPINCOUNT=30000 OMP_PROC_BIND=true"],
                    help="one wait policy per process, as VAR=VALUE (space-separated items within one policy)")
    ap.add_argument("--gaps", default="0.5,2,5,20", help="comma-separated idle spells before each region (ms)")
    ap.add_argument("--regions", type=int, default=100, help="regions timed per gap (median printed)")
    args = ap.parse_args()
    try:
        gaps = [float(g) for g in args.gaps.split(",")]
    except ValueError:
        ap.error(f"--gaps wants comma-separated numbers of ms, got {args.gaps!r}")
    if not gaps or min(gaps) < 0 or args.regions < 1:
        ap.error("--gaps must be >= 0 ms and --regions >= 1")
    print("median us of the first parallel region after a gap of " + " / ".join(f"{g:g}" for g in gaps) + " ms")
    for policy in args.policies:
        pairs = [item.partition("=") for item in policy.split()]
        if any(not name or sep != "=" for name, sep, _ in pairs):
            ap.error(f"--policies wants VAR=VALUE items, got {policy!r}")
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")}
        env.update({name: value for name, _, value in pairs})
        done = subprocess.run([sys.executable, "-c", CHILD, ",".join(map(str, gaps)), str(args.regions)], env=env,
                              capture_output=True, text=True, check=False)
        shown = done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip().splitlines()[-1:]}"
        print(f"  {policy:42s} {shown}")


if __name__ == "__main__":
    main()
