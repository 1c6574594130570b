"""Checks that used to come late: an estimator of the wrong shape, a fingerprint that identifies no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.estimator import ESTIMATOR_META_KEY, LinearEstimator, load_estimator_file, model_fingerprint
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError


def test_wrong_shape_estimator_refused_at_construction(tiny_llama: object) -> None:
    b = get_backend(tiny_llama)
    assert (b.n_layers, b.n_heads) == (2, 4)
    with pytest.raises(InputError, match=r"estimator: .*6 layers x 12 heads.*2 layers x 4 heads"):
        AT2Attribution(tiny_llama, LinearEstimator.uniform(6, 12))
    AT2Attribution(tiny_llama, LinearEstimator.uniform(2, 4))  # the right shape, no fingerprint: accepted


def test_fingerprint_of_unknown_keys_refused(tiny_llama: object, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"model_fingerprint: holds none of the known keys"):
        LinearEstimator(torch.ones(2, 4) / 8, model_fingerprint={"colour": "blue", "size": 3})
    with pytest.raises(InputError, match="model_fingerprint"):
        LinearEstimator(torch.ones(2, 4) / 8, model_fingerprint={"n_layers": None})
    # unknown keys beside known ones (a later version's fields) and an empty (unchecked) fingerprint are fine
    fp = model_fingerprint(get_backend(tiny_llama))
    AT2Attribution(tiny_llama, LinearEstimator(torch.ones(2, 4) / 8, model_fingerprint=dict(fp, colour="blue")))
    LinearEstimator(torch.ones(2, 4) / 8, model_fingerprint={})
    # in a file too
    meta = LinearEstimator(torch.ones(2, 4) / 8, model_fingerprint=fp).metadata()
    meta["model_fingerprint"] = {"colour": "blue"}
    path = tmp_path / "unknown.safetensors"
    save_file({"weights": torch.ones(2, 4) / 8}, str(path), metadata={ESTIMATOR_META_KEY: json.dumps(meta)})
    with pytest.raises(EstimatorFileError, match="model_fingerprint holds none of the known keys"):
        load_estimator_file(path)
