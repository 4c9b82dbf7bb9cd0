"""The shipped default gated model: it loads from the package, is gated, classifies the shipped samples,
and `parsicore eval` on the Fashion-MNIST test set reproduces the figures of its model card (measured in
PyTorch by the training script and stored in the model's metadata)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import parsicore
from parsicore.api import default_model_path, weights_dir
from parsicore.checksum import weights_sha256
from parsicore.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
CARD = weights_dir() / "fashion_gated.md"


def test_default_model_is_shipped_gated_and_intact():
    assert default_model_path().is_file()
    model = parsicore.load(backend="numpy")
    assert len(model.plan.gated_steps) == 4
    assert weights_sha256(model.model_file) == model.metadata["weights_sha256"]
    assert model.labels[9] == "Ankle boot"
    assert default_model_path().stat().st_size < 5_000_000, "the shipped model must stay small"


def test_samples_are_classified_as_their_file_names_say(capsys):
    samples = sorted((weights_dir() / "samples").glob("*.png"))
    with pytest.raises(SystemExit) as info:
        main(["run", *map(str, samples), "--json", "--backend", "numpy"])
    assert info.value.code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = {"t-shirt-top": "T-shirt/top", "ankle-boot": "Ankle boot"}
    correct = 0
    for r in records:
        stem = Path(r["image"]).stem.split("_", 1)[1]
        correct += r["top"][0]["label"] == names.get(stem, stem.capitalize())
        assert 0.05 < r["macs_executed"] / r["macs_dense"] < 0.9, "the gates should switch kernels off"
    assert correct >= 9, records


def test_model_card_states_the_metadata_figures():
    card = CARD.read_text()
    meta = parsicore.load(backend="numpy").metadata
    assert f"{meta['test_accuracy'] * 100:.2f} %" in card
    assert f"{meta['test_mac_fraction'] * 100:.1f} %" in card


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_eval_reproduces_the_model_card(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(default_model_path()), str(FASHION), "--json"])  # the default backend
    assert info.value.code == 0
    point = json.loads(capsys.readouterr().out)["points"][0]
    meta = parsicore.load(backend="numpy").metadata
    assert point["images"] == 10_000
    # PyTorch and parsicore may disagree on an image or two whose logits tie within float noise.
    assert abs(point["accuracy"] - meta["test_accuracy"]) <= 0.0005
    assert abs(point["conv_macs_fraction"] - meta["test_mac_fraction"]) <= 0.002
    # The project's target for the default model, as the engine measures it.
    assert point["accuracy"] >= 0.925 and point["conv_macs_fraction"] <= 0.40
    assert re.search(r"\b0\.5\b", json.dumps(meta.get("architecture", {})))
