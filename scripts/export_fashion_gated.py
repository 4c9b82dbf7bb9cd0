"""Export a trained gated Fashion-MNIST model (.npz from train_fashion_gated.py) to parsicore's format.

Example::

    python scripts/export_fashion_gated.py /tmp/train_runs/gated.npz -o weights/fashion_gated.h5 --check

``--check`` runs parsicore on test images and compares logits, masks and MAC fractions with the
PyTorch model in eval mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

from fashion_gated_arch import CLASSES, MEAN, STD, ArchConfig, GatedNet, load_arrays  # noqa: E402
from train_fashion_gated import DEFAULT_DATA, find_idx, read_idx, to_tensor  # noqa: E402

from parsicore.builder import ModelBuilder  # noqa: E402
from parsicore.export.torch_modules import LKAMGate  # noqa: E402

PRODUCER = f"scripts/train_fashion_gated.py (PyTorch {torch.__version__})"


def _command(argv: list[str]) -> str:
    """The training command as a reader types it from the repository root (no machine-specific path)."""
    if not argv:
        return ""
    return " ".join(["python", f"scripts/{Path(argv[0]).name}", *argv[1:]])


def load_npz(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta dict, arrays) of a training run's .npz (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(str(z["__meta__"]))
    return meta, arrays


def torch_model(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> GatedNet:
    """The PyTorch model in eval mode with the stored weights."""
    model = GatedNet(ArchConfig.from_dict(meta["config"]))
    load_arrays(model, arrays)
    return model.eval()


def build(model: GatedNet, meta: dict[str, Any], selftest: np.ndarray | None = None) -> ModelBuilder:
    """A ModelBuilder holding the parsicore graph of ``model`` (eval-mode semantics)."""
    cfg = model.cfg
    final = meta.get("final", {})
    desc = (
        f"Fashion-MNIST classifier, VGG-style 3x3 convs {cfg.layers} (P = 2x2 max pool), BN+ReLU, "
        "global average pool, linear; every conv but the first gated by an LKAM gate (parsimonious "
        "inference). Output: logits of 10 classes."
    )
    b = ModelBuilder(name="fashion-gated", description=desc, license="MIT", producer=PRODUCER)
    b.set_labels(CLASSES)
    b.set_preprocessing(
        input_size=(28, 28),
        colour="L",
        resize="stretch",
        mean=[MEAN],
        std=[STD],
        value_range=(0.0, 1.0),
    )
    b.set_metadata(
        output_kind="logits",
        architecture=cfg.to_dict(),
        training={"command": _command(meta.get("argv", [])), "seed": meta.get("args", {}).get("seed")},
        test_accuracy=final.get("accuracy"),
        test_mac_fraction=final.get("mac_fraction"),
        test_mac_fraction_with_gates=final.get("mac_fraction_with_gates"),
    )
    b.add_input("image", (None, cfg.in_channels, *cfg.input_hw))
    x = "image"
    for j, (conv, bn, gate, pool) in enumerate(zip(model.convs, model.bns, model.gates, model.pool_after), start=1):
        gname = None
        if isinstance(gate, LKAMGate):
            gw = {
                "w1": gate.bank1.weight.detach().numpy(),
                "b1": gate.bank1.bias.detach().numpy(),
            }
            if gate.bank2 is not None:
                gw["w2"] = gate.bank2.weight.detach().numpy()
                gw["b2"] = gate.bank2.bias.detach().numpy()
            gname = b.add_node(
                "LKAMGate",
                [x],
                [f"g{j}"],
                name=f"gate{j}",
                attrs={
                    "kernel_size": gate.kernel_size,
                    "activation": gate.activation,
                    "pool": gate.pool,
                    "threshold": gate.threshold,
                    "mode": gate.mode,
                },
                weights=gw,
            )
        kh, kw = conv.kernel_size
        ph, pw = conv.padding
        y = b.add_node(
            "Conv",
            [x],
            [f"c{j}"],
            name=f"conv{j}",
            attrs={
                "kernel": (kh, kw),
                "stride": tuple(conv.stride),
                "pads": (ph, pw, ph, pw),
                "dilation": tuple(conv.dilation),
                "groups": conv.groups,
            },
            weights={
                "weight": conv.weight.detach().numpy(),
                "bias": None if conv.bias is None else conv.bias.detach().numpy(),
            },
        )
        y = b.add_node(
            "BatchNorm",
            [y],
            [f"bn{j}"],
            name=f"bn{j}",
            attrs={"epsilon": bn.eps},
            weights={
                "scale": bn.weight.detach().numpy(),
                "bias": bn.bias.detach().numpy(),
                "mean": bn.running_mean.numpy(),
                "var": bn.running_var.numpy(),
            },
        )
        y = b.add_node("Relu", [y], [f"r{j}"], name=f"relu{j}")
        if gname is not None:
            y = b.add_node("ChannelMask", [y, gname], [f"m{j}"], name=f"mask{j}")
        if pool:
            y = b.add_node(
                "MaxPool",
                [y],
                [f"p{j}"],
                name=f"pool{j}",
                attrs={"kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0), "ceil_mode": False},
            )
        x = y
    x = b.add_node("GlobalAveragePool", [x], ["gap"], name="gap")
    x = b.add_node("Flatten", [x], ["flat"], name="flatten")
    b.add_node(
        "Gemm",
        [x],
        ["logits"],
        name="fc",
        weights={"weight": model.fc.weight.detach().numpy(), "bias": model.fc.bias.detach().numpy()},
    )
    b.add_output("logits")
    if selftest is not None:
        with torch.no_grad():
            ref = model(torch.from_numpy(selftest)).numpy()
        b.set_selftest({"image": selftest}, {"logits": ref})
    return b


def test_images(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` test images (normalised float32 NCHW) and labels."""
    x = read_idx(find_idx(data_dir, "t10k-images-idx3-ubyte"))[:count]
    y = read_idx(find_idx(data_dir, "t10k-labels-idx1-ubyte"))[:count]
    return to_tensor(x).numpy(), y.astype(np.int64)


