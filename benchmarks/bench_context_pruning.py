"""Context pruning (the AT2 paper's application): score the context's sentences for the model's own answer, keep the
best ones, let the model answer again, and score both answers against the gold SQuAD answers.

    python benchmarks/bench_context_pruning.py --small                       # CI smoke: 1 task, 2 methods (CPU)
    python benchmarks/bench_context_pruning.py --suite squad --out runs/pruning_squad.csv      # resumable
    python benchmarks/bench_context_pruning.py --suite multidoc --device cuda --out runs/md.s0.csv \\
        --shard-index 0 --shard-count 4                                      # one of 4 processes
    python benchmarks/bench_context_pruning.py --merge runs/md.s0.csv runs/md.s1.csv ... --out runs/md.csv
    python benchmarks/bench_context_pruning.py --report runs/pruning_squad.csv runs/md.csv --md results.md
    python benchmarks/bench_context_pruning.py --select-prompt --train-limit 20   # prompt chosen on training tasks

Suites (``--suite``), built from at2_lens/data/squad_v2/dev_subset.json and its train / held-out split
(``at2_lens.evaluation.squad``), every suite from one split's text only: ``squad`` (a paragraph, its first
answerable question), ``multidoc`` (the paragraph among two-sentence distractor snippets of other articles,
``multi_document_split``) and ``long`` (the paragraph among ``LONG_OTHERS`` whole paragraphs of other articles of
the same split, in an order seeded per task). Sources are sentences.

Per task: SmolLM2 answers greedily over the full context; each method (``at2``: the shipped estimator, ``at2_refined8``,
``contextcite32``, ``loo``, ``avg_attention``, built as the faithfulness benchmark builds them; ``random``: seeded
scores) scores the sentences for that answer; each keep rule (top-k for --ks; keep the fewest best sentences holding
a share of the positive score mass, for every --masses candidate) prunes the context, and the model answers again over
the pruned text (same prompt). ``oracle`` keeps the sentences that hold the first occurrence of a gold answer in the
question's own paragraph: the best any sentence pruning can do. Per answer: exact match and token F1 against all gold
answers (SQuAD normalisation), contains-gold, its length in words, whether it refuses; per kept context: the log-
probability of the first gold answer (remove-mode, the exact pruned text), the sentences kept, whether they hold a
gold answer. A mask reached by several rules or methods is answered once.

The mass share is chosen per method on the training split (``--splits train,held_out`` runs both; the report picks,
per method, the candidate with the best mean F1 on the training tasks and shows its held-out numbers). Nothing is
chosen on held-out tasks. ``--prompt`` names an answer instruction (PROMPTS), applied identically to the full and the
pruned contexts; ``--select-prompt`` prints each candidate's full-context F1 on training tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.data import SQUAD_V2_DEV_SUBSET  # noqa: E402
from at2_lens.evaluation.answers import answer_scores, contains_answer  # noqa: E402
from at2_lens.evaluation.squad import multi_document_split, squad_split_records  # noqa: E402
from at2_lens.pruning import mass_mask, top_k_mask  # noqa: E402
from at2_lens.tasks import ContextTask, join_documents  # noqa: E402
from at2_lens.tasks.spans import cut_spans  # noqa: E402

from _resume import load_partial, save_partial  # noqa: E402

DEFAULT_DATA = SQUAD_V2_DEV_SUBSET
SUITES = ("squad", "multidoc", "long")
METHODS = ("at2", "at2_refined8", "contextcite32", "loo", "avg_attention")
METHOD_ORDER = (*METHODS, "random")  # the order of the methods in every table
MASSES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
KS = (1, 2, 3)
LONG_OTHERS = 3
# Answer instructions: (system prompt, text appended to the question); the same for full and pruned contexts.
PROMPTS: dict[str, tuple[str | None, str]] = {
    "default": (None, ""),
    "short_system": ("Answer the question with a short phrase copied from the context, not a full sentence.", ""),
    "short_query": (None, " Answer in as few words as possible."),
}
REFUSAL = re.compile(r"\b(not (explicitly |directly |specifically )?(mentioned|provided|specified|stated|given|"
                     r"clear)|does not (say|mention|provide|state|specify)|doesn't (say|mention|provide|state|"
                     r"specify)|no (information|mention)|cannot|can't|unable to|i don't know|not possible to)\b",
                     re.IGNORECASE)
COLUMNS = ["suite", "split", "task", "method", "rule", "value", "n_sources", "kept", "kept_has_gold", "answer",
           "em", "f1", "contains", "answer_words", "refusal", "log_prob", "delta_log_prob"]


@dataclass(frozen=True)
class SuiteTask:
    """One benchmark task: the task (no response), every gold answer, and the character span of the question's own
    paragraph in the joined context (where the oracle looks for the gold answer)."""

    task: ContextTask
    golds: tuple[str, ...]
    own: tuple[int, int]
    qid: str


def _records(data: str | Path, split: str) -> list[dict[str, Any]]:
    train, held = squad_split_records(data)
    if split not in ("train", "held_out"):
        raise SystemExit(f"split: expected 'train' or 'held_out', got {split!r}")
    return train if split == "train" else held


def _own_span(context: str | Sequence[str], paragraph: str) -> tuple[int, int]:
    text, spans = join_documents(context)
    if isinstance(context, str):
        return (0, len(text))
    return next(sp for doc, sp in zip(context, spans, strict=True) if doc == paragraph)


def build_suite(suite: str, data: str | Path, split: str, *, seed: int = 0) -> list[SuiteTask]:
    """The tasks of one suite on one split, deterministic in ``seed``; text from that split only."""
    records = _records(data, split)
    if suite == "squad":
        tasks = [ContextTask(context=r["context"], query=r["question"], sources="sentence") for r in records]
    elif suite == "multidoc":
        train, held = multi_document_split(data, seed=seed)
        tasks = train if split == "train" else held
    elif suite == "long":
        tasks = []
        for r in records:
            rng = random.Random(f"{seed}:{r['id']}")
            others = sorted({o["context"] for o in records if o["title"] != r["title"]})
            docs = [r["context"], *rng.sample(others, min(LONG_OTHERS, len(others)))]
            rng.shuffle(docs)
            tasks.append(ContextTask(context=docs, query=r["question"], sources="sentence"))
    else:
        raise SystemExit(f"--suite: expected one of {SUITES}, got {suite!r}")
    out = []
    for r, t in zip(records, tasks, strict=True):
        assert t.query == r["question"]
        out.append(SuiteTask(task=t, golds=tuple(r["answers"]), own=_own_span(t.context, r["context"]), qid=r["id"]))
    return out


def with_prompt(task: ContextTask, prompt: str) -> ContextTask:
    """``task`` under an answer instruction of PROMPTS."""
    system, suffix = PROMPTS[prompt]
    return replace(task, system_prompt=system, query=task.query + suffix)


def oracle_mask(context: str, spans: Sequence[tuple[int, int]], golds: Sequence[str],
                own: tuple[int, int]) -> torch.Tensor | None:
    """Keep-mask of the sentences overlapping the first occurrence of a gold answer inside the question's own
    paragraph (exact text, else case-insensitive); None when no gold answer occurs there."""
    a, b = own
    para = context[a:b]
    for text in (para, para.lower()):
        for gold in golds:
            g = gold if text is para else gold.lower()
            at = text.find(g) if g.strip() else -1
            if at >= 0:
                s, e = a + at, a + at + len(g)
                keep = torch.tensor([x < e and y > s for x, y in spans], dtype=torch.bool)
                if keep.any():
                    return keep
    return None


def rule_masks(
    scores: torch.Tensor, ks: Iterable[int], masses: Iterable[float]
) -> list[tuple[str, float, torch.Tensor]]:
    """``(rule, value, keep-mask)`` of every keep rule; a k at or above the number of sources keeps them all."""
    n = scores.numel()
    out = [("top_k", float(k), top_k_mask(scores, min(k, n))) for k in ks]
    out += [("mass", float(m), mass_mask(scores, m)) for m in masses]
    return out


def is_refusal(answer: str) -> bool:
    """Whether an answer declines (says the context does not tell, cannot answer, ...)."""
    return bool(REFUSAL.search(answer))


def with_refusals(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its refusal column recomputed from the answers (so the rule can improve without a re-run)."""
    return df.assign(refusal=[float(is_refusal(a if isinstance(a, str) else "")) for a in df["answer"]])


