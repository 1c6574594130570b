"""Causal checks of head rankings in one call: ablate a ranking's top-k heads, compare with k random heads.

:func:`causal_check` measures, on every task, the change of the target's log-probability (nats; the task's target:
the model's own greedy answer where the task has no response, the gold code of a needle task) when a ranking's top-k
heads are ablated, and the same for random k-head sets, per ablation mode:

- ``"zero"``: the heads' outputs ``z`` (``hook_z``, before ``W_O``) are set to zero;
- ``"mean"``: set to their mean ``z`` over every token of the ``reference`` tasks (training tasks' prompts and
  responses; one pass each);
- ``"resample"``: set to their ``z`` on another task (a *donor*, drawn with the seed among the ``reference`` tasks
  whose prompt is at least as long, else the longest), aligned at the start of the response so that the chat
  template's closing tokens and the answers line up; positions past the donor's last token take that token's ``z``.

Each task gets ``ceil(n_random / n_tasks)`` random k-head sets of its own (uniform over all heads, seeded), the same
sets in every mode, so every task weighs the same and at least ``n_random`` sets are drawn in all. Summaries
(``CausalCheck.summary``) give per mode and ranking the mean change over tasks, the mean change under random sets
(per task the mean over its sets, then over tasks), their ratio, and 95 % intervals from a paired bootstrap over
tasks. Every row of a batch ablates its own head set (one hook per layer, a head mask per row).

:func:`knockout_check` is the per-source attention knockout: the chosen heads stop attending to the task's gold
source (``knockout_sources``), or to another source of about the same length, and the change of the target's
log-probability is reported for both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_int
from at2_lens.ablation.outputs import span_output
from at2_lens.ablation.positions import query_rows
from at2_lens.backends import Backend, hook_names
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.head_ablation import ABLATION_HOWS, knockout_sources, top_heads
from at2_lens.heads._common import decoder_backend, prepare_all, unwrap
from at2_lens.tasks import ContextTask, TokenizedTask

RANDOM = "random"
_Z = Tensor  # [pos, layer, head, d_head]


def _as_rankings(rankings: Mapping[str, Tensor] | Tensor, n_layers: int, n_heads: int) -> dict[str, Tensor]:
    if isinstance(rankings, Tensor):
        rankings = {"ranking": rankings}
    if not isinstance(rankings, Mapping) or not rankings:
        raise InputError("rankings: expected a [layer, head] tensor or a non-empty {name: [layer, head]} mapping")
    out = {}
    for name, r in rankings.items():
        if not isinstance(name, str) or not name or name == RANDOM:
            raise InputError(f"rankings: names must be non-empty strings other than {RANDOM!r}, got {name!r}")
        if not isinstance(r, Tensor) or tuple(r.shape) != (n_layers, n_heads) or not r.is_floating_point():
            raise InputError(f"rankings[{name!r}]: expected a float [layer, head] = [{n_layers}, {n_heads}] tensor, "
                             "got "
                             f"{getattr(r, 'dtype', type(r).__name__)} {tuple(getattr(r, 'shape', ()))}")
        if not torch.isfinite(r).all():
            raise InputError(f"rankings[{name!r}]: contains NaN or inf")
        out[name] = r.detach().float().cpu()
    return out


def _check_hows(how: str | Sequence[str]) -> tuple[str, ...]:
    hows = (how,) if isinstance(how, str) else tuple(how)
    if not hows or any(h not in ABLATION_HOWS for h in hows) or len(set(hows)) != len(hows):
        raise InputError(f"how: expected distinct ablation modes from {ABLATION_HOWS}, got {how!r}")
    return hows


def _mask(heads: Sequence[tuple[int, int]], n_layers: int, n_heads: int) -> Tensor:
    m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


def _random_mask(rng: random.Random, k: int, n_layers: int, n_heads: int) -> Tensor:
    flat = torch.zeros(n_layers * n_heads, dtype=torch.bool)
    flat[rng.sample(range(n_layers * n_heads), k)] = True
    return flat.view(n_layers, n_heads)


@torch.no_grad()
def _all_z(backend: Backend, ids: Tensor) -> _Z:
    """Every head's ``z`` on one sequence, ``[pos, layer, head, d_head]`` (float32, on the model's device)."""
    seen: dict[int, Tensor] = {}

    def reader(layer: int) -> Any:
        def hook(z: Tensor, hook: Any) -> None:
            seen[layer] = z[0].detach().float()

        return hook

    backend.run(ids[None], [(hook_names.z(layer), reader(layer)) for layer in range(backend.n_layers)])
    if len(seen) != backend.n_layers:
        raise ModelNotSupportedError(f"{backend.describe()}: hook_z fired on {len(seen)} of {backend.n_layers} layers")
    return torch.stack([seen[layer] for layer in range(backend.n_layers)], dim=1)


def _aligned(donor: _Z, donor_start: int, n_pos: int, start: int) -> _Z:
    """The donor's ``z`` moved so that its response start lines up with ``start``; clipped at both ends."""
    idx = (torch.arange(n_pos) - start + donor_start).clamp(0, donor.shape[0] - 1)
    return donor[idx.to(donor.device)]


