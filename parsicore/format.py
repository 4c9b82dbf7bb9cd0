"""Model format v1: HDF5 file <-> :class:`ModelFile`. The only module that touches h5py (or pyfive).

Layout of a v1 file (see FORMAT.md for the full specification)::

    /                       attrs: format = "parsicore-model", format_version = 1
    /graph_json             uint8 dataset: UTF-8 JSON {"inputs": [...], "outputs": [...], "nodes": [...]}
    /metadata_json          uint8 dataset: UTF-8 JSON {"name", "description", "license", "producer",
                            "labels", "preprocessing", ...}
    /weights/<node>/<name>  float32 or float16 datasets
    /selftest/input/<t>     optional float32 datasets: an input and the producer's outputs for it
    /selftest/output/<t>

This module checks the *structure* (types, names, dtypes, sizes); op-level checks (known op types,
attributes, weight shapes, acyclic graph) happen in :mod:`parsicore.graph`. Reading works with h5py, or
with the pure-Python reader pyfive where h5py is not installed (Termux). Writing needs h5py and is atomic:
a temporary file beside the target is renamed over it only once complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.errors import ModelFormatError

FORMAT_NAME = "parsicore-model"
FORMAT_VERSION = 1

#: Sanity limits: a file declaring more than this is rejected before anything is allocated.
MAX_NODES = 20_000
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_WEIGHT_BYTES = 2 * 1024**3
MAX_DIM = 1 << 16
MAX_INPUT_ELEMENTS = 1 << 28  # per image
NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]+@#]{1,200}$")


@dataclass(frozen=True)
class TensorSpec:
    """A model input: name and full shape, the batch dimension first and None (dynamic)."""

    name: str
    shape: tuple[int | None, ...]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape[1:])  # type: ignore[arg-type]


@dataclass(frozen=True)
class NodeSpec:
    """A graph node as stored: op type, tensor names, raw JSON attributes. Weights live in ModelFile.weights."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ModelFile:
    """Everything in a model file, in memory. weights: node name -> weight name -> float32 array."""

    inputs: list[TensorSpec]
    outputs: list[str]
    nodes: list[NodeSpec]
    weights: dict[str, dict[str, np.ndarray]]
    metadata: dict[str, Any] = field(default_factory=dict)
    selftest_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    selftest_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"
    #: Weight names stored as float16 in the file (they are float32 in memory).
    float16_weights: frozenset[tuple[str, str]] = frozenset()


# ----------------------------------------------------------------------------------------------- reading


