"""``at2-lens heads`` and ``at2-lens tree`` on a tiny BERT classifier saved to disk, and on MiniLM-SST2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from at2_lens.cli import main
from at2_lens.models.classifier import ClassifierHead, write_head
from at2_lens.models.tiny import save_tiny

TRAIN = [("a good film", 1), ("bad", 0), ("dull and far too long", 0), ("great acting", 1), ("weak script", 0),
         ("a joy", 1)]
VALID = [("fine acting , weak script", 1), ("the plot was dull", 0), ("great", 1), ("awful", 0)]


@pytest.fixture(scope="module")
def tiny_classifier_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny_clf")
    model_dir = save_tiny("bert", root / "model")
    gen = torch.Generator().manual_seed(0)
    head = ClassifierHead(weight=torch.randn(2, 64, generator=gen), bias=torch.zeros(2),
                          meta={"labels": ["negative", "positive"], "pooling": "mean"})
    head_path = write_head(root / "head.safetensors", head)
    data = root / "data"
    (data / "sst2").mkdir(parents=True)
    for name, rows in (("train.tsv", TRAIN), ("validation.tsv", VALID)):
        lines = ["sentence\tlabel", *(f"{t}\t{y}" for t, y in rows)]
        (data / "sst2" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_dir, head_path, data


def test_heads_writes_csv_plot_and_table(tiny_classifier_files: tuple[Path, Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, head, data = tiny_classifier_files
    csv, png, imp = tmp_path / "sweep.csv", tmp_path / "sweep.png", tmp_path / "imp.json"
    stab = tmp_path / "stability.csv"
    assert main(["heads", "--model", str(model_dir), "--head", str(head), "--data-dir", str(data),
                 "--n-importance", "4", "--n-fractions", "2", "--n-steps", "2", "--batch-size", "2",
                 "--csv", str(csv), "--plot", str(png), "--importance-json", str(imp), "--random-draws", "3",
                 "--stability-csv", str(stab), "--no-progress"]) == 0
    df = pd.read_csv(csv)
    assert len(df) == 3 * 3 + 3 * 3 and list(df["method"].unique()) == ["attattr", "attention", "taylor", "random"]
    assert sorted(df[df.method == "random"]["draw"].unique()) == [0, 1, 2]
    assert df["fraction"].unique().tolist() == [0.0, 0.5, 1.0]
    assert df[df.fraction == 0.0]["accuracy"].nunique() == 1 and df[df.fraction == 1.0]["accuracy"].nunique() == 1
    assert df["n_pruned"].max() == 8  # the tiny BERT: 2 layers x 4 heads
    assert png.read_bytes()[:4] == b"\x89PNG"
    scores = json.loads(imp.read_text())
    assert set(scores) == {"attattr", "attention", "taylor", "halves"} and len(scores["attattr"]) == 2
    assert set(scores["halves"]["taylor"]) == {"a", "b"}
    st = pd.read_csv(stab)
    assert st["method"].tolist() == ["attattr", "attention", "taylor"] and (st["n_a"] == 2).all()
    assert st["spearman"].between(-1, 1).all()
    out = capsys.readouterr().out
    assert "| pruned | heads | attattr | attention | taylor | random |" in out
    assert "| 50 % | 4 |" in out and "on 4 validation sentences" in out and " ± " in out
    assert "| method | Spearman (set A vs set B) |" in out


def test_tree_writes_png_and_prints_edges(tiny_classifier_files: tuple[Path, Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, head, _ = tiny_classifier_files
    png = tmp_path / "tree.png"
    assert main(["tree", "--model", str(model_dir), "--head", str(head), "--text", "a good film",
                 "--threshold", "0.3", "--n-steps", "4", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "edges above 0.3" in out and "layer 1:" in out  # the top layer's strongest interaction is an edge
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_a_clear_error(tiny_classifier_files: tuple[Path, Path, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, head, data = tiny_classifier_files
    assert main(["tree", "--model", str(model_dir), "--text", "a good film"]) == 2
    assert "--head" in capsys.readouterr().err
    assert main(["tree", "--model", str(model_dir), "--head", str(head), "--text", "x", "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main(["heads", "--model", str(model_dir), "--head", str(head), "--data-dir", str(data),
                 "--methods", "attattr,gradient"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["heads", "--model", str(model_dir), "--head", str(head), "--data-dir", str(data),
                 "--n-importance", "100"]) == 2
    assert "--n-importance" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
def test_heads_on_minilm_sst2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2

    csv = tmp_path / "sweep.csv"
    assert main(["heads", "--n-importance", "8", "--n-eval", "48", "--classifier", "probe", "--random-draws", "1",
                 "--n-fractions", "2", "--n-steps", "4", "--csv", str(csv), "--plot", "", "--no-progress"]) == 0
    df = pd.read_csv(csv)
    assert len(df) == 3 * 4 and df["n_pruned"].tolist()[:3] == [0, 36, 72]
    texts, labels = load_sst2("validation", limit=48)
    own = load_minilm_sst2().accuracy(texts, labels)
    assert (df[df.fraction == 0.0]["accuracy"] == own).all()  # nothing pruned = the classifier itself
    full = df[df.fraction == 1.0]["accuracy"]
    assert full.nunique() == 1 and float(full.iloc[0]) != own  # every head masked changes the predictions
    assert "| 100 % | 72 |" in capsys.readouterr().out


@pytest.mark.real
def test_tree_on_minilm_sst2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "tree.png"
    assert main(["tree", "--text", "a gorgeous, witty, seductive movie.", "--n-steps", "8", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "-> positive" in out and "layer 5:" in out and "gorgeous" in out
    assert png.stat().st_size > 1000