def _row_hooks(masks: Tensor, values: list[Tensor | None], n_layers: int) -> list[tuple[str, Any]]:
    """One ``hook_z`` hook per layer where some row ablates a head: row ``b``'s masked heads take ``values[b]``
    (``[pos, layer, head, d_head]`` or ``[layer, head, d_head]``; None = zeros)."""
    hooks = []
    for layer in range(n_layers):
        m = masks[:, layer]  # [batch, head]
        if not bool(m.any()):
            continue

        def hook(z: Tensor, hook: Any, layer: int = layer, m: Tensor = m) -> Tensor:
            repl = torch.zeros_like(z)
            for b, v in enumerate(values):
                if v is not None and bool(m[b].any()):
                    repl[b] = (v[:, layer] if v.dim() == 4 else v[layer][None]).to(z.dtype)
            mm = m.to(z.device)[:, None, :, None]
            return torch.where(mm, repl, z)

        hooks.append((hook_names.z(layer), hook))
    return hooks


@dataclass
class CausalCheck:
    """What :func:`causal_check` measured.

    Attributes:
        rows: one row per (task, mode, head set): ``task``, ``mode``, ``set`` (a ranking's name or ``"random"``),
            ``draw`` (the random set's number within the task; -1 for rankings), ``k``, ``clean`` and ``ablated``
            (the target's log-probability, nats) and ``delta = ablated - clean``.
        heads: each ranking's top-k heads, ``(layer, head)``, best first.
        k, n_random_per_task, seed: the settings.
        target: what the log-probability is of, in words.
    """

    rows: pd.DataFrame
    heads: dict[str, list[tuple[int, int]]]
    k: int
    n_random_per_task: int
    seed: int
    target: str = "the task's target (the model's own greedy answer, or the task's given response/target)"
    n_bootstrap: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)

    def per_task(self) -> pd.DataFrame:
        """Mean change per (mode, task, set): random sets averaged within each task."""
        return self.rows.groupby(["mode", "task", "set"], sort=False)["delta"].mean().unstack("set")

    def summary(self) -> pd.DataFrame:
        """Per mode and ranking: mean change over tasks with its 95 % bootstrap interval, the same for k random heads,
        the ratio ranking / random (interval from the same paired bootstrap), the median change over all random
        sets (a few sets that hit a critical head can dominate the mean), and the share of tasks where the ranking
        lowers the log-probability more than that task's random sets do on average."""
        out = []
        rng = np.random.default_rng(self.seed)
        for mode, tab in self.per_task().groupby(level="mode", sort=False):
            n = len(tab)
            draws = self.rows[(self.rows["mode"] == mode) & (self.rows["set"] == RANDOM)]["delta"]
            idx = rng.integers(0, n, size=(self.n_bootstrap, n))
            rand = tab[RANDOM].to_numpy()
            rand_boot = rand[idx].mean(axis=1)
            for name in [c for c in tab.columns if c != RANDOM]:
                vals = tab[name].to_numpy()
                boot = vals[idx].mean(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio_boot = boot / rand_boot
                ratio = vals.mean() / rand.mean() if rand.mean() != 0 else float("nan")
                out.append({
                    "mode": mode, "ranking": name, "k": self.k, "tasks": n,
                    "delta": vals.mean(), "delta_lo": np.percentile(boot, 2.5), "delta_hi": np.percentile(boot, 97.5),
                    "random_delta": rand.mean(), "random_lo": np.percentile(rand_boot, 2.5),
                    "random_hi": np.percentile(rand_boot, 97.5), "random_median": float(draws.median()),
                    "ratio": ratio, "ratio_lo": np.nanpercentile(ratio_boot, 2.5),
                    "ratio_hi": np.nanpercentile(ratio_boot, 97.5),
                    "share_below_random": float((vals < rand).mean()),
                })
        return pd.DataFrame(out)

    def to_frame(self) -> pd.DataFrame:
        """The summary table (see :meth:`summary`)."""
        return self.summary()

    def to_markdown(self) -> str:
        """The summary as a markdown table: change of the target's log-probability (nats) with 95 % intervals."""
        s = self.summary()
        lines = [f"| mode | ranking | top-{self.k} Δ log p [95 % CI] | {self.k} random Δ [95 % CI] | ratio [95 % CI] | "
                 "random median Δ | tasks below random |", "|---|---|---|---|---|---:|---:|"]
        for r in s.itertuples():
            lines.append(
                f"| {r.mode} | {r.ranking} | {r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}] | "
                f"{r.random_delta:+.3f} [{r.random_lo:+.3f}, {r.random_hi:+.3f}] | "
                f"{r.ratio:.2f} [{r.ratio_lo:.2f}, {r.ratio_hi:.2f}] | {r.random_median:+.3f} | "
                f"{r.share_below_random:.2f} |")
        return "\n".join(lines)


@dataclass
class AblationReference:
    """The activations ``"mean"`` and ``"resample"`` ablations write, from reference (training) tasks:
    ``mean_z`` ``[layer, head, d_head]`` (every head's mean ``z`` over every token of the tasks) and ``donors``, each
    task's ``z`` ``[pos, layer, head, d_head]`` with its response start (its prompt length)."""

    mean_z: Tensor
    donors: list[tuple[Tensor, int]]


def ablation_reference(model: Any, tasks: Sequence[Any]) -> AblationReference:
    """An :class:`AblationReference` from ``tasks`` (one forward pass each, nothing generated: a ``ContextTask``'s
    prompt, and its response where it has one). Build it once and pass it as ``causal_check(reference=...)``."""
    backend = decoder_backend(model)
    ref = _tokenize_reference(backend, tasks)
    donors = []
    total: Tensor | None = None
    count = 0
    for t in ref:
        z = _all_z(backend, t.input_ids)
        donors.append((z, t.prompt_len))
        total = z.sum(dim=0) if total is None else total + z.sum(dim=0)
        count += z.shape[0]
    assert total is not None
    return AblationReference(total / count, donors)


def _tokenize_reference(backend: Backend, reference: Sequence[Any]) -> list[TokenizedTask]:
    """Reference tasks as tokens, without generating: a ``ContextTask``'s prompt (and response, when given)."""
    plain, _ = unwrap(reference, "reference")
    if not plain:
        raise InputError("reference: expected at least one task")
    out = []
    for i, t in enumerate(plain):
        if isinstance(t, ContextTask):
            out.append(t.tokenize(backend.tokenizer, max_length=backend.n_ctx))
        elif isinstance(t, TokenizedTask):
            backend.check_tokens(t.input_ids, name=f"reference[{i}].input_ids")
            out.append(t)
        else:
            raise InputError(f"reference[{i}]: expected a ContextTask, TokenizedTask or NeedleTask, got "
                             f"{type(t).__name__}")
    return out


def causal_check(
    model: Any,
    rankings: Mapping[str, Float[Tensor, "layer head"]] | Float[Tensor, "layer head"],
    tasks: Sequence[Any],
    *,
    k: int = 10,
    how: str | Sequence[str] = ABLATION_HOWS,
    n_random: int = 100,
    reference: Sequence[Any] | AblationReference | None = None,
    seed: int = 0,
    task_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    n_bootstrap: int = 2000,
    progress: bool = False,
) -> CausalCheck:
    """Ablate each ranking's top-``k`` heads and ``k`` random heads on every task; see the module docstring.

    Args:
        model: a TransformerLens decoder (or its ``Backend``).
        rankings: a ``[layer, head]`` score tensor, or ``{name: tensor}`` (larger = more important).
        tasks: the tasks to check on (held-out tasks): ``ContextTask`` (no response: the model's greedy answer is
            generated and becomes the target), ``NeedleTask`` (the gold code) or ``TokenizedTask``.
        k: heads ablated per set; 0 ablates nothing (every change is 0).
        how: ablation modes, from ``("zero", "mean", "resample")``.
        n_random: random k-head sets in all, at least; each task gets ``ceil(n_random / len(tasks))``.
        reference: tasks the ``"mean"`` and ``"resample"`` values come from (training tasks, not the checked ones),
            or an :class:`AblationReference` built from them once; needed for those modes. Only their prompts (and
            responses where given) are read; nothing is generated.
        seed: seeds the random sets, the donors and the bootstrap.
        task_ids: the tasks' numbers in ``rows`` (default ``0, 1, ...``); task ``i``'s random sets and donor are
            seeded by ``(seed, task_ids[i])``, so a long run can check its tasks one call at a time.
        batch_size: ablated sequences per forward pass.
        max_new_tokens: generation budget where a response is generated.
        n_bootstrap: bootstrap resamples for the intervals.
        progress: show a tqdm bar over tasks.

    Returns:
        a :class:`CausalCheck` (``.summary()`` / ``.to_frame()``, ``.to_markdown()``, ``.rows`` per set and task).
    """
    backend = decoder_backend(model)
    hows = _check_hows(how)
    n_cells = backend.n_layers * backend.n_heads
    k = check_int("k", k, minimum=0, maximum=n_cells)
    n_random = check_int("n_random", n_random, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, minimum=10)
    check_int("max_new_tokens", max_new_tokens)
    ranks = _as_rankings(rankings, backend.n_layers, backend.n_heads)
    needs_ref = [h for h in hows if h != "zero"]
    if needs_ref and reference is None:
        raise InputError(f"reference: how={needs_ref} needs reference tasks (training tasks) for the mean or donor "
                         "activations")
    if reference is not None and not isinstance(reference, AblationReference):
        _tokenize_reference(backend, reference)  # checked before any generation
    if k > 0 and not backend.probe.z_editable:
        raise ModelNotSupportedError(f"{backend.describe()}: edits at hook_z do not take effect, so heads cannot be "
                                     "ablated there")
    n_tasks = len(unwrap(tasks)[0])
    ids = list(range(n_tasks)) if task_ids is None else list(task_ids)
    if len(ids) != n_tasks or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"task_ids: expected one int per task ({n_tasks}), got {task_ids!r}")
    prepared, _ = prepare_all(backend, tasks, max_new_tokens)
    per_task = math.ceil(n_random / len(prepared))
    heads = {name: (top_heads(r, k) if k else []) for name, r in ranks.items()}
    if needs_ref and not isinstance(reference, AblationReference):
        assert reference is not None
        reference = ablation_reference(backend, reference)
    mean_z, donors = (reference.mean_z, reference.donors) if isinstance(reference, AblationReference) else (None, [])
    order = sorted(range(len(donors)), key=lambda i: donors[i][1])
    items: Any = list(zip(ids, prepared, strict=True))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"causal check (k={k})", unit="task")
    records = []
    for ti, task in items:
        assert task.target_token_range is not None
        rng = random.Random(f"{seed}:{ti}")
        sets: list[tuple[str, int, Tensor]] = [(n, -1, _mask(h, backend.n_layers, backend.n_heads))
                                               for n, h in heads.items()]
        sets += [(RANDOM, d, _random_mask(rng, k, backend.n_layers, backend.n_heads)) for d in range(per_task)]
        donor = None
        if "resample" in hows:
            longer = [i for i in order if donors[i][1] >= task.prompt_len]
            pick = rng.choice(longer) if longer else order[-1]
            dz, dstart = donors[pick]
            donor = _aligned(dz, dstart, task.seq_len, task.prompt_len)
        value = {"zero": None, "mean": mean_z, "resample": donor}
        jobs = [("clean", "", -1, torch.zeros(backend.n_layers, backend.n_heads, dtype=torch.bool))]
        jobs += [(mode, name, d, m) for mode in hows for name, d, m in sets]
        t0, t1 = task.target_token_range
        rows = query_rows((t0, t1), True)
        row_idx = torch.arange(rows.start, rows.stop)
        target = task.input_ids[t0:t1]
        out = []
        for b0 in range(0, len(jobs), batch_size):
            chunk = jobs[b0 : b0 + batch_size]
            masks = torch.stack([j[3] for j in chunk]) if k else torch.zeros(len(chunk), backend.n_layers,
                                                                               backend.n_heads, dtype=torch.bool)
            vals = [value[j[0]] if j[0] != "clean" else None for j in chunk]
            tokens = task.input_ids[None].expand(len(chunk), -1)
            with torch.no_grad():
                logits = backend.run_rows(tokens, row_idx, _row_hooks(masks, vals, backend.n_layers))
                out.append(span_output(logits, target[None].expand(len(chunk), -1).to(logits.device),
                                       "log_prob").cpu())
        logp = torch.cat(out).tolist()
        clean = logp[0]
        for (mode, name, d, _), lp in zip(jobs[1:], logp[1:], strict=True):
            records.append({"task": ti, "mode": mode, "set": name, "draw": d, "k": k, "clean": clean, "ablated": lp,
                            "delta": lp - clean})
    return CausalCheck(pd.DataFrame(records), heads, k, per_task, seed, n_bootstrap=n_bootstrap)


