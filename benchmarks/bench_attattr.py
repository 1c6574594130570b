"""AttAttr cost per layer as a ratio to Captum's LayerIntegratedGradients on the same HookPoint (goal: <= 1.0).

    python benchmarks/bench_attattr.py                          # tiny random Llama (4 layers), fast
    python benchmarks/bench_attattr.py --backend bridge         # the same on the TransformerBridge
    python benchmarks/bench_attattr.py --model smollm2 --layers 0,15,29 --tokens 64

Both sides integrate d log p(next token) / d A_l over the same ``n_steps`` Gauss-Legendre points in one batch, from
zero attention at layer ``l`` to the model's own. The baseline is ``LayerIntegratedGradients(f, hook_point)`` with a
scaling hook registered first on ``blocks.{l}.attn.hook_pattern`` (it makes the baseline's activation zero). Prints
ratios measured in the same run (interleaved, medians), never absolute seconds, and the completeness error of both.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import torch
from captum.attr import LayerIntegratedGradients
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.attattr import AttentionAttribution  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.models import BACKEND_CHOICES  # noqa: E402

from _timing import interleaved_ratio  # noqa: E402

TEXT = (
    "The committee met on Tuesday to review the annual budget. Several members raised questions about travel "
    "costs, and the treasurer explained that most of the increase came from a single conference in the spring."
)


def load(args: argparse.Namespace) -> Any:
    if args.model == "tiny":
        from at2_lens.models.tiny import load_tiny

        return load_tiny("llama", args.backend, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2)
    try:
        from at2_lens.models import load_model
    except ImportError as err:  # the loader may not exist in this checkout
        sys.exit(f"--model {args.model}: at2_lens.models.load_model is unavailable ({err})")
    try:
        return load_model(args.model, backend=args.backend)
    except Exception as err:  # missing wheel, wrong checksum, unsupported backend: report and stop
        sys.exit(f"--model {args.model}: could not load it ({type(err).__name__}: {err})")


class LigBaseline:
    """Captum's ``LayerIntegratedGradients`` on ``blocks.{l}.attn.hook_pattern`` with a zero-attention baseline."""

    def __init__(self, model: Any, layer: int, tokens: Tensor, target: int) -> None:
        self.model, self.tokens, self.target = model, tokens, target
        self.hook_point = model.hook_dict[f"blocks.{layer}.attn.hook_pattern"]
        self.alpha: Tensor = torch.ones(1)
        self.lig = LayerIntegratedGradients(self.forward, self.hook_point)

    def forward(self, tokens: Tensor, alpha: Tensor) -> Tensor:
        self.alpha = alpha
        logits = self.model(tokens)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, self.target]

    def attribute(self, n_steps: int, delta: bool = False) -> Any:
        # Registered before LIG's own hook, so LIG sees alpha * A: A for the inputs, 0 for the baseline.
        self.hook_point.add_hook(lambda p, hook: p * self.alpha.to(p.dtype)[:, None, None, None])
        try:
            return self.lig.attribute(
                (self.tokens, torch.ones(1)), baselines=(self.tokens, torch.zeros(1)), n_steps=n_steps,
                return_convergence_delta=delta,
            )
        finally:
            self.hook_point.remove_hooks("fwd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (default), 'smollm2', or anything load_model accepts")
    ap.add_argument("--backend", default="auto", choices=list(BACKEND_CHOICES))
    ap.add_argument("--tokens", type=int, default=64, help="input length in tokens (default 64)")
    ap.add_argument("--n-steps", type=int, default=20)
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all for tiny, first/mid/last)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per layer (default 3 tiny, 1 real)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier ratios on a busy CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = args.repeats or (3 if args.model == "tiny" else 1)

    model = load(args)
    backend = get_backend(model)
    ids = backend.tokenizer(TEXT * 8)["input_ids"][: args.tokens]
    tokens = torch.tensor(ids)[None]
    with torch.no_grad():
        target = int(model(tokens)[0, -1].argmax())
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    elif args.model == "tiny":
        layers = list(range(backend.n_layers))
    else:
        layers = sorted({0, backend.n_layers // 2, backend.n_layers - 1})
    backend.check_layers(layers)

    attattr = AttentionAttribution(model)
    print(f"model={backend.describe()} tokens={tokens.shape[1]} n_steps={args.n_steps} method=gausslegendre "
          f"starts_at_layer={attattr.starts_at_layer} rows_only={attattr.unembeds_read_rows_only} "
          f"repeats={repeats} threads={args.threads}", flush=True)
    print("| layer | time ratio AttAttr / LIG | AttAttr completeness error | LIG completeness error |")
    print("|---|---|---|---|")
    ratios = []
    for layer in layers:
        lig = LigBaseline(model, layer, tokens, target)

        def ours(layer: int = layer) -> None:
            attattr.attribute(tokens, target, layers=[layer], n_steps=args.n_steps)

        def theirs(lig: LigBaseline = lig) -> None:
            lig.attribute(args.n_steps)

        _, _, ratio = interleaved_ratio(ours, theirs, repeats=repeats)
        ratios.append(ratio)
        res = attattr.attribute(tokens, target, layers=[layer], n_steps=args.n_steps, return_convergence_delta=True)
        change = float((res.output - res.baseline_output[0]).abs())
        lig_attr, lig_delta = lig.attribute(args.n_steps, delta=True)
        agree = float((lig_attr[0] - res.attributions[0]).abs().max() / res.attributions[0].abs().max())
        print(f"| {layer} | {ratio:.3f} | {float(res.relative_convergence_delta()[0]):.2e} | "
              f"{abs(float(lig_delta[0])) / change:.2e} (max rel. difference from AttAttr {agree:.1e}) |", flush=True)
    worst = max(ratios)
    print(f"worst ratio {worst:.3f}; goal <= 1.0: {'met' if worst <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
