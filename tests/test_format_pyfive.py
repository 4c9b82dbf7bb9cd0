"""Reading models without h5py: the pure-Python pyfive fallback gives the same ModelFile and the same errors.

Models are written with h5py (the builder), then read with h5py blocked (``sys.modules["h5py"] = None``
makes ``import h5py`` raise ImportError, as on Termux where h5py is not installed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyfive")
h5py = pytest.importorskip("h5py")

from parsicore.api import default_model_path, load  # noqa: E402
from parsicore.builder import ModelBuilder  # noqa: E402
from parsicore.errors import ModelFormatError  # noqa: E402
from parsicore.format import FORMAT_NAME, ModelFile, read_model  # noqa: E402


@pytest.fixture
def without_h5py(monkeypatch):
    """Block h5py for the test; format.py then reads through pyfive."""
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError):
        import h5py  # noqa: F401


def small_model(seed: int = 0) -> ModelBuilder:
    """Conv -> Relu -> MaxPool -> Conv -> GlobalAveragePool -> Flatten -> Gemm, with labels, preprocessing
    and a self-test vector computed by the numpy backend."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    b = ModelBuilder("pyfive-check", description="tiny CNN for the pyfive reader", license="MIT", producer="tests")
    b.set_labels(["a", "b", "c"])
    b.set_preprocessing((8, 8), colour="L", mean=(0.5,), std=(0.25,))
    b.set_metadata(accuracy=0.5, training={"epochs": 1, "note": "ünïcödé"})
    b.add_input("image", (None, 1, 8, 8))
    b.add_node("Conv", ["image"], ["c1"], name="conv1", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": w(4, 1, 3, 3), "bias": w(4)})
    b.add_node("Relu", ["c1"], ["r1"], name="relu1")
    b.add_node("MaxPool", ["r1"], ["p1"], name="pool1", attrs={"kernel": (2, 2), "stride": (2, 2)})
    b.add_node("Conv", ["p1"], ["c2"], name="conv2", weights={"weight": w(6, 4, 1, 1)})
    b.add_node("GlobalAveragePool", ["c2"], ["g"], name="gap")
    b.add_node("Flatten", ["g"], ["f"], name="flatten")
    b.add_node("Gemm", ["f"], ["logits"], name="fc", weights={"weight": w(3, 6), "bias": w(3)})
    b.add_output("logits")
    x = rng.random((2, 1, 8, 8), dtype=np.float32)
    y = load(b.build(), backend="numpy")(x)
    b.set_selftest({"image": x}, {"logits": y})
    return b


def assert_same_model(a: ModelFile, b: ModelFile) -> None:
    assert a.inputs == b.inputs and a.outputs == b.outputs and a.nodes == b.nodes
    assert a.metadata == b.metadata
    assert a.float16_weights == b.float16_weights
    assert a.weights.keys() == b.weights.keys()
    for node, arrays in a.weights.items():
        assert arrays.keys() == b.weights[node].keys()
        for key, arr in arrays.items():
            other = b.weights[node][key]
            assert other.dtype == np.float32 and other.flags.c_contiguous
            np.testing.assert_array_equal(arr, other, err_msg=f"{node}/{key}")
    for mine, theirs in ((a.selftest_inputs, b.selftest_inputs), (a.selftest_outputs, b.selftest_outputs)):
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


@pytest.mark.parametrize("float16", [False, True])
def test_pyfive_reads_what_h5py_reads(tmp_path, monkeypatch, float16):
    path = tmp_path / "m.h5"
    small_model().save(path, float16=float16)
    with_h5py = read_model(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with_pyfive = read_model(path)
    assert_same_model(with_h5py, with_pyfive)
    assert len(with_pyfive.float16_weights) == (5 if float16 else 0)
    assert with_pyfive.metadata["training"]["note"] == "ünïcödé"


def test_pyfive_is_the_reader_used_and_weights_are_copies(tmp_path, monkeypatch):
    import pyfive

    path = tmp_path / "m.h5"
    small_model().save(path)
    opened = []
    real_file = pyfive.File
    monkeypatch.setattr(pyfive, "File", lambda *a, **k: opened.append(a) or real_file(*a, **k))
    monkeypatch.setitem(sys.modules, "h5py", None)
    model = read_model(path)
    assert len(opened) == 1
    before = {node: {k: v.copy() for k, v in arrays.items()} for node, arrays in model.weights.items()}
    for arrays in model.weights.values():
        for arr in arrays.values():
            assert arr.flags.owndata and arr.flags.writeable  # not a view of a memory map of the file
    # overwrite the file in place (same inode, as `cp new.h5 model.h5` does): the loaded weights stay
    with open(path, "r+b") as fh:
        fh.write(b"\0" * path.stat().st_size)
    for node, arrays in model.weights.items():
        for key, arr in arrays.items():
            np.testing.assert_array_equal(arr, before[node][key])


def test_model_runs_its_selftest_when_read_by_pyfive(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    builder = small_model()
    builder.save(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    model = load(path, backend="numpy")
    st_in, st_out = model.model_file.selftest_inputs, model.model_file.selftest_outputs
    np.testing.assert_allclose(model(st_in["image"]), st_out["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelFormatError, match="needs h5py"):  # writing needs h5py; reading does not
        builder.save(tmp_path / "again.h5")
    assert not (tmp_path / "again.h5").exists()


def test_model_without_weights_or_selftest(tmp_path, monkeypatch):
    b = ModelBuilder("bare")
    b.add_input("x", (None, 2, 3, 3))
    b.add_node("Relu", ["x"], ["y"])
    b.add_output("y")
    path = tmp_path / "bare.h5"
    b.save(path)
    with_h5py = read_model(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with_pyfive = read_model(path)
    assert_same_model(with_h5py, with_pyfive)
    assert with_pyfive.weights == {} and with_pyfive.selftest_inputs == {}


def test_neither_reader_installed_is_a_format_error(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    small_model().save(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setitem(sys.modules, "pyfive", None)
    with pytest.raises(ModelFormatError, match="needs h5py or pyfive"):
        read_model(path)


def test_shipped_default_model_reads_the_same(monkeypatch):
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"{path} is not there yet")
    with_h5py = read_model(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert_same_model(with_h5py, read_model(path))


# ----------------------------------------------------------------------------------------------- errors


def write_raw(path: Path, build) -> Path:
    """An HDF5 file written directly with h5py (for malformed layouts the builder refuses to write)."""
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _json(obj) -> np.ndarray:
    import json

    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


GRAPH = {"inputs": [{"name": "x", "shape": [None, 3]}], "outputs": ["y"],
         "nodes": [{"name": "fc", "op": "Gemm", "inputs": ["x"], "outputs": ["y"], "attrs": {}}]}


def _valid_root(f) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = np.int64(1)
    f.create_dataset("graph_json", data=_json(GRAPH))
    f.create_dataset("metadata_json", data=_json({"name": "raw"}))


def _int_weights(f) -> None:
    _valid_root(f)
    f.create_dataset("weights/fc/weight", data=np.ones((2, 3), dtype=np.int32))


def _group_as_weight(f) -> None:
    _valid_root(f)
    f.create_group("weights/fc/weight")


def _unknown_node_weights(f) -> None:
    _valid_root(f)
    f.create_dataset("weights/ghost/weight", data=np.ones((2, 3), dtype=np.float32))


def _wrong_version(f) -> None:
    _valid_root(f)
    f.attrs["format_version"] = np.int64(7)


def _no_graph(f) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = np.int64(1)


def _float_json(f) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = np.int64(1)
    f.create_dataset("graph_json", data=np.zeros(4, dtype=np.float32))


def _bad_json(f) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = np.int64(1)
    f.create_dataset("graph_json", data=np.frombuffer(b"{not json", dtype=np.uint8))


def _not_parsicore(f) -> None:
    f.create_dataset("data", data=np.arange(10))


def _weights_is_dataset(f) -> None:
    _valid_root(f)
    f.create_dataset("weights/fc", data=np.ones(3, dtype=np.float32))


def _version_as_string(f) -> None:
    _valid_root(f)
    f.attrs["format_version"] = "one"


MALFORMED = {
    "int weights": (_int_weights, "only float32 and float16"),
    "group where a weight should be": (_group_as_weight, "is a group"),
    "weights of an unknown node": (_unknown_node_weights, "unknown node 'ghost'"),
    "other format version": (_wrong_version, "format version 7"),
    "no graph": (_no_graph, "missing dataset '/graph_json'"),
    "graph not uint8": (_float_json, "1-D uint8"),
    "graph not JSON": (_bad_json, "not valid UTF-8 JSON"),
    "another HDF5 file": (_not_parsicore, "not a parsicore model"),
    "weights/<node> is a dataset": (_weights_is_dataset, None),
    "format_version not an integer": (_version_as_string, "format_version"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_give_the_same_error_with_pyfive(tmp_path, monkeypatch, case):
    build, message = MALFORMED[case]
    path = write_raw(tmp_path / "bad.h5", build)
    with pytest.raises(ModelFormatError, match=message) as by_h5py:
        read_model(path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ModelFormatError, match=message) as by_pyfive:
        read_model(path)
    assert str(path) in str(by_pyfive.value) and "\n" not in str(by_pyfive.value)
    if message is not None:  # the same validation, so the same words (the reader's own detail may differ elsewhere)
        assert str(by_h5py.value) == str(by_pyfive.value)


@pytest.mark.parametrize("content", [b"", b"just some text\n" * 20, b"\x89HDF\r\n\x1a\n" + b"\x00" * 40],
                         ids=["empty", "text", "bare signature"])
def test_non_hdf5_files_are_format_errors(tmp_path, without_h5py, content):
    path = tmp_path / "junk.h5"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match="junk.h5"):
        read_model(path)


def test_truncated_and_corrupted_files_only_ever_raise_format_errors(tmp_path, monkeypatch):
    good = tmp_path / "good.h5"
    small_model().save(good)
    data = good.read_bytes()
    monkeypatch.setitem(sys.modules, "h5py", None)
    bad = tmp_path / "bad.h5"
    for cut in (0, 8, 100, 512, len(data) // 3, len(data) // 2, len(data) - 600):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            read_model(bad)
    rng = np.random.default_rng(1)
    outcomes = {"read": 0, "ModelFormatError": 0}
    for _ in range(120):
        corrupted = bytearray(data)
        for i in rng.integers(0, len(data), size=3):
            corrupted[i] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(corrupted))
        try:
            read_model(bad)
            outcomes["read"] += 1  # a flipped weight byte is still a readable file
        except ModelFormatError:
            outcomes["ModelFormatError"] += 1
    assert sum(outcomes.values()) == 120  # anything else would have propagated and failed the test
