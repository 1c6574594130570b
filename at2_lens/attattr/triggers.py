"""Adversarial triggers from attention attributions (Hao et al., AAAI 2021, §"Adversarial attack").

The interactions AttAttr finds most important on training examples are reused as a non-targeted attack:

1. ``mine_trigger_patterns``: ``attributed_pairs`` attributes the classifier's output to the attention of the
   chosen layers for every training example, takes the max over heads (and layers) for every (query, key) pair of
   content tokens and keeps each example's best pairs (the expensive step; ``ExamplePairs`` stores as JSON);
   ``count_patterns`` then counts, per class, the token pairs ``key → query`` among each example's first ``top_k``
   and returns the most frequent (or highest-scoring), with the mean relative positions (0 = first content token,
   1 = last) at which their two tokens occurred;
2. ``insert_pattern``: put the pattern's two tokens into another example's content tokens at the same relative
   positions (token ids are inserted directly, so no re-tokenisation can split or merge them; special tokens such
   as ``[CLS]``/``[SEP]`` stay where they are);
3. ``trigger_attack``: accuracy on evaluation examples before and after inserting each pattern, as a DataFrame.

Works with any encoder classifier object that ``at2_lens.attattr.head_importance`` accepts (``tokenize``,
``forward`` with ``fwd_hooks``, ``backend`` or ``model``, and a linear ``head`` or an ``output_func``), e.g.
``SentimentClassifier``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from at2_lens._validate import check_choice, check_int
from at2_lens.attattr.attribution import SelfAttentionAttribution, as_layer_list
from at2_lens.attattr.readouts import OutputFunc, classifier_output_func
from at2_lens.errors import InputError
from at2_lens.models.batching import check_texts_labels, length_batches
from at2_lens.models.classifier import classifier_backend

if TYPE_CHECKING:
    import pandas as pd

Examples = Literal["all", "other", "same"]


@dataclass(frozen=True)
class TriggerPattern:
    """A ``key → query`` token interaction mined by AttAttr, with the class and positions it was found at.

    Attributes:
        key_id, query_id: token ids (the key token is read by the query token).
        key_token, query_token: their texts (tokenizer pieces).
        source_class: the gold class of the training examples it was mined from.
        count: in how many of those examples it (``pool="key"``: its key token) was among the top pairs.
        key_rel, query_rel: mean relative positions among the content tokens (0 = first, 1 = last).
        score: mean normalised attribution of the pair where it was mined (per example, divided by the example's
            largest pair score).
    """

    key_id: int
    query_id: int
    key_token: str
    query_token: str
    source_class: int
    count: int
    key_rel: float
    query_rel: float
    score: float = 0.0

    @property
    def name(self) -> str:
        """``"key → query"``, e.g. ``"dull → film"``."""
        return f"{self.key_token} → {self.query_token}"


# ------------------------------------------------------------------------------------------------------ helpers
def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}


def content_span(ids: Sequence[int], special: set[int]) -> tuple[int, int]:
    """``(first, end)``: the content tokens are ``ids[first:end]`` (leading/trailing special tokens excluded)."""
    first = 0
    while first < len(ids) and ids[first] in special:
        first += 1
    end = len(ids)
    while end > first and ids[end - 1] in special:
        end -= 1
    return first, end


def relative_position(index: int, n: int) -> float:
    """Position ``index`` of ``n`` content tokens as a fraction: 0 for the first, 1 for the last."""
    return index / (n - 1) if n > 1 else 0.0


def insert_pattern(content: Sequence[int], pattern: TriggerPattern) -> tuple[list[int], tuple[int, int]]:
    """Insert the pattern's key and query tokens into ``content`` (token ids) at its relative positions.

    Token ``t`` with relative position ``r`` goes before the original token ``round(r · n)`` (at the end for
    ``r = 1``), so a pattern found at the start of its sentences lands at the start, one from the end lands at
    the end; when both land on the same gap they keep their mined order.

    Returns:
        ``(new_content, (key_index, query_index))``: the new ids and where the two tokens are in them.
    """
    n = len(content)
    items = sorted(
        [(round(pattern.key_rel * n), pattern.key_rel, 0, pattern.key_id),
         (round(pattern.query_rel * n), pattern.query_rel, 1, pattern.query_id)]
    )
    out: list[int] = []
    where = [0, 0]
    k = 0
    for i in range(n + 1):
        while k < len(items) and items[k][0] == i:
            where[items[k][2]] = len(out)
            out.append(items[k][3])
            k += 1
        if i < n:
            out.append(int(content[i]))
    return out, (where[0], where[1])


# ------------------------------------------------------------------------------------------------------- mining
RankBy = Literal["count", "score"]
Pool = Literal["pair", "key"]


@dataclass(frozen=True)
class ExamplePairs:
    """One training example's best ``key → query`` pairs: the expensive part of mining, kept so that counting rules
    can be compared (or re-run) without attributing again. Plain data: ``to_dict`` / ``from_dict`` give JSON.

    Attributes:
        label: the example's gold class.
        pairs: up to ``top_k`` pairs, best first, each ``(key_id, query_id, key_rel, query_rel, score)`` with the
            score divided by the example's best pair score (so the first is 1.0).
    """

    label: int
    pairs: tuple[tuple[int, int, float, float, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExamplePairs:
        """Rebuild from ``to_dict`` output, checking every field (a hand-edited file fails here, clearly)."""
        try:
            label = int(data["label"])
            pairs = tuple((int(k), int(q), float(kr), float(qr), float(sc)) for k, q, kr, qr, sc in data["pairs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"example pairs: expected {{'label': int, 'pairs': [[key_id, query_id, key_rel, "
                             f"query_rel, score], ...]}}, got {str(data)[:80]!r} ({exc})") from exc
        return cls(label=label, pairs=pairs)


def attributed_pairs(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    layers: int | Sequence[int] | None = None,
    top_k: int = 10,
    target: Literal["predicted", "gold"] = "predicted",
    n_steps: int = 8,
    batch_size: int = 8,
    output_func: OutputFunc | None = None,
) -> list[ExamplePairs]:
    """Each example's ``top_k`` best ``key → query`` pairs of content tokens by attention attribution.

    A pair's score is its AttAttr attribution, max over the heads of ``layers``; pairs of one token with itself,
    special tokens and non-positive scores are left out. One ``ExamplePairs`` per text, in order (an example with
    fewer than two content tokens or no positive pair has no pairs).
    """
    texts, gold = check_texts_labels(texts, labels, need_labels=True)
    assert gold is not None
    top_k = check_int("top_k", top_k)
    batch_size = check_int("batch_size", batch_size)
    check_choice("target", target, ("predicted", "gold"))
    backend = classifier_backend(classifier)
    layer_list = backend.check_layers(as_layer_list(layers))
    func = output_func if output_func is not None else classifier_output_func(classifier)
    attributor = SelfAttentionAttribution(backend, func)
    special = _special_ids(backend.tokenizer)

    out: list[ExamplePairs | None] = [None] * len(texts)
    for idx in length_batches(texts, batch_size):
        tokens, mask = classifier.tokenize([texts[i] for i in idx])
        tgt = torch.tensor([gold[i] for i in idx]) if target == "gold" else None
        res = attributor.attribute(tokens, target=tgt, layers=layer_list, n_steps=n_steps, attention_mask=mask)
        attr = res.attributions if res.batched else res.attributions[None]  # [batch, layer, head, q, k]
        pair_scores = attr.detach().float().amax(dim=(1, 2)).cpu()  # [batch, q, k]
        for row, i in enumerate(idx):
            out[i] = _best_pairs(pair_scores[row], tokens[row], mask[row], special, gold[i], top_k)
    return [p for p in out if p is not None]


def _best_pairs(
    scores: Tensor, tokens: Tensor, mask: Tensor, special: set[int], label: int, top_k: int
) -> ExamplePairs:
    real = mask.bool().nonzero().reshape(-1)
    ids = tokens[real].tolist()
    first, end = content_span(ids, special)
    n = end - first
    if n < 2:
        return ExamplePairs(label=label, pairs=())
    pos = real[first:end]
    s = scores[pos][:, pos].clone()
    s.fill_diagonal_(float("-inf"))
    best = float(s.max())
    if best <= 0:
        return ExamplePairs(label=label, pairs=())
    flat = s.reshape(-1)
    pairs = []
    for o in torch.argsort(flat, descending=True, stable=True)[:top_k].tolist():
        value = float(flat[o])
        if value <= 0:
            break
        q, k = divmod(o, n)
        pairs.append((int(ids[first + k]), int(ids[first + q]), relative_position(k, n), relative_position(q, n),
                      value / best))
    return ExamplePairs(label=label, pairs=tuple(pairs))


def count_patterns(
    examples: Sequence[ExamplePairs],
    tokenizer: Any,
    *,
    top_k: int = 1,
    n_patterns: int = 3,
    rank_by: RankBy = "count",
    pool: Pool = "pair",
) -> list[TriggerPattern]:
    """The patterns of each class, from every example's first ``top_k`` pairs.

    ``pool="pair"``: a pattern is one ``key → query`` token pair. ``pool="key"``: pairs are pooled by their key token
    (the token being read, e.g. a sentiment word, whatever reads it), and the pattern is that key with the query
    token it was most often read by; exact pairs are rare in short sentences, key tokens recur.

    ``rank_by="count"``: most frequent first (in how many examples the pattern is among the first ``top_k``; ties:
    higher mean score first). ``rank_by="score"``: highest summed normalised score first (found often *and*
    strongly). ``tokenizer`` turns ids into the patterns' token texts. Positions are means over the occurrences of
    the returned pair.
    """
    top_k = check_int("top_k", top_k)
    n_patterns = check_int("n_patterns", n_patterns)
    check_choice("rank_by", rank_by, ("count", "score"))
    check_choice("pool", pool, ("pair", "key"))
    if isinstance(examples, ExamplePairs) or not all(isinstance(e, ExamplePairs) for e in examples):
        raise InputError("examples: expected a list of ExamplePairs (from attributed_pairs)")
    # group (class, key_id[, query_id]) -> examples, summed score; pair (key_id, query_id, class) -> occurrences
    groups: dict[tuple[int, ...], list[Any]] = {}
    pair_stats: dict[tuple[int, int, int], list[float]] = {}  # [occurrences, sum key_rel, sum query_rel, sum score]
    for n, ex in enumerate(examples):
        for key_id, query_id, key_rel, query_rel, score in ex.pairs[:top_k]:
            group = (ex.label, key_id) if pool == "key" else (ex.label, key_id, query_id)
            entry = groups.setdefault(group, [set(), 0.0])
            entry[0].add(n)
            entry[1] += score
            stats = pair_stats.setdefault((key_id, query_id, ex.label), [0.0, 0.0, 0.0, 0.0])
            stats[0] += 1
            stats[1] += key_rel
            stats[2] += query_rel
            stats[3] += score
    patterns: list[TriggerPattern] = []
    for cls in sorted({g[0] for g in groups}):
        rows = [(g, len(v[0]), v[1]) for g, v in groups.items() if g[0] == cls]
        if rank_by == "count":
            rows.sort(key=lambda r: (-r[1], -r[2] / r[1], r[0]))
        else:
            rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
        for group, count, score in rows[:n_patterns]:
            key_id = group[1]
            if pool == "key":  # the query it was read by most often (ties: higher summed score, then lower id)
                query_id = min((q for k, q, c in pair_stats if k == key_id and c == cls),
                               key=lambda q: (-pair_stats[(key_id, q, cls)][0], -pair_stats[(key_id, q, cls)][3], q))
            else:
                query_id = group[2]
            occ, k_rel, q_rel, _ = pair_stats[(key_id, query_id, cls)]
            patterns.append(TriggerPattern(
                key_id=key_id, query_id=query_id, key_token=tokenizer.convert_ids_to_tokens(key_id),
                query_token=tokenizer.convert_ids_to_tokens(query_id), source_class=cls, count=count,
                key_rel=k_rel / occ, query_rel=q_rel / occ, score=score / count,
            ))
    return patterns


def mine_trigger_patterns(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    layers: int | Sequence[int] | None = None,
    top_k: int = 1,
    n_patterns: int = 3,
    rank_by: RankBy = "count",
    pool: Pool = "pair",
    target: Literal["predicted", "gold"] = "predicted",
    n_steps: int = 8,
    batch_size: int = 8,
    output_func: OutputFunc | None = None,
) -> list[TriggerPattern]:
    """The most frequent top-attributed ``key → query`` token pairs of each class of ``texts``.

    ``attributed_pairs`` then ``count_patterns``; call those two to keep the attributions and try other counts.

    Args:
        classifier: an encoder classifier (see the module docstring).
        texts, labels: training examples and their gold classes.
        layers: the layers whose attributions are searched (default: all); a pair's score is its max over these
            layers' heads.
        top_k: pairs kept per example (pairs of two content tokens at different positions, positive score).
        n_patterns: patterns returned per class.
        rank_by: ``"count"`` (most frequent first) or ``"score"`` (highest summed normalised score first).
        pool: ``"pair"`` (exact token pairs) or ``"key"`` (pairs pooled by key token; see ``count_patterns``).
        target: AttAttr's F is the probability of the ``"predicted"`` or of the ``"gold"`` class.
        n_steps, batch_size: integration steps and examples per attribution call.
        output_func: F inside the attributed pass (default: from the classifier, see ``classifier_output_func``).

    Returns:
        ``TriggerPattern`` objects, class by class (ascending class index), best first.
    """
    top_k = check_int("top_k", top_k)
    n_patterns = check_int("n_patterns", n_patterns)
    check_choice("rank_by", rank_by, ("count", "score"))
    check_choice("pool", pool, ("pair", "key"))
    examples = attributed_pairs(classifier, texts, labels, layers=layers, top_k=top_k, target=target,
                                n_steps=n_steps, batch_size=batch_size, output_func=output_func)
    return count_patterns(examples, classifier_backend(classifier).tokenizer, top_k=top_k, n_patterns=n_patterns,
                          rank_by=rank_by, pool=pool)


def pattern_overlap(
    a: Sequence[TriggerPattern], b: Sequence[TriggerPattern], top: int | None = None, *, by: Pool = "pair"
) -> float:
    """Share of the patterns mined on one example set that were also mined on another (same tokens, same class).

    With ``top``, only the ``top`` most frequent patterns of each class of each list are compared (the lists of
    ``mine_trigger_patterns`` are most frequent first). Returns ``|A ∩ B| / |A|`` (1.0: ``b`` found all of ``a``);
    a stable mining gives a high overlap between two disjoint example sets. ``by="key"`` compares key tokens only
    (for ``pool="key"`` patterns, whose query is the key's most frequent partner).
    """
    def keys(ps: Sequence[TriggerPattern]) -> list[tuple[int, int, int]]:
        if not all(isinstance(p, TriggerPattern) for p in ps):
            raise InputError("patterns: every item must be a TriggerPattern")
        seen: dict[int, int] = {}
        out = []
        for p in ps:
            seen[p.source_class] = seen.get(p.source_class, 0) + 1
            if top is None or seen[p.source_class] <= top:
                out.append((p.key_id, p.query_id if by == "pair" else -1, p.source_class))
        return out

    if top is not None:
        top = check_int("top", top)
    check_choice("by", by, ("pair", "key"))
    ka, kb = keys(a), set(keys(b))
    if not ka:
        raise InputError("a: expected at least one TriggerPattern")
    return sum(k in kb for k in ka) / len(ka)


# ------------------------------------------------------------------------------------------------------- attack
def _pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return tokens, mask


@torch.no_grad()
def _predict(classifier: Any, seqs: list[list[int]], pad_id: int, batch_size: int) -> list[int]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        tokens, mask = _pad([seqs[i] for i in chunk], pad_id)
        p = classifier.forward(tokens, mask).argmax(dim=-1).cpu().tolist()
        for i, y in zip(chunk, p, strict=True):
            out[i] = int(y)
    return out


def attacked_sequences(
    classifier: Any, texts: Sequence[str], pattern: TriggerPattern
) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """``(original, attacked, positions)``: each text's real token ids, the ids with ``pattern`` inserted, and
    the (key, query) indices of the inserted tokens in the attacked ids (special tokens kept in place)."""
    backend = classifier_backend(classifier)
    special = _special_ids(backend.tokenizer)
    tokens, mask = classifier.tokenize(list(texts))
    originals, attacked, where = [], [], []
    for row in range(tokens.shape[0]):
        ids = tokens[row][mask[row].bool()].tolist()
        first, end = content_span(ids, special)
        new, (kq, qq) = insert_pattern(ids[first:end], pattern)
        originals.append(ids)
        attacked.append(ids[:first] + new + ids[end:])
        where.append((first + kq, first + qq))
    return originals, attacked, where


def trigger_attack(
    classifier: Any,
    patterns: Sequence[TriggerPattern],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    examples: Examples = "all",
    batch_size: int = 64,
) -> pd.DataFrame:
    """Accuracy on ``texts`` before and after inserting each pattern (one row per pattern).

    Args:
        examples: which evaluation examples each pattern is inserted into: ``"all"``, those of another class than
            the pattern's source class (``"other"``) or of the same class (``"same"``).

    Returns:
        A DataFrame with columns ``pattern``, ``key_token``, ``query_token``, ``source_class``, ``mined_count``,
        ``n_examples``, ``accuracy_before``, ``accuracy_after``, ``drop`` (before − after) and ``flipped`` (fraction
        of examples whose prediction changed). Examples that would exceed the context window are left out.
    """
    import pandas as pd

    texts, gold = check_texts_labels(texts, labels, need_labels=True)
    assert gold is not None
    examples = check_choice("examples", examples, ("all", "other", "same"))
    batch_size = check_int("batch_size", batch_size)
    if isinstance(patterns, TriggerPattern) or not isinstance(patterns, Sequence) or not patterns:
        raise InputError("patterns: expected a non-empty list of TriggerPattern (from mine_trigger_patterns)")
    if not all(isinstance(p, TriggerPattern) for p in patterns):
        raise InputError("patterns: every item must be a TriggerPattern")
    backend = classifier_backend(classifier)
    pad_id = getattr(backend.tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    rows = []
    for pattern in patterns:
        chosen = [i for i, y in enumerate(gold) if examples == "all"
                  or (examples == "other" and y != pattern.source_class)
                  or (examples == "same" and y == pattern.source_class)]
        if not chosen:
            rows.append({"pattern": pattern.name, "key_token": pattern.key_token, "query_token": pattern.query_token,
                         "source_class": pattern.source_class, "mined_count": pattern.count, "n_examples": 0,
                         "accuracy_before": float("nan"), "accuracy_after": float("nan"), "drop": float("nan"),
                         "flipped": float("nan")})
            continue
        original, attacked, _ = attacked_sequences(classifier, [texts[i] for i in chosen], pattern)
        keep = [r for r, seq in enumerate(attacked) if len(seq) <= backend.n_ctx]
        y = [gold[chosen[r]] for r in keep]
        before = _predict(classifier, [original[r] for r in keep], pad_id, batch_size) if keep else []
        after = _predict(classifier, [attacked[r] for r in keep], pad_id, batch_size) if keep else []
        n = len(keep)
        acc_b = sum(int(p == t) for p, t in zip(before, y, strict=True)) / n if n else float("nan")
        acc_a = sum(int(p == t) for p, t in zip(after, y, strict=True)) / n if n else float("nan")
        flipped = sum(int(a != b) for a, b in zip(after, before, strict=True)) / n if n else float("nan")
        rows.append({"pattern": pattern.name, "key_token": pattern.key_token, "query_token": pattern.query_token,
                     "source_class": pattern.source_class, "mined_count": pattern.count, "n_examples": n,
                     "accuracy_before": acc_b, "accuracy_after": acc_a, "drop": acc_b - acc_a, "flipped": flipped})
    return pd.DataFrame(rows, columns=["pattern", "key_token", "query_token", "source_class", "mined_count",
                                       "n_examples", "accuracy_before", "accuracy_after", "drop", "flipped"])


__all__ = [
    "ExamplePairs",
    "TriggerPattern",
    "attacked_sequences",
    "attributed_pairs",
    "content_span",
    "count_patterns",
    "insert_pattern",
    "mine_trigger_patterns",
    "pattern_overlap",
    "relative_position",
    "trigger_attack",
]
