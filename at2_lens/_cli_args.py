"""Command-line options shared by the ``at2-lens`` sub-commands (one definition, one help text)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, *, default: str, model_help: str, hooked_class: str) -> None:
    """Add ``--model`` (default ``default``; ``model_help`` says what it accepts) and ``--backend``.

    ``hooked_class`` names the TL 3.9 class that ``--backend hooked`` selects (``HookedTransformer`` for the
    decoder commands, ``HookedEncoder`` for the encoder ones).
    """
    p.add_argument("--model", default=default, help=f"{model_help} (default: {default})")
    p.add_argument("--backend", default="auto", choices=["auto", "hooked", "bridge"],
                   help=f"TransformerLens class: 'hooked' = {hooked_class} (TL 3.9 only), 'bridge' = "
                        "TransformerBridge, 'auto' = hooked where available (default: auto)")
