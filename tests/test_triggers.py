"""Adversarial triggers mined from AttAttr: insertion logic, mining and the attack on a tiny BERT and MiniLM-SST2."""

from __future__ import annotations

import pytest
import torch

from at2_lens.attattr.triggers import (
    ExamplePairs,
    TriggerPattern,
    attacked_sequences,
    attributed_pairs,
    content_span,
    count_patterns,
    insert_pattern,
    mine_trigger_patterns,
    pattern_overlap,
    trigger_attack,
)
from at2_lens.errors import InputError
from tests.conftest import BACKENDS
from tests.test_head_importance import LABELS, TEXTS, TinyClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _pattern(key_rel: float, query_rel: float, key_id: int = 901, query_id: int = 902) -> TriggerPattern:
    return TriggerPattern(key_id=key_id, query_id=query_id, key_token="k", query_token="q", source_class=1,
                          count=3, key_rel=key_rel, query_rel=query_rel)


def test_pattern_overlap_counts_shared_patterns_per_class() -> None:
    a = [_pattern(0, 1, 1, 2), _pattern(0, 1, 3, 4), _pattern(0, 1, 5, 6)]
    b = [_pattern(0, 1, 3, 4), _pattern(0, 1, 7, 8), _pattern(0, 1, 1, 2)]
    assert pattern_overlap(a, b) == pytest.approx(2 / 3)
    assert pattern_overlap(a, b, top=1) == 0.0  # (1, 2) is A's first but B's third
    assert pattern_overlap(a, b, top=3) == pytest.approx(2 / 3)
    other_class = [TriggerPattern(key_id=1, query_id=2, key_token="k", query_token="q", source_class=0, count=1,
                                  key_rel=0, query_rel=1)]
    assert pattern_overlap(other_class, a) == 0.0  # same tokens, other class: not the same pattern
    with pytest.raises(InputError, match="at least one"):
        pattern_overlap([], a)
    with pytest.raises(InputError, match="TriggerPattern"):
        pattern_overlap(["x"], a)  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------------- counting
class _Ids:
    """A tokenizer stand-in: id -> "t<id>"."""

    @staticmethod
    def convert_ids_to_tokens(i: int) -> str:
        return f"t{i}"


@pytest.mark.line_independent
def test_count_patterns_counts_the_first_top_k_pairs_per_class() -> None:
    ex = [
        ExamplePairs(label=1, pairs=((1, 2, 0.0, 1.0, 1.0), (3, 4, 0.5, 0.5, 0.9))),
        ExamplePairs(label=1, pairs=((3, 4, 0.25, 0.75, 1.0), (1, 2, 0.0, 0.5, 0.2))),
        ExamplePairs(label=1, pairs=((5, 6, 0.0, 1.0, 1.0),)),
        ExamplePairs(label=0, pairs=((1, 2, 1.0, 0.0, 1.0),)),
        ExamplePairs(label=0, pairs=()),
    ]
    top1 = count_patterns(ex, _Ids(), top_k=1, n_patterns=5)
    assert [(p.source_class, p.name, p.count) for p in top1] == [
        (0, "t1 → t2", 1), (1, "t1 → t2", 1), (1, "t3 → t4", 1), (1, "t5 → t6", 1)]
    top2 = count_patterns(ex, _Ids(), top_k=2, n_patterns=5)
    ones = [p for p in top2 if p.source_class == 1]
    # (3,4): count 2, mean score 0.95 -> first; (1,2): count 2, mean score 0.6; (5,6): count 1.
    assert [(p.name, p.count) for p in ones] == [("t3 → t4", 2), ("t1 → t2", 2), ("t5 → t6", 1)]
    assert ones[0].key_rel == pytest.approx(0.375) and ones[0].query_rel == pytest.approx(0.625)
    assert ones[0].score == pytest.approx(0.95) and ones[1].score == pytest.approx(0.6)
    # By summed score: (3,4) 1.9, (1,2) 1.2, (5,6) 1.0.
    by_score = [p.name for p in count_patterns(ex, _Ids(), top_k=2, n_patterns=5, rank_by="score")
                if p.source_class == 1]
    assert by_score == ["t3 → t4", "t1 → t2", "t5 → t6"]
    weak = [ExamplePairs(label=1, pairs=((7, 8, 0, 1, 0.1),)), ExamplePairs(label=1, pairs=((7, 8, 0, 1, 0.1),)),
            ExamplePairs(label=1, pairs=((9, 9, 0, 1, 1.0),))]
    assert [p.name for p in count_patterns(weak, _Ids())] == ["t7 → t8", "t9 → t9"]  # frequent first
    assert [p.name for p in count_patterns(weak, _Ids(), rank_by="score")] == ["t9 → t9", "t7 → t8"]  # 1.0 > 0.2
    assert len(count_patterns(ex, _Ids(), top_k=2, n_patterns=1)) == 2  # one per class
    with pytest.raises(InputError, match="rank_by"):
        count_patterns(ex, _Ids(), rank_by="mean")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="examples"):
        count_patterns([{"label": 1, "pairs": []}], _Ids())  # type: ignore[list-item]


