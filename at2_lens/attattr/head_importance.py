"""Head importance and head pruning (Hao et al., AAAI 2021, §"Head pruning"), with the paper's baselines.

``head_importance(method, classifier, texts, labels)`` scores every attention head, ``[layer, head]``:

- ``"attattr"``: ``I_{l,h} = Σ_x max_{i,j} Attr_{l,h}(x)[i, j]`` with ``SelfAttentionAttribution`` and F the probability
  of the predicted (or gold) class;
- ``"attention"``: ``Σ_x max_{i,j} A_{l,h}(x)[i, j]``, the attention-score baseline;
- ``"taylor"``: ``Σ_x |⟨∂L/∂z_{l,h}, z_{l,h}⟩|`` (Michel et al. 2019) with ``z = blocks.{l}.attn.hook_z`` of the head
  and L the cross-entropy of the gold label, l2-normalised within each layer;
- ``"random"``: seeded uniform scores.

``pruning_sweep`` masks the least important heads first (their attention pattern is zeroed at the attention
intervention, ``Backend.pattern_hooks``, so the head contributes nothing but the output bias) and re-evaluates
accuracy; ``compare_pruning`` runs every method, ``plot_pruning`` draws the curves (matplotlib).

A classifier is any object with ``forward(tokens, attention_mask=None, fwd_hooks=()) -> probabilities [batch, n]``,
``tokenize(texts) -> (tokens, attention_mask)`` and ``backend`` (or ``model``), e.g. ``SentimentClassifier`` (see
``at2_lens.models.classifier.Classifier``). AttAttr also needs F inside the attributed pass: pass ``output_func``, or
give the classifier an ``output_func`` attribute, or a ``head`` with ``weight``, ``bias`` and ``pooling`` (linear
head on the pooled final hidden state; ``at2_lens.attattr.readouts.classifier_output_func``).

("Heads" here are attention heads; the trained classifier heads shipped with the package live in
``at2_lens/classifier_heads/``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._optional import require
from at2_lens._validate import check_choice, check_fraction, check_int
from at2_lens.attattr.attribution import SelfAttentionAttribution
from at2_lens.attattr.readouts import OutputFunc, classifier_output_func
from at2_lens.backends import Backend
from at2_lens.errors import InputError
from at2_lens.interventions import FwdHook, PatternTransform
from at2_lens.models.batching import check_texts_labels, length_batches
from at2_lens.models.classifier import Classifier, classifier_backend

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ImportanceMethod = Literal["attattr", "attention", "taylor", "random"]
IMPORTANCE_METHODS: tuple[ImportanceMethod, ...] = ("attattr", "attention", "taylor", "random")
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------- helpers
def _bar(items: Iterable[T], progress: bool, desc: str) -> Iterable[T]:
    """``items`` wrapped in a tqdm progress bar when ``progress`` (stderr), else unchanged."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(list(items), desc=desc, leave=False)


def _real_pairs(mask: Tensor | None, n_pos: int, n_rows: int, device: torch.device) -> Tensor:
    """``[batch, query, key]`` True where both positions are real tokens."""
    real = (torch.ones(n_rows, n_pos, dtype=torch.bool) if mask is None else mask.bool()).to(device)
    return real[:, :, None] & real[:, None, :]


