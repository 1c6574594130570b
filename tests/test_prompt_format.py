"""Estimators know the prompt format they were trained on (issue #16): ``collect`` records it in the store,
``train`` in the estimator file, and ``AT2Attribution`` warns once when it attributes a prompt rendered the other
way (naming both). The shipped SmolLM2 estimator records ``chat`` (its weights unchanged)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.collect import collect
from at2_lens.at2.estimator import (
    LinearEstimator,
    chat_template_sha256,
    load_estimator_file,
    prompt_format_mismatch,
    weights_sha256,
)
from at2_lens.at2.training import train_from_store
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.tasks import ContextTask

SHIPPED_WEIGHTS_SHA256 = "2cdd100cf3e381794faf238dd95f1f3676d1312edab58d8cd3ee2f42cff51d4b"
FAST: dict[str, Any] = {"steps": 10, "batch_size": 8, "progress": False}


def _tasks(fmt: str, n: int = 4) -> list[ContextTask]:
    return [ContextTask(context=f"The cat sat. Item {i} is red. Dogs bark.", query=f"Which item {i}?",
                        response="Item red.", prompt_format=fmt) for i in range(n)]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tiny_llama: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LinearEstimator]:
    """One tiny estimator per prompt format, each collected and trained on prompts of that format."""
    out = {}
    for fmt in ("chat", "plain"):
        store = collect(tiny_llama, _tasks(fmt), tmp_path_factory.mktemp(fmt) / "store", n_masks=4, progress=False)
        assert store.settings.extra["prompt_format"]["name"] == fmt
        out[fmt], _ = train_from_store(store, held_out=None, **FAST)
    return out


def _warnings(at2: AT2Attribution, fmt: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at2.attribute(_tasks(fmt, 1)[0])
    return [str(w.message) for w in caught if "prompt" in str(w.message)]


def test_collect_and_train_record_the_prompt_format(trained: dict[str, LinearEstimator], tiny_llama: Any,
                                                     tmp_path: Path) -> None:
    digest = chat_template_sha256(get_backend(tiny_llama).tokenizer)
    assert digest is not None and len(digest) == 64
    assert trained["chat"].prompt_format == {"name": "chat", "template_sha256": digest}
    assert trained["plain"].prompt_format == {"name": "plain", "template_sha256": None}
    back = load_estimator_file(trained["chat"].save(tmp_path / "est.safetensors"))
    assert back.prompt_format == trained["chat"].prompt_format


@pytest.mark.parametrize(("trained_on", "used"), [("chat", "plain"), ("plain", "chat")])
def test_other_format_warns_once_naming_both(trained: dict[str, LinearEstimator], tiny_llama: Any,
                                             trained_on: str, used: str) -> None:
    at2 = AT2Attribution(tiny_llama, trained[trained_on])
    (message,) = _warnings(at2, used)
    assert f"trained on {trained_on!r} prompts" in message and f"prompt is {used!r}" in message
    assert _warnings(at2, used) == []  # once per attribution object and format


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_same_format_or_unknown_format_does_not_warn(trained: dict[str, LinearEstimator], tiny_llama: Any,
                                                     fmt: str) -> None:
    assert _warnings(AT2Attribution(tiny_llama, trained[fmt]), fmt) == []
    assert _warnings(AT2Attribution(tiny_llama), "plain" if fmt == "chat" else "chat") == []  # uniform weights


def test_a_different_chat_template_is_a_mismatch() -> None:
    a, b = "a" * 64, "b" * 64
    why = prompt_format_mismatch({"name": "chat", "template_sha256": a}, {"name": "chat", "template_sha256": b})
    assert why is not None and "aaaaaaaaaaaa" in why and "bbbbbbbbbbbb" in why
    assert prompt_format_mismatch({"name": "chat", "template_sha256": None},
                                  {"name": "chat", "template_sha256": b}) is None
    assert prompt_format_mismatch(None, {"name": "plain", "template_sha256": None}) is None


def test_bad_prompt_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prompt_format"):
        LinearEstimator.uniform(2, 2, prompt_format={"name": "html"})
    est = LinearEstimator.uniform(2, 2)
    meta = est.metadata()
    meta["prompt_format"] = {"name": "chat", "template_sha256": "xyz"}
    from at2_lens.at2.estimator import ESTIMATOR_META_KEY
    from at2_lens.files import safetensors_bytes

    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"weights": est.weights}, ESTIMATOR_META_KEY, meta))
    with pytest.raises(EstimatorFileError, match="prompt_format"):
        load_estimator_file(path)


def test_resuming_a_store_without_a_recorded_format_adds_none(tiny_llama: Any, tmp_path: Path) -> None:
    """Stores written before the field existed resume as they are (the manifest must match exactly)."""
    store = collect(tiny_llama, _tasks("chat", 2), tmp_path / "store", n_masks=4, progress=False)
    manifest = tmp_path / "store" / "store.json"
    data = json.loads(manifest.read_text())
    del data["extra"]["prompt_format"]
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for example in (tmp_path / "store" / "examples").iterdir():
        example.unlink()
    store = collect(tiny_llama, _tasks("chat", 2), tmp_path / "store", n_masks=4, progress=False)
    assert "prompt_format" not in store.settings.extra and len(store) == 2
    est, _ = train_from_store(store, held_out=None, **FAST)
    assert est.prompt_format is None


def test_shipped_estimator_records_chat_with_unchanged_weights() -> None:
    from at2_lens.at2.pretrained import load_estimator

    est = load_estimator()
    assert weights_sha256(est.weights) == SHIPPED_WEIGHTS_SHA256
    assert est.prompt_format is not None and est.prompt_format["name"] == "chat"
    assert len(est.prompt_format["template_sha256"]) == 64


@pytest.mark.real
def test_shipped_estimator_matches_smollm2_chat_template_and_warns_on_plain(smollm2: Any) -> None:
    from at2_lens.at2.pretrained import load_estimator

    est = load_estimator()
    assert est.prompt_format == {"name": "chat",
                                 "template_sha256": chat_template_sha256(get_backend(smollm2).tokenizer)}
    at2 = AT2Attribution(smollm2, est)
    task = ContextTask(context="Paris is in France. The Nile is long.", query="Where is Paris?",
                       response="France.", prompt_format="plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at2.attribute(task)
        at2.attribute(ContextTask(context=task.context, query=task.query, response="France."))
    messages = [str(w.message) for w in caught if "prompt" in str(w.message)]
    assert len(messages) == 1 and "'chat'" in messages[0] and "'plain'" in messages[0]
