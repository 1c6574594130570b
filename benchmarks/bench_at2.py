"""AT2 attribution cost as a ratio to one plain forward pass over the same tokens (goal: <= 1.15 at 512 tokens).

    python benchmarks/bench_at2.py                 # SmolLM2-135M-Instruct, 512-token context (real model)
    python benchmarks/bench_at2.py --model tiny    # tiny random model, fast smoke run

Prints ratios measured in the same run, never absolute seconds as the result. A second span of the same response is
also timed: it reuses the cached pass, so its ratio should be near 0. Attributing a response the model generates is
timed against the generation alone (greedy, KV cache, ``--max-new-tokens``): the feature pass also checks the cached
decoding, so the ratio is 1 + one forward pass / generation; the older path (a checking pass, then the feature pass)
is shown beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.at2.attribution import AT2Attribution  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.tasks import ContextTask, prepare_task  # noqa: E402

from _timing import interleaved_ratio  # noqa: E402

FILLER = (
    "The committee met on Tuesday to review the annual budget. Several members raised questions about travel costs. "
    "The treasurer explained that most of the increase came from a single conference. A vote was postponed. "
)


def build_task(tokenizer: object, n_tokens: int) -> ContextTask:
    """A context of about ``n_tokens`` prompt tokens with a fixed response."""
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    text, i = "", 0
    while len(tokenizer(text)["input_ids"]) < n_tokens - 60:  # type: ignore[operator]
        text += sentences[i % len(sentences)] + " "
        i += 1
    return ContextTask(context=text, query="Why was the vote postponed?", response="Because of travel costs.")


def load_bench_model(name: str) -> object:
    """``"tiny"``: the tiny random Llama (smoke runs); anything else: ``at2_lens.load_model(name)``."""
    if name == "tiny":
        from at2_lens.models.tiny import load_tiny

        return load_tiny("llama")
    from at2_lens.models import load_model

    return load_model(name)


def generated_response_ratios(
    model: object, task: ContextTask, max_new_tokens: int, repeats: int
) -> tuple[float, float, int]:
    """Generate + attribute, and the two-pass path (checked generation, then attribute), each as a ratio to the
    greedy generation alone; and the number of generated tokens."""
    backend = get_backend(model)
    ungenerated = dataclasses.replace(task, response=None)
    prompt = ungenerated.tokenize(backend.tokenizer, max_length=backend.n_ctx).input_ids
    n_new = len(backend.generate_greedy(prompt, max_new_tokens=max_new_tokens))  # settles whether the cache works

    def generate() -> None:
        backend.generate_greedy_unchecked(prompt, max_new_tokens=max_new_tokens)

    def generate_and_attribute() -> None:
        AT2Attribution(model).attribute(ungenerated, max_new_tokens=max_new_tokens)

    def two_pass() -> None:
        AT2Attribution(model).attribute(prepare_task(backend, ungenerated, max_new_tokens))

    _, _, one = interleaved_ratio(generate_and_attribute, generate, repeats=repeats)
    _, _, two = interleaved_ratio(two_pass, generate, repeats=repeats)
    return one, two, n_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default) or 'tiny'")
    ap.add_argument("--tokens", type=int, default=512, help="approximate prompt length in tokens (default 512)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generation budget for the generated-response "
                    "measurement (default 32)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_bench_model(args.model)
    backend = get_backend(model)
    task = build_task(backend.tokenizer, min(args.tokens, backend.n_ctx - 100))
    tokenized = task.tokenize(backend.tokenizer, max_length=backend.n_ctx)
    ids = tokenized.input_ids[None]

    def attribute_fresh() -> None:
        AT2Attribution(model).attribute(tokenized)

    def forward() -> None:
        backend.run(ids)

    _, _, ratio = interleaved_ratio(attribute_fresh, forward, repeats=args.repeats)
    at2 = AT2Attribution(model)
    at2.attribute(tokenized)
    _, _, sub_ratio = interleaved_ratio(
        lambda: at2.attribute(tokenized, target=(0, 7)), forward, repeats=args.repeats
    )
    gen_ratio, two_pass_ratio, n_new = generated_response_ratios(model, task, args.max_new_tokens, args.repeats)
    print(f"model={backend.describe()} tokens={ids.shape[1]} sources={tokenized.n_sources}")
    print("| measurement | ratio to one forward pass |")
    print("|---|---|")
    print(f"| AT2 attribute (fresh) | {ratio:.3f} |")
    print(f"| AT2 attribute, second span of the same response (cached pass) | {sub_ratio:.3f} |")
    print(f"goal <= 1.15 at 512 tokens: {'met' if ratio <= 1.15 else 'NOT met'}")
    print(f"\n| measurement ({n_new} generated tokens) | ratio to generation alone |")
    print("|---|---|")
    print(f"| generate + AT2 attribute (one pass after generation) | {gen_ratio:.3f} |")
    print(f"| generate + checking pass + AT2 attribute (the two-pass path) | {two_pass_ratio:.3f} |")


if __name__ == "__main__":
    main()
