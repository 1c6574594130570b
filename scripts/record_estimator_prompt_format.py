"""Add the ``prompt_format`` entry to the shipped SmolLM2 estimator's metadata, weights unchanged (issue #16).

The estimator was trained on chat-template prompts: ``scripts/collect_smollm2.py`` builds ``ContextTask``s with
the default ``prompt_format="auto"``, and SmolLM2's tokenizer has a chat template, so every stored example was
rendered with it. This script records that (with the sha256 of SmolLM2's template text), re-writes the file and
checks that the weights' sha256 is the same before and after.

    python scripts/record_estimator_prompt_format.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from at2_lens.at2.estimator import load_estimator_file, prompt_format_record, weights_sha256  # noqa: E402
from at2_lens.models.embedded import smollm2_hf_dir  # noqa: E402

PATH = ROOT / "at2_lens" / "estimators" / "smollm2-135m-instruct.safetensors"


def main() -> int:
    estimator = load_estimator_file(PATH)
    before = weights_sha256(estimator.weights)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf_dir()), local_files_only=True)
    estimator.prompt_format = prompt_format_record(True, tokenizer)
    estimator.save(PATH)
    after = load_estimator_file(PATH)
    assert weights_sha256(after.weights) == before, "the weights changed"
    assert after.prompt_format == estimator.prompt_format
    print(f"{PATH.name}: prompt_format {after.prompt_format}; weights sha256 {before} unchanged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