# ----------------------------------------------------------------------------------------------- importance scores
def attattr_importance(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    target: Literal["predicted", "gold"] = "predicted",
    n_steps: int = 20,
    batch_size: int = 8,
    internal_batch_size: int | None = None,
    output_func: OutputFunc | None = None,
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """``Σ_x max_{i,j} Attr_{l,h}(x)[i, j]`` over ``texts`` (padding excluded); F = probability of the target class.

    ``progress`` shows a tqdm bar over the batches.
    """
    check_choice("target", target, ("predicted", "gold"))
    texts, gold = check_texts_labels(texts, labels, need_labels=target == "gold")
    batch_size = check_int("batch_size", batch_size)
    backend = classifier_backend(classifier)
    func = output_func if output_func is not None else classifier_output_func(classifier)
    attributor = SelfAttentionAttribution(backend, func)
    total = torch.zeros(backend.n_layers, backend.n_heads, dtype=torch.float64)
    for idx in _bar(length_batches(texts, batch_size), progress, "AttAttr importance"):
        tokens, mask = classifier.tokenize([texts[i] for i in idx])
        tgt = None if gold is None or target == "predicted" else torch.tensor([gold[i] for i in idx])
        result = attributor.attribute(
            tokens, target=tgt, n_steps=n_steps, attention_mask=mask, internal_batch_size=internal_batch_size
        )
        imp = result.head_importance()
        imp = imp if result.batched else imp[None]
        total += imp.detach().double().sum(dim=0).cpu()
    return total.float()


def attention_importance(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """``Σ_x max_{i,j} A_{l,h}(x)[i, j]``: the attention-score baseline (real query/key pairs only)."""
    texts, _ = check_texts_labels(texts, labels, need_labels=False)
    batch_size = check_int("batch_size", batch_size)
    backend = classifier_backend(classifier)
    total = torch.zeros(backend.n_layers, backend.n_heads, dtype=torch.float64)
    for idx in _bar(length_batches(texts, batch_size), progress, "attention importance"):
        tokens, mask = classifier.tokenize([texts[i] for i in idx])
        maxima: dict[int, Tensor] = {}

        def reader(layer: int, mask: Tensor = mask, maxima: dict[int, Tensor] = maxima) -> Callable[..., None]:
            def hook(pattern: Tensor, hook: Any) -> None:
                pair = _real_pairs(mask, pattern.shape[-1], pattern.shape[0], pattern.device)
                masked = pattern.detach().float().masked_fill(~pair[:, None], float("-inf"))
                maxima[layer] = masked.flatten(-2).max(dim=-1).values.sum(dim=0).double().cpu()

            return hook

        hooks = [(backend.pattern_hook(layer), reader(layer)) for layer in range(backend.n_layers)]
        with torch.no_grad():
            classifier.forward(tokens, mask, fwd_hooks=hooks)
        if len(maxima) != backend.n_layers:  # pragma: no cover - every supported backend fires hook_pattern
            raise InputError(f"{backend.describe()}: hook_pattern did not fire in every layer")
        total += torch.stack([maxima[layer] for layer in range(backend.n_layers)])
    return total.float()


def taylor_importance(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 32,
    normalise: bool = True,
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """``Σ_x |⟨∂L/∂z_{l,h}, z_{l,h}⟩|`` with ``z`` = ``hook_z`` of the head and L the gold-label cross-entropy.

    With ``normalise`` (default), each layer's scores are divided by their l2 norm (Michel et al., 2019).
    """
    texts, gold = check_texts_labels(texts, labels, need_labels=True)
    assert gold is not None
    batch_size = check_int("batch_size", batch_size)
    backend = classifier_backend(classifier)
    total = torch.zeros(backend.n_layers, backend.n_heads, dtype=torch.float64)
    for idx in _bar(length_batches(texts, batch_size), progress, "Taylor importance"):
        tokens, mask = classifier.tokenize([texts[i] for i in idx])
        zs: dict[int, Tensor] = {}

        def recorder(layer: int, zs: dict[int, Tensor] = zs) -> Callable[..., Tensor]:
            # Return a copy and differentiate with respect to it: some bridges hand the hook a reshaped view and
            # keep using their own tensor unless the hook returns one.
            def hook(z: Tensor, hook: Any) -> Tensor:
                zs[layer] = z.clone()
                return zs[layer]

            return hook

        hooks = [(backend.z_hook(layer), recorder(layer)) for layer in range(backend.n_layers)]
        with torch.enable_grad():
            probs = classifier.forward(tokens, mask, fwd_hooks=hooks)
            y = torch.tensor([gold[i] for i in idx], device=probs.device)
            picked = probs.gather(1, y[:, None])[:, 0]
            loss = -torch.log(picked.float().clamp_min(torch.finfo(torch.float32).tiny)).sum()
            layers = sorted(zs)
            if len(layers) != backend.n_layers or any(zs[lyr].dim() != 4 for lyr in layers):
                raise InputError(f"{backend.describe()}: hook_z must fire in every layer as [batch, pos, head, d_head]")
            grads = torch.autograd.grad(loss, [zs[lyr] for lyr in layers], allow_unused=True)
        for layer, g in zip(layers, grads, strict=True):
            if g is None:
                continue
            per_example = (g * zs[layer]).detach().float().sum(dim=(1, 3)).abs()  # [batch, head]
            total[layer] += per_example.double().sum(dim=0).cpu()
    return (layer_normalised(total) if normalise else total).float()


def layer_normalised(importance: Tensor) -> Tensor:
    """Each layer's scores divided by their l2 norm (Michel et al., 2019), as ``taylor_importance`` returns them."""
    return importance / importance.norm(dim=1, keepdim=True).clamp_min(1e-20)


def random_importance(classifier: Any, *, seed: int = 0) -> Float[Tensor, "layer head"]:
    """Uniform random scores ``[layer, head]`` from a generator seeded with ``seed``."""
    backend = classifier_backend(classifier)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(backend.n_layers, backend.n_heads, generator=gen)


def head_importance(
    method: str,
    classifier: Any,
    texts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> Float[Tensor, "layer head"]:
    """Head importance ``[layer, head]`` by ``method`` (``"attattr"``, ``"attention"``, ``"taylor"``, ``"random"``).

    ``kwargs`` go to the method's function (``attattr_importance``: ``target``, ``n_steps``, ``batch_size``, ...).
    """
    if method == "random":
        return random_importance(classifier, seed=seed)
    check_choice("method", method, IMPORTANCE_METHODS)
    if texts is None:
        raise InputError(f"texts: method {method!r} needs texts")
    if method == "attattr":
        return attattr_importance(classifier, texts, labels, **kwargs)
    if method == "attention":
        return attention_importance(classifier, texts, labels, **kwargs)
    if labels is None:
        raise InputError("labels: method 'taylor' needs the gold labels")
    return taylor_importance(classifier, texts, labels, **kwargs)


# ------------------------------------------------------------------------------------------------------- masking
def mask_heads(head_keep: Bool[Tensor, " head"] | Float[Tensor, " head"]) -> PatternTransform:
    """Pattern transform that zeroes the attention of the heads whose ``head_keep`` is 0 (False)."""
    keep = head_keep.to(torch.float32)

    def transform(pattern: Tensor) -> Tensor:
        if keep.shape != (pattern.shape[1],):
            raise ValueError(f"head_keep of shape {tuple(keep.shape)} does not fit {pattern.shape[1]} heads")
        return pattern * keep.to(pattern.device, pattern.dtype)[None, :, None, None]

    return transform


def head_mask_hooks(backend: Backend, masked: Bool[Tensor, "layer head"]) -> list[FwdHook]:
    """Forward hooks masking the heads where ``masked`` is True (layers with no masked head get no hook)."""
    if masked.shape != (backend.n_layers, backend.n_heads):
        raise InputError(f"masked: expected shape {(backend.n_layers, backend.n_heads)}, got {tuple(masked.shape)}")
    hooks: list[FwdHook] = []
    for layer in range(backend.n_layers):
        if bool(masked[layer].any()):
            hooks.extend(backend.pattern_hooks(layer, mask_heads(~masked[layer].bool())))
    return hooks


def pruning_mask(importance: Float[Tensor, "layer head"], n_pruned: int) -> Bool[Tensor, "layer head"]:
    """True for the ``n_pruned`` least important heads (ties broken by flat index, stable)."""
    flat = importance.detach().float().reshape(-1).cpu()
    order = torch.sort(flat, stable=True).indices
    masked = torch.zeros_like(flat, dtype=torch.bool)
    masked[order[:n_pruned]] = True
    return masked.reshape(importance.shape)


# ------------------------------------------------------------------------------------------------------- pruning
@torch.no_grad()
def _accuracy(
    classifier: Any, batches: list[tuple[Tensor, Tensor, Tensor]], hooks: Sequence[FwdHook]
) -> float:
    correct, n = 0, 0
    for tokens, mask, y in batches:
        preds = classifier.forward(tokens, mask, fwd_hooks=list(hooks)).argmax(dim=-1).cpu()
        correct += int((preds == y).sum())
        n += len(y)
    return correct / n


def pruning_sweep(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    importance: Float[Tensor, "layer head"],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    method: str = "custom",
    batch_size: int = 64,
    progress: bool = False,
    cache: dict[bytes, float] | None = None,
) -> pd.DataFrame:
    """Accuracy on ``texts`` after masking the least important ``fraction`` of all heads, for each fraction.

    ``n_pruned = round(fraction · n_layers · n_heads)``. Returns a DataFrame with columns ``fraction``,
    ``n_pruned``, ``accuracy``, ``method``. ``cache`` (a dict the caller keeps, for one classifier and one
    ``texts``/``labels``) remembers the accuracy of each head mask, so sweeps that share a mask (0 % and 100 %
    pruned always do) evaluate it once. ``progress`` shows a tqdm bar over the fractions.
    """
    import pandas as pd

    texts, gold = check_texts_labels(texts, labels, need_labels=True)
    assert gold is not None
    batch_size = check_int("batch_size", batch_size)
    backend = classifier_backend(classifier)
    if not isinstance(importance, Tensor) or importance.shape != (backend.n_layers, backend.n_heads):
        raise InputError(f"importance: expected a tensor of shape {(backend.n_layers, backend.n_heads)}")
    if not bool(torch.isfinite(importance).all()):
        raise InputError("importance: every score must be finite")
    fracs = [check_fraction("fractions", f, closed=True) for f in fractions]
    if not fracs:
        raise InputError("fractions: expected at least one fraction in [0, 1]")
    n_heads = backend.n_layers * backend.n_heads
    batches: list[tuple[Tensor, Tensor, Tensor]] = []
    rows = []
    for f in _bar(fracs, progress, f"pruning ({method})"):
        n_pruned = round(f * n_heads)
        masked = pruning_mask(importance, n_pruned)
        key = masked.numpy().tobytes()
        if cache is not None and key in cache:
            acc = cache[key]
        else:
            if not batches:
                for idx in length_batches(texts, batch_size):
                    tokens, mask = classifier.tokenize([texts[i] for i in idx])
                    batches.append((tokens, mask, torch.tensor([gold[i] for i in idx])))
            acc = _accuracy(classifier, batches, head_mask_hooks(backend, masked))
            if cache is not None:
                cache[key] = acc
        rows.append({"fraction": f, "n_pruned": n_pruned, "accuracy": acc, "method": method})
    return pd.DataFrame(rows, columns=["fraction", "n_pruned", "accuracy", "method"])


def random_pruning(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    n_draws: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    cache: dict[bytes, float] | None = None,
) -> pd.DataFrame:
    """``pruning_sweep`` for ``n_draws`` random head orders (``random_importance`` with seeds ``seed``,
    ``seed + 1``, ...); one row per draw and fraction, with a ``draw`` column (``method`` is ``"random"``).

    Summarise with ``df.groupby("fraction")["accuracy"].agg(["mean", "std", "min", "max"])``.
    """
    import pandas as pd

    n_draws = check_int("n_draws", n_draws, minimum=1)
    frames = []
    for draw in _bar(range(n_draws), progress, "random draws"):
        imp = random_importance(classifier, seed=seed + draw)
        df = pruning_sweep(classifier, texts, labels, imp, fractions, method="random", batch_size=batch_size,
                           cache=cache)
        frames.append(df.assign(draw=draw))
    return pd.concat(frames, ignore_index=True)


def compare_pruning(
    classifier: Any,
    importance_texts: Sequence[str],
    importance_labels: Sequence[int],
    eval_texts: Sequence[str],
    eval_labels: Sequence[int],
    methods: Sequence[str] = IMPORTANCE_METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    seed: int = 0,
    batch_size: int = 64,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """``pruning_sweep`` for each importance method (scored on the importance set, evaluated on the eval set).

    ``method_kwargs`` maps a method to extra arguments of its importance function (e.g.
    ``{"attattr": {"n_steps": 8}}``). The importances are kept in ``df.attrs["importance"]`` (nested lists).
    """
    import pandas as pd

    extra = method_kwargs or {}
    frames, scores = [], {}
    for method in methods:
        imp = head_importance(method, classifier, importance_texts, importance_labels, seed=seed,
                              **extra.get(method, {}))
        scores[method] = imp.tolist()
        frames.append(pruning_sweep(classifier, eval_texts, eval_labels, imp, fractions, method=method,
                                    batch_size=batch_size))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["importance"] = scores
    return df


def importance_stability(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    methods: Sequence[str] = ("attattr", "attention", "taylor"),
    *,
    prune_fraction: float = 0.5,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """How stable each importance ranking is: scores from two disjoint halves of ``texts``, compared.

    The first ``len(texts) // 2`` examples form set A, the rest set B (shuffle before calling if the order is not
    random). Per method, a row with ``method``, ``n_a``, ``n_b``, ``spearman`` (rank correlation of the two
    ``[layer, head]`` scores, ``scipy.stats.spearmanr``) and ``pruned_overlap`` (the share of the
    ``prune_fraction`` least important heads that both sets would prune). The importances are kept in
    ``df.attrs["importance"][method]`` as ``{"a": ..., "b": ..., "all": ...}`` (nested lists), where ``"all"`` is the
    importance of all ``texts`` (the sum of the two sets' sums; Taylor scores are layer-normalised after summing),
    so a pruning sweep over every example needs no second pass.
    """
    import pandas as pd
    from scipy.stats import spearmanr

    texts, gold = check_texts_labels(texts, labels, need_labels=True)
    assert gold is not None
    if len(texts) < 2:
        raise InputError(f"texts: expected at least 2 examples to split in two sets, got {len(texts)}")
    prune_fraction = check_fraction("prune_fraction", prune_fraction, closed=True)
    for method in methods:
        check_choice("methods", method, IMPORTANCE_METHODS)
        if method == "random":
            raise InputError("methods: 'random' has no data to be stable over; leave it out")
    extra = method_kwargs or {}
    half = len(texts) // 2
    sets = {"a": (texts[:half], gold[:half]), "b": (texts[half:], gold[half:])}
    rows, scores = [], {}
    for method in methods:
        kwargs = {**extra.get(method, {}), "progress": progress}
        if method == "taylor":
            kwargs["normalise"] = False
        raw = {k: head_importance(method, classifier, t, y, **kwargs).double() for k, (t, y) in sets.items()}
        total = raw["a"] + raw["b"]
        if method == "taylor":
            raw = {k: layer_normalised(v) for k, v in raw.items()}
            total = layer_normalised(total)
        a, b = raw["a"].flatten().numpy(), raw["b"].flatten().numpy()
        n_pruned = round(prune_fraction * a.size)
        both = pruning_mask(raw["a"], n_pruned) & pruning_mask(raw["b"], n_pruned)
        rows.append({
            "method": method, "n_a": half, "n_b": len(texts) - half,
            "spearman": float(spearmanr(a, b).statistic),
            "pruned_overlap": float(both.sum()) / n_pruned if n_pruned else float("nan"),
        })
        scores[method] = {"a": raw["a"].float().tolist(), "b": raw["b"].float().tolist(),
                          "all": total.float().tolist()}
    df = pd.DataFrame(rows, columns=["method", "n_a", "n_b", "spearman", "pruned_overlap"])
    df.attrs["importance"] = scores
    return df


def plot_pruning(df: pd.DataFrame, path: str | None = None, *, title: str | None = None) -> Figure:
    """Accuracy against the fraction of heads pruned, one line per method; saved to ``path`` if given.

    A method with several rows per fraction (the draws of ``random_pruning``) is drawn as their mean with the
    range of the draws shaded.

    Uses matplotlib's object-oriented API (no pyplot state), imported only when called (extra ``plot``).
    """
    # matplotlib's object-oriented API: no pyplot state, no backend switch.
    Figure = require("matplotlib.figure", "plot", "plotting the head-pruning sweep").Figure
    missing = {"fraction", "accuracy", "method"} - set(df.columns)
    if missing:
        raise InputError(f"df: missing columns {sorted(missing)}")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for method, part in df.groupby("method", sort=False):
        stats = part.groupby("fraction")["accuracy"].agg(["mean", "min", "max", "count"]).sort_index()
        if int(stats["count"].max()) > 1:  # several draws (random_pruning): the mean and the range of the draws
            line = ax.plot(stats.index, stats["mean"], marker="o", label=f"{method} (mean of {stats['count'].max()})")
            ax.fill_between(stats.index, stats["min"], stats["max"], color=line[0].get_color(), alpha=0.2)
        else:
            ax.plot(stats.index, stats["mean"], marker="o", label=str(method))
    ax.set_xlabel("fraction of heads pruned")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


__all__ = [
    "DEFAULT_FRACTIONS",
    "IMPORTANCE_METHODS",
    "Classifier",
    "ImportanceMethod",
    "attattr_importance",
    "attention_importance",
    "compare_pruning",
    "head_importance",
    "head_mask_hooks",
    "importance_stability",
    "layer_normalised",
    "mask_heads",
    "plot_pruning",
    "pruning_mask",
    "pruning_sweep",
    "random_importance",
    "random_pruning",
    "taylor_importance",
]
