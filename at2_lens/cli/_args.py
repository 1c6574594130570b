"""Command-line options shared by several ``at2-lens`` sub-commands (one definition, one help text each).

- ``add_model_args``: ``--model``, ``--backend`` and ``--device`` (every command that loads a model);
  ``check_model_kind`` (before loading: an embedded model of the wrong kind) and ``check_loaded_kind`` (right after
  loading any other model, before any work) refuse an encoder for a decoder command and the reverse.
- ``add_max_new_tokens_arg``: ``--max-new-tokens``, default ``DEFAULT_MAX_NEW_TOKENS`` (the library's, defined once).
- ``add_classifier_args`` / ``load_classifier`` / ``set_threads``: the encoder classifier of ``heads`` and ``tree``.
- ``add_context_args`` / ``read_context``: ``--context PATH`` (``-``: standard input) or ``--context-text TEXT``
  (``demo``, ``attribute``, ``prune``); ``paragraphs``: a text's blank-line separated paragraphs, as documents.
- ``check_output_path``: an output file option (``--json``) that can be written, checked before any model loads.
- ``parse_ints``: a comma-separated list of integers (``--ks``, ``--adversarial-layers``); ``check_file``: an
  input file that must exist; ``check_device``: a ``--device`` value.
- ``TASKS_HELP`` / ``parse_tasks_spec``: what ``--tasks`` of ``collect`` and ``evaluate`` accepts.

Rule of every command: all of its input is checked before any model loads (the model's kind too, for the embedded
names), so a typo costs no loading time. Heavy imports happen inside the functions that need them, so ``--help``
stays instant.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_int
from at2_lens.errors import InputError
from at2_lens.models import BACKEND_CHOICES, EMBEDDED, EMBEDDED_DECODERS

_DEVICE_HELP = "'auto' (CUDA when available, else cpu), 'cpu', 'cuda' or 'cuda:N'"


def add_model_args(p: argparse.ArgumentParser, *, default: str, model_help: str, hooked_class: str,
                   device_help: str = "") -> None:
    """Add ``--model`` (default ``default``; ``model_help`` says what it accepts), ``--backend`` and ``--device``.

    ``hooked_class`` names the TL 3.9 class that ``--backend hooked`` selects (``HookedTransformer`` for the
    decoder commands, ``HookedEncoder`` for the encoder ones); ``device_help`` adds to ``--device``'s help.
    """
    when = f"default: {default}" if default else "required"
    p.add_argument("--model", default=default, help=f"{model_help} ({when})")
    p.add_argument("--backend", default="auto", choices=list(BACKEND_CHOICES),
                   help=f"TransformerLens class: 'hooked' = {hooked_class} (TL 3.9 only), 'bridge' = "
                        "TransformerBridge, 'auto' = hooked where available (default: auto)")
    p.add_argument("--device", default="auto",
                   help=f"where the model runs: {_DEVICE_HELP}. {device_help}(default: auto)")


def add_max_new_tokens_arg(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--max-new-tokens`` with the library's default budget; ``what`` says when the budget is used."""
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"generation budget (tokens) {what} (default: {DEFAULT_MAX_NEW_TOKENS})")


def check_model_kind(model: str, *, decoder: bool, command: str) -> None:
    """Before loading: refuse an embedded model of the wrong kind for ``command`` (decoder or encoder commands).

    Only the embedded names are known without loading; other models are checked by :func:`check_loaded_kind`.
    """
    key = model.strip().lower()
    if key in EMBEDDED and (key in EMBEDDED_DECODERS) != decoder:
        kind, want = ("a decoder", "an encoder (BERT-type)") if not decoder else ("an encoder", "a decoder (causal LM)")
        other = sorted(EMBEDDED_DECODERS if decoder else set(EMBEDDED) - EMBEDDED_DECODERS)
        raise InputError(f"--model: {model!r} is {kind} model ({EMBEDDED[key]}); 'at2-lens {command}' needs {want} "
                         f"model such as {other[0]!r}")


def check_loaded_kind(model: Any, *, decoder: bool, command: str, name: str) -> None:
    """Right after loading (before any work): refuse an encoder for a decoder command and the reverse."""
    from at2_lens.backends import get_backend

    if get_backend(model).is_causal != decoder:
        want = "a decoder (causal LM)" if decoder else "an encoder (BERT-type)"
        raise InputError(f"--model: {name!r} loaded as {'a decoder' if not decoder else 'an encoder'}; "
                         f"'at2-lens {command}' needs {want} model")


def check_device(choice: str) -> str:
    """A ``--device`` value that names a device (checked before any model loads); returns it unchanged."""
    import torch

    if choice == "auto":
        return choice
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise InputError(f"--device: expected {_DEVICE_HELP}, got {choice!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {choice!r} was requested but CUDA is not available")
    return choice


