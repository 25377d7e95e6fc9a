from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_release.packaging.handler import (
    VERSION_HEADER,
    RequestError,
    TextClassifierHandler,
    parse_request,
    postprocess,
    request_body,
    setting,
)
from tests.support.torchserve_context import make_context

pytestmark = pytest.mark.unit

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture()
def restore_torch_threads() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def handler(
    tiny_model_dir: Path, restore_torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> TextClassifierHandler:
    monkeypatch.delenv("ML_RELEASE_TORCH_THREADS", raising=False)
    monkeypatch.delenv("ML_RELEASE_MAX_LENGTH", raising=False)
    h = TextClassifierHandler()
    h.initialize(make_context(tiny_model_dir, batch=1))
    return h


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"text": "great car"}', "great car"),
        (bytearray(b'{"text": "great car"}'), "great car"),
        ('{"text": "great car"}', "great car"),
        ({"text": "great car"}, "great car"),
        ('{"text": "caf\\u00e9 \\ud83d\\ude97"}', "café 🚗"),
    ],
    ids=["bytes", "bytearray", "str", "decoded-json", "unicode-escapes"],
)
def test_parse_request_returns_the_text(body: object, expected: str) -> None:
    assert parse_request(body) == expected


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "not JSON"),
        ("{'text': 'single quotes'}", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (None, "empty body"),
        (b"", "empty body"),
        ({}, 'missing "text"'),
        ({"txt": "typo"}, "unknown keys: 'txt'"),
        ({"text": ""}, "non-empty string"),
        ({"text": "   "}, "non-empty string"),
        ({"text": 3}, "non-empty string, got a number"),
        ({"text": None}, "non-empty string, got null"),
        ({"text": ["a"]}, "non-empty string, got an array"),
        ({"text": "ok", "lang": "en"}, "unknown keys 'lang'"),
        (b'["text"]', "JSON object"),
        (7, "JSON object"),
    ],
    ids=[
        "not-json",
        "python-literal",
        "not-utf8",
        "none",
        "empty-bytes",
        "missing-text",
        "misspelled-text",
        "empty-text",
        "blank-text",
        "text-number",
        "text-null",
        "text-array",
        "unknown-key",
        "array-body",
        "number-body",
    ],
)
def test_parse_request_names_the_problem(body: object, problem: str) -> None:
    with pytest.raises(RequestError, match=problem.replace("(", r"\(")):
        parse_request(body)


def test_request_body_prefers_data_and_falls_back_to_body() -> None:
    assert request_body({"data": b"a", "body": b"b"}) == b"a"
    assert request_body({"body": {"text": "x"}}) == {"text": "x"}
    assert request_body({"data": None, "body": b"b"}) == b"b"


def test_postprocess_picks_the_most_probable_label() -> None:
    out = postprocess([[0.1, 0.7, 0.2]], LABELS)
    assert out == [{"label": "neutral", "scores": {"negative": 0.1, "neutral": 0.7, "positive": 0.2}}]


@pytest.mark.parametrize(
    "row", [[math.nan, 0.5, 0.5], [math.inf, 0.0, 0.0], [0.5, 0.5]], ids=["nan", "inf", "wrong-width"]
)
def test_postprocess_refuses_non_finite_or_misshaped_scores(row: list[float]) -> None:
    with pytest.raises(ValueError):
        postprocess([row], LABELS)


@pytest.mark.parametrize(
    ("env", "yaml_config", "expected"),
    [
        (None, None, 1),
        (None, {"handler": {"torch_threads": 3}}, 3),
        ("2", {"handler": {"torch_threads": 3}}, 2),
        (None, {"batchSize": 4}, 1),
    ],
    ids=["default", "from-model-config", "env-overrides-model-config", "no-handler-section"],
)
def test_setting_precedence(
    env: str | None, yaml_config: dict[str, Any] | None, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("ML_RELEASE_TORCH_THREADS", raising=False)
    else:
        monkeypatch.setenv("ML_RELEASE_TORCH_THREADS", env)
    assert setting("ML_RELEASE_TORCH_THREADS", yaml_config, "torch_threads", 1) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "two"], ids=["zero", "negative", "not-a-number"])
