"""A/B of two parsicore checkouts on one model: each runs in its own worker process, the two are called in
turn, round by round (A B, B A, A B, ...), so a change in the machine's speed hits both alike.

    git worktree add /tmp/base <commit>
    python scripts/ab_checkouts.py MODEL.h5 /tmp/base . [--rounds 20] [--calls 50] [--threads 1]
    python scripts/ab_checkouts.py MODEL.h5 . . --threads 2 --env-a "OMP_WAIT_POLICY=PASSIVE" \
        --env-b "GOMP_SPINCOUNT=30000"                                   # one engine, two environments
    python scripts/ab_checkouts.py MODEL.h5 . . --threads 2 --gap-ms 5 ...  # calls now and then, not back to back

Prints each checkout's median latency and the median (and range) of the per-round ratios B/A: the ratio is
the figure to trust on a shared machine, whose speed here changed by up to 1.5x within minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import parsicore
m = parsicore.load(sys.argv[2], backend="numba", threads=int(sys.argv[3]))
x = np.random.default_rng(0).standard_normal((1, *m.inputs[0].shape[1:]), dtype=np.float32)
for _ in range(10):
    m(x)
print(parsicore.__file__, flush=True)
gap = float(sys.argv[4]) / 1000
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    print(float(np.median(times)) * 1e3, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("a", type=Path, help="checkout A (the baseline)")
    ap.add_argument("b", type=Path, help="checkout B")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=50, help="calls per engine and round (median taken)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle time before each call (a program calling now and then; default 0: back to back)")
    ap.add_argument("--env-a", default="", metavar="'VAR=VALUE ...'",
                    help="environment variables for A's worker only (space-separated; A and B may then be one "
                         "checkout: an A/B of thread-pool settings read at start-up)")
    ap.add_argument("--env-b", default="", metavar="'VAR=VALUE ...'", help="the same for B's worker")
    args = ap.parse_args()
    extra = []
    for option, text in (("--env-a", args.env_a), ("--env-b", args.env_b)):
        pairs = [item.partition("=") for item in text.split()]
        if any(not name or sep != "=" for name, sep, _ in pairs):
            ap.error(f"{option} wants VAR=VALUE items, got {text!r}")
        extra.append({name: value for name, _, value in pairs})
    if args.gap_ms < 0 or args.rounds < 1 or args.calls < 1 or args.threads < 1:
        ap.error("--gap-ms must be >= 0; --rounds, --calls and --threads >= 1")
    if not args.model.is_file():
        ap.error(f"no model file {args.model}")
    workers = []
    for checkout, env_extra in zip((args.a, args.b), extra):
        root = str(checkout.resolve())
        env = {**os.environ, **env_extra, "PYTHONPATH": root}
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, root, str(args.model.resolve()),
                                         str(args.threads), str(args.gap_ms)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env))
    for name, w in zip("AB", workers):
        print(f"{name}: {w.stdout.readline().strip()}")
    medians: list[list[float]] = [[], []]
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            workers[i].stdin.write(f"{args.calls}\n")
            workers[i].stdin.flush()
            medians[i].append(float(workers[i].stdout.readline()))
    for w in workers:
        w.stdin.close()
        w.wait()
    a, b = np.array(medians[0]), np.array(medians[1])
    ratios = b / a
    gap = f", {args.gap_ms:g} ms idle before each call" if args.gap_ms else ""
    print(f"{args.model.name}, {args.threads} thread(s){gap}: A {np.median(a):.3f} ms, B {np.median(b):.3f} ms, "
          f"B/A {np.median(ratios):.3f} (rounds {ratios.min():.2f}-{ratios.max():.2f})")


if __name__ == "__main__":
    main()