@pytest.mark.line_independent
def test_key_pooling_counts_a_key_over_all_its_queries() -> None:
    ex = [
        ExamplePairs(label=0, pairs=((7, 1, 0.0, 1.0, 1.0), (5, 6, 0.5, 0.5, 0.8))),
        ExamplePairs(label=0, pairs=((7, 2, 0.2, 0.6, 1.0), (7, 1, 0.4, 0.8, 0.5))),
        ExamplePairs(label=0, pairs=((7, 3, 0.5, 0.5, 1.0),)),
        ExamplePairs(label=0, pairs=((5, 6, 0.0, 1.0, 1.0),)),
    ]
    # Exact pairs: (5,6) (mean score 0.9) and (7,1) (0.75) in two examples each, (7,2), (7,3) in one.
    assert [(p.name, p.count) for p in count_patterns(ex, _Ids(), top_k=2, n_patterns=4)] == [
        ("t5 → t6", 2), ("t7 → t1", 2), ("t7 → t2", 1), ("t7 → t3", 1)]
    # Key 7 is read in three examples (twice in the second: counted once), key 5 in two; 7's usual reader is 1.
    pooled = count_patterns(ex, _Ids(), top_k=2, n_patterns=4, pool="key")
    assert [(p.name, p.count) for p in pooled] == [("t7 → t1", 3), ("t5 → t6", 2)]
    assert pooled[0].key_rel == pytest.approx(0.2) and pooled[0].query_rel == pytest.approx(0.9)  # (7, 1)'s places
    assert pooled[0].score == pytest.approx(3.5 / 3)  # summed over all of key 7's pairs, per example
    other = count_patterns(ex[1:3], _Ids(), top_k=2, pool="key")  # key 7 read by 2, 1, 3: 2 wins the tie on score
    assert other[0].name == "t7 → t2"
    assert pattern_overlap(pooled, other) == 0.0 and pattern_overlap(pooled, other, by="key") == 0.5
    with pytest.raises(InputError, match="pool"):
        count_patterns(ex, _Ids(), pool="query")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="by"):
        pattern_overlap(pooled, other, by="query")  # type: ignore[arg-type]


@pytest.mark.line_independent
def test_example_pairs_round_trip_through_json() -> None:
    import json

    ex = ExamplePairs(label=1, pairs=((1, 2, 0.0, 1.0, 1.0), (3, 4, 0.5, 0.25, 0.5)))
    assert ExamplePairs.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex
    with pytest.raises(InputError, match="example pairs"):
        ExamplePairs.from_dict({"label": 1, "pairs": [[1, 2, 0.0]]})
    with pytest.raises(InputError, match="example pairs"):
        ExamplePairs.from_dict({"pairs": []})


# ---------------------------------------------------------------------------------------------------- insertion
@pytest.mark.line_independent
def test_insert_pattern_keeps_relative_positions() -> None:
    content = [10, 11, 12, 13, 14]
    new, (k, q) = insert_pattern(content, _pattern(0.0, 1.0))
    assert new == [901, 10, 11, 12, 13, 14, 902] and (k, q) == (0, 6)
    new, (k, q) = insert_pattern(content, _pattern(1.0, 0.5))
    assert new == [10, 11, 902, 12, 13, 14, 901] and (k, q) == (6, 2)
    new, (k, q) = insert_pattern(content, _pattern(0.5, 0.5))  # same gap: mined order kept (key first on a tie)
    assert new[k] == 901 and new[q] == 902 and q == k + 1
    # For any length, each inserted token sits within one position of its relative place; originals keep order.
    for n in range(1, 30):
        orig = list(range(100, 100 + n))
        for kr, qr in ((0.2, 0.7), (0.9, 0.1), (0.33, 0.33)):
            new, (k, q) = insert_pattern(orig, _pattern(kr, qr))
            assert len(new) == n + 2 and new[k] == 901 and new[q] == 902
            assert [t for t in new if t not in (901, 902)] == orig
            assert abs(k - kr * n) <= 1.5 and abs(q - qr * n) <= 1.5


@pytest.mark.line_independent
def test_content_span_skips_special_tokens_at_both_ends() -> None:
    assert content_span([101, 5, 6, 102], {101, 102}) == (1, 3)
    assert content_span([5, 6], {101, 102}) == (0, 2)
    assert content_span([101, 102], {101, 102}) == (2, 2)


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny_clf(tiny_bert_models: dict[str, object]) -> TinyClassifier:
    return TinyClassifier(tiny_bert_models[BACKENDS[0]])