def ends_mid_sentence(answer: str) -> bool:
    """Whether an answer stops without closing punctuation (it ran into the token budget)."""
    return not answer.rstrip().endswith((".", "!", "?", '"', ")", "'"))


def answer_row(answer: str, golds: Sequence[str]) -> dict[str, Any]:
    s = answer_scores(answer, list(golds))
    return {"answer": answer, "em": s["exact_match"], "f1": s["f1"], "contains": s["contains"],
            "answer_words": len(answer.split()), "refusal": float(is_refusal(answer))}


def run_task(model: Any, methods: dict[str, Any], item: SuiteTask, *, suite: str, split: str, key: str,
             ks: Sequence[int], masses: Sequence[float], max_new_tokens: int, seed: int, index: int) -> list[dict]:
    """All rows of one task: full, oracle, and every method x rule."""
    from at2_lens.ablation import ablation_fn
    from at2_lens.backends import get_backend
    from at2_lens.tasks import prepare_task

    backend = get_backend(model)
    answered = prepare_task(backend, item.task, max_new_tokens)
    gold_task = prepare_task(backend, replace(item.task, response=item.golds[0]))
    assert gold_task.source_spans == answered.source_spans  # the same sentences are scored and cut
    n, spans, context = answered.n_sources, answered.source_spans, answered.context
    log_prob = ablation_fn(model, gold_task, mode="remove", output="log_prob")
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    scores = {name: m.attribute(answered).scores.detach().float().cpu() for name, m in methods.items()}
    scores["random"] = torch.rand(n, generator=gen)

    entries: list[tuple[str, str, float, torch.Tensor]] = [("full", "full", float(n), torch.ones(n, dtype=torch.bool))]
    oracle = oracle_mask(context, spans, item.golds, item.own)
    if oracle is not None:
        entries.append(("oracle", "oracle", float(int(oracle.sum())), oracle))
    for name, s in scores.items():
        entries += [(name, rule, value, keep) for rule, value, keep in rule_masks(s, ks, masses)]
    distinct: dict[bytes, torch.Tensor] = {}
    for *_, keep in entries:
        distinct.setdefault(keep.numpy().tobytes(), keep)
    keys = list(distinct)
    values = log_prob(torch.stack([distinct[k] for k in keys])).tolist()
    lp = dict(zip(keys, values, strict=True))
    answers: dict[bytes, str] = {torch.ones(n, dtype=torch.bool).numpy().tobytes(): answered.response or ""}
    for k in keys:
        if k not in answers:
            pruned = replace(item.task, context=cut_spans(context, spans, distinct[k].tolist()), response=None)
            answers[k] = prepare_task(backend, pruned, max_new_tokens).response or ""
    full_lp = lp[torch.ones(n, dtype=torch.bool).numpy().tobytes()]
    rows = []
    for method, rule, value, keep in entries:
        k = keep.numpy().tobytes()
        kept_text = " ".join(t for t, f in zip(answered.source_texts, keep.tolist(), strict=True) if f)
        rows.append({"suite": suite, "split": split, "task": key, "method": method, "rule": rule, "value": value,
                     "n_sources": n, "kept": int(keep.sum()),
                     "kept_has_gold": float(contains_answer(kept_text, list(item.golds))),
                     **answer_row(answers[k], item.golds), "log_prob": lp[k], "delta_log_prob": lp[k] - full_lp})
    return rows