def test_setting_refuses_a_bad_value(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_RELEASE_TORCH_THREADS", raw)
    with pytest.raises(ValueError, match="ML_RELEASE_TORCH_THREADS"):
        setting("ML_RELEASE_TORCH_THREADS", None, "torch_threads", 1)


def test_initialize_sets_threads_max_length_and_labels(
    tiny_model_dir: Path, restore_torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.delenv("ML_RELEASE_TORCH_THREADS", raising=False)
    monkeypatch.setenv("ML_RELEASE_MAX_LENGTH", "16")
    h = TextClassifierHandler()
    h.initialize(make_context(tiny_model_dir, batch=1, yaml_config={"handler": {"torch_threads": 1}}))
    assert torch.get_num_threads() == 1
    assert h.max_length == 16
    assert h.labels == LABELS
    assert h.model_version == "r1"
    assert not h.model.training


def test_a_valid_batch_gets_one_distribution_per_row(handler: TextClassifierHandler, tiny_model_dir: Path) -> None:
    rows = [
        {"body": {"text": "I love this car"}},
        {"data": b'{"text": "I hate waiting"}'},
        {"body": json.dumps({"text": "It drove to the store. " * 100})},  # longer than max_length
    ]
    context = make_context(tiny_model_dir, batch=3)
    out = handler.handle(rows, context)
    assert len(out) == 3
    for idx, result in enumerate(out):
        assert set(result) == {"label", "scores"}
        assert set(result["scores"]) == set(LABELS)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        assert all(isinstance(p, float) and math.isfinite(p) for p in result["scores"].values())
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert context.get_response_status(idx)[0] == 200
        assert context.get_response_headers(idx)[VERSION_HEADER] == "r1"


def test_batching_does_not_change_a_rows_answer(handler: TextClassifierHandler, tiny_model_dir: Path) -> None:
    alone = handler.handle([{"body": {"text": "short"}}], make_context(tiny_model_dir, batch=1))
    padded = handler.handle(
        [{"body": {"text": "short"}}, {"body": {"text": "a much longer sentence that forces padding " * 3}}],
        make_context(tiny_model_dir, batch=2),
    )
    for label in LABELS:
        assert padded[0]["scores"][label] == pytest.approx(alone[0]["scores"][label], abs=1e-5)


def test_malformed_rows_get_400_and_valid_rows_of_the_batch_are_answered(
    handler: TextClassifierHandler, tiny_model_dir: Path
) -> None:
    rows = [
        {"body": {"text": "fine"}},
        {"body": b"{not json"},
        {"body": {"other": "x"}},
        {"body": {"text": ""}},
        {"body": {"text": 42}},
        {"body": {"text": "fine too", "extra": 1}},
        {"data": b'{"text": "also fine"}'},
    ]
    expected_problems = {
        1: "not JSON",
        2: 'missing "text"',
        3: '"text" must be a non-empty string',
        4: '"text" must be a non-empty string',
        5: "unknown keys 'extra'",
    }
    context = make_context(tiny_model_dir, batch=len(rows))
    out = handler.handle(rows, context)
    assert len(out) == len(rows)
    for idx in (0, 6):
        assert context.get_response_status(idx)[0] == 200
        assert set(out[idx]) == {"label", "scores"}
    for idx, problem in expected_problems.items():
        code, phrase = context.get_response_status(idx)
        assert code == 400
        assert problem in phrase
        assert out[idx] == {"error": phrase}


def test_a_batch_of_only_malformed_rows_runs_no_inference(
    handler: TextClassifierHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(texts: list[str]) -> list[list[float]]:
        raise AssertionError("inference ran on an empty batch")

    monkeypatch.setattr(handler, "predict_proba", forbidden)
    context = make_context(tiny_model_dir, batch=2)
    out = handler.handle([{"body": b""}, {"body": {"text": None}}], context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert all("error" in o for o in out)


def test_non_finite_model_output_is_a_500_not_a_label(
    handler: TextClassifierHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handler, "predict_proba", lambda texts: [[math.nan, 0.5, 0.5] for _ in texts])
    context = make_context(tiny_model_dir, batch=2)
    out = handler.handle([{"body": {"text": "a"}}, {"body": b"bad"}], context)
    assert context.get_response_status(0)[0] == 500
    assert "non-finite" in out[0]["error"]
    assert context.get_response_status(1)[0] == 400