def test_mining_on_the_tiny_bert(tiny_clf: TinyClassifier) -> None:
    patterns = mine_trigger_patterns(tiny_clf, TEXTS, LABELS, top_k=2, n_patterns=2, n_steps=4, batch_size=2)
    assert patterns and all(isinstance(p, TriggerPattern) for p in patterns)
    per_class: dict[int, list[TriggerPattern]] = {}
    for p in patterns:
        per_class.setdefault(p.source_class, []).append(p)
        assert 0.0 <= p.key_rel <= 1.0 and 0.0 <= p.query_rel <= 1.0 and p.score > 0
        assert tiny_clf.backend.tokenizer.convert_ids_to_tokens(p.key_id) == p.key_token
    assert set(per_class) <= set(LABELS)
    for cls, ps in per_class.items():
        assert len(ps) <= 2
        assert [p.count for p in ps] == sorted((p.count for p in ps), reverse=True)
        assert sum(p.count for p in ps) <= 2 * LABELS.count(cls)
    # The mined tokens occur in the class's own texts.
    for p in patterns:
        texts = [t for t, y in zip(TEXTS, LABELS, strict=True) if y == p.source_class]
        ids = set(tiny_clf.tokenize(texts)[0].reshape(-1).tolist())
        assert p.key_id in ids and p.query_id in ids
    # Mining is attributed_pairs then count_patterns: the stored pairs give the same patterns.
    pairs = attributed_pairs(tiny_clf, TEXTS, LABELS, top_k=5, n_steps=4, batch_size=2)
    assert len(pairs) == len(TEXTS) and [e.label for e in pairs] == LABELS
    for e in pairs:
        assert len(e.pairs) <= 5 and (not e.pairs or e.pairs[0][4] == pytest.approx(1.0))
        assert [s for *_, s in e.pairs] == sorted((s for *_, s in e.pairs), reverse=True)
    assert count_patterns(pairs, tiny_clf.backend.tokenizer, top_k=2, n_patterns=2) == patterns
    pooled = mine_trigger_patterns(tiny_clf, TEXTS, LABELS, top_k=5, n_patterns=3, n_steps=4, batch_size=2,
                                   pool="key", rank_by="score")
    assert pooled == count_patterns(pairs, tiny_clf.backend.tokenizer, top_k=5, n_patterns=3, pool="key",
                                    rank_by="score")
    keys = [(p.source_class, p.key_id) for p in pooled]
    assert len(keys) == len(set(keys))  # one pattern per key and class
    # One layer only works too and is deterministic.
    a = mine_trigger_patterns(tiny_clf, TEXTS, LABELS, layers=1, n_steps=4)
    assert a == mine_trigger_patterns(tiny_clf, TEXTS, LABELS, layers=[1], n_steps=4)


def test_attack_recomputes_accuracy_on_the_inserted_tokens(tiny_clf: TinyClassifier) -> None:
    pats = [_pattern(0.0, 1.0, key_id=40, query_id=70), _pattern(0.5, 0.2, key_id=12, query_id=99)]
    df = trigger_attack(tiny_clf, pats, TEXTS, LABELS, batch_size=2)
    assert list(df.columns) == ["pattern", "key_token", "query_token", "source_class", "mined_count", "n_examples",
                                "accuracy_before", "accuracy_after", "drop", "flipped"]
    assert df["n_examples"].tolist() == [len(TEXTS)] * 2
    tokens, mask = tiny_clf.tokenize(TEXTS)
    with torch.no_grad():
        own = (tiny_clf.forward(tokens, mask).argmax(-1) == torch.tensor(LABELS)).float().mean().item()
    assert df["accuracy_before"].tolist() == pytest.approx([own, own])
    for r, p in enumerate(pats):
        original, attacked, where = attacked_sequences(tiny_clf, TEXTS, p)
        correct = 0
        for seq, orig, (k, q), y in zip(attacked, original, where, LABELS, strict=True):
            assert len(seq) == len(orig) + 2 and seq[k] == p.key_id and seq[q] == p.query_id
            with torch.no_grad():
                pred = int(tiny_clf.forward(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).argmax())
            correct += int(pred == y)
        assert df["accuracy_after"].iloc[r] == pytest.approx(correct / len(TEXTS))
        assert df["drop"].iloc[r] == pytest.approx(own - correct / len(TEXTS))
    other = trigger_attack(tiny_clf, pats[:1], TEXTS, LABELS, examples="other")
    same = trigger_attack(tiny_clf, pats[:1], TEXTS, LABELS, examples="same")
    assert other["n_examples"].iloc[0] == LABELS.count(0) and same["n_examples"].iloc[0] == LABELS.count(1)