def resolve_device(choice: str) -> Any:
    """``--device`` as a ``torch.device`` for a single-process command (``auto``: CUDA when available)."""
    import torch

    check_device(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def check_file(value: str | None, name: str) -> None:
    """Refuse an option ``name`` whose value names no existing file (None: the option was not given)."""
    if value is not None and not Path(value).is_file():
        why = "is a directory" if Path(value).is_dir() else "does not exist"
        raise InputError(f"{name}: expected an existing file, but {value!r} {why}")


def add_context_args(p: argparse.ArgumentParser, *, required: bool, default: str) -> None:
    """``--context PATH`` (a file; ``-`` = standard input) or ``--context-text TEXT``, one of them; ``default``
    ends both help texts (what applies when neither is given)."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--context", default=None, metavar="PATH",
                       help="the context: a UTF-8 text file ('-' reads standard input); a path that names no file "
                            f"is an error{default}")
    group.add_argument("--context-text", default=None, metavar="TEXT",
                       help=f"the context text itself, instead of --context{default}")


def read_context(args: argparse.Namespace) -> str | None:
    """The context that ``--context``/``--context-text`` give (None: neither); a missing file is an InputError."""
    if args.context_text is not None:
        return str(args.context_text)
    if args.context is None:
        return None
    if args.context == "-":
        return sys.stdin.read()
    path = Path(args.context)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "names no file"
        raise InputError(f"--context: expected a text file path ('-' for standard input), but {args.context!r} "
                         f"{why}; pass the text itself with --context-text")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--context: cannot read {args.context!r} as UTF-8 text: {exc}") from None


def paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, as documents."""
    return [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]


def check_output_path(value: str | None, name: str) -> None:
    """Refuse an output file option ``name`` that cannot be written: it names a folder, or one of its folders is a
    file (missing folders are fine: the writers create them). None or '': not given. So a typo fails before the
    work, not after it."""
    if not value:
        return
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{name}: expected a file path to write, but {value!r} is a directory")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"{name}: cannot write {value!r}: {str(blocking)!r} is a file, not a folder")


def add_classifier_args(p: argparse.ArgumentParser, *, default_classifier: str = "probe") -> None:
    """Add the options that choose the encoder classifier (``--model``, ``--backend``, ``--classifier``, ``--head``,
    ``--threads``); ``default_classifier`` is ``--classifier``'s default."""
    add_model_args(p, default="minilm", hooked_class="HookedEncoder",
                   model_help="'minilm' (embedded all-MiniLM-L6-v2, offline) or a local BERT-type model directory")
    p.add_argument("--classifier", default=default_classifier, choices=["finetuned", "probe"],
                   help="with --model minilm and no --head: 'finetuned' (MiniLM fine-tuned on SST-2 with LoRA, "
                        "load_minilm_sst2_finetuned) or 'probe' (the frozen MiniLM with a linear probe, "
                        f"load_minilm_sst2) (default: {default_classifier})")
    p.add_argument("--head", default=None,
                   help="classifier head file (.safetensors from write_head) on the frozen model; default: the "
                        "shipped SST-2 probe or fine-tuned classifier for minilm (required for any other model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")


def check_classifier_args(args: argparse.Namespace, command: str) -> None:
    """Everything about the classifier options that can be checked before loading (``heads`` and ``tree``)."""
    check_model_kind(args.model, decoder=False, command=command)
    if args.model.strip().lower() != "minilm" and args.head is None:
        raise InputError("--head: a model other than 'minilm' needs a classifier head file (.safetensors)")
    check_file(args.head, "--head")
    check_int("--threads", args.threads, minimum=1)
    check_device(args.device)


def load_classifier(
    model: str, head: str | None, backend: str, device: str = "auto", *, finetuned: bool = False
) -> Any:
    """The MiniLM SST-2 classifier (``finetuned``: the fine-tuned one, unless a ``head`` file is given), or
    ``SentimentClassifier(load_model(model), read_head(head))``."""
    from at2_lens.models.classifier import SentimentClassifier, load_minilm_sst2, read_head

    where = resolve_device(device)
    if model.strip().lower() == "minilm":
        if finetuned and head is None:
            from at2_lens.models.finetuned import load_minilm_sst2_finetuned

            return load_minilm_sst2_finetuned(backend, device=where)
        return load_minilm_sst2(backend, head_path=head, device=where)
    if head is None:
        raise InputError("--head: a model other than 'minilm' needs a classifier head file (.safetensors)")
    from at2_lens.models import load_model

    loaded = load_model(model, backend=backend, device=where)  # type: ignore[arg-type]
    check_loaded_kind(loaded, decoder=False, command="heads/tree", name=model)
    return SentimentClassifier(loaded, read_head(head))


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
    "add_context_args",
    "add_max_new_tokens_arg",
    "add_model_args",
    "check_classifier_args",
    "check_device",
    "check_file",
    "check_loaded_kind",
    "check_model_kind",
    "check_output_path",
    "load_classifier",
    "paragraphs",
    "parse_ints",
    "parse_tasks_spec",
    "read_context",
    "resolve_device",
    "set_threads",
]
