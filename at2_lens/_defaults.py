"""Defaults shared by the library and the ``at2-lens`` command line, defined once (a light module: no torch)."""

from __future__ import annotations

DEFAULT_MAX_NEW_TOKENS = 64
"""The generation budget (tokens) when a response is generated: the default of every ``max_new_tokens`` argument
and of every ``at2-lens`` command's ``--max-new-tokens``."""

__all__ = ["DEFAULT_MAX_NEW_TOKENS"]
