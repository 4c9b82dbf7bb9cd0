"""The op table is complete: every op has a numpy kernel and a test module; no kernel without an op."""

from __future__ import annotations

from pathlib import Path

from parsicore.kernels import factories, numba_available
from parsicore.ops import FAMILIES, OPS

TESTS = Path(__file__).parent / "ops"


def test_every_op_has_a_numpy_kernel_and_reference():
    numpy_table = factories("numpy")
    missing = sorted(set(OPS) - set(numpy_table))
    assert not missing, f"ops without a numpy kernel: {missing}"
    from parsicore.ops.base import OpDef

    no_reference = sorted(name for name, op in OPS.items() if type(op).reference is OpDef.reference)
    assert not no_reference, f"ops without a naive reference: {no_reference}"


def test_no_kernel_without_an_op():
    for backend in ["numpy", "reference"] + (["numba"] if numba_available() else []):
        extra = sorted(set(factories(backend)) - set(OPS))
        assert not extra, f"{backend} kernels matching no op: {extra}"


def test_every_family_has_a_test_module():
    missing = [stem for stem in FAMILIES if not (TESTS / f"test_{stem}.py").is_file()]
    assert not missing, f"op families without tests/ops/test_<stem>.py: {missing}"


def test_numba_families_are_op_families():
    if not numba_available():
        return
    from parsicore.kernels import numba_backend

    assert set(numba_backend.FAMILIES) <= set(FAMILIES)