# ------------------------------------------------------------------------------------------- source knockout
@dataclass
class KnockoutCheck:
    """What :func:`knockout_check` measured: per task, the change of the target's log-probability (nats) when the
    chosen heads stop attending to the gold source (``delta_gold``) and to another source of about the same length
    (``delta_other``); ``rows`` holds ``task, gold, other, clean, delta_gold, delta_other``."""

    rows: pd.DataFrame
    heads: list[tuple[int, int]]

    def summary(self) -> pd.DataFrame:
        r = self.rows
        return pd.DataFrame([{
            "heads": len(self.heads), "tasks": len(r), "delta_gold": r["delta_gold"].mean(),
            "delta_other": r["delta_other"].mean(),
            "share_gold_lower": float((r["delta_gold"] < r["delta_other"]).mean()),
        }])

    def to_frame(self) -> pd.DataFrame:
        return self.summary()

    def to_markdown(self) -> str:
        s = self.summary().iloc[0]
        return ("| heads | tasks | Δ log p, gold source knocked out | Δ log p, other source | tasks gold < other |\n"
                "|---:|---:|---:|---:|---:|\n"
                f"| {int(s['heads'])} | {int(s['tasks'])} | {s['delta_gold']:+.3f} | {s['delta_other']:+.3f} | "
                f"{s['share_gold_lower']:.2f} |")