def check(path: Path, model: GatedNet, x: np.ndarray, y: np.ndarray, backend: str | None) -> bool:
    """Compare parsicore with PyTorch (eval mode) on ``x``; print and return whether they agree."""
    import parsicore

    pm = parsicore.load(path, backend=backend)
    ok = True
    for thr in (None, 0.3, 0.7):
        if thr is not None:
            model.set_threshold(thr)
        st: dict = {}
        with torch.no_grad():
            ref = model(torch.from_numpy(x), stats=st).numpy()
        model.set_threshold(model.cfg.threshold)
        out, stats = pm.run_with_stats(x, threshold=thr)
        logits = out["logits"]
        diff = float(np.abs(logits - ref).max())
        agree = float((logits.argmax(1) == ref.argmax(1)).mean())
        dense = float(st["dense"]) * x.shape[0]
        torch_frac = float(st["conv"].sum()) / dense
        torch_gates = (float(st["conv"].sum()) + float(st["gate"]) * x.shape[0]) / dense
        acc = float((logits.argmax(1) == y).mean())
        print(
            f"threshold {thr if thr is not None else 'default'}: max |logit diff| {diff:.2e}, "
            f"argmax agreement {agree:.4f}, parsicore acc {acc:.4f}, "
            f"MAC fraction parsicore {stats.macs_fraction:.4f} / torch conv-only {torch_frac:.4f}, "
            f"conv + gates {torch_gates:.4f}"
        )
        ok = ok and agree >= 0.99 and diff < 1e-2
    return ok


def plot_sweep(meta: dict[str, Any], path: Path, dense_accuracy: float | None = None) -> None:
    """Accuracy vs executed conv MAC fraction over thresholds (the training run's eval sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(meta["sweep"], key=lambda r: r["mac_fraction"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("mac_fraction", "conv MACs"), ("mac_fraction_with_gates", "conv + gate MACs")):
        ax.plot([100 * r[key] for r in sweep], [100 * r["accuracy"] for r in sweep], "o-", label=label)
    for r in sweep:
        ax.annotate(f"{r['threshold']:.1f}", (100 * r["mac_fraction"], 100 * r["accuracy"]), fontsize=7)
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="grey", ls="--", label="same net without gates")
    ax.set_xlabel("executed conv MACs, % of dense (mean over 10k test images)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("fashion_gated: accuracy vs compute over gate thresholds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("npz", type=Path, help="weights saved by train_fashion_gated.py")
    ap.add_argument("-o", "--output", type=Path, default=SCRIPTS.parent / "weights" / "fashion_gated.h5")
    ap.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="Fashion-MNIST idx directory")
    ap.add_argument("--selftest", type=int, default=4, help="test images embedded as self-test vector")
    ap.add_argument("--check", action="store_true", help="compare parsicore with PyTorch after saving")
    ap.add_argument("--check-images", type=int, default=500)
    ap.add_argument("--backend", default=None, help="parsicore backend for --check")
    ap.add_argument("--plot", type=Path, default=None, help="also draw the threshold sweep to this PNG")
    ap.add_argument("--dense", type=Path, default=None, help="the no-gates run's .npz (for the plot)")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    meta, arrays = load_npz(args.npz)
    model = torch_model(meta, arrays)
    x, y = test_images(args.data, max(args.selftest, args.check_images if args.check else 0))
    b = build(model, meta, selftest=x[: args.selftest] if args.selftest else None)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    b.save(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    if args.plot:
        dense_acc = load_npz(args.dense)[0]["final"]["accuracy"] if args.dense else None
        plot_sweep(meta, args.plot, dense_acc)
        print(f"wrote {args.plot}")
    if args.check:
        return 0 if check(args.output, model, x, y, args.backend) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
