"""CircuitsVis views: ``SourceAttribution.to_circuitsvis()`` and ``at2_lens.top_heads_attention``.

The props carry the context's tokens and their sources' scores, and the heads' real attention; the HTML inlines the
CircuitsVis bundle (no CDN) and survives hostile token text; without CircuitsVis the calls name the extra; and headless
Chromium (the launcher of ``test_browser_render``) shows the views with no console error and no request leaving the
machine (a recording proxy sees every request the browser makes).
"""

from __future__ import annotations

import html
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import at2_lens
from at2_lens import AT2Attribution, ContextTask, LinearEstimator, SourceAttribution, top_heads, top_heads_attention
from at2_lens._optional import EXTRAS
from at2_lens.at2.estimator import model_fingerprint
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError, OptionalDependencyError
from at2_lens.viz import CircuitsVisView, _render, context_token_scores
from tests.conftest import BACKENDS
from tests.test_browser_render import _result, _run, chromium

pytest.importorskip("circuitsvis", reason="the CircuitsVis views need the 'circuitsvis' extra")
pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = ["The cat is black.", "Paris is the <b>capital</b> & </script><script>alert(1)</script> of France.",
           "The dog is brown."]


def _estimator(model: Any, seed: int = 0) -> LinearEstimator:
    backend = get_backend(model)
    weights = torch.randn(backend.n_layers, backend.n_heads, generator=torch.Generator().manual_seed(seed))
    return LinearEstimator(weights, model_fingerprint=model_fingerprint(backend))


def _attribute(model: Any) -> tuple[SourceAttribution, LinearEstimator]:
    est = _estimator(model)
    task = ContextTask(context=CONTEXT, query="What is the capital of France?", response="Paris", sources="sentence")
    return AT2Attribution(model, estimator=est).attribute(task), est


def _props(view: CircuitsVisView) -> dict[str, Any]:
    """The props as the page's script passes them to CircuitsVis (parsed back out of the HTML)."""
    found = re.search(rf"CircuitsVis\.{view.component},\s*(\{{.*\}})\s*\)\s*</script>\s*$", view.html, re.S)
    assert found, "the component's props are not where CircuitsVis renders them"
    return json.loads(found.group(1))


def _check_self_contained(view: CircuitsVisView) -> None:
    page = view.html
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert not re.search(r"\bimport\b[^;\n]*\bfrom\s*[\"'](https?:)?//", page)  # CircuitsVis's CDN form
    assert "unpkg.com" not in page and "jsdelivr" not in page
    assert page.count("</script>") == 1  # only the end of the one script: token text cannot close it early
    assert "CircuitsVis.render(" in page and len(page) > 1_000_000  # the wheel's bundle is inlined


# ------------------------------------------------------------------------------------------------ props and HTML
def test_to_circuitsvis_colours_context_tokens_by_source_score(tiny_llama: Any) -> None:
    result, _ = _attribute(tiny_llama)
    view = result.to_circuitsvis()
    assert view.component == "ColoredTokens"
    task = result.task
    assert task is not None
    assert "".join(view.tokens) == result.context  # the tokens spell the context exactly

    # Each token's value is its source's score; tokens between sources (the joins) are 0.
    source_of = task.token_source_index()
    in_context = [i for i, (a, b) in enumerate(task.offsets[: task.prompt_len])
                  if b > a and b > task.context_start and a < task.context_start + len(task.context)]
    assert len(in_context) == len(view.tokens)
    scores = result.scores.tolist()
    expected = [scores[source_of[i]] if source_of[i] >= 0 else 0.0 for i in in_context]
    tokens, values = context_token_scores(result)
    assert tokens == list(view.tokens) and values == pytest.approx(expected)
    assert 0.0 in values and set(expected) - {0.0} == set(scores)

    props = _props(view)
    assert props == view.props
    assert props["tokens"] == [html.escape(t, quote=False) for t in view.tokens]  # CircuitsVis inserts HTML
    assert props["values"] == pytest.approx(expected)
    top = max(abs(s) for s in scores)
    assert props["maxValue"] == pytest.approx(top) and props["minValue"] == pytest.approx(-top)
    _check_self_contained(view)
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in "".join(props["tokens"])  # hostile text arrives as text
    assert "<script>alert" not in view.html and "<b>capital" not in view.html
    assert view._repr_html_() == view.show_code() == view.html
    assert repr(view) == f"CircuitsVisView(component='ColoredTokens', n_tokens={len(view.tokens)})"