def _open_reader(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        h5py = None
    if h5py is not None:
        try:
            return h5py.File(path, "r")
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: not a readable HDF5 model file ({_first_line(e)})") from e
    try:
        import pyfive
    except ImportError as e:
        raise ModelFormatError(f"{path}: reading models needs h5py or pyfive (pip install pyfive)") from e
    try:
        return pyfive.File(str(path))
    except Exception as e:  # pyfive raises assorted errors on corrupt input
        raise ModelFormatError(f"{path}: not a readable HDF5 model file ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value[()])
    return str(value)


def _read_json(f: Any, name: str, path: Path) -> Any:
    if name not in f:
        raise ModelFormatError(f"{path}: missing dataset '/{name}'")
    ds = f[name]
    if np.dtype(ds.dtype) != np.uint8 or len(ds.shape) != 1:  # np.dtype: pyfive < 0.5 gives strings ('<u1')
        raise ModelFormatError(f"{path}: '/{name}' must be a 1-D uint8 dataset of UTF-8 JSON")
    if ds.shape[0] > MAX_JSON_BYTES:
        raise ModelFormatError(f"{path}: '/{name}' is {ds.shape[0]} bytes, over the {MAX_JSON_BYTES} limit")
    try:
        return json.loads(bytes(np.asarray(ds[()], dtype=np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: '/{name}' is not valid UTF-8 JSON ({e})") from e


def _check_name(kind: str, name: Any, path: Path) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ModelFormatError(f"{path}: invalid {kind} name {name!r} (1-200 chars of A-Z a-z 0-9 _ . : - [ ] + @ #)")
    return name


def _parse_graph(graph: Any, path: Path) -> tuple[list[TensorSpec], list[str], list[NodeSpec]]:
    if not isinstance(graph, dict) or not {"inputs", "outputs", "nodes"} <= set(graph):
        raise ModelFormatError(f"{path}: graph JSON must be an object with 'inputs', 'outputs' and 'nodes'")
    raw_nodes = graph["nodes"]
    if not isinstance(raw_nodes, list):
        raise ModelFormatError(f"{path}: graph 'nodes' must be a list")
    if len(raw_nodes) > MAX_NODES:
        raise ModelFormatError(f"{path}: {len(raw_nodes)} nodes declared, over the limit of {MAX_NODES}")
    inputs = []
    if not isinstance(graph["inputs"], list) or not graph["inputs"]:
        raise ModelFormatError(f"{path}: graph 'inputs' must be a non-empty list")
    for item in graph["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("shape"), list):
            raise ModelFormatError(f"{path}: each input must be an object with 'name' and 'shape'")
        name = _check_name("input", item.get("name"), path)
        shape = item["shape"]
        if len(shape) < 2 or len(shape) > 4:
            raise ModelFormatError(f"{path}: input {name!r} must have rank 2 to 4 with the batch first, got {shape}")
        if shape[0] is not None:
            raise ModelFormatError(f"{path}: input {name!r}: the batch dimension must be null (dynamic), "
                                   f"got {shape[0]}")
        dims = shape[1:]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM for d in dims):
            raise ModelFormatError(f"{path}: input {name!r} has invalid dimensions {shape} (each 1..{MAX_DIM})")
        if int(np.prod(dims, dtype=np.int64)) > MAX_INPUT_ELEMENTS:
            raise ModelFormatError(f"{path}: input {name!r} declares {shape}, absurdly large "
                                   f"(> {MAX_INPUT_ELEMENTS} values)")
        inputs.append(TensorSpec(name, (None, *dims)))
    outputs = graph["outputs"]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise ModelFormatError(f"{path}: graph 'outputs' must be a non-empty list of tensor names")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: node #{i} is not an object")
        name = _check_name("node", raw.get("name"), path)
        op = raw.get("op")
        if not isinstance(op, str) or not op:
            raise ModelFormatError(f"{path}: node {name!r} has no op type")
        ins, outs = raw.get("inputs"), raw.get("outputs")
        for kind, names in (("inputs", ins), ("outputs", outs)):
            if not isinstance(names, list) or not all(isinstance(t, str) and 0 < len(t) <= 200 for t in names):
                raise ModelFormatError(f"{path}: node {name!r}: '{kind}' must be a list of tensor names")
        attrs = raw.get("attrs", {})
        if not isinstance(attrs, dict):
            raise ModelFormatError(f"{path}: node {name!r}: 'attrs' must be an object")
        nodes.append(NodeSpec(name, op, tuple(ins), tuple(outs), attrs))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise ModelFormatError(f"{path}: node name {dup!r} is used twice")
    return inputs, list(outputs), nodes


def _read_float_group(group: Any, what: str, path: Path) -> tuple[dict[str, np.ndarray], set[str], int]:
    arrays, halves, nbytes = {}, set(), 0
    for key in group.keys():
        ds = group[key]
        if not hasattr(ds, "dtype"):
            raise ModelFormatError(f"{path}: {what}/{key} is a group, expected a dataset")
        dtype = np.dtype(ds.dtype)  # pyfive < 0.5 gives strings ('<f4')
        if dtype not in (np.float32, np.float16):
            raise ModelFormatError(f"{path}: {what}/{key} has dtype {dtype}; only float32 and float16 are allowed")
        size = int(np.prod(ds.shape, dtype=np.int64)) * dtype.itemsize
        nbytes += size
        if nbytes > MAX_WEIGHT_BYTES:
            raise ModelFormatError(f"{path}: {what} declares over {MAX_WEIGHT_BYTES} bytes of data, absurdly large")
        try:
            arr = np.asarray(ds[()])
        except Exception as e:  # truncated data surfaces here
            raise ModelFormatError(
                f"{path}: cannot read {what}/{key} ({_first_line(e)}); is the file truncated?") from e
        if arr.dtype == np.float16:
            halves.add(key)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.owndata:
            # pyfive returns views of a memory map of the file: copy, so that a model file overwritten in
            # place (cp new.h5 model.h5) cannot change a loaded model's weights or crash it with SIGBUS.
            arr = arr.copy()
        arrays[key] = arr
    return arrays, halves, nbytes


def read_model(path: str | os.PathLike[str]) -> ModelFile:
    """Read and structurally validate a model file; ModelFormatError naming the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such model file")
    if p.is_dir():
        raise ModelFormatError(f"{p}: is a directory, not a model file")
    f = _open_reader(p)
    try:
        return _read_open_file(f, p)
    except ModelFormatError:
        raise
    except Exception as e:  # anything h5py/pyfive throws on a corrupt file
        raise ModelFormatError(f"{p}: corrupt model file ({_first_line(e)})") from e
    finally:
        close = getattr(f, "close", None)
        if close:
            close()


def _read_open_file(f: Any, p: Path) -> ModelFile:
    fmt = _attr_str(f.attrs.get("format", ""))
    if fmt != FORMAT_NAME:
        raise ModelFormatError(f"{p}: not a parsicore model (format attribute {fmt!r}, expected {FORMAT_NAME!r})")
    version = f.attrs.get("format_version")
    try:
        version = int(np.asarray(version).item())
    except (TypeError, ValueError):
        raise ModelFormatError(f"{p}: format_version attribute is missing or not an integer") from None
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{p}: format version {version} is not supported "
                               f"(this parsicore reads version {FORMAT_VERSION})")
    inputs, outputs, nodes = _parse_graph(_read_json(f, "graph_json", p), p)
    metadata = _read_json(f, "metadata_json", p)
    if not isinstance(metadata, dict):
        raise ModelFormatError(f"{p}: metadata JSON must be an object")
    weights: dict[str, dict[str, np.ndarray]] = {}
    halves: set[tuple[str, str]] = set()
    total = 0
    if "weights" in f:
        group = f["weights"]
        node_names = {n.name for n in nodes}
        for node_name in group.keys():
            if node_name not in node_names:
                raise ModelFormatError(f"{p}: weights for unknown node {node_name!r}")
            arrays, half, nbytes = _read_float_group(group[node_name], f"weights/{node_name}", p)
            total += nbytes
            if total > MAX_WEIGHT_BYTES:
                raise ModelFormatError(f"{p}: weights exceed {MAX_WEIGHT_BYTES} bytes, absurdly large")
            weights[node_name] = arrays
            halves |= {(node_name, k) for k in half}
    st_in: dict[str, np.ndarray] = {}
    st_out: dict[str, np.ndarray] = {}
    if "selftest" in f:
        st = f["selftest"]
        if "input" in st:
            st_in = _read_float_group(st["input"], "selftest/input", p)[0]
        if "output" in st:
            st_out = _read_float_group(st["output"], "selftest/output", p)[0]
    return ModelFile(inputs, outputs, nodes, weights, metadata, st_in, st_out, str(p), frozenset(halves))


# ----------------------------------------------------------------------------------------------- writing


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True, allow_nan=False).encode("utf-8"), dtype=np.uint8)


def graph_to_json(model: ModelFile) -> dict[str, Any]:
    """The graph part of a ModelFile as the JSON object stored in /graph_json."""
    return {
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in model.inputs],
        "outputs": list(model.outputs),
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs), "attrs": dict(n.attrs)}
            for n in model.nodes
        ],
    }


def write_model(model: ModelFile, path: str | os.PathLike[str], float16: bool = False) -> None:
    """Write ``model`` to ``path`` atomically (temp file + rename). float16 stores weights as float16.

    Raises ModelFormatError when the target directory is not writable or h5py is missing; the target is
    left untouched on any failure.
    """
    try:
        import h5py
    except ImportError as e:
        raise ModelFormatError("writing models needs h5py (pip install h5py)") from e
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ModelFormatError(f"{target}: directory {directory} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ModelFormatError(f"{target}: cannot write there ({e.strerror})") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.create_dataset("graph_json", data=_json_bytes(graph_to_json(model)))
            f.create_dataset("metadata_json", data=_json_bytes(model.metadata))
            wg = f.create_group("weights")
            dtype = np.float16 if float16 else np.float32
            for node_name, arrays in model.weights.items():
                if not arrays:
                    continue
                g = wg.create_group(node_name)
                for key, arr in arrays.items():
                    g.create_dataset(key, data=np.asarray(arr, dtype=np.float32).astype(dtype))
            if model.selftest_inputs or model.selftest_outputs:
                st = f.create_group("selftest")
                for sub, arrays in (("input", model.selftest_inputs), ("output", model.selftest_outputs)):
                    sg = st.create_group(sub)
                    for key, arr in arrays.items():
                        sg.create_dataset(key, data=np.asarray(arr, dtype=np.float32))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ModelFormatError(f"{target}: write failed ({_first_line(e)})") from e
        raise
