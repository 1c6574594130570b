"""AttAttr ``n_steps="auto"``: per-layer tolerance met, the cap respected, node evaluations reused, integer n_steps
unchanged, results saved and loaded, and the quadrature rules themselves."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from at2_lens.attattr import AttAttrResult, AttentionAttribution, ForwardOutput, quadrature
from at2_lens.attattr.attribution import DEFAULT_ATOL, DEFAULT_RTOL
from at2_lens.backends import get_backend

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.tensor([5, 70, 71, 72, 33, 90, 100, 44, 45, 46, 120, 7])
TARGET = 101


def wavy(out: ForwardOutput, inputs: Tensor) -> Tensor:
    """An F that oscillates along the integration path (cos of a scaled logit): the tiny model's log-probabilities
    are so smooth in the attention that 5 nodes already reach float precision; this F needs 5 on layer 0 and 17 on
    layer 1."""
    return torch.cos(100.0 * out.logits[:, -1, TARGET])


def _within_tolerance(res: AttAttrResult, rtol: float, atol: float) -> Tensor:
    assert res.convergence_delta is not None and res.baseline_output is not None
    change = (res.output[..., None] - res.baseline_output).abs()
    return res.convergence_delta.abs() <= rtol * change + atol


class _NodeCounter:
    """Counts the rows (examples × integration nodes) that run through the model's last block, and the distinct
    integration points among them."""

    def __init__(self, model: Any) -> None:
        b = get_backend(model)
        self.rows = 0
        self.calls = 0
        self.largest = 0
        self.hook = b.model.hook_dict[f"blocks.{b.n_layers - 1}.hook_resid_post"]

    def __enter__(self) -> _NodeCounter:
        def count(x: Tensor, hook: Any) -> None:
            self.rows += int(x.shape[0])
            self.calls += 1
            self.largest = max(self.largest, int(x.shape[0]))

        self.hook.add_hook(count)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.remove_hooks("fwd")


def test_auto_meets_its_tolerance_on_every_layer(tiny_llama: Any) -> None:
    attr = AttentionAttribution(tiny_llama, wavy)
    res = attr.attribute(TOKENS, n_steps="auto", rtol=1e-4, atol=0.0)
    n_layers = get_backend(tiny_llama).n_layers
    assert res.n_steps == "auto" and res.method == "clenshaw_curtis" and res.rtol == 1e-4 and res.atol == 0.0
    assert res.steps is not None and res.converged is not None
    assert res.steps.shape == (n_layers,) and bool(res.converged.all())
    assert bool(_within_tolerance(res, 1e-4, 0.0).all()), res.relative_convergence_delta()
    assert float(res.relative_convergence_delta().max()) <= 1e-4
    # per layer: the layers of this model need different rules, and each stopped at the first that met rtol
    assert len(set(res.steps.tolist())) > 1, res.steps
    for i, layer in enumerate(res.layers):
        used = int(res.steps[i])
        sizes = [r.size for r in quadrature.family("clenshaw_curtis", used)]
        assert sizes[-1] == used
        if len(sizes) > 1:  # the rule before it did not meet the tolerance
            with pytest.warns(UserWarning, match="did not reach"):
                smaller = attr.attribute(TOKENS, layers=[layer], n_steps="auto", rtol=1e-12, atol=0.0,
                                         max_steps=sizes[-2])
            assert float(smaller.relative_convergence_delta()[0]) > 1e-4


def test_auto_baseline_matches_the_integer_path(tiny_llama: Any) -> None:
    """The completeness target of auto (F with the layer's attention zeroed, from its α = 0 node) is the baseline the
    integer path computes with its own extra forward."""
    attr = AttentionAttribution(tiny_llama)
    auto = attr.attribute(TOKENS, target=TARGET, n_steps="auto")
    fixed = attr.attribute(TOKENS, target=TARGET, n_steps=20, return_convergence_delta=True)
    assert auto.baseline_output is not None and fixed.baseline_output is not None
    torch.testing.assert_close(auto.baseline_output, fixed.baseline_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(auto.attributions, fixed.attributions, rtol=0,
                               atol=1e-4 * float(fixed.attributions.abs().max()))
    assert bool(_within_tolerance(auto, DEFAULT_RTOL, DEFAULT_ATOL).all())


def test_auto_never_exceeds_the_cap_and_says_so(tiny_llama: Any) -> None:
    attr = AttentionAttribution(tiny_llama, wavy)
    with _NodeCounter(tiny_llama) as counter, pytest.warns(UserWarning, match="did not reach rtol") as record:
        res = attr.attribute(TOKENS, layers=[0, 1], n_steps="auto", rtol=1e-9, atol=0.0, max_steps=12)
    assert res.steps is not None and res.converged is not None
    assert res.steps.tolist() == [9, 9] and not bool(res.converged.any())  # 5 + 4 new nodes; 17 would exceed 12
    assert counter.rows == 1 + 2 * 9  # the unmodified pass, then 9 nodes per layer (α = 0 included: no extra pass)
    assert len(record) == 2 and "layer 0" in str(record[0].message) and "max_steps=12" in str(record[0].message)


def test_auto_reuses_the_nodes_of_smaller_rules(tiny_llama: Any) -> None:
    """A nested rule pays only for the nodes it adds: stopping at 17 Clenshaw-Curtis nodes costs 17 evaluations, not
    5 + 9 + 17; Gauss-Legendre doubling (no shared nodes) pays every rule it tried."""
    attr = AttentionAttribution(tiny_llama, wavy)
    with _NodeCounter(tiny_llama) as counter:
        res = attr.attribute(TOKENS, layers=[1], n_steps="auto", rtol=1e-4, atol=0.0)
    assert res.steps is not None and int(res.steps[0]) == 17
    assert counter.rows == 1 + 17
    with _NodeCounter(tiny_llama) as counter:
        gl = attr.attribute(TOKENS, layers=[1], n_steps="auto", method="gausslegendre", rtol=1e-4, atol=0.0)
    assert gl.steps is not None
    used = int(gl.steps[0])
    assert used in (4 + 8, 4 + 8 + 16, 4 + 8 + 16 + 32)
    assert counter.rows == 1 + used + 1  # no α = 0 node: one extra pass for F(A_l = 0)


def test_auto_runs_at_most_20_points_per_pass_by_default(tiny_llama: Any) -> None:
    """Without internal_batch_size, a 65-point rule's 32 new points run as 20 + 12, not in one pass of 32 (the
    former fixed default's memory: 20 points per pass)."""
    attr = AttentionAttribution(tiny_llama, wavy)
    with _NodeCounter(tiny_llama) as counter, pytest.warns(UserWarning, match="did not reach"):
        res = attr.attribute(TOKENS, layers=[0], n_steps="auto", rtol=1e-12, atol=0.0, max_steps=65)
    assert res.steps is not None and int(res.steps[0]) == 65
    assert counter.rows == 1 + 65 and counter.largest == 20
    assert counter.calls == 1 + 6  # the unmodified pass; then 5, 4, 8, 16, 20 + 12 new points


@pytest.mark.parametrize("method", quadrature.RULES)
def test_every_rule_family_meets_the_tolerance(tiny_llama: Any, method: str) -> None:
    res = AttentionAttribution(tiny_llama, wavy).attribute(TOKENS, n_steps="auto", method=method, rtol=1e-4,
                                                           atol=0.0)
    assert res.method == method and res.converged is not None and bool(res.converged.all())
    assert bool(_within_tolerance(res, 1e-4, 0.0).all())


def test_auto_batches_chunks_and_budgets(tiny_llama: Any) -> None:
    """Several rows: every row meets the tolerance; internal_batch_size and memory_budget change nothing but the
    order of float sums."""
    attr = AttentionAttribution(tiny_llama, wavy)
    batch = torch.stack([TOKENS, TOKENS.flip(0)])
    whole = attr.attribute(batch, n_steps="auto", rtol=1e-4, atol=0.0)
    assert whole.convergence_delta is not None and whole.convergence_delta.shape == (2, 2)
    assert bool(_within_tolerance(whole, 1e-4, 0.0).all())
    chunked = attr.attribute(batch, n_steps="auto", rtol=1e-4, atol=0.0, internal_batch_size=6)
    budget = attr.attribute(batch, n_steps="auto", rtol=1e-4, atol=0.0, memory_budget="2MB")
    for other in (chunked, budget):
        assert torch.equal(other.steps, whole.steps)
        torch.testing.assert_close(other.attributions, whole.attributions, rtol=1e-4, atol=1e-6)


def test_integer_n_steps_is_unchanged(tiny_llama: Any, tiny_bert_models: dict) -> None:
    """An integer n_steps takes the Captum path as before: same numbers as method='gausslegendre' given explicitly,
    no auto fields; encoders default to 20 Gauss-Legendre points, decoders to auto."""
    attr = AttentionAttribution(tiny_llama)
    a = attr.attribute(TOKENS, target=TARGET, n_steps=20)
    b = attr.attribute(TOKENS, target=TARGET, n_steps=20, method="gausslegendre")
    assert torch.equal(a.attributions, b.attributions)
    assert a.n_steps == 20 and a.method == "gausslegendre" and a.steps is None and a.converged is None
    assert a.rtol is None and a.convergence_delta is None
    assert attr.attribute(TOKENS, target=TARGET, layers=[0]).n_steps == "auto"
    bert = next(iter(tiny_bert_models.values()))
    b_tokens = torch.tensor([[1, 5, 6, 7, 2]])
    head = torch.nn.Linear(get_backend(bert).d_model, 2)
    from at2_lens.attattr import PooledOutput

    enc = AttentionAttribution(bert, PooledOutput(lambda h: head(h).softmax(-1))).attribute(b_tokens, layers=[0])
    assert enc.n_steps == 20 and enc.method == "gausslegendre" and enc.steps is None


def test_auto_result_saves_and_loads(tiny_llama: Any, tmp_path: Path) -> None:
    res = AttentionAttribution(tiny_llama, wavy).attribute(TOKENS, layers=[0, 1], n_steps="auto", rtol=1e-4,
                                                          atol=0.0, max_steps=65)
    back = AttAttrResult.load(res.save(tmp_path / "auto.safetensors"))
    assert back.n_steps == "auto" and back.method == "clenshaw_curtis"
    assert (back.rtol, back.atol, back.max_steps) == (1e-4, 0.0, 65)
    assert back.steps is not None and res.steps is not None and torch.equal(back.steps, res.steps)
    assert back.converged is not None and res.converged is not None and torch.equal(back.converged, res.converged)
    assert torch.equal(back.attributions, res.attributions)
    assert back.convergence_delta is not None and res.convergence_delta is not None
    assert torch.equal(back.convergence_delta, res.convergence_delta)
    fixed = AttentionAttribution(tiny_llama).attribute(TOKENS, target=TARGET, layers=[0], n_steps=8)
    again = AttAttrResult.load(fixed.save(tmp_path / "fixed.safetensors"))
    assert again.n_steps == 8 and again.steps is None and again.rtol is None


# ---------------------------------------------------------------------------------------------- the rules alone
@pytest.mark.parametrize("method", quadrature.RULES)
def test_rules_integrate_smooth_functions(method: str) -> None:
    exact = (math.exp(3.0) - 1.0) / 3.0
    errors = []
    for rule in quadrature.family(method, 300):
        assert math.isclose(sum(rule.weights), 1.0, rel_tol=1e-12)
        assert all(0.0 <= a <= 1.0 for a in rule.alphas)
        errors.append(abs(sum(w * math.exp(3.0 * a) for a, w in zip(rule.alphas, rule.weights, strict=True)) - exact))
    assert errors[0] > 1e-7 and min(errors) < 1e-12


@pytest.mark.parametrize("method", ["clenshaw_curtis", "romberg"])
def test_nested_families_contain_their_smaller_rules(method: str) -> None:
    rules = list(quadrature.family(method, 300))
    for small, big in itertools.pairwise(rules):
        assert set(small.keys) <= set(big.keys)
        position = dict(zip(big.keys, big.alphas, strict=True))
        assert all(position[k] == pytest.approx(a, abs=1e-15) for k, a in zip(small.keys, small.alphas, strict=True))
    assert quadrature.max_cost(method, 300) == rules[-1].size == 257
    assert quadrature.max_cost("gausslegendre", 300) == 4 + 8 + 16 + 32 + 64 + 128


def test_gauss_legendre_rule_is_captums() -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    rule = quadrature.gauss_legendre(20)
    assert list(rule.alphas) == pytest.approx(alphas(20), abs=1e-12)
    assert list(rule.weights) == pytest.approx(step_sizes(20), abs=1e-12)


def test_warning_free_when_converged(tiny_llama: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionAttribution(tiny_llama).attribute(TOKENS, target=TARGET, layers=[0], n_steps="auto")