def test_to_circuitsvis_without_a_task_cuts_words() -> None:
    result = _result()  # built by hand: no tokenized task
    view = result.to_circuitsvis()
    assert "".join(view.tokens) == result.context
    assert view.tokens[:3] == ("The", " cat", " is")
    values = dict(zip(view.tokens, view.props["values"], strict=False))
    assert values[" Paris"] == pytest.approx(0.8) and values[" dog"] == pytest.approx(-0.3)


def test_save_html_writes_a_self_contained_page(tiny_llama: Any, tmp_path: Path) -> None:
    result, _ = _attribute(tiny_llama)
    view = result.to_circuitsvis()
    path = view.save_html(tmp_path / "tokens.html", title="a <title>")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and view.html in page and "<title>a &lt;title&gt;</title>" in page


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_heads_attention_draws_the_estimators_top_heads(tiny_llama_models: dict[str, Any], backend: str) -> None:
    model = tiny_llama_models[backend]
    result, est = _attribute(model)
    view = top_heads_attention(model, result, est, k=3)
    heads = top_heads(est.weights, 3)
    props = _props(view)
    assert view.component == "AttentionHeads"
    assert props["attentionHeadNames"] == [f"L{layer}H{head}" for layer, head in heads]
    task = result.task
    assert task is not None
    assert "".join(view.tokens) == task.text and len(view.tokens) == task.seq_len
    assert props["tokens"] == list(view.tokens)  # drawn as text on the chart: given as they are
    assert props["maskUpperTri"] is True  # a decoder's patterns

    _, cache = model.run_with_cache(task.input_ids[None])
    want = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in heads]).float()
    assert torch.tensor(props["attention"]).shape == (3, task.seq_len, task.seq_len)
    torch.testing.assert_close(torch.tensor(props["attention"]), want, atol=1e-5, rtol=0)
    _check_self_contained(view)

    # The same view from the task itself and from the attribution object that carries the estimator.
    again = top_heads_attention(model, task, AT2Attribution(model, estimator=est), k=3)
    assert again.props["attentionHeadNames"] == props["attentionHeadNames"]
    assert again.props["attention"] == props["attention"]


def test_top_heads_attention_tokenizes_a_context_task(tiny_llama: Any) -> None:
    est = _estimator(tiny_llama)
    task = ContextTask(context=CONTEXT, query="Capital?", response="Paris", sources="sentence")
    view = top_heads_attention(tiny_llama, task, est, k=2)
    assert "".join(view.tokens).endswith("Paris") and len(view.props["attentionHeadNames"]) == 2


def test_top_heads_attention_refuses_bad_input(tiny_llama: Any) -> None:
    result, est = _attribute(tiny_llama)
    backend = get_backend(tiny_llama)
    with pytest.raises(InputError, match="k"):
        top_heads_attention(tiny_llama, result, est, k=backend.n_layers * backend.n_heads + 1)
    other = LinearEstimator(torch.ones(backend.n_layers + 1, backend.n_heads),
                            model_fingerprint={**model_fingerprint(backend), "n_layers": backend.n_layers + 1})
    with pytest.raises(EstimatorFileError, match="n_layers"):
        top_heads_attention(tiny_llama, result, other)
    with pytest.raises(InputError, match="no tokenized task"):
        top_heads_attention(tiny_llama, _result(), est)
    with pytest.raises(InputError, match="result_or_task"):
        top_heads_attention(tiny_llama, "some text", est)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="ships no estimator"):
        top_heads_attention(tiny_llama, result)  # no shipped estimator fits the tiny model


HOSTILE = ["<|im_start|>", " </script><script>alert(1)</script>", " a & b", " <!--", " \u2028"]


def _hostile_heads_view() -> CircuitsVisView:
    import circuitsvis.attention

    n = len(HOSTILE)
    attention = torch.tril(torch.ones(2, n, n)) / torch.arange(1, n + 1)[:, None]
    return _render("AttentionHeads", circuitsvis.attention.attention_heads, HOSTILE, html_tokens=False,
                   attention=attention, attention_head_names=["L0H1", "L2H3"])


def test_token_text_cannot_break_out_of_the_script() -> None:
    view = _hostile_heads_view()
    _check_self_contained(view)
    assert _props(view)["tokens"] == HOSTILE  # the same strings once the script reads them
    assert "<script>alert" not in view.html and "<!--" not in view.html.split("CircuitsVis.render(")[-1]


