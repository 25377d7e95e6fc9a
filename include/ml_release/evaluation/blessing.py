"""The blessing a trained model must earn before it may be packaged and released (TFX-style).

Three rules, all required: an absolute accuracy floor, a margin over the majority-class baseline,
and "no worse than production by more than ``max_regression``" when a production model exists.
Every rule contributes one reason, pass or fail, so the release record explains the verdict
whichever way it went. A non-finite number anywhere is never blessed (absence of evidence fails
closed, G21).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ml_release.config import BlessingSpec

# Thresholds are sums of decimals (0.424 + 0.05); without a tolerance a model whose accuracy
# prints as exactly the threshold could fail on the last bit of a float.
_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Blessing:
    blessed: bool
    reasons: tuple[str, ...]
    accuracy: float
    baseline_accuracy: float
    production_accuracy: float | None
    min_accuracy: float
    baseline_margin: float
    max_regression: float

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data: non-finite numbers become ``None`` (the reasons keep them)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


def bless(
    accuracy: float,
    baseline_accuracy: float,
    production_accuracy: float | None,
    spec: BlessingSpec,
) -> Blessing:
    """Apply the three rules of ``spec`` to a candidate's test accuracy."""
    reasons: list[str] = []
    passed: list[bool] = []

    def rule(ok: bool, operands: tuple[float, ...], holds: str, fails: str) -> None:
        finite = all(math.isfinite(x) for x in operands)
        passed.append(ok and finite)
        if not finite:
            reasons.append(f"not a finite number: {fails.replace(' < ', ' vs ')}")
        else:
            reasons.append(holds if ok else fails)

    acc = float(accuracy)
    floor = float(spec.min_accuracy)
    rule(
        acc >= floor - _TOLERANCE,
        (acc, floor),
        f"accuracy {acc:.3f} >= floor {floor:.3f}",
        f"accuracy {acc:.3f} < floor {floor:.3f}",
    )

    base, margin = float(baseline_accuracy), float(spec.baseline_margin)
    rule(
        acc >= base + margin - _TOLERANCE,
        (acc, base, margin),
        f"accuracy {acc:.3f} >= baseline {base:.3f} + margin {margin:.3f}",
        f"accuracy {acc:.3f} < baseline {base:.3f} + margin {margin:.3f}",
    )

    regression = float(spec.max_regression)
    if production_accuracy is None:
        finite = math.isfinite(acc) and math.isfinite(regression)
        passed.append(finite)
        reasons.append(
            "no production model: regression check not applicable"
            if finite
            else f"not a finite number: accuracy {acc:.3f}, max regression {regression:.3f}"
        )
    else:
        prod = float(production_accuracy)
        rule(
            acc >= prod - regression - _TOLERANCE,
            (acc, prod, regression),
            f"accuracy {acc:.3f} >= production {prod:.3f} - max regression {regression:.3f}",
            f"accuracy {acc:.3f} < production {prod:.3f} - max regression {regression:.3f}",
        )

    return Blessing(
        blessed=all(passed),
        reasons=tuple(reasons),
        accuracy=acc,
        baseline_accuracy=base,
        production_accuracy=None if production_accuracy is None else float(production_accuracy),
        min_accuracy=floor,
        baseline_margin=margin,
        max_regression=regression,
    )
