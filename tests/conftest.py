"""Shared test configuration: a bounded hypothesis profile (JIT warm-up makes deadlines meaningless)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "parsicore",
    max_examples=int(os.environ.get("PARSICORE_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("parsicore")
