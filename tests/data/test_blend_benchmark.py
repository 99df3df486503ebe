"""benchmarks/data.py blend: the row it writes to benchmarks/RESULTS.md compares the closed-form
blend with megatron's helper at each N, with the helper simulated where its arrays would not fit."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_blend_benchmark_row_has_the_figures_at_each_n():
    import data as bench  # benchmarks/data.py

    row = bench.bench_blend([1_000_000, 10_000_000_000], micro_batch=64)
    parts = row.split("; N=")
    assert len(parts) == 3 and parts[1].startswith("1,000,000:") and parts[2].startswith("10,000,000,000:")
    small, large = parts[1], parts[2]
    assert "simulated" not in small and "simulated: its rate at N=1,000,000" in large
    rate = [float(re.search(r"([\d.]+) ms per 1M samples \(", p).group(1)) for p in (small, large)]
    helper_large = float(re.search(r"helper alone ([\d.]+) s", large).group(1))
    assert rate[0] == rate[1] and helper_large == pytest.approx(rate[0] * 10, rel=0.01)  # its 1M rate x 10B
    assert "0.01 GB of index per rank" in small and "100.00 GB of index per rank" in large
    for part in (small, large):
        first = float(re.search(r"first micro-batch of 64 in ([\d.]+) ms", part).group(1))
        served = [float(x) for x in re.search(r"served ([\d.]+) / ([\d.]+) / ([\d.]+) ms per 1M", part).groups()]
        held = float(re.search(r"index held ([\d.]+) kB", part).group(1))
        disk = float(re.search(r"([\d.]+) kB on disk", part).group(1))
        assert first < 1000 and all(0 < s < 2000 for s in served) and held < 100 and disk < 20
    others = re.findall(r"([\d.]+) ms \(([\d.]+)x of ([\d.]+) ms\)", large.split("other specs at N=10B")[1])
    assert len(others) == len(bench.OTHER_SPECS)
    for served, ratio, helper in ((float(a), float(b), float(c)) for a, b, c in others):
        assert 0 < served < 2000 and ratio == pytest.approx(served / helper, abs=0.03)  # (figures rounded)
