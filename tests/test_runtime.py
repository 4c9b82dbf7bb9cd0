"""Runtime: whole random models on every backend against the naive interpreter, BN folding, input checks,
buffer reuse, and one model called from several threads at once."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import parsicore
from parsicore.builder import ModelBuilder
from parsicore.errors import BackendError, InputError
from tests.concurrency import run_in_threads
from tests.models import _w, bn_weights, gated_cnn, small_cnn
from tests.naive import naive_run
from tests.strategies import backends, seeded_array

ACTIVATIONS = [("Relu", {}), ("Clip", {"lo": 0.0, "hi": 6.0}), ("LeakyRelu", {"alpha": 0.1}), ("Sigmoid", {}),
               ("Tanh", {}), ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("HardSwish", {}), ("Silu", {})]


@st.composite
def random_models(draw):
    """A chain of randomly chosen blocks (conv/BN/activation, depthwise, pooling, pad, concat, residual add,
    SE-style mul), then global pooling, flatten, gemm, softmax."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    c = draw(st.integers(1, 4))
    size = draw(st.integers(5, 12))
    b = ModelBuilder("random")
    b.add_input("x", (None, c, size, size))
    t, h = "x", size
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "depthwise", "pool", "pad", "concat", "residual", "se"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 2])) if h >= 4 else 1
            out = draw(st.integers(1, 8))
            t2 = b.add_node("Conv", [t], [f"c{i}"], name=f"conv{i}",
                            attrs={"pads": (k // 2,) * 4, "stride": (stride,) * 2},
                            weights={"weight": _w(rng, out, c, k, k), "bias": _w(rng, out, scale=0.1)})
            if draw(st.booleans()):
                t2 = b.add_node("BatchNorm", [t2], [f"bn{i}"], name=f"bn{i}", weights=bn_weights(rng, out))
            op, attrs = draw(st.sampled_from(ACTIVATIONS))
            t = b.add_node(op, [t2], [f"a{i}"], name=f"act{i}", attrs=attrs)
            c, h = out, (h + 2 * (k // 2) - k) // stride + 1
        elif kind == "depthwise":
            t = b.add_node("Conv", [t], [f"d{i}"], name=f"dw{i}", attrs={"pads": (1, 1, 1, 1), "groups": c},
                           weights={"weight": _w(rng, c, 1, 3, 3)})
        elif kind == "pool" and h >= 2:
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            t = b.add_node(op, [t], [f"p{i}"], name=f"pool{i}", attrs={"kernel": (2, 2), "stride": (2, 2),
                                                                       "ceil_mode": draw(st.booleans())})
            h = -(-h // 2) if b._nodes[-1].attrs["ceil_mode"] else h // 2
        elif kind == "pad":
            t = b.add_node("Pad", [t], [f"pad{i}"], name=f"pad{i}", attrs={"pads": (1, 0, 0, 1), "value": 0.0})
            h += 1
            t = b.add_node("MaxPool", [t], [f"crop{i}"], name=f"crop{i}", attrs={"kernel": (2, 1), "stride": (1, 1)})
            h -= 1
        elif kind == "concat":
            other = b.add_node("Relu", [t], [f"r{i}"], name=f"relu{i}")
            t = b.add_node("Concat", [t, other], [f"cat{i}"], name=f"cat{i}")
            c *= 2
        elif kind == "residual":
            branch = b.add_node("Conv", [t], [f"rc{i}"], name=f"rconv{i}", attrs={"pads": (1, 1, 1, 1)},
                                weights={"weight": _w(rng, c, c, 3, 3)})
            t = b.add_node("Add", [branch, t], [f"add{i}"], name=f"add{i}")
            if draw(st.booleans()):  # ResNet's ReLU after the Add: fused into the Add's pass by the plan
                op, attrs = draw(st.sampled_from(ACTIVATIONS))
                t = b.add_node(op, [t], [f"adda{i}"], name=f"addact{i}", attrs=attrs)
        elif kind == "se":
            g = b.add_node("GlobalAveragePool", [t], [f"seg{i}"], name=f"sepool{i}")
            s = b.add_node("Conv", [g], [f"sec{i}"], name=f"seconv{i}", weights={"weight": _w(rng, c, c, 1, 1)})
            s = b.add_node("Sigmoid", [s], [f"ses{i}"], name=f"sesig{i}")
            t = b.add_node("Mul", [t, s], [f"sem{i}"], name=f"semul{i}")
    t = b.add_node(draw(st.sampled_from(["GlobalAveragePool", "GlobalMaxPool"])), [t], ["g"], name="gpool")
    t = b.add_node("Flatten", [t], ["f"], name="flatten")
    t = b.add_node("Gemm", [t], ["logits"], name="fc", weights={"weight": _w(rng, 5, c), "bias": _w(rng, 5)})
    b.add_node("Softmax", [t], ["probs"], name="softmax")
    b.add_output("probs")
    b.add_output("logits")
    return b.build(), (draw(st.integers(1, 3)), *b._inputs[0].shape[1:]), seed


@given(random_models(), st.sampled_from(backends()), st.booleans())
def test_random_models_match_naive(model_and_shape, backend, fold):
    model, shape, seed = model_and_shape
    x = seeded_array(seed % 1000, shape)
    expected = naive_run(model, x)
    got = parsicore.load(model, backend=backend, fold=fold)(x)
    for name in ("logits", "probs"):
        scale = max(1.0, float(np.abs(expected[name]).max()))
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("backend", backends())
def test_relu_after_a_residual_add_runs_in_the_add(backend):
    """The plan folds the activation after an Add into the Add's step (one pass); the result is the naive one."""
    rng = np.random.default_rng(5)
    b = ModelBuilder("residual")
    b.add_input("x", (None, 4, 6, 6))
    b.add_node("Conv", ["x"], ["c"], name="conv", attrs={"pads": (1, 1, 1, 1)}, weights={"weight": _w(rng, 4, 4, 3, 3)})
    b.add_node("Add", ["c", "x"], ["s"], name="add")
    b.add_node("Relu", ["s"], ["y"], name="relu")
    b.add_output("y")
    model = b.build()
    m = parsicore.load(model, backend=backend)
    assert [s.nodes for s in m.plan.steps] == [("conv",), ("add", "relu")]
    x = seeded_array(6, (2, 4, 6, 6))
    np.testing.assert_allclose(m(x), naive_run(model, x)["y"], rtol=1e-5, atol=1e-5)
    assert (m(x) >= 0).all() and (m(x) == 0).any()


def test_bn_folding_equals_unfolded():
    model = small_cnn(3).build()
    x = seeded_array(4, (3, 1, 28, 28))
    folded = parsicore.load(model, backend="numpy", fold=True)
    unfolded = parsicore.load(model, backend="numpy", fold=False)
    assert len(folded.plan.steps) < len(unfolded.plan.steps)
    assert "bn1" in folded.plan.steps[0].nodes
    np.testing.assert_allclose(folded(x), unfolded(x), rtol=1e-4, atol=1e-5)


def test_outputs_do_not_alias_the_workspace():
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    a = m(seeded_array(0, (1, 1, 28, 28)))
    kept = a.copy()
    m(seeded_array(1, (1, 1, 28, 28)))
    np.testing.assert_array_equal(a, kept)


def test_second_run_reuses_buffers():
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    x = seeded_array(0, (2, 1, 28, 28))
    m(x)
    first = [id(b) for b in m._local.workspace[1]]
    m(x)
    assert [id(b) for b in m._local.workspace[1]] == first
    assert len(first) < len(m.plan.steps), "liveness should let tensors share slots"


def test_workspace_keeps_no_reference_to_the_input():
    """The workspace's per-step input lists take the caller's array for one call only: after it, nothing in
    the model holds the input (a large input is freed when the caller drops it), and the next call with a
    different input sees that input, not the previous one."""
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    x = seeded_array(0, (1, 1, 28, 28))
    first = m(x)
    ref = weakref.ref(x)
    del x
    assert ref() is None
    other = seeded_array(1, (1, 1, 28, 28))
    model_file = small_cnn(0).build()
    (want,) = naive_run(model_file, other).values()
    np.testing.assert_allclose(m(other), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(m(other), first)


@pytest.mark.parametrize("backend", backends())
def test_one_model_many_threads_equals_serial(backend):
    model = parsicore.load(gated_cnn(5, offset=0.0), backend=backend)
    inputs = [seeded_array(100 + i, (1 + i % 2, 3, 10, 10)) for i in range(200)]
    serial = [model(x) for x in inputs]
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        for i in range(k, 200, 4):  # 50 calls per thread, different inputs and batch sizes
            results[i] = model(inputs[i])

    run_in_threads(worker, 4)
    for i in range(200):
        np.testing.assert_array_equal(results[i], serial[i])


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((1, 1, 28, 28), dtype=np.float64), "float32"),
        (np.zeros((1, 28, 28), dtype=np.float32), r"shape \(N, 1, 28, 28\)"),
        (np.zeros((1, 3, 28, 28), dtype=np.float32), "shape"),
        (np.zeros((0, 1, 28, 28), dtype=np.float32), "batch size 0"),
        (np.full((1, 1, 28, 28), np.nan, dtype=np.float32), "NaN"),
        ([[1.0]], "numpy array"),
        ({"wrong": np.zeros((1, 1, 28, 28), np.float32)}, "missing"),
    ],
)
def test_bad_inputs_are_input_errors(x, match):
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    with pytest.raises(InputError, match=match):
        m(x)


def test_non_contiguous_input():
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    x = seeded_array(0, (2, 1, 28, 56))[:, :, :, ::2]
    np.testing.assert_allclose(m(x), m(np.ascontiguousarray(x)), rtol=1e-6)


def test_unknown_backend_and_bad_threads():
    with pytest.raises(BackendError):
        parsicore.load(small_cnn(0).build(), backend="cuda")
    with pytest.raises(InputError):
        parsicore.load(small_cnn(0).build(), threads=0)


def test_model_description():
    m = parsicore.load(small_cnn(0).build(), backend="numpy")
    assert [t.name for t in m.inputs] == ["image"] and m.inputs[0].shape == (None, 1, 28, 28)
    assert m.outputs[0].shape == (None, 10)
    assert m.labels[0] == "T-shirt/top"
    assert m.metadata["license"] == "MIT"


def test_load_from_a_path_releases_the_folded_originals(tmp_path, monkeypatch):
    """The plan holds BN-folded copies; the file's own conv and BN arrays must not stay alive beside them, yet
    model_file/graph still give the file's weights (read again) and the run equals one that kept them."""
    import gc
    import weakref

    from parsicore import api
    from parsicore.errors import ModelFormatError
    from parsicore.format import read_model

    path = tmp_path / "m.h5"
    small_cnn(3).save(path)
    read = {}

    def spy(p):
        read["file"] = read_model(p)
        return read["file"]

    monkeypatch.setattr(api, "read_model", spy)
    model = parsicore.load(path, backend="numpy")
    monkeypatch.undo()
    file_weights = read.pop("file").weights
    conv1 = {k: weakref.ref(v) for k, v in file_weights["conv1"].items()}
    bn = {k: weakref.ref(v) for k, v in file_weights["bn1"].items()}
    del file_weights
    gc.collect()
    assert all(r() is None for r in conv1.values()), "the folded conv's original weights are still alive"
    assert all(r() is None for r in bn.values()), "the folded BatchNorm's arrays are still alive"

    kept = parsicore.load(read_model(path), backend="numpy")  # a caller-owned ModelFile: nothing released
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(model(x), kept(x))
    reference = read_model(path)
    for node, arrays in reference.weights.items():
        for name, arr in arrays.items():
            np.testing.assert_array_equal(model.model_file.weights[node][name], arr)
    assert model.graph.total_params == kept.graph.total_params > 0

    fresh = parsicore.load(path, backend="numpy")
    small_cnn(4).save(path)  # the file changes under a loaded model: its weights cannot be read again
    with pytest.raises(ModelFormatError, match="changed since the model was loaded"):
        fresh.model_file  # noqa: B018
