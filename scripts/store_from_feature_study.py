"""Write the estimator store (``data/at2_smollm2/store``) from the feature-study collection.

    python scripts/store_from_feature_study.py --study DIR [--family sum.uniform] [--store data/at2_smollm2/store]

``scripts/collect_feature_study.py`` reads several feature families per task (run on a GPU for the whole v3 task
list); this keeps one family (AT2's own, ``sum.uniform``, unless told otherwise) and writes each task as an example of
a store with exactly the settings ``scripts/collect_smollm2.py`` uses, so that script resumes the same store (e.g. the
tasks the GPU run could not finish). The study saved features in float16; they are stored as float32.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "data" / "at2_smollm2" / "store"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--family", default="sum.uniform")
    ap.add_argument("--store", default=str(STORE))
    args = ap.parse_args()
    from at2_feature_ceiling import family, load_study
    from collect_smollm2 import TASKS_V3

    from at2_lens import load_model
    from at2_lens.at2.estimator import model_fingerprint
    from at2_lens.at2.store import AblationExample, AblationStore, StoreSettings
    from at2_lens.backends import get_backend

    backend = get_backend(load_model("smollm2"))
    tasks = load_study(Path(args.study))
    n_masks = int(tasks[0]["masks"].shape[0])
    settings = StoreSettings(
        model_fingerprint=model_fingerprint(backend), n_layers=backend.n_layers, n_heads=backend.n_heads,
        ablation_mode="mask", output_type="logit_prob", granularity="sentence", n_masks=n_masks, keep_prob=0.5,
        seed=0, extra={"tasks": TASKS_V3},
    )
    store = AblationStore(args.store, settings)
    for t in tasks:
        meta = t["meta"]
        n_sources = int(t["masks"].shape[1])
        example = AblationExample(
            meta["index"], family(t, args.family).contiguous(), t["masks"].bool(), t["outputs"].float(),
            float(t["full_output"][0]),
            {"n_sources": n_sources, "n_tokens": meta["n_tokens"], "response": meta["response"],
             "target": meta["response"], "query": meta["query"], "granularity": "sentence", "kind": meta["kind"]},
        )
        store.write(example)
    print(json.dumps({"examples": len(store), "store": str(store.root)}))


if __name__ == "__main__":
    main()
