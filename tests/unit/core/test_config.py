from __future__ import annotations

from pathlib import Path

import pytest

from ml_release.config import ReleaseSpec
from ml_release.errors import SpecError

pytestmark = pytest.mark.unit

SPEC = Path(__file__).resolve().parents[3] / "include" / "releases" / "sentiment.yaml"


def test_shipped_spec_loads_with_its_demo_profile() -> None:
    spec = ReleaseSpec.for_model("sentiment")
    assert spec.training.profile == "demo"
    assert spec.data.labels == ("negative", "neutral", "positive")
    assert spec.release.load.requests >= 1000  # a p99 needs 1,000 samples (PERFORMANCE L3)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  min_rows: 1000", "  min_rows: 1000\n  surprise: 1", "data: unknown key(s) 'surprise'"),
        ("  min_rows: 1000", "  min_rows: many", "data.min_rows: expected an integer"),
        ("  backend: local", "  backend: slurm", "training.backend: 'slurm' is not one of"),
        ("  profile: demo", "  profile: tiny", "training.profile: 'tiny' is not one of"),
        ("  min_rows: 1000", "  min_rows: 0", "data.min_rows: must be >= 1"),
        (
            "  pretraffic_checks: [accuracy, load]",
            "  pretraffic_checks: [accuracy, lod]",
            "release.pretraffic_checks.1.: 'lod' is not one of",
        ),
        ("  pretraffic_checks: [accuracy, load]", "  pretraffic_checks: [load, load]", "names a check twice"),
        ("    looks_per_step: 4", "    looks_per_step: 0", "release.canary.looks_per_step: must be >= 1"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-enum",
        "unknown-profile",
        "zero-row-floor",
        "unknown-pretraffic-check",
        "repeated-pretraffic-check",
        "no-looks",
    ],
)
def test_bad_spec_is_refused_naming_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = SPEC.read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ReleaseSpec.load(bad)


def test_overrides_apply_and_are_checked() -> None:
    spec = ReleaseSpec.for_model("sentiment")
    assert spec.with_overrides({"training.profile": "full"}).training.active.precision == "bf16"
    with pytest.raises(SpecError, match=r"training\.nope: no such spec key"):
        spec.with_overrides({"training.nope": 1})
    with pytest.raises(SpecError, match=r"blessing\.min_accuracy: expected a number"):
        spec.with_overrides({"blessing.min_accuracy": "high"})


def test_missing_spec_names_the_path() -> None:
    with pytest.raises(SpecError, match="model_name: 'Bad Name' must match"):
        ReleaseSpec.for_model("Bad Name")
    with pytest.raises(SpecError, match="release spec not found"):
        ReleaseSpec.for_model("nosuchmodel")