def test_bad_arguments_fail_clearly(tiny_clf: TinyClassifier) -> None:
    with pytest.raises(InputError, match="patterns"):
        trigger_attack(tiny_clf, [], TEXTS, LABELS)
    with pytest.raises(InputError, match="examples"):
        trigger_attack(tiny_clf, [_pattern(0, 1)], TEXTS, LABELS, examples="mine")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="labels"):
        mine_trigger_patterns(tiny_clf, TEXTS, LABELS[:2])
    with pytest.raises(InputError, match="top_k"):
        mine_trigger_patterns(tiny_clf, TEXTS, LABELS, top_k=0)
    with pytest.raises(InputError, match="layers"):
        mine_trigger_patterns(tiny_clf, TEXTS, LABELS, layers=[9])


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real
@pytest.mark.slow
def test_minilm_sst2_triggers(minilm: object) -> None:
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2

    clf = load_minilm_sst2(model=minilm)
    train_texts, train_labels = load_sst2("train", limit=400)
    # A dozen full-length phrases (the file starts with fragments), both classes.
    pick = [i for i, t in enumerate(train_texts) if len(t.split()) >= 6][:12]
    patterns = mine_trigger_patterns(clf, [train_texts[i] for i in pick], [train_labels[i] for i in pick],
                                     layers=[4, 5], n_patterns=2, n_steps=4, batch_size=6)
    assert patterns and {p.source_class for p in patterns} <= {0, 1}
    special = set(clf.tokenizer.all_special_ids)
    assert all(p.key_id not in special and p.query_id not in special for p in patterns)
    eval_texts, eval_labels = load_sst2("validation", limit=24)
    df = trigger_attack(clf, patterns, eval_texts, eval_labels)
    print(df.to_string())
    assert (df["accuracy_before"] == clf.accuracy(eval_texts, eval_labels)).all()
    assert df["n_examples"].eq(24).all()
    # The attack really inserts the tokens between [CLS] and [SEP], at the mined relative positions.
    p = patterns[0]
    original, attacked, where = attacked_sequences(clf, eval_texts, p)
    for orig, seq, (k, q) in zip(original, attacked, where, strict=True):
        assert seq[0] == clf.tokenizer.cls_token_id and seq[-1] == clf.tokenizer.sep_token_id
        assert seq[k] == p.key_id and seq[q] == p.query_id and len(seq) == len(orig) + 2
        n = len(orig) - 2
        assert abs((k - 1) - p.key_rel * n) <= 1.5 and abs((q - 1) - p.query_rel * n) <= 1.5
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in attacked], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in attacked], batch_first=True)
    with torch.no_grad():
        acc = (clf.forward(tokens, mask).argmax(-1) == torch.tensor(eval_labels)).float().mean().item()
    assert df["accuracy_after"].iloc[0] == pytest.approx(acc)


@pytest.mark.real
@pytest.mark.slow
def test_stability_script_saves_pairs_and_reuses_them(tmp_path: object) -> None:
    """scripts/attattr_triggers.py --stability on the fine-tuned MiniLM, tiny sizes: four samples' pairs saved as
    JSON (with the phrase indices), the rule chosen on A/B, and a second run reads the pairs instead of attributing."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pairs_dir = Path(str(tmp_path)) / "pairs"
    cmd = [sys.executable, str(root / "scripts" / "attattr_triggers.py"), "--stability", "--n-train", "3",
           "--n-eval", "8", "--top-ks", "1,2", "--keep", "2", "--overlap-top", "2", "--n-patterns", "1",
           "--n-steps", "4", "--pairs-dir", str(pairs_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = {n: json.loads((pairs_dir / f"pairs_{n}.json").read_text()) for n in "ABCD"}
    picks = [set(d["phrases"]) for d in saved.values()]
    assert all(len(p) == 3 for p in picks) and len(set.union(*picks)) == 12  # disjoint samples
    assert all(len(d["examples"]) == 3 and all(len(e["pairs"]) <= 2 for e in d["examples"]) for d in saved.values())
    assert "(chosen)" in first.stdout and first.stdout.count("| pair |") == 4 and first.stdout.count("| key |") == 4
    assert "Mean over each set's patterns: A+B+C+D:" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("examples read from") == 4
    # Same pairs, same report (apart from the timings in the first line and the per-sample progress lines).
    report = [ln for ln in first.stdout.splitlines() if ln.startswith("|")]
    assert report == [ln for ln in second.stdout.splitlines() if ln.startswith("|")]
    # Other settings in the same directory are refused, naming the option.
    third = subprocess.run([*cmd[:-2], "--n-steps", "8", "--pairs-dir", str(pairs_dir)], capture_output=True,
                           text=True, cwd=root, timeout=600)
    assert third.returncode == 2 and "--pairs-dir" in third.stderr and "Traceback" not in third.stderr
