"""TorchRunner: the parsicore graph run op by op with torch.nn.functional, against parsicore (numpy backend).

Tolerance 1e-4 relative to the output scale. Same models as the ONNX export tests: the op zoo (every op of
the table), small_cnn and every gated_cnn variant, plus run-time threshold / keep overrides.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parsicore.api import load  # noqa: E402
from parsicore.errors import ConversionError, InputError  # noqa: E402
from parsicore.export.torch_runner import TorchRunner  # noqa: E402
from tests.export._compare import GATED_VARIANTS, assert_outputs_close, model_input  # noqa: E402
from tests.export._parsicore_zoo import zoo_model  # noqa: E402
from tests.models import gated_cnn, small_cnn  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_zoo_matches_parsicore(seed: int) -> None:
    model_file = zoo_model(seed)
    x = model_input(model_file, 5, seed)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    assert_outputs_close(ours, TorchRunner(model_file).run(x))


def test_small_cnn_matches_parsicore() -> None:
    model_file = small_cnn(3).build()
    x = model_input(model_file, 3, 0)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    assert_outputs_close(ours, TorchRunner(model_file).run(x))


@pytest.mark.parametrize("variant", sorted(GATED_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gated_models_match_parsicore(variant: str, seed: int) -> None:
    model_file = gated_cnn(seed=seed, **GATED_VARIANTS[variant])  # type: ignore[arg-type]
    x = model_input(model_file, 6, seed + 10)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    assert_outputs_close(ours, TorchRunner(model_file).run(x))


@pytest.mark.parametrize(("variant", "overrides"), [("lkam-hard-2banks", {"threshold": 0.8}),
                                                    ("topk-scaled", {"keep": 0.25})])
def test_overrides(variant: str, overrides: dict[str, float]) -> None:
    model_file = gated_cnn(seed=4, **GATED_VARIANTS[variant])  # type: ignore[arg-type]
    x = model_input(model_file, 4, 5)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x, **overrides)  # type: ignore[arg-type]
    assert_outputs_close(ours, TorchRunner(model_file, **overrides).run(x))  # type: ignore[arg-type]


def test_module_is_eval_and_threads_are_set() -> None:
    before = torch.get_num_threads()
    try:
        runner = TorchRunner(small_cnn().build(), threads=1)
        assert torch.get_num_threads() == 1
        assert not runner.module.training
    finally:
        torch.set_num_threads(before)


def test_input_errors() -> None:
    runner = TorchRunner(small_cnn().build())
    with pytest.raises(InputError):
        runner.run({"other": np.zeros((1, 1, 28, 28), np.float32)})


def test_unsupported_average_pool_pads_are_refused() -> None:
    from parsicore.builder import ModelBuilder

    b = ModelBuilder("avg")
    b.add_input("x", (None, 1, 6, 6))
    b.add_node("AveragePool", ["x"], ["y"], attrs={"kernel": (3, 3), "pads": (1, 0, 0, 1)})
    b.add_output("y")
    with pytest.raises(ConversionError, match="AveragePool pads"):
        TorchRunner(b.build())
