"""perf/micro.py stays importable and correct: its benchmarks assert that the vectorised and per-segment
paths produce the same bytes before timing them, and the vectorised path must be clearly faster."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MICRO = Path(__file__).resolve().parents[2] / "perf" / "micro.py"


def _load():
    spec = importlib.util.spec_from_file_location("udpflannel_perf_micro", MICRO)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_micro_benchmarks_run_and_agree() -> None:
    micro = _load()
    for result in (micro.bench_split(1), micro.bench_gro(1)):
        assert result.vector_us > 0 and result.loop_us > 0
        # generous: the real targets (20x, 2 us/segment) are for a quiet machine, not a loaded CI box
        assert result.speedup > 3, result
    assert micro.memory_kib().get("rss_kib", 1) > 0
