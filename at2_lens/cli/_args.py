"""Command-line options shared by several ``at2-lens`` sub-commands (one definition, one help text each).

- ``add_model_args``: ``--model`` and ``--backend`` (every command that loads a model).
- ``add_classifier_args`` / ``load_classifier`` / ``set_threads``: the encoder classifier of ``heads`` and ``tree``.
- ``parse_ints``: a comma-separated list of integers (``--ks``, ``--adversarial-layers``).
- ``TASKS_HELP`` / ``parse_tasks_spec``: what ``--tasks`` of ``collect`` and ``evaluate`` accepts.

Heavy imports happen inside the functions that need them, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from at2_lens._validate import check_int
from at2_lens.errors import InputError
from at2_lens.models import BACKEND_CHOICES


def add_model_args(p: argparse.ArgumentParser, *, default: str, model_help: str, hooked_class: str) -> None:
    """Add ``--model`` (default ``default``; ``model_help`` says what it accepts) and ``--backend``.

    ``hooked_class`` names the TL 3.9 class that ``--backend hooked`` selects (``HookedTransformer`` for the
    decoder commands, ``HookedEncoder`` for the encoder ones).
    """
    p.add_argument("--model", default=default, help=f"{model_help} (default: {default})")
    p.add_argument("--backend", default="auto", choices=list(BACKEND_CHOICES),
                   help=f"TransformerLens class: 'hooked' = {hooked_class} (TL 3.9 only), 'bridge' = "
                        "TransformerBridge, 'auto' = hooked where available (default: auto)")


def add_classifier_args(p: argparse.ArgumentParser) -> None:
    """Add the options that choose the encoder classifier (``--model``, ``--backend``, ``--head``, ``--threads``)."""
    add_model_args(p, default="minilm", hooked_class="HookedEncoder",
                   model_help="'minilm' (embedded all-MiniLM-L6-v2, offline) or a local BERT-type model directory")
    p.add_argument("--head", default=None,
                   help="classifier head file (.safetensors from write_head); default: the shipped SST-2 head "
                        "for minilm (required for any other model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")


def load_classifier(model: str, head: str | None, backend: str) -> Any:
    """The MiniLM SST-2 classifier, or ``SentimentClassifier(load_model(model), read_head(head))``."""
    from at2_lens.models.classifier import SentimentClassifier, load_minilm_sst2, read_head

    if model.strip().lower() == "minilm":
        return load_minilm_sst2(backend, head_path=head)
    if head is None:
        raise InputError("--head: a model other than 'minilm' needs a classifier head file (.safetensors)")
    from at2_lens.models import load_model

    return SentimentClassifier(load_model(model, backend=backend), read_head(head))  # type: ignore[arg-type]


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` after checking ``--threads``."""
    import torch

    torch.set_num_threads(check_int("--threads", n, minimum=1))


def parse_ints(text: str, name: str) -> list[int]:
    """The integers of a comma-separated option value; ``name`` is the option, for the error message."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{name}: expected at least one integer")
    return values


TASKS_HELP = ("'squad:' (or 'squad:dev_subset') for the SQuAD 2.0 subset shipped with at2_lens, 'squad:PATH' for a "
              "SQuAD-format JSON file, 'squad:rajpurkar/squad_v2[:SPLIT]' for SQuAD 2.0 from the Hugging Face hub; "
              "'hotpot:PATH' for a HotpotQA JSON file or 'hotpot:hotpotqa/hotpot_qa[:SPLIT]' for HotpotQA "
              "(distractor) from the hub, sources = HotpotQA's own sentences when --sources is sentence; or a "
              ".jsonl file of tasks ({'context', 'query', ['response']} per line). Hub names need "
              "pip install 'at2_lens[hub]' and the hub (or a cached copy); the default split is validation")
"""The help text of ``--tasks`` (collect, evaluate)."""

TASK_KINDS = ("squad", "hotpot")
"""The ``KIND:`` prefixes ``--tasks`` accepts before a path or hub name."""
SHIPPED_SQUAD_NAMES = ("", "dev_subset")
"""What after ``squad:`` selects the shipped SQuAD subset."""


def parse_tasks_spec(spec: str) -> tuple[str, str | Path]:
    """``(kind, source)`` for a ``--tasks`` value: kind ``"squad"``, ``"hotpot"`` or ``"jsonl"``; source a local
    ``Path`` or a hub name (str) as the loaders take it. Checked here, before any model is loaded."""
    from at2_lens.data import SQUAD_V2_DEV_SUBSET
    from at2_lens.tasks.hub import parse_hub_name

    kind, sep, rest = spec.partition(":")
    if sep and kind in TASK_KINDS:
        if kind == "squad" and rest.strip() in SHIPPED_SQUAD_NAMES:
            return kind, SQUAD_V2_DEV_SUBSET
        if not rest.strip():
            raise InputError(f"--tasks: '{kind}:' needs a file or hub name after the colon, e.g. "
                             f"'hotpot:hotpotqa/hotpot_qa'")
        return kind, rest if parse_hub_name(rest, kind, "--tasks") else Path(rest)
    path = Path(spec)
    if sep and re.fullmatch(r"[A-Za-z_]\w+", kind) and not path.exists():
        raise InputError(f"--tasks: unknown prefix '{kind}:'; expected {', '.join(k + ':' for k in TASK_KINDS)} "
                         "or a .jsonl file")
    return "jsonl", path


__all__ = [
    "SHIPPED_SQUAD_NAMES",
    "TASKS_HELP",
    "TASK_KINDS",
    "add_classifier_args",
    "add_model_args",
    "load_classifier",
    "parse_ints",
    "parse_tasks_spec",
    "set_threads",
]
