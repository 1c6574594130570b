"""The README quick start, run by ``scripts/check_wheel.sh`` in a fresh environment where at2_lens is an installed
wheel (not the checkout): shipped estimator, SmolLM2 + AT2 on the quick-start task, the MiniLM SST-2 head, the
shipped data. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path

import at2_lens
from at2_lens import AT2Attribution, ContextTask


def step(name: str, t0: list[float]) -> None:
    now = time.perf_counter()
    print(f"  {name}: {now - t0[0]:.1f} s", flush=True)
    t0[0] = now


def main() -> int:
    t0 = [time.perf_counter()]
    # The package must come from the environment's site-packages, not from a checkout on sys.path.
    where = Path(at2_lens.__file__).resolve()
    assert "site-packages" in where.parts, f"at2_lens imported from {where}, not from an installed wheel"
    assert importlib.metadata.version("at2_lens") == at2_lens.__version__, "metadata version != __version__"
    print(f"at2_lens {at2_lens.__version__} from {where.parent}")

    estimator = at2_lens.load_estimator()
    step("load_estimator()", t0)
    model = at2_lens.load_model("smollm2")
    step('load_model("smollm2") (first load: dequantises the GGUF)', t0)
    task = ContextTask(
        context=["Mount Everest is 8,849 metres tall.", "The Eiffel Tower is 330 metres tall."],
        query="How tall is Mount Everest?",
        sources="sentence",
    )
    result = AT2Attribution(model, estimator=estimator).attribute(task)
    scores = result.scores
    assert tuple(scores.shape) == (2,) and bool(scores.isfinite().all()), f"bad scores {scores}"
    print(result.to_dataframe().to_string(index=False))
    assert int(scores.argmax()) == 0, "the sentence holding the answer should rank first"
    step("AT2 attribution", t0)

    from at2_lens.models.classifier import load_minilm_sst2, load_sst2

    clf = load_minilm_sst2()
    pred = clf.predict(["a gorgeous, witty, seductive movie."])
    assert clf.labels[pred[0]] == "positive", f"prediction {pred}"
    step("load_minilm_sst2() + one prediction", t0)

    from at2_lens.data import SQUAD_V2_DEV_SUBSET

    assert SQUAD_V2_DEV_SUBSET.is_file(), SQUAD_V2_DEV_SUBSET
    texts, labels = load_sst2()
    assert len(texts) == len(labels) == 872, len(texts)
    step("shipped data (SQuAD 2.0 subset, SST-2 validation: 872 rows)", t0)
    print("quick start: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
