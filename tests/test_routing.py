"""Routers vs. small, independent NumPy references.

The references work per token in float64 (on the float32-cast logits) and break
ties with a stable argsort of the negated values, i.e. lower index first.
Random rows whose deciding values are *nearly* (but not exactly) tied are redrawn:
there the float32 kernel and the float64 reference may legitimately order them
differently. Exact ties (duplicated values) are kept; they must match exactly.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wideep_jax.routing import Routing, RouterSpec, llama4_topk, noaux_tc_topk, route, softmax_topk

RTOL = 1e-6  # float32 tolerance for weights
GAP = 2e-6  # rows with a non-zero gap below this between deciding values are redrawn
T = 32

RowRef = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]]


# ----------------------------------------------------------------------------- references


def _desc(values: np.ndarray) -> np.ndarray:
    """Indices sorting ``values`` high to low, lower index first on ties."""
    return np.argsort(-values, kind="stable")


def _min_gap(values_desc: np.ndarray, *, relative: bool) -> float:
    """Smallest non-zero gap between consecutive finite values (sorted high to low)."""
    v = values_desc[np.isfinite(values_desc)]
    gaps = v[:-1] - v[1:]
    if relative:
        gaps = gaps / np.maximum(np.abs(v[:-1]), 1e-300)
    gaps = gaps[gaps != 0]
    return float(gaps.min()) if gaps.size else np.inf


def ref_softmax_row(x: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray, float]:
    x = x.astype(np.float32).astype(np.float64)
    e = np.exp(x - x.max())
    p = e / e.sum()
    order = _desc(p)
    ids = order[:k]
    w = p[ids]
    if norm:
        w = w / w.sum()
    # Deciding values: the order of the top k and the k-th/(k+1)-th boundary.
    return ids, w, _min_gap(p[order[: k + 1]], relative=True)


def ref_noaux_row(
    x: np.ndarray,
    k: int,
    bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm: bool = True,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    x = x.astype(np.float32).astype(np.float64)
    e = x.size
    s = 1.0 / (1.0 + np.exp(-x))
    c = s + (0.0 if bias is None else bias.astype(np.float32).astype(np.float64))
    gap = np.inf
    if n_group > 1:
        size = e // n_group
        group_score = np.array([np.sort(c[g * size : (g + 1) * size])[-2:].sum() for g in range(n_group)])
        g_order = _desc(group_score)
        masked = np.full(e, -np.inf)
        for g in g_order[:topk_group]:
            masked[g * size : (g + 1) * size] = c[g * size : (g + 1) * size]
        c = masked
        gap = _min_gap(group_score[g_order[: topk_group + 1]], relative=False)
    order = _desc(c)
    ids = order[:k]
    w = s[ids]
    if norm:
        w = w / (w.sum() + 1e-20)
    w = w * scale
    return ids, w, min(gap, _min_gap(c[order[: k + 1]], relative=False))


def ref_llama4_row(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Hugging Face's Llama4Router: top-k of the logits, sigmoid of the chosen ones."""
    x = x.astype(np.float32).astype(np.float64)
    order = _desc(x)
    ids = order[:k]
    return ids, 1.0 / (1.0 + np.exp(-x[ids])), _min_gap(x[order[: k + 1]], relative=False)


def _draw(rng: np.random.Generator, ref: RowRef, sample: Callable[[], np.ndarray], t: int = T) -> np.ndarray:
    """``t`` rows from ``sample()``, redrawing rows with near-ties (see module doc)."""
    rows = []
    for _ in range(50 * t):
        row = sample()
        if ref(row)[2] > GAP:
            rows.append(row)
            if len(rows) == t:
                return np.stack(rows)
    raise AssertionError("could not draw rows without near-ties; check the sampler")