# ------------------------------------------------------------------------------------------------ the extra
def test_without_circuitsvis_the_error_names_the_extra(tiny_llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    result, est = _attribute(tiny_llama)
    for name in [m for m in sys.modules if m == "circuitsvis" or m.startswith("circuitsvis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "circuitsvis", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=re.escape("pip install 'at2_lens[circuitsvis]'")) as info:
        result.to_circuitsvis()
    assert isinstance(info.value, OptionalDependencyError) and "to_circuitsvis" in str(info.value)
    with pytest.raises(ImportError, match=re.escape("at2_lens[circuitsvis]")):
        top_heads_attention(tiny_llama, result, est, k=2)


def test_importing_at2_lens_does_not_import_circuitsvis() -> None:
    code = ("import sys, at2_lens, at2_lens.viz, at2_lens.results; at2_lens.top_heads_attention; "
            "assert 'circuitsvis' not in sys.modules, 'circuitsvis was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pyproject_declares_the_extra() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("circuitsvis") for r in extras["circuitsvis"])
    assert any(r.startswith("circuitsvis") for r in extras["dev"])
    assert EXTRAS["circuitsvis"] == "circuitsvis"  # the one helper that names extras knows it
    assert "top_heads_attention" in at2_lens.__all__


# ------------------------------------------------------------------------------------------------ the browser
# Chromium's own service traffic (network time, component updates, account checks), which it sends for any page,
# even a blank one, whatever the flags; requests to any other host come from the page.
CHROMIUM_SERVICE_HOSTS = {"clients2.google.com", "update.googleapis.com", "redirector.gvt1.com", "accounts.google.com"}
QUIET = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-pings",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--disable-default-apps",
         "--disable-extensions",
         "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate"]

# Before the page's own scripts: record uncaught errors, rejected promises and console errors/warnings.
CATCH = """<script>
window.__at2 = {errors: []};
window.addEventListener('error', function (e) { window.__at2.errors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { window.__at2.errors.push('rejection: ' + e.reason); });
['error', 'warn'].forEach(function (level) {
  var original = console[level];
  console[level] = function () {
    window.__at2.errors.push(level + ': ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
});
</script>"""

# After them (a module script runs after the view's module script): what the page shows once React has rendered.
PROBE = """<script type="module">
setTimeout(function () {
  var out = {errors: window.__at2.errors, tokens: [], labels: [], inked: []};
  document.querySelectorAll('.colored-tokens > span > span').forEach(function (el) {
    out.tokens.push({text: el.textContent, bg: getComputedStyle(el).backgroundColor});
  });
  document.querySelectorAll('h4').forEach(function (el) { out.labels.push(el.textContent); });
  document.querySelectorAll('canvas').forEach(function (el) {  // the share of each canvas's pixels painted
    var px = el.getContext('2d').getImageData(0, 0, el.width, el.height).data, n = 0;
    for (var i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
    out.inked.push(n / (el.width * el.height));
  });
  var pre = document.createElement('pre'); pre.id = 'at2-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 1500);
</script>"""


@contextmanager
def recording_proxy() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP proxy that answers nothing and records the first line of every request it receives (for HTTPS,
    the ``CONNECT host:443`` line)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(32)
    seen: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    seen.append(conn.recv(4096).split(b"\r\n")[0].decode("latin-1"))
                except OSError as exc:
                    seen.append(f"? {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        server.close()
        thread.join(timeout=5)


def _host(request_line: str) -> str:
    target = request_line.split(" ")[1] if " " in request_line else request_line
    return re.sub(r"^[a-z]+://", "", target).split("/")[0].split(":")[0]


def open_offline(page: Path, tmp: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """Open ``page`` in headless Chromium with every request routed to a recording proxy.

    Returns what the probe found after rendering, the browser's console lines, and the requests the page sent out
    (Chromium's own service traffic left aside).
    """
    browser = chromium()
    probed = tmp / f"probed-{page.name}"
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("<body>", "<body>" + CATCH, 1).replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    with recording_proxy() as (port, seen):
        done = _run(browser, tmp, f"--proxy-server=http://127.0.0.1:{port}", "--proxy-bypass-list=<-loopback>",
                    *QUIET, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                    probed.as_uri())
    found = re.search(r'<pre id="at2-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run; Chromium returned: {done.stdout[-500:]!r}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    outside = [r for r in seen if _host(r) not in CHROMIUM_SERVICE_HOSTS]
    return json.loads(html.unescape(found.group(1))), console, outside


def _shown(text: str) -> str:
    return text.replace("\xa0", " ")


def _check_tokens_page(probe: dict[str, Any], view: CircuitsVisView) -> None:
    shown = probe["tokens"]
    assert [_shown(t["text"]) for t in shown] == [re.sub(r"\s", " ", t) for t in view.tokens]
    values = view.props["values"]
    top = max(range(len(values)), key=lambda i: abs(values[i]))
    full = "rgb(255, 140, 0)" if values[top] > 0 else "rgb(70, 130, 230)"
    assert shown[top]["bg"] == full  # the largest score in full orange (positive) or blue (negative)
    colour: dict[float, str] = {}
    for t, v in zip(shown, values, strict=True):
        assert colour.setdefault(v, t["bg"]) == t["bg"]  # one colour per source: its tokens share a score
    zero = [t for t, v in zip(shown, values, strict=True) if v == 0]
    assert all(t["bg"] == "rgb(255, 255, 255)" for t in zero)  # outside every source: white


def _check_heads_page(probe: dict[str, Any], view: CircuitsVisView) -> None:
    names = view.props["attentionHeadNames"]
    assert [label for label in probe["labels"] if label in names] == names  # every head, labelled, in order
    # A heatmap per head and the zoomed one of the first, all painted (the tokens label the zoomed one's axes).
    assert len(probe["inked"]) == len(names) + 1 and min(probe["inked"]) > 0.2


def test_browser_check_catches_outside_requests(tmp_path: Path) -> None:
    """The check itself: a page that fetches from outside is caught (images, scripts, fetch)."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.com/x.png">'
                    '<script src="https://unpkg.com/circuitsvis/dist/cdn/esm.js" type="module"></script>'
                    "<script>fetch('https://cdn.jsdelivr.net/x.js').catch(function () {});</script></body></html>",
                    encoding="utf-8")
    _, _, outside = open_offline(page, tmp_path)
    assert {_host(r) for r in outside} >= {"example.com", "unpkg.com", "cdn.jsdelivr.net"}


def test_views_render_offline_in_chromium(tiny_llama: Any, tmp_path: Path) -> None:
    result, est = _attribute(tiny_llama)
    tokens_view = result.to_circuitsvis()
    probe, console, outside = open_offline(tokens_view.save_html(tmp_path / "tokens.html"), tmp_path)
    assert probe["errors"] == [] and console == [] and outside == []
    _check_tokens_page(probe, tokens_view)
    assert "</script><script>alert(1)</script>" in "".join(_shown(t["text"]) for t in probe["tokens"])

    heads_view = top_heads_attention(tiny_llama, result, est, k=3)
    probe, console, outside = open_offline(heads_view.save_html(tmp_path / "heads.html"), tmp_path)
    assert probe["errors"] == [] and console == [] and outside == []
    _check_heads_page(probe, heads_view)

    hostile = _hostile_heads_view()  # tokens that would end the script, or open a comment, run as text
    probe, console, outside = open_offline(hostile.save_html(tmp_path / "hostile.html"), tmp_path)
    assert probe["errors"] == [] and console == [] and outside == []
    _check_heads_page(probe, hostile)


@pytest.mark.real
@pytest.mark.slow
def test_circuitsvis_on_smollm2_with_the_shipped_estimator(smollm2: Any, tmp_path: Path) -> None:
    chromium()
    est = at2_lens.load_estimator()
    result = AT2Attribution(smollm2, estimator=est).attribute(ContextTask(
        context="The cat is black. Paris is the capital of France. The dog is brown.",
        query="What is the capital of France?", response="Paris", sources="sentence"))
    tokens_view = result.to_circuitsvis()
    assert "".join(tokens_view.tokens) == result.context
    assert max(tokens_view.props["values"]) == pytest.approx(float(result.scores.max()))
    probe, console, outside = open_offline(tokens_view.save_html(tmp_path / "tokens.html"), tmp_path)
    assert probe["errors"] == [] and console == [] and outside == []
    _check_tokens_page(probe, tokens_view)
    paris = next(t for t in probe["tokens"] if "Paris" in t["text"])
    assert paris["bg"] not in ("rgb(255, 255, 255)", "rgb(70, 130, 230)")  # its sentence scores above 0

    heads_view = top_heads_attention(smollm2, result, est, k=5)
    assert heads_view.props["attentionHeadNames"] == [f"L{a}H{b}" for a, b in top_heads(est.weights, 5)]
    probe, console, outside = open_offline(heads_view.save_html(tmp_path / "heads.html"), tmp_path)
    assert probe["errors"] == [] and console == [] and outside == []
    _check_heads_page(probe, heads_view)
