"""``python -m at2_lens.cli``: the ``at2-lens`` command line (what ``torchrun -m`` and ``accelerate launch -m`` run)."""

from __future__ import annotations

from at2_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
