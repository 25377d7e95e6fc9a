from __future__ import annotations

import pytest

from ml_release.analysis.loadgen import LoadResult, Sample
from ml_release.pipeline.release import _merge_results, _split

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(800, 4, [200] * 4), (10, 4, [3, 3, 2, 2]), (3, 4, [1, 1, 1]), (5, 1, [5]), (0, 4, [0])],
    ids=["even", "uneven", "fewer-requests-than-looks", "one-look", "nothing"],
)
def test_a_step_is_split_into_near_equal_parts(total: int, parts: int, expected: list[int]) -> None:
    assert _split(total, parts) == expected
    assert sum(_split(total, parts)) == total


def test_parts_merge_into_one_step_result() -> None:
    def part(n: int, version: str) -> LoadResult:
        samples = tuple(Sample(i, i / 10, 0.02, 200, version) for i in range(n))
        return LoadResult(samples=samples, rate_per_s=10.0, wall_s=n / 10, version_header="X-Version")

    merged = _merge_results(part(3, "v1"), part(2, "v2"))
    assert [s.served_by for s in merged.samples] == ["v1"] * 3 + ["v2"] * 2
    assert merged.wall_s == pytest.approx(0.5) and merged.rate_per_s == 10.0