def _reference(ref: RowRef, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = [ref(row) for row in np.asarray(logits, dtype=np.float32)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def _check(got: Routing, ref: RowRef, logits: np.ndarray) -> None:
    ids, w = _reference(ref, logits)
    assert got.ids.dtype == jnp.int32 and got.weights.dtype == jnp.float32
    assert got.ids.shape == got.weights.shape == ids.shape
    np.testing.assert_array_equal(np.asarray(got.ids), ids)
    np.testing.assert_allclose(np.asarray(got.weights), w, rtol=RTOL, atol=0)


def _normal(rng: np.random.Generator, e: int, std: float = 2.0) -> Callable[[], np.ndarray]:
    return lambda: (std * rng.standard_normal(e)).astype(np.float32)


def _grid(rng: np.random.Generator, e: int, levels: int = 9) -> Callable[[], np.ndarray]:
    """Few distinct values, so rows are full of exact ties. The 0.25 offset keeps the
    grid asymmetric: sigmoid(a) + sigmoid(-a) == 1 would make different groups'
    top-2 sums tie in exact math yet not in floating point."""
    return lambda: ((rng.integers(0, levels, e) - levels // 2 + 0.25) / 4).astype(np.float32)


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("e,k", [(8, 2), (64, 1), (64, 6), (256, 8), (16, 16)])
def test_softmax_matches_reference(rng, e, k, norm):
    ref = lambda r: ref_softmax_row(r, k, norm)  # noqa: E731
    logits = _draw(rng, ref, _normal(rng, e))
    _check(softmax_topk(jnp.asarray(logits), k, norm_topk_prob=norm), ref, logits)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("e,k", [(8, 3), (64, 8), (64, 64)])
def test_softmax_ties(rng, e, k, norm):
    ref = lambda r: ref_softmax_row(r, k, norm)  # noqa: E731
    logits = _draw(rng, ref, _grid(rng, e, levels=5))
    logits[0] = 0.5  # one row all tied: must give ids 0..k-1
    _check(softmax_topk(jnp.asarray(logits), k, norm_topk_prob=norm), ref, logits)
    # The sampler must actually produce a tie across the k-th boundary.
    if k < e:
        desc = np.sort(logits, axis=-1)[:, ::-1]
        assert np.any(desc[1:, k - 1] == desc[1:, k])


def test_softmax_tie_at_boundary_explicit():
    got = softmax_topk(jnp.array([[1.0, 2.0, 3.0, 2.0, 2.0, 0.0]]), 3)
    np.testing.assert_array_equal(np.asarray(got.ids), [[2, 1, 3]])
    np.testing.assert_allclose(float(got.weights.sum()), 1.0, rtol=RTOL)


def test_softmax_top_k_equals_e_is_sorted_permutation(rng):
    logits = rng.standard_normal((T, 32)).astype(np.float32)
    got = softmax_topk(jnp.asarray(logits), 32, norm_topk_prob=False)
    np.testing.assert_array_equal(np.sort(np.asarray(got.ids), axis=-1), np.broadcast_to(np.arange(32), (T, 32)))
    w = np.asarray(got.weights)
    assert np.all(np.diff(w, axis=-1) <= 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- noaux_tc

NOAUX_CASES = [
    # e, k, n_group, topk_group
    (16, 4, 1, 1),
    (64, 1, 1, 1),
    (64, 6, 8, 4),
    (64, 1, 8, 4),
    (64, 32, 8, 4),  # k == every expert of the kept groups
    (256, 8, 8, 4),
    (256, 16, 8, 8),  # all groups kept: same as n_group == 1
    (32, 4, 16, 3),  # groups of 2
]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("e,k,n_group,topk_group", NOAUX_CASES)
def test_noaux_matches_reference(rng, e, k, n_group, topk_group, use_bias, norm):
    bias = (0.1 * rng.standard_normal(e)).astype(np.float32) if use_bias else None
    scale = float(rng.uniform(0.5, 3.0))
    kw = dict(n_group=n_group, topk_group=topk_group, norm=norm, scale=scale)
    ref = lambda r: ref_noaux_row(r, k, bias, **kw)  # noqa: E731
    logits = _draw(rng, ref, _normal(rng, e))
    got = noaux_tc_topk(
        jnp.asarray(logits),
        k,
        correction_bias=None if bias is None else jnp.asarray(bias),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    _check(got, ref, logits)


def test_noaux_deepseek_v3_dims(rng):
    e, k, n_group, topk_group, scale = 256, 8, 8, 4, 2.5
    bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
    ref = lambda r: ref_noaux_row(r, k, bias, n_group, topk_group, True, scale)  # noqa: E731
    logits = _draw(rng, ref, _normal(rng, e), t=64)
    spec = RouterSpec(kind="noaux_tc", n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale)
    got = route(jnp.asarray(logits), k, spec, correction_bias=jnp.asarray(bias))
    _check(got, ref, logits)
    np.testing.assert_allclose(np.asarray(got.weights).sum(-1), scale, rtol=1e-5)
    groups = np.asarray(got.ids) // (e // n_group)
    assert all(len(set(row)) <= topk_group for row in groups)


@pytest.mark.parametrize("e,k,n_group,topk_group", [(8, 2, 4, 1), (64, 8, 8, 4), (256, 8, 8, 4), (64, 32, 8, 4)])
def test_noaux_ties(rng, e, k, n_group, topk_group):
    """Grid logits tie scores and group scores, at the k-th and topk_group-th boundaries."""
    ref = lambda r: ref_noaux_row(r, k, None, n_group, topk_group)  # noqa: E731
    sample = _grid(rng, e, levels=5)
    size = e // n_group

    def tied_groups() -> np.ndarray:
        # Every group is a shuffle of the same values: all group scores tie exactly.
        base = sample()[:size]
        return np.concatenate([rng.permutation(base) for _ in range(n_group)])

    logits = np.concatenate([_draw(rng, ref, sample), _draw(rng, ref, tied_groups, t=8)])
    logits[0] = 0.25  # everything tied: the first topk_group groups, then lowest ids
    got = noaux_tc_topk(jnp.asarray(logits), k, n_group=n_group, topk_group=topk_group)
    _check(got, ref, logits)
    np.testing.assert_array_equal(np.asarray(got.ids[0]), np.arange(k))


def test_noaux_tied_groups_keep_lower_group_explicit():
    # Groups of 2: group scores 1.0, 1.5, 1.0, 1.5 (sigmoid(0) = 0.5, sigmoid(big) ~ 1).
    # topk_group=1 keeps group 1 (lower of the tied 1 and 3).
    big = 30.0
    logits = jnp.array([[0.0, 0.0, big, 0.0, 0.0, 0.0, 0.0, big]])
    got = noaux_tc_topk(logits, 2, n_group=4, topk_group=1, norm_topk_prob=False)
    np.testing.assert_array_equal(np.asarray(got.ids), [[2, 3]])


def test_noaux_bias_changes_selection_not_weights(rng):
    e, k, n_group, topk_group = 64, 6, 8, 4
    logits = jnp.asarray(rng.standard_normal((T, e)).astype(np.float32))
    bias = np.zeros(e, np.float32)
    bias[rng.choice(e, 8, replace=False)] = 1.0  # large enough to win selection
    kw = dict(n_group=n_group, topk_group=topk_group, norm_topk_prob=False)
    plain = noaux_tc_topk(logits, k, **kw)
    biased = noaux_tc_topk(logits, k, correction_bias=jnp.asarray(bias), **kw)
    assert np.any(np.asarray(plain.ids) != np.asarray(biased.ids))
    scores = np.asarray(jax.nn.sigmoid(logits))
    np.testing.assert_array_equal(np.asarray(biased.weights), np.take_along_axis(scores, np.asarray(biased.ids), -1))
    # And with renormalisation the weights are the unbiased scores over their sum.
    normed = noaux_tc_topk(logits, k, correction_bias=jnp.asarray(bias), n_group=n_group, topk_group=topk_group)
    np.testing.assert_array_equal(np.asarray(normed.ids), np.asarray(biased.ids))
    w = np.asarray(biased.weights, np.float64)
    np.testing.assert_allclose(np.asarray(normed.weights), w / w.sum(-1, keepdims=True), rtol=RTOL)


def test_noaux_negative_choice_never_picks_dropped_group(rng):
    """-inf masking (DeepSeek reference): HF's 0.0 fill would pick dropped experts here."""
    e, k, n_group, topk_group = 64, 8, 8, 2
    bias = np.full(e, -2.0, np.float32)  # every biased choice is negative
    ref = lambda r: ref_noaux_row(r, k, bias, n_group, topk_group)  # noqa: E731
    logits = _draw(rng, ref, _normal(rng, e))
    got = noaux_tc_topk(
        jnp.asarray(logits), k, correction_bias=jnp.asarray(bias), n_group=n_group, topk_group=topk_group
    )
    _check(got, ref, logits)
    groups = np.asarray(got.ids) // (e // n_group)
    assert all(len(set(row)) <= topk_group for row in groups)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 4)])
def test_noaux_top_k_equals_e(rng, n_group, topk_group):
    e = 32
    ref = lambda r: ref_noaux_row(r, e, None, n_group, topk_group, False)  # noqa: E731
    logits = _draw(rng, ref, _normal(rng, e))
    got = noaux_tc_topk(jnp.asarray(logits), e, n_group=n_group, topk_group=topk_group, norm_topk_prob=False)
    _check(got, ref, logits)
    np.testing.assert_array_equal(np.sort(np.asarray(got.ids), -1), np.broadcast_to(np.arange(e), (T, e)))


# ----------------------------------------------------------------------------- llama4


@pytest.mark.parametrize("e,k", [(16, 1), (128, 1), (16, 4), (8, 8)])
def test_llama4_matches_reference(rng, e, k):
    ref = lambda r: ref_llama4_row(r, k)  # noqa: E731
    for sample in (_normal(rng, e), _grid(rng, e)):
        logits = _draw(rng, ref, sample)
        _check(llama4_topk(jnp.asarray(logits), k), ref, logits)


def test_llama4_selects_on_logits_where_the_sigmoid_saturates():
    """sigmoid(30) == sigmoid(40) == 1 in float32: selecting on the sigmoid would tie and
    take expert 0; the larger logit must win, and the weight stays 1."""
    logits = jnp.asarray([[30.0, 40.0, -3.0, 0.0], [-50.0, -60.0, -70.0, -40.0]])
    got = llama4_topk(logits, 1)
    np.testing.assert_array_equal(np.asarray(got.ids), [[1], [3]])
    np.testing.assert_allclose(np.asarray(got.weights), [[1.0], [1.0 / (1.0 + np.exp(40.0))]], rtol=1e-6)


def test_llama4_rejects_renormalisation_and_group_knobs():
    with pytest.raises(ValueError, match=re.escape("norm_topk_prob=True")):
        RouterSpec(kind="llama4").validate(num_experts=16, top_k=1)
    with pytest.raises(ValueError, match=re.escape("n_group=2")):
        RouterSpec(kind="llama4", norm_topk_prob=False, n_group=2).validate(num_experts=16, top_k=1)
    with pytest.raises(ValueError, match="correction_bias: only kind='noaux_tc'.*kind='llama4'"):
        route(jnp.zeros((2, 8)), 1, RouterSpec(kind="llama4", norm_topk_prob=False), correction_bias=jnp.zeros(8))


# ----------------------------------------------------------------------------- dtype, dispatch, jit

SPECS = [
    RouterSpec(),
    RouterSpec(norm_topk_prob=False),
    RouterSpec(kind="noaux_tc", n_group=8, topk_group=4, routed_scaling_factor=2.5),
    RouterSpec(kind="noaux_tc", norm_topk_prob=False),
    RouterSpec(kind="llama4", norm_topk_prob=False),
]


def _ref_for(spec: RouterSpec, k: int, bias: np.ndarray | None) -> RowRef:
    if spec.kind == "softmax":
        return lambda r: ref_softmax_row(r, k, spec.norm_topk_prob)
    if spec.kind == "llama4":
        return lambda r: ref_llama4_row(r, k)
    return lambda r: ref_noaux_row(
        r, k, bias, spec.n_group, spec.topk_group, spec.norm_topk_prob, spec.routed_scaling_factor
    )


def _bias_for(rng: np.random.Generator, spec: RouterSpec, e: int) -> np.ndarray | None:
    return (0.1 * rng.standard_normal(e)).astype(np.float32) if spec.kind == "noaux_tc" else None


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_logits(rng, spec):
    e, k = 64, 6
    bias = _bias_for(rng, spec, e)
    ref = _ref_for(spec, k, bias)
    to_bf16 = lambda: np.asarray(jnp.asarray(_normal(rng, e)(), jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    logits = _draw(rng, ref, to_bf16)  # bf16-representable values
    got = route(jnp.asarray(logits, jnp.bfloat16), k, spec, correction_bias=None if bias is None else jnp.asarray(bias))
    _check(got, ref, logits)


@pytest.mark.parametrize("spec", SPECS)
def test_route_dispatch(rng, spec):
    e, k = 64, 4
    logits = jnp.asarray(rng.standard_normal((T, e)).astype(np.float32))
    bias = _bias_for(rng, spec, e)
    got = route(logits, k, spec, correction_bias=None if bias is None else jnp.asarray(bias))
    if spec.kind == "softmax":
        want = softmax_topk(logits, k, norm_topk_prob=spec.norm_topk_prob)
    elif spec.kind == "llama4":
        want = llama4_topk(logits, k)
    else:
        want = noaux_tc_topk(
            logits,
            k,
            correction_bias=jnp.asarray(bias),
            n_group=spec.n_group,
            topk_group=spec.topk_group,
            norm_topk_prob=spec.norm_topk_prob,
            routed_scaling_factor=spec.routed_scaling_factor,
        )
    assert isinstance(got, Routing)
    np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(want.ids))
    np.testing.assert_array_equal(np.asarray(got.weights), np.asarray(want.weights))


def test_route_softmax_rejects_bias():
    with pytest.raises(ValueError, match="correction_bias"):
        route(jnp.zeros((2, 8)), 2, RouterSpec(), correction_bias=jnp.zeros(8))


def test_noaux_rejects_bad_bias_shape():
    with pytest.raises(ValueError, match=re.escape("correction_bias.shape=(4,)")):
        noaux_tc_topk(jnp.zeros((2, 8)), 2, correction_bias=jnp.zeros(4))


@pytest.mark.parametrize("spec", SPECS)
def test_jit_and_vmap_match(rng, spec):
    e, k = 64, 6
    bias = _bias_for(rng, spec, e)
    ref = _ref_for(spec, k, bias)
    logits = _draw(rng, ref, _normal(rng, e))
    b = None if bias is None else jnp.asarray(bias)
    jitted = jax.jit(route, static_argnums=(1, 2))(jnp.asarray(logits), k, spec, correction_bias=b)
    _check(jitted, ref, logits)
    eager = route(jnp.asarray(logits), k, spec, correction_bias=b)
    np.testing.assert_array_equal(np.asarray(jitted.ids), np.asarray(eager.ids))
    np.testing.assert_allclose(np.asarray(jitted.weights), np.asarray(eager.weights), rtol=RTOL)
    # Per-token vmap (the router sees a single [E] row) and an extra leading batch dim.
    per_token = jax.jit(jax.vmap(lambda x: route(x, k, spec, correction_bias=b)))(jnp.asarray(logits))
    _check(per_token, ref, logits)
    batched = route(jnp.asarray(logits).reshape(4, T // 4, e), k, spec, correction_bias=b)
    np.testing.assert_array_equal(np.asarray(batched.ids).reshape(T, k), np.asarray(eager.ids))


# ----------------------------------------------------------------------------- validate

VALIDATE_ERRORS = [
    # spec kwargs, num_experts, top_k, fragments the message must contain
    (dict(kind="sigmoid"), 8, 2, ["kind='sigmoid'", "noaux_tc"]),
    (dict(), 0, 1, ["num_experts=0"]),
    (dict(), 8, 0, ["top_k=0", "1 <= top_k <= num_experts (8)"]),
    (dict(), 8, 9, ["top_k=9", "1 <= top_k <= num_experts (8)"]),
    (dict(kind="noaux_tc", n_group=0), 8, 2, ["n_group=0", ">= 1"]),
    (dict(kind="noaux_tc", n_group=3, topk_group=1), 8, 2, ["n_group=3", "divide num_experts (8)"]),
    (dict(kind="noaux_tc", n_group=4, topk_group=0), 8, 2, ["topk_group=0", "1 <= topk_group <= n_group (4)"]),
    (dict(kind="noaux_tc", n_group=4, topk_group=5), 8, 2, ["topk_group=5", "1 <= topk_group <= n_group (4)"]),
    (dict(kind="noaux_tc", n_group=8, topk_group=4), 8, 2, ["n_group=8", ">= 2 experts per group"]),
    (dict(kind="noaux_tc", n_group=8, topk_group=4), 64, 33, ["top_k=33", "topk_group * (num_experts // n_group)"]),
    (dict(kind="noaux_tc", routed_scaling_factor=0.0), 8, 2, ["routed_scaling_factor=0.0", "> 0"]),
    (dict(kind="noaux_tc", routed_scaling_factor=-2.5), 8, 2, ["routed_scaling_factor=-2.5", "> 0"]),
    (dict(kind="noaux_tc", routed_scaling_factor=float("nan")), 8, 2, ["routed_scaling_factor=nan", "finite"]),
    (dict(n_group=2), 8, 2, ["n_group=2", "kind='noaux_tc'"]),
    (dict(topk_group=2, n_group=1), 8, 2, ["topk_group=2", "1 <= topk_group <= n_group (1)"]),
    (dict(routed_scaling_factor=2.5), 8, 2, ["routed_scaling_factor=2.5", "kind='noaux_tc'"]),
    (dict(kind="llama4"), 8, 1, ["norm_topk_prob=True", "must be False"]),
    (dict(kind="llama4", norm_topk_prob=False, topk_group=2, n_group=2), 8, 1, ["n_group=2", "kind='llama4'"]),
    (dict(kind="llama4", norm_topk_prob=False, routed_scaling_factor=2.0), 8, 1,
     ["routed_scaling_factor=2.0", "kind='llama4'"]),
]


@pytest.mark.parametrize("kwargs,num_experts,top_k,fragments", VALIDATE_ERRORS)
def test_validate_errors(kwargs, num_experts, top_k, fragments):
    spec = RouterSpec(**kwargs)
    with pytest.raises(ValueError) as err:
        spec.validate(num_experts=num_experts, top_k=top_k)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    field = fragments[0].split("=")[0]
    with pytest.raises(ValueError, match=re.escape(fragments[0])):
        spec.validate(num_experts=num_experts, top_k=top_k)
    if field != "num_experts":
        # route() validates at trace time, also under jit.
        logits = jnp.zeros((2, max(num_experts, 1)))
        with pytest.raises(ValueError, match=re.escape(fragments[0])):
            jax.jit(route, static_argnums=(1, 2))(logits, top_k, spec)


@pytest.mark.parametrize(
    "spec,num_experts,top_k",
    [
        (RouterSpec(), 8, 8),
        (RouterSpec(kind="noaux_tc", n_group=8, topk_group=4, routed_scaling_factor=2.5), 256, 8),
        (RouterSpec(kind="noaux_tc", n_group=8, topk_group=4), 64, 32),
        (RouterSpec(kind="noaux_tc", n_group=4, topk_group=4), 8, 8),
        (RouterSpec(kind="llama4", norm_topk_prob=False), 128, 1),
    ],
)
def test_validate_accepts(spec, num_experts, top_k):
    spec.validate(num_experts=num_experts, top_k=top_k)


def test_is_int_is_one_helper_shared_with_generate():
    """The router's checks and generate's take ints by one rule (each module had a copy):
    Python and NumPy ints; bools (NumPy's too) and floats are not ints."""
    from wideep_jax import _checks, routing
    from wideep_jax.models import generate

    assert routing._is_int is _checks.is_int and generate._is_int is _checks.is_int
    assert all(map(_checks.is_int, (3, -1, np.int64(3), np.uint8(0))))
    assert not any(map(_checks.is_int, (True, np.bool_(True), 3.0, np.float32(3), "3", None)))
    with pytest.raises(ValueError, match=r"top_k=True: must be an int"):
        RouterSpec().validate(num_experts=4, top_k=True)
