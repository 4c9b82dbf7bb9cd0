"""Model format v1: round trip, atomic writes, and a typed error for every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import parsicore
from parsicore.errors import GraphError, ModelFormatError, UnsupportedOpError
from parsicore.format import FORMAT_NAME, read_model, write_model
from tests.models import small_cnn
from tests.naive import naive_run
from tests.strategies import seeded_array


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "m.h5"
    small_cnn(0).save(path)
    return path


def _edit_graph(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        graph = json.loads(bytes(f["graph_json"][()]).decode())
        edit(graph)
        del f["graph_json"]
        f.create_dataset("graph_json", data=np.frombuffer(json.dumps(graph).encode(), dtype=np.uint8))


def test_save_load_run_equals_in_memory(saved: Path):
    builder = small_cnn(0)
    x = seeded_array(1, (2, 1, 28, 28))
    in_memory = parsicore.load(builder.build(), backend="numpy")(x)
    from_file = parsicore.load(saved, backend="numpy")(x)
    np.testing.assert_array_equal(in_memory, from_file)
    np.testing.assert_allclose(from_file, naive_run(builder.build(), x)["logits"], rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_everything(saved: Path):
    original = small_cnn(0).build()
    loaded = read_model(saved)
    assert loaded.metadata == original.metadata
    assert loaded.inputs == original.inputs and loaded.outputs == original.outputs
    assert [n.name for n in loaded.nodes] == [n.name for n in original.nodes]
    for node, arrays in original.weights.items():
        for key, arr in arrays.items():
            np.testing.assert_array_equal(loaded.weights[node][key], arr)


def test_float16_storage_loads_as_float32_close(tmp_path: Path):
    path = tmp_path / "half.h5"
    small_cnn(0).save(path, float16=True)
    loaded = read_model(path)
    assert all(a.dtype == np.float32 for arrays in loaded.weights.values() for a in arrays.values())
    assert loaded.float16_weights
    w = small_cnn(0).build().weights["conv1"]["weight"]
    np.testing.assert_allclose(loaded.weights["conv1"]["weight"], w, rtol=1e-3, atol=1e-4)
    from parsicore.checksum import weights_sha256

    assert weights_sha256(loaded) == loaded.metadata["weights_sha256"]


def test_atomic_write_leaves_target_untouched_on_failure(tmp_path: Path, monkeypatch):
    path = tmp_path / "m.h5"
    path.write_bytes(b"previous content")
    model = small_cnn(0).build()

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError):
        write_model(model, path)
    assert path.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"], "temporary file left behind"


def test_write_into_missing_directory_is_a_format_error(tmp_path: Path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        write_model(small_cnn(0).build(), tmp_path / "nope" / "m.h5")


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelFormatError, match="no such model file"):
        parsicore.load(tmp_path / "absent.h5")


def test_not_hdf5(tmp_path: Path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(ModelFormatError, match="not a readable HDF5"):
        parsicore.load(p)


def test_truncated_file(saved: Path):
    data = saved.read_bytes()
    for cut in (len(data) // 3, len(data) - 200):
        saved.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            parsicore.load(saved)


def test_wrong_format_version(saved: Path):
    with h5py.File(saved, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(ModelFormatError, match="format version 2"):
        parsicore.load(saved)


def test_not_a_parsicore_file(tmp_path: Path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.zeros(3))
    with pytest.raises(ModelFormatError, match=FORMAT_NAME):
        parsicore.load(p)


def test_missing_weight(saved: Path):
    with h5py.File(saved, "r+") as f:
        del f["weights/conv2/weight"]
    with pytest.raises(GraphError, match="conv2.*missing weight"):
        parsicore.load(saved)


def test_wrong_weight_shape(saved: Path):
    with h5py.File(saved, "r+") as f:
        del f["weights/conv2/weight"]
        f.create_dataset("weights/conv2/weight", data=np.zeros((12, 7, 3, 3), dtype=np.float32))
    with pytest.raises(GraphError, match="conv2"):
        parsicore.load(saved)


def test_object_or_integer_dataset_is_refused(saved: Path):
    with h5py.File(saved, "r+") as f:
        del f["weights/fc/bias"]
        f.create_dataset("weights/fc/bias", data=np.array(["a", "b"], dtype=h5py.string_dtype()))
    with pytest.raises(ModelFormatError, match="only float32 and float16"):
        parsicore.load(saved)


def test_unknown_op(saved: Path):
    def edit(g):
        g["nodes"][1]["op"] = "FancyOp"
        g["nodes"][2]["op"] = "OtherOp"

    _edit_graph(saved, edit)
    with pytest.raises(UnsupportedOpError, match="FancyOp.*OtherOp|OtherOp.*FancyOp"):
        parsicore.load(saved)


def test_cycle(saved: Path):
    def edit(g):
        g["nodes"][0]["inputs"] = ["r1"]  # conv1 now reads relu1's output, which depends on conv1

    _edit_graph(saved, edit)
    with pytest.raises(GraphError, match="cycle"):
        parsicore.load(saved)


def test_undefined_input(saved: Path):
    def edit(g):
        g["nodes"][3]["inputs"] = ["nowhere"]

    _edit_graph(saved, edit)
    with pytest.raises(GraphError, match="undefined tensor 'nowhere'"):
        parsicore.load(saved)


def test_undefined_output(saved: Path):
    _edit_graph(saved, lambda g: g["outputs"].append("ghost"))
    with pytest.raises(GraphError, match="ghost"):
        parsicore.load(saved)


@pytest.mark.parametrize("shape", [[None, 1, 100000, 100000], [None, 3, 60000, 60000], [None, 0, 28, 28],
                                   [None, -1, 28, 28], [4, 1, 28, 28], [None, 1.5, 28, 28]])
def test_absurd_or_invalid_declared_size(saved: Path, shape):
    _edit_graph(saved, lambda g: g["inputs"][0].update(shape=shape))
    with pytest.raises(ModelFormatError):
        parsicore.load(saved)


def test_bad_attribute_type_and_range(saved: Path):
    _edit_graph(saved, lambda g: g["nodes"][0]["attrs"].update(stride=[0, 1]))
    with pytest.raises(GraphError, match="conv1"):
        parsicore.load(saved)
    _edit_graph(saved, lambda g: g["nodes"][0]["attrs"].update(stride="two"))
    with pytest.raises(GraphError, match="conv1"):
        parsicore.load(saved)


def test_nan_weight_is_refused(saved: Path):
    with h5py.File(saved, "r+") as f:
        f["weights/fc/bias"][0] = np.nan
    with pytest.raises(GraphError, match="NaN"):
        parsicore.load(saved)


def test_errors_are_one_line(saved: Path):
    _edit_graph(saved, lambda g: g["nodes"][3].update(inputs=["nowhere"]))
    with pytest.raises(GraphError) as info:
        parsicore.load(saved)
    assert "\n" not in str(info.value) and str(saved) in str(info.value)


def test_directory_is_refused(tmp_path: Path):
    with pytest.raises(ModelFormatError, match="directory"):
        parsicore.load(tmp_path)
