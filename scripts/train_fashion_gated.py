"""Reference training recipe for the default gated Fashion-MNIST model.

Trains :class:`fashion_gated_arch.GatedNet` (LKAM gates, straight-through hard
switches, sparsity penalty ``gain * mean over gates of mean switch``) on CPU
and saves the weights plus a JSON description with ``np.savez`` (no pickle).

Example::

    python scripts/train_fashion_gated.py --epochs 20 --seed 0 --gain 1.0 \\
        --out /tmp/train_runs/gated.npz
    python scripts/train_fashion_gated.py --no-gates --epochs 20 --seed 0 \\
        --out /tmp/train_runs/dense.npz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_gated_arch import MEAN, STD, ArchConfig, GatedNet, state_to_arrays

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned byte idx files are supported")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        p = data_dir / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{stem}[.gz] not found in {data_dir}")


def load_fashion(
    data_dir: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x uint8 (N,28,28), train_y, test_x, test_y) from idx files in ``data_dir``."""
    xtr = read_idx(find_idx(data_dir, "train-images-idx3-ubyte"))
    ytr = read_idx(find_idx(data_dir, "train-labels-idx1-ubyte"))
    xte = read_idx(find_idx(data_dir, "t10k-images-idx3-ubyte"))
    yte = read_idx(find_idx(data_dir, "t10k-labels-idx1-ubyte"))
    return xtr, ytr, xte, yte


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W) -> normalised float32 (N,1,H,W): (pixel/255 - mean)/std."""
    t = torch.from_numpy(x.astype(np.float32) / 255.0)
    return ((t - MEAN) / STD).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero-pixel padding ``pad`` and random horizontal flip."""
    n, _, h, w = x.shape
    bg = (0.0 - MEAN) / STD
    p = F.pad(x[:, 0], (pad, pad, pad, pad), value=bg)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    out = p[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out.unsqueeze(1)


@torch.no_grad()
def evaluate(model: GatedNet, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> dict[str, float]:
    """Eval-mode accuracy and mean MAC fractions (conv only, and conv + gate banks)."""
    model.eval()
    correct = 0
    conv = 0.0
    gate = 0.0
    dense = 0.0
    for i in range(0, x.shape[0], batch):
        st: dict = {}
        logits = model(x[i : i + batch], stats=st)
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        conv += float(st["conv"].sum())
        nb = logits.shape[0]
        gate += float(st.get("gate", 0)) * nb
        dense += float(st["dense"]) * nb
    n = x.shape[0]
    return {
        "accuracy": correct / n,
        "mac_fraction": conv / dense,
        "mac_fraction_with_gates": (conv + gate) / dense,
        "dense_macs_per_image": dense / n,
        "gate_macs_per_image": gate / n,
    }


def param_groups(model: GatedNet, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim > 1 and not name.startswith("gates."):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": wd},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"directory with the Fashion-MNIST idx files (.gz or plain); default {DEFAULT_DATA}",
    )
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gain", type=float, default=1.0, help="sparsity penalty weight")
    ap.add_argument(
        "--gain-warmup",
        type=float,
        default=0.2,
        help="fraction of training to ramp the gain",
    )
    ap.add_argument(
        "--target-macs",
        type=float,
        default=0.0,
        help="if > 0, adapt the gain during training (multiplicatively, per step) so that\n"
        "the batch's hard-gated conv MAC fraction tracks this target (ramped from 1.0\n"
        "over the warm-up); 0 keeps the gain fixed (after its warm-up)",
    )
    ap.add_argument("--gain-rate", type=float, default=0.02, help="log-gain step per unit error")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gates", action="store_true", help="train the same network without gates")
    ap.add_argument("--layers", default=ArchConfig.layers)
    ap.add_argument("--gate-hidden", type=int, default=ArchConfig.gate_hidden)
    ap.add_argument("--gate-bias", type=float, default=ArchConfig.gate_bias)
    ap.add_argument("--threshold", type=float, default=ArchConfig.threshold)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (one-cycle)")
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--max-batches", type=int, default=0, help="stop each epoch early (timing)")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--out", default="/tmp/train_runs/fashion_gated.npz", help="output .npz path")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data_dir = Path(args.data)
    print(f"reading Fashion-MNIST idx files from {data_dir}", flush=True)
    xtr, ytr, xte, yte = load_fashion(data_dir)
    x_train, y_train = to_tensor(xtr), torch.from_numpy(ytr.astype(np.int64))
    x_test, y_test = to_tensor(xte), torch.from_numpy(yte.astype(np.int64))

    cfg = ArchConfig(
        layers=args.layers,
        gated=not args.no_gates,
        gate_hidden=args.gate_hidden,
        gate_bias=args.gate_bias,
        threshold=args.threshold,
    )
    model = GatedNet(cfg).to(memory_format=torch.channels_last)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"config {json.dumps(cfg.to_dict())}; {nparams} parameters", flush=True)

    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch)
    if args.max_batches:
        steps_per_epoch = min(steps_per_epoch, args.max_batches)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(param_groups(model, args.wd), lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15, div_factor=10.0)
    step = 0
    warm = max(1, int(args.gain_warmup * total))
    log_gain = math.log(max(args.gain, 1e-3))
    gain = 0.0
    history = []
    t_start = time.time()
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        tl = tp = tf = 0.0
        nb = 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx]
            st: dict = {}
            logits = model(xb, stats=st if cfg.gated else None)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            pen = model.switch_penalty()
            ramp = min(1.0, step / warm)
            if cfg.gated and args.target_macs > 0:
                frac = float(st["conv"].mean()) / float(st["dense"])
                target = 1.0 - ramp * (1.0 - args.target_macs)
                log_gain += args.gain_rate * (frac - target)
                log_gain = min(max(log_gain, math.log(1e-3)), math.log(1e3))
                gain = math.exp(log_gain)
                tf += frac
            else:
                gain = args.gain * ramp
            total_loss = loss + gain * pen if cfg.gated else loss
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            sched.step()
            step += 1
            tl += float(loss.detach())
            tp += float(pen.detach())
            nb += 1
        dt = time.time() - t0
        rec = {
            "epoch": epoch + 1,
            "loss": tl / nb,
            "switch": tp / nb,
            "train_mac_fraction": tf / nb,
            "gain": gain,
            "lr": sched.get_last_lr()[0],
            "seconds": dt,
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            rec.update(evaluate(model, x_test, y_test))
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if epoch + 1 < args.epochs:  # checkpoint in case the run has to be cut short
            ckpt = Path(str(args.out) + ".partial.npz")
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            meta = {"config": cfg.to_dict(), "args": vars(args), "history": history}
            np.savez(ckpt, __meta__=np.array(json.dumps(meta)), **state_to_arrays(model))

    train_seconds = time.time() - t_start
    final = evaluate(model, x_test, y_test)
    sweep = []
    if cfg.gated:
        for thr in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
            model.set_threshold(thr)
            r = evaluate(model, x_test, y_test)
            r["threshold"] = thr
            sweep.append(r)
            print("sweep " + json.dumps(r), flush=True)
        model.set_threshold(cfg.threshold)
    meta = {
        "config": cfg.to_dict(),
        "args": vars(args),
        "argv": sys.argv,
        "torch": torch.__version__,
        "final": final,
        "sweep": sweep,
        "history": history,
        "train_seconds": train_seconds,
    }
    print("final " + json.dumps(final), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = state_to_arrays(model)
    np.savez(out, __meta__=np.array(json.dumps(meta)), **arrays)
    print(f"saved {out} ({train_seconds:.0f} s training)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
