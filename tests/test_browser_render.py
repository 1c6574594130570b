"""The HTML views open in a real browser: headless Chromium renders an AT2 report and a ``to_html()`` result, and
we check what it shows (computed styles read by a probe script after layout, and the screenshot's pixels).

Skips, saying so, only when no Chromium binary is installed (``.ci/run`` installs the Debian ``chromium`` package).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from at2_lens.report import write_report
from at2_lens.results import SourceAttribution

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Runs in the page after layout; records what the browser actually shows into <pre id="at2-probe">.
PROBE = """
<script>
(function () {
  function box(el) { var r = el.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }
  var out = {sources: [], cells: []};
  document.querySelectorAll('.at2-source').forEach(function (el) {
    out.sources.push({index: +el.dataset.source, text: el.textContent,
                      bg: getComputedStyle(el).backgroundColor, box: box(el)});
  });
  var table = document.querySelector('table.at2-heads');
  out.heatmap_rows = table ? table.querySelectorAll('tr').length - 1 : -1;
  if (table) table.querySelectorAll('td').forEach(function (td) {
    out.cells.push({title: td.title, bg: getComputedStyle(td).backgroundColor, box: box(td)});
  });
  var t = document.querySelector('.at2-target');
  out.target = t ? t.textContent : null;
  var pre = document.createElement('pre'); pre.id = 'at2-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""

ORANGE = (255, 140, 0)  # a source at the top score is shaded rgba(255, 140, 0, 1)
HEAT = (200, 60, 20)  # the heatmap cell of the largest weight is rgba(200, 60, 20, 1)


def chromium() -> str:
    """Path of a Chromium binary, or skip the test with a clear message."""
    for name in (os.environ.get("AT2_LENS_CHROMIUM"), *BROWSERS):
        path = shutil.which(name) if name else None
        if path:
            return path
    pytest.skip("no Chromium binary found (apt-get install chromium, or set AT2_LENS_CHROMIUM); "
                "the browser rendering tests need one")


def _run(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def render(page: Path, tmp: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Open ``page`` in headless Chromium: the probe's findings and a 1000 x 1400 screenshot as RGB pixels."""
    from PIL import Image

    browser = chromium()
    probed = tmp / "probed.html"
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE,
                      encoding="utf-8")
    dom = _run(browser, tmp, "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="at2-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe script did not run; Chromium returned: {dom[:500]!r}"
    shot = tmp / "shot.png"
    _run(browser, tmp, "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    return json.loads(html.unescape(found.group(1))), pixels


def _colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 3) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.array(rgb)) <= tol).all(axis=-1)


def _result() -> SourceAttribution:
    texts = ("The cat is black.", "Paris is the capital of France.", "The dog is brown.")
    context = " ".join(texts)
    spans, pos = [], 0
    for t in texts:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 1
    return SourceAttribution(scores=torch.tensor([0.05, 0.8, -0.3]), source_texts=texts, source_spans=tuple(spans),
                             context=context, target_text="Paris", response="Paris", method="AT2")


def _check_report(probe: dict[str, Any], pixels: np.ndarray, result: SourceAttribution, n_layers: int,
                  n_heads: int) -> None:
    top = result.ranking()[0]
    shown = {s["index"]: s for s in probe["sources"]}
    assert sorted(shown) == list(range(result.n_sources))
    assert shown[top]["text"] == result.source_texts[top]
    assert shown[top]["bg"] == "rgb(255, 140, 0)"  # the top source is fully highlighted
    x, y, w, h = shown[top]["box"]
    assert w > 20 and h > 5  # laid out and visible
    others = [s for i, s in shown.items() if i != top]
    assert all(s["bg"] != "rgb(255, 140, 0)" for s in others)
    assert probe["target"] == result.target_text
    assert probe["heatmap_rows"] == n_layers and len(probe["cells"]) == n_layers * n_heads
    assert sum(c["bg"] == "rgb(200, 60, 20)" for c in probe["cells"]) >= 1  # the largest weight, fully shaded

    # The screenshot is not blank, and the highlight sits where the browser laid out the top source.
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    orange = _colour_mask(pixels, ORANGE)
    assert orange.sum() > 200
    rows, cols = np.nonzero(orange)
    assert abs(rows.mean() - (y + h / 2)) < h and x - 2 <= cols.mean() <= x + w + 2
    assert _colour_mask(pixels, HEAT).sum() > 50  # the heatmap's strongest cell is painted


@pytest.mark.line_independent
def test_report_and_to_html_render_in_chromium(tmp_path: Path) -> None:
    result = _result()
    weights = torch.zeros(4, 3)
    weights[2, 1] = 0.5
    weights[0, 0] = -0.2
    weights[3, 2] = 0.1
    page = write_report(tmp_path / "report.html", result, weights, title="browser test", query="Capital?")
    probe, pixels = render(page, tmp_path)
    _check_report(probe, pixels, result, n_layers=4, n_heads=3)
    negative = next(s for s in probe["sources"] if s["index"] == 2)
    assert negative["bg"].startswith("rgba(70, 130, 230")  # a negative score is shaded blue

    fragment = tmp_path / "fragment.html"
    fragment.write_text(f"<!DOCTYPE html><html><body>{result.to_html()}</body></html>", encoding="utf-8")
    probe, pixels = render(fragment, tmp_path)
    assert next(s for s in probe["sources"] if s["index"] == 1)["bg"] == "rgb(255, 140, 0)"
    assert probe["heatmap_rows"] == -1 and _colour_mask(pixels, ORANGE).sum() > 200


@pytest.mark.real
@pytest.mark.slow
def test_at2_report_on_smollm2_renders_in_chromium(smollm2: Any, tmp_path: Path) -> None:
    """The demo's kind of report (SmolLM2, shipped estimator, head heatmap) as a browser shows it."""
    import at2_lens
    from at2_lens import AT2Attribution, ContextTask

    chromium()
    at2 = AT2Attribution(smollm2, estimator=at2_lens.load_estimator())
    result = at2.attribute(ContextTask(
        context="The cat is black. Paris is the capital of France. The dog is brown.",
        query="What is the capital of France?", response="Paris"))
    page = write_report(tmp_path / "report.html", result, at2.head_weights, query="What is the capital of France?")
    probe, pixels = render(page, tmp_path)
    _check_report(probe, pixels, result, n_layers=30, n_heads=9)