def _other_source(task: TokenizedTask, gold: int) -> int:
    """The non-gold source whose token length is closest to the gold source's (the earlier one on ties)."""
    a, b = task.source_token_ranges[gold]
    best = [(abs((y - x) - (b - a)), i) for i, (x, y) in enumerate(task.source_token_ranges) if i != gold]
    return min(best)[1]


def knockout_check(
    model: Any,
    heads: Sequence[tuple[int, int]],
    tasks: Sequence[Any],
    *,
    gold: Sequence[int | None] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> KnockoutCheck:
    """Per-source attention knockout for ``heads``: the target's log-probability change when they stop attending to
    the gold source, and when they stop attending to another source of about the same length.

    Args:
        model: a TransformerLens decoder (or its ``Backend``).
        heads: ``(layer, head)`` pairs (e.g. ``top_heads(ranking, 10)``).
        tasks: ``NeedleTask`` (the gold source is the needle) or ``ContextTask`` / ``TokenizedTask`` with ``gold``.
        gold: per task, the gold source index (None: the needle of a ``NeedleTask``).
        max_new_tokens: generation budget where a response is generated.
    """
    backend = decoder_backend(model)
    plain, needles = unwrap(tasks)
    if gold is not None and (isinstance(gold, str) or len(gold) != len(plain)):
        raise InputError(f"gold: expected one source index (or None) per task ({len(plain)}), got {gold!r}")
    golds = [(gold[i] if gold is not None and gold[i] is not None else needles[i]) for i in range(len(plain))]
    missing = [i for i, g in enumerate(golds) if g is None]
    if missing:
        raise InputError(f"gold: tasks {missing[:5]} have no gold source (give gold=[...] or NeedleTask)")
    knockout_sources(backend, heads, [0])  # checks the heads before any generation
    prepared, _ = prepare_all(backend, tasks, max_new_tokens)
    recs = []
    for i, (task, g) in enumerate(zip(prepared, golds, strict=True)):
        assert g is not None and task.target_token_range is not None
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < task.n_sources or task.n_sources < 2:
            raise InputError(f"gold[{i}]: expected a source index in [0, {task.n_sources}) of a task with at least "
                             f"two sources, got {g!r}")
        other = _other_source(task, g)
        t0, t1 = task.target_token_range
        row_idx = torch.arange(t0 - 1, t1 - 1)
        target = task.input_ids[t0:t1][None]

        def logp(src: int | None, task: TokenizedTask = task, row_idx: Tensor = row_idx, target: Tensor = target
                 ) -> float:
            hooks = [] if src is None else knockout_sources(backend, heads, range(*task.source_token_ranges[src])
                                                            ).fwd_hooks
            with torch.no_grad():
                logits = backend.run_rows(task.input_ids[None], row_idx, hooks)
            return float(span_output(logits, target.to(logits.device), "log_prob")[0])

        clean = logp(None)
        recs.append({"task": i, "gold": g, "other": other, "clean": clean, "delta_gold": logp(g) - clean,
                     "delta_other": logp(other) - clean})
    return KnockoutCheck(pd.DataFrame(recs), [tuple(h) for h in heads])  # type: ignore[misc]


__all__ = ["RANDOM", "AblationReference", "CausalCheck", "KnockoutCheck", "ablation_reference", "causal_check",
           "knockout_check"]
