"""Estimator calibration: the fitted scale (and optional offset) recover a known linear truth, survive the file, put
AT2's scores in output units without changing any ranking, and bad calibrations are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.estimator import LinearEstimator, load_estimator_file
from at2_lens.at2.store import AblationExample
from at2_lens.at2.training import calibrate
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.files import safetensors_bytes
from at2_lens.tasks import ContextTask


def _examples(scale: float, offset: float, n: int = 12) -> tuple[LinearEstimator, list[AblationExample]]:
    g = torch.Generator().manual_seed(0)
    est = LinearEstimator(torch.rand(2, 3, generator=g) / 6)
    examples = []
    for i in range(n):
        feats = torch.rand(5, 2, 3, generator=g)
        masks = torch.rand(16, 5, generator=g) < 0.5
        score = est.score(feats)
        out = 3.0 * i + masks.float() @ (scale * score + offset)  # a per-task constant, then the linear truth
        examples.append(AblationExample(i, feats, masks, out, float(out.max()), {}))
    return est, examples


@pytest.mark.line_independent
def test_scale_only_calibration_recovers_the_scale() -> None:
    est, examples = _examples(scale=250.0, offset=0.0)
    cal = calibrate(est, examples)
    assert cal.calibration is not None
    assert cal.calibration["scale"] == pytest.approx(250.0, rel=1e-6)
    assert cal.calibration["offset"] == 0.0 and cal.calibration["fitted_on"] == 12
    assert "logit-probability" in cal.units
    assert torch.equal(cal.weights, est.weights)


@pytest.mark.line_independent
def test_offset_calibration_recovers_scale_and_offset() -> None:
    est, examples = _examples(scale=120.0, offset=-0.7)
    cal = calibrate(est, examples, with_offset=True)
    assert cal.calibration["scale"] == pytest.approx(120.0, rel=1e-6)
    assert cal.calibration["offset"] == pytest.approx(-0.7, abs=1e-6)


def test_calibration_survives_the_file_and_scales_attribution(tiny_llama: Any, tmp_path: Path) -> None:
    est = LinearEstimator(torch.rand(2, 4, generator=torch.Generator().manual_seed(1)))
    cal = LinearEstimator(est.weights, calibration={"scale": 40.0, "offset": 0.0, "units": "test units"})
    loaded = load_estimator_file(cal.save(tmp_path / "cal.safetensors"))
    assert loaded.calibration == cal.calibration and loaded.units == "test units"
    task = ContextTask(context=["The cat sat.", "Paris is in France."], query="Where?", response="In France.",
                       sources="sentence")
    raw = AT2Attribution(tiny_llama, est).attribute(task)
    scaled = AT2Attribution(tiny_llama, loaded).attribute(task)
    assert torch.allclose(scaled.scores, 40.0 * raw.scores, rtol=1e-5)
    assert scaled.units == "test units" and "unitless" in raw.units
    assert torch.equal(scaled.scores.argsort(), raw.scores.argsort())


BAD = [
    ({"scale": 0.0, "offset": 0.0, "units": "u"}, "'scale' must be > 0"),
    ({"scale": 1.0, "offset": True, "units": "u"}, "'offset' must be a finite number"),
    ({"scale": 1.0, "offset": 0.0}, "'units'"),
    ("1.0", "expected a dict"),
]


@pytest.mark.parametrize(("calibration", "needle"),
                         [*BAD, ({"scale": float("nan"), "offset": 0.0, "units": "u"}, "'scale' must be a finite")])
@pytest.mark.line_independent
def test_bad_calibration_is_refused_in_memory(calibration: Any, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        LinearEstimator(torch.ones(2, 3) / 6, calibration=calibration)


@pytest.mark.parametrize(("calibration", "needle"), BAD)
@pytest.mark.line_independent
def test_bad_calibration_is_refused_on_load(calibration: Any, needle: str, tmp_path: Path) -> None:
    meta = json.loads(json.dumps(LinearEstimator(torch.ones(2, 3) / 6).metadata()))
    meta["calibration"] = calibration
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"weights": torch.ones(2, 3) / 6}, "at2_lens_estimator", meta))
    with pytest.raises(EstimatorFileError, match=needle):
        load_estimator_file(path)


@pytest.mark.line_independent
def test_calibrate_refuses_bad_input() -> None:
    est, examples = _examples(scale=1.0, offset=0.0)
    with pytest.raises(InputError, match="examples: expected at least one"):
        calibrate(est, [])
    with pytest.raises(InputError, match="estimator: expected a LinearEstimator"):
        calibrate("est", examples)  # type: ignore[arg-type]
    _, negative = _examples(scale=-5.0, offset=0.0)
    with pytest.raises(InputError, match="the fitted scale"):
        calibrate(est, negative)
