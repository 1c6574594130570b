"""``at2-lens convert-estimator``: an AT2-package ``score_estimator.pt`` (e.g. from the Hugging Face hub) as an at2_lens
estimator file (safetensors + JSON) for a given model."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from at2_lens.cli._args import add_model_args, check_device, resolve_device
from at2_lens.errors import At2LensError, InputError


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert-estimator`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser(
        "convert-estimator", help="convert a score estimator of the AT2 authors' package into an at2_lens estimator",
        description="Read a score_estimator.pt saved by the AT2 authors' package (pip install at2) with "
                    "torch.load(weights_only=True) - nothing in the file can run - refuse anything but the known "
                    "layout, check its heads against the model and write an at2_lens estimator file "
                    "(safetensors + JSON) with the model's fingerprint.")
    p.add_argument("file", help="the reference estimator file (score_estimator.pt)")
    add_model_args(p, default="", hooked_class="HookedTransformer",
                   model_help="the model the estimator was trained for: a Hugging Face model id or a local model "
                              "directory (loaded to take its fingerprint and check its layers x heads)")
    p.add_argument("--out", required=True, help="the at2_lens estimator file to write (.safetensors)")
    p.set_defaults(func=cmd_convert_estimator)
    return p


def cmd_convert_estimator(args: argparse.Namespace) -> int:
    """Validate the file before loading the model, convert, save, and print what was written."""
    from at2_lens import load_model
    from at2_lens.at2.convert import convert_reference_estimator, read_reference_estimator

    if not args.model:
        raise InputError("--model: required, the model the reference estimator was trained for (a Hugging Face id "
                         "or a local model directory)")
    check_device(args.device)
    src, out = Path(args.file), Path(args.out)
    if out.resolve() == src.resolve():
        raise At2LensError("--out: must differ from the reference file (it would be overwritten)")
    read_reference_estimator(src)  # a bad file is refused before the (possibly large) model is loaded
    model = load_model(args.model, backend=args.backend, device=resolve_device(args.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes are printed below
        estimator = convert_reference_estimator(src, model)
    estimator.save(out)
    assert estimator.training is not None
    print(f"converted {src} ({estimator.n_layers} layers x {estimator.n_heads} heads, "
          f"model_type {estimator.training['reference_model_type']}) -> {out.resolve()}")
    for note in estimator.training["notes"]:
        print(f"note: {note}")
    return 0


__all__ = ["add_convert_parser", "cmd_convert_estimator"]