# ---------------------------------------------------------------------------------------------- report


def choose_masses(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (suite, method): the mass share whose mean F1 over the training tasks is highest (ties: the smaller
    share, which prunes more). Only training rows are read."""
    train = df[(df["split"] == "train") & (df["rule"] == "mass")]
    out: dict[tuple[str, str], float] = {}
    for (suite, method), g in train.groupby(["suite", "method"], sort=False):
        means = g.groupby("value")["f1"].mean()
        best = means.max()
        out[(suite, method)] = float(min(v for v, m in means.items() if m >= best - 1e-12))
    return out


def paired_interval(diff: np.ndarray, *, seed: int = 0, n_resamples: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of paired differences (scipy)."""
    from scipy.stats import bootstrap

    diff = np.asarray(diff, dtype=float)
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        m = float(diff.mean()) if len(diff) else float("nan")
        return m, m
    res = bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def suite_order(label: str) -> tuple[bool, int, str]:
    """Sort key of a suite label (``"squad"``, ``"squad (short_query)"``): default prompt first, SUITES order."""
    base, _, prompt = label.partition(" ")
    return (bool(prompt), SUITES.index(base) if base in SUITES else len(SUITES), prompt)


def by_suite(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``df``'s rows per suite, in ``suite_order``: the order of every table of the report."""
    return sorted(df.groupby("suite", sort=False), key=lambda kv: suite_order(kv[0]))


def summary_rows(df: pd.DataFrame, split: str = "held_out") -> pd.DataFrame:
    """Per suite, method and rule (the mass rule at the share chosen on training tasks): means over the ``split``
    tasks, and the paired F1 difference to the full context with its bootstrap interval."""
    chosen = choose_masses(df)
    d = with_refusals(df[df["split"] == split])
    out = []
    for suite, s in by_suite(d):
        full = s[s["method"] == "full"].set_index("task")
        groups = [("full", "full", None), ("oracle", "oracle", None)]
        found = [m for m in dict.fromkeys(s["method"]) if m not in ("full", "oracle")]
        for method in sorted(found, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)):
            top = s[(s["method"] == method) & (s["rule"] == "top_k")]
            groups += [(method, "top_k", v) for v in sorted(top["value"].unique())]
            if (suite, method) in chosen:
                groups.append((method, "mass", chosen[(suite, method)]))
        for method, rule, value in groups:
            g = s[(s["method"] == method) & (s["rule"] == rule)]
            if value is not None:
                g = g[np.isclose(g["value"], value)]
            if g.empty:
                continue
            g = g.set_index("task")
            diff = (g["f1"] - full.loc[g.index, "f1"]).to_numpy()
            low, high = paired_interval(diff)
            label = (f"top-{int(value)}" if rule == "top_k" else f"mass {value:g} (train)" if rule == "mass"
                     else "full context" if rule == "full" else "gold sentence(s)")
            out.append({"suite": suite, "method": method, "rule": label, "kind": rule, "value": value,
                        "tasks": len(g), "em": g["em"].mean(),
                        "f1": g["f1"].mean(), "df1": diff.mean(), "df1_low": low, "df1_high": high,
                        "contains": g["contains"].mean(), "dlogp": g["delta_log_prob"].mean(),
                        "kept": g["kept"].mean(), "n_sources": g["n_sources"].mean(),
                        "kept_has_gold": g["kept_has_gold"].mean(), "words": g["answer_words"].mean(),
                        "refusal": g["refusal"].mean()})
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame) -> str:
    """One markdown table per suite."""
    lines: list[str] = []
    for suite, s in summary.groupby("suite", sort=False):
        lines += [f"### {suite} ({int(s['tasks'].max())} held-out tasks, {s['n_sources'].iloc[0]:.1f} sentences "
                  "on average)", "",
                  "| method | rule | EM | F1 | ΔF1 vs full [95 % CI] | contains | Δ log P(gold) | kept | kept holds "
                  "gold | words | refusals |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in s.itertuples():
            ci = "–" if r.method == "full" else f"{r.df1:+.3f} [{r.df1_low:+.3f}, {r.df1_high:+.3f}]"
            lines.append(f"| {r.method} | {r.rule} | {r.em:.3f} | {r.f1:.3f} | {ci} | {r.contains:.2f} | "
                         f"{r.dlogp:+.2f} | {r.kept:.1f} | {r.kept_has_gold:.2f} | {r.words:.1f} | {r.refusal:.2f} |")
        lines.append("")
    return "\n".join(lines)


def overview(summary: pd.DataFrame) -> str:
    """The README's compact view of ``summary``: per suite, each method's held-out F1 at every rule, with the paired
    difference to the full context (its 95 % interval for the mass rule; every interval is in the full tables)."""
    lines: list[str] = []
    for suite, s in summary.groupby("suite", sort=False):
        full = s[s["method"] == "full"].iloc[0]
        head = (f"**{suite}** ({int(s['tasks'].max())} held-out tasks, {full['n_sources']:.1f} sentences on average): "
                f"full context F1 {full['f1']:.3f}")
        orc = s[s["method"] == "oracle"]
        if not orc.empty:
            o = orc.iloc[0]
            head += f", gold sentence {o['f1']:.3f} ({o['df1']:+.3f} [{o['df1_low']:+.3f}, {o['df1_high']:+.3f}])"
        top = s[s["kind"] == "top_k"]
        labels = dict(zip(top["value"], top["rule"], strict=False))  # k -> "top-k"
        ks = sorted(labels)
        lines += [head, "", "| method | " + " | ".join([*(labels[k] for k in ks), "mass share chosen on training "
                  "tasks"]) + " |", "|---|" + "---:|" * len(ks) + "---|"]
        for method in [m for m in dict.fromkeys(s["method"]) if m not in ("full", "oracle")]:
            g = s[s["method"] == method]
            at = g[g["kind"] == "top_k"].set_index("value")
            cells = [f"{at.loc[k, 'f1']:.3f} ({at.loc[k, 'df1']:+.3f})" if k in at.index else "–" for k in ks]
            mass = g[g["kind"] == "mass"]
            if mass.empty:
                cells.append("–")
            else:
                m = mass.iloc[0]
                cells.append(f"{m['value']:g}: {m['f1']:.3f} ({m['df1']:+.3f} [{m['df1_low']:+.3f}, "
                             f"{m['df1_high']:+.3f}]), {m['kept']:.1f} kept")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def diagnosis(df: pd.DataFrame, *, method: str = "at2", k: float = 2.0, split: str = "held_out") -> str:
    """Task-by-task comparison of the full-context and the ``method`` top-k answers, as counts (per suite)."""
    lines = []
    d = with_refusals(df[df["split"] == split])
    for suite, s in by_suite(d):
        full = s[s["method"] == "full"].set_index("task")
        pr = s[(s["method"] == method) & (s["rule"] == "top_k") & np.isclose(s["value"], k)].set_index("task")
        if pr.empty:
            continue
        full = full.loc[pr.index]
        orc = s[s["method"] == "oracle"].set_index("task")
        fc, pc = full["contains"].astype(bool), pr["contains"].astype(bool)
        lost, gained = (fc & ~pc), (~fc & pc)
        cut = pr["kept"] < pr["n_sources"]
        n = len(pr)
        lines += [f"### {suite}: full context vs {method} top-{int(k)} ({n} held-out tasks)", "",
                  "| count | tasks |", "|---|---:|",
                  f"| full answer contains gold | {int(fc.sum())} |",
                  f"| pruned answer contains gold | {int(pc.sum())} |",
                  f"| lost (full yes, pruned no) / gained (full no, pruned yes) | {int(lost.sum())} / "
                  f"{int(gained.sum())} |",
                  f"| context actually cut (k < sentences) | {int(cut.sum())} |",
                  f"| kept sentences hold no gold answer | {int((pr['kept_has_gold'] == 0).sum())} |",
                  f"| ... of those, full answer was wrong too (AT2 kept its wrong answer's support) | "
                  f"{int(((pr['kept_has_gold'] == 0) & ~fc).sum())} |",
                  f"| lost although the kept sentences hold gold | {int((lost & (pr['kept_has_gold'] == 1)).sum())} |",
                  "| no gold answer in one stretch of the own paragraph (no oracle) | "
                  f"{n - len(orc.index.intersection(pr.index))} |",
                  f"| gold spans two sentences (oracle keeps > 1) | {int((orc['kept'] > 1).sum())} |",
                  f"| refusals: full / pruned | {int(full['refusal'].sum())} / {int(pr['refusal'].sum())} |",
                  f"| ends mid-sentence (token budget): full / pruned | "
                  f"{int(full['answer'].fillna('').map(ends_mid_sentence).sum())} / "
                  f"{int(pr['answer'].fillna('').map(ends_mid_sentence).sum())} |",
                  f"| mean answer words: full / pruned | {full['answer_words'].mean():.1f} / "
                  f"{pr['answer_words'].mean():.1f} |",
                  f"| identical answers | {int((full['answer'] == pr['answer']).sum())} |",
                  f"| Δ log P(gold) > 0 but answer lost gold | {int((lost & (pr['delta_log_prob'] > 0)).sum())} |",
                  ""]
    return "\n".join(lines)


def report(df: pd.DataFrame, settings: dict[str, Any] | None = None) -> str:
    """The markdown report: answer quality per suite, method and rule, then the diagnosis."""
    chosen = choose_masses(df)
    head = ["# Context pruning benchmark", ""]
    if settings:
        head += [f"Settings: {json.dumps(settings, sort_keys=True)}", ""]
    if chosen:
        head += ["Mass share chosen on the training tasks (best mean F1): " + ", ".join(
            f"{s}/{m} {v:g}" for (s, m), v in chosen.items()), ""]
    mass = df[(df["split"] == "train") & (df["rule"] == "mass")]
    n_train = mass.groupby(["suite", "method"], sort=False)["task"].nunique()
    if not n_train.empty:
        head += ["Training tasks used for the choice: " + ", ".join(
            f"{s}/{m} {n}" for (s, m), n in n_train.items()), ""]
    summary = summary_rows(df)
    return "\n".join([*head, "## Overview (held-out F1, ΔF1 vs full context)", "", overview(summary),
                      "## Answer quality (held-out)", "", markdown(summary), "## Diagnosis", "", diagnosis(df)])


# ---------------------------------------------------------------------------------------------- main


def shard(items: Sequence[Any], index: int, count: int) -> list[int]:
    """Indices of the items of shard ``index`` of ``count`` (round robin)."""
    if count < 1 or not 0 <= index < count:
        raise SystemExit(f"--shard-index/--shard-count: expected 0 <= index < count, got {index}/{count}")
    return [i for i in range(len(items)) if i % count == index]


def merge(paths: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows of several shard files (same settings but the shard) in one frame, each task once."""
    frames, settings = [], None
    for p in paths:
        meta = json.loads(Path(p).with_suffix(".json").read_text())["settings"]
        s = {k: v for k, v in meta.items() if k not in ("shard_index", "shard_count")}
        if settings is not None and s != settings:
            raise SystemExit(f"--merge: {p} was written with other settings")
        settings = s
        frames.append(pd.read_csv(p, keep_default_na=False, na_values=[""]))
    df = pd.concat(frames, ignore_index=True)
    dup = df.drop_duplicates(["split", "task", "method", "rule", "value"])
    return dup, settings or {}


def label_prompt(df: pd.DataFrame, prompt: str) -> pd.DataFrame:
    """Rows of a run under a non-default prompt are reported as their own suite, ``"squad (short_query)"``."""
    if prompt == "default":
        return df
    return df.assign(suite=[f"{s} ({prompt})" for s in df["suite"]])


def read_results(paths: Sequence[str]) -> pd.DataFrame:
    """The rows of several results files, each labelled with the prompt its settings name.

    Files of the same suite and prompt combine (a second run adding methods on the same tasks): the rows both hold
    (``full``, ``oracle``, ``random``: the same for every method list) are kept once, and must agree."""
    frames = []
    for p in paths:
        meta = Path(p).with_suffix(".json")
        prompt = json.loads(meta.read_text())["settings"].get("prompt", "default") if meta.is_file() else "default"
        frames.append(label_prompt(pd.read_csv(p, keep_default_na=False, na_values=[""]), prompt))
    df = pd.concat(frames, ignore_index=True)
    key = ["suite", "split", "task", "method", "rule", "value"]
    both = df[df.duplicated(key, keep=False)]
    if not both.empty and (both.groupby(key)[["answer", "kept"]].nunique() > 1).any(axis=None):
        raise SystemExit(f"{', '.join(paths)}: rows of the same task, method and rule differ between files (other "
                         "settings?)")
    return df.drop_duplicates(key, ignore_index=True)


def select_prompt(model: Any, data: str, limit: int, max_new_tokens: int) -> str:
    """Full-context F1 / EM / contains of every PROMPTS candidate on the first ``limit`` training paragraphs."""
    from at2_lens.backends import get_backend
    from at2_lens.tasks import prepare_task

    backend = get_backend(model)
    items = build_suite("squad", data, "train")[:limit]
    lines = [f"Full-context answers on {len(items)} training paragraphs", "", "| prompt | EM | F1 | contains | words |",
             "|---|---:|---:|---:|---:|"]
    for name in PROMPTS:
        rows = [answer_row(prepare_task(backend, with_prompt(it.task, name), max_new_tokens).response or "", it.golds)
                for it in items]
        r = pd.DataFrame(rows)
        lines.append(f"| {name} | {r.em.mean():.3f} | {r.f1.mean():.3f} | {r.contains.mean():.2f} | "
                     f"{r.answer_words.mean():.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="squad", choices=SUITES)
    ap.add_argument("--splits", default="held_out", help="comma-separated: train,held_out (train: mass choice)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="SQuAD-format JSON (default: the shipped subset)")
    ap.add_argument("--estimator", default=None, help="AT2 estimator file (default: the one shipped for SmolLM2)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"attribution methods (default {','.join(METHODS)});"
                    " random and oracle are always added")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="top-k rules (default 1,2,3)")
    ap.add_argument("--masses", default=",".join(map(str, MASSES)), help="mass-share candidates")
    ap.add_argument("--prompt", default="default", choices=list(PROMPTS))
    ap.add_argument("--limit", type=int, default=None, help="only the first N held-out tasks")
    ap.add_argument("--train-limit", type=int, default=40, help="only the first N training tasks (default 40)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baseline and the suites (default 0)")
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--shard-count", type=int, default=1)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default) or 'tiny' (a random model, for tests)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="per-task CSV (+ .json settings), resumable")
    ap.add_argument("--md", default=None, help="also write the report here")
    ap.add_argument("--small", action="store_true", help="CI smoke: 1 held-out task, at2 and avg_attention, k=1")
    ap.add_argument("--merge", nargs="+", default=None, help="shard CSVs to combine into --out")
    ap.add_argument("--report", nargs="+", default=None, help="result CSVs to report on (no model)")
    ap.add_argument("--select-prompt", action="store_true", help="compare PROMPTS on training tasks and stop")
    args = ap.parse_args()

    if args.merge:
        df, settings = merge(args.merge)
        if args.out:
            save_partial(args.out, df[COLUMNS], settings)
        print(report(label_prompt(df, settings.get("prompt", "default")), settings))
        return
    if args.report:
        text = report(read_results(args.report))
        if args.md:
            from at2_lens.files import atomic_write_text

            atomic_write_text(Path(args.md), text + "\n")
        print(text)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.small:
        args.methods, args.ks, args.masses, args.limit, args.max_new_tokens = "at2,avg_attention", "1", "0.5", 1, 12
        args.splits = "held_out"
    from at2_lens.at2.estimator import weights_sha256
    from at2_lens.evaluation.methods import build_methods
    from at2_lens.models import load_model

    if args.model == "tiny":
        from at2_lens.models.tiny import load_tiny

        model = load_tiny("llama")
    else:
        model = load_model(args.model, device=args.device)
    if args.select_prompt:
        print(select_prompt(model, args.data, args.train_limit, args.max_new_tokens))
        return
    methods = build_methods(model, [m for m in args.methods.split(",") if m], estimator=args.estimator,
                            seed=args.seed)
    ks = [int(k) for k in args.ks.split(",") if k]
    masses = [float(m) for m in args.masses.split(",") if m]
    splits = [s for s in args.splits.split(",") if s]
    at2 = next((m for m in methods.values() if hasattr(m, "estimator")), None)
    settings = {"suite": args.suite, "splits": splits, "data": Path(args.data).name, "methods": list(methods),
                "ks": ks, "masses": masses, "prompt": args.prompt, "limit": args.limit,
                "train_limit": args.train_limit, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "estimator_sha256": weights_sha256(at2.estimator.weights) if at2 is not None else None,
                "shard_index": args.shard_index, "shard_count": args.shard_count}
    if args.model != "smollm2":  # recorded only when not the default
        settings["model"] = args.model
    done, _ = load_partial(args.out, settings)
    rows: list[dict] = [] if done is None else done.to_dict("records")
    finished = {r["task"] for r in rows}
    for split in splits:
        items = build_suite(args.suite, args.data, split, seed=args.seed)
        limit = args.train_limit if split == "train" else args.limit
        items = items[:limit] if limit is not None else items
        for i in shard(items, args.shard_index, args.shard_count):
            key = f"{split}:{i}"
            if key in finished:
                continue
            task_rows = run_task(model, methods, replace(items[i], task=with_prompt(items[i].task, args.prompt)),
                                 suite=args.suite, split=split, key=key, ks=ks, masses=masses,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, index=i)
            rows += task_rows
            full = task_rows[0]
            print(f"{key}: {full['n_sources']} sentences, full answer {full['answer']!r} (F1 {full['f1']:.2f}), "
                  f"gold {items[i].golds[0]!r}", file=sys.stderr, flush=True)
            if args.out:
                save_partial(args.out, pd.DataFrame(rows, columns=COLUMNS), settings)
    df = label_prompt(pd.DataFrame(rows, columns=COLUMNS), args.prompt)
    text = report(df, settings)
    if args.md:
        from at2_lens.files import atomic_write_text

        atomic_write_text(Path(args.md), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
