"""`wideep_jax.forward_jit`: nnx.jit's results without handing the module's weights back."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_helpers import make_layer, make_spec, random_tokens
from wideep_jax import forward_jit


def test_moe_layer_forward_equals_nnx_jit_and_returns_only_the_outputs():
    spec = make_spec(kind="noaux_tc", experts=16, top_k=4)
    layer = make_layer(spec, ep=4, seed=int(np.random.default_rng().integers(1 << 30)))
    x = random_tokens(np.random.default_rng(), 32, spec.hidden_size)
    want_y, want_stats = nnx.jit(lambda m, x: m(x))(layer, x)
    forward = forward_jit(lambda m, x: m(x))
    y, stats = forward(layer, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))  # the same program: bit-equal
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), np.asarray(want_stats.expert_counts))
    # The compiled program's outputs are the function's only: no weight comes back (nnx.jit's
    # hand every Variable back, which XLA copies on every call).
    graphdef, state = nnx.split(layer)
    out_info = forward.jitted.lower(graphdef, state, x).out_info
    assert len(jax.tree.leaves(out_info)) == len(jax.tree.leaves((y, stats)))


def test_weights_replaced_between_calls_are_used_without_recompiling():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    x = jnp.asarray(np.random.default_rng().standard_normal((3, 8)), jnp.float32)
    forward = forward_jit(lambda m, x: m(x))
    first = np.asarray(forward(model, x))
    np.testing.assert_allclose(first, np.asarray(x @ model.kernel[...] + model.bias[...]), rtol=1e-6)
    model.kernel.set_value(model.kernel[...] * 2.0)  # what an online balancer does between steps
    second = np.asarray(forward(model, x))
    np.testing.assert_allclose(second - np.asarray(model.bias[...]), 2.0 * (first - np.asarray(model.bias[...])),
                               rtol=1e-5, atol=1e-6)
    assert forward.jitted._cache_size() == 1


def test_static_argnames_positional_or_keyword_and_donation():
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def step(m, x, cache, scale):
        assert isinstance(scale, float)  # static: a Python value, not a tracer
        return m(x) * scale, cache + 1.0

    forward = forward_jit(step, static_argnames="scale", donate_argnums=2)
    x, cache = jnp.ones((2, 4)), jnp.zeros((2, 4))
    y, cache2 = forward(model, x, cache, 2.0)
    np.testing.assert_allclose(np.asarray(y), 2.0 * np.asarray(model(x)), rtol=1e-6)
    assert cache.is_deleted()  # donated: updated in place
    y3, _ = forward(model, x, cache2, scale=3.0)
    np.testing.assert_allclose(np.asarray(y3), 3.0 * np.asarray(model(x)), rtol=1e-6)
    with pytest.raises(ValueError, match="donate_argnums=0.*positions >= 1"):
        forward_jit(step, donate_argnums=0)

    def keyword_only(m, x, *, scale):
        assert isinstance(scale, float)
        return m(x) * scale

    forward = forward_jit(keyword_only, static_argnames="scale")
    np.testing.assert_allclose(np.asarray(forward(model, x, scale=4.0)), 4.0 * np.asarray(model(x)), rtol=1e-6)


def test_bound_forward_sees_new_weights_after_refresh():
    model = nnx.Linear(6, 3, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    x = jnp.asarray(np.random.default_rng().standard_normal((2, 6)), jnp.float32)
    forward = forward_jit(lambda m, x: m(x))
    bound = forward.bind(model)
    before = np.asarray(bound(x))
    np.testing.assert_array_equal(before, np.asarray(forward(model, x)))
    model.bias.set_value(model.bias[...] + 1.0)
    bound.refresh()  # (flax 0.12's split state holds the Variables themselves, so it sees set_value anyway)
    np.testing.assert_allclose(np.asarray(bound(x)), before + 1.0, rtol=1e-6)
    assert forward.jitted._cache_size() == 1


def test_argument_errors_name_the_argument_in_fns_numbering():
    """Found in review: ``donate_argnums=True`` donated argument 1 without a word; None, 1.0
    or ``static_argnames=1`` gave "'...' object is not iterable"; a position past fn's
    arguments was reported by jax.jit one higher than the caller wrote it; naming the module
    parameter static gave jax's 'invalid argnames'."""
    def step(m, x, cache=None, *, scale=1.0):
        return m(x) * scale

    for bad in (True, None, 1.0, [1, True], "1"):
        with pytest.raises(ValueError, match=re.escape(f"forward_jit donate_argnums={bad!r}: allowed: positions >= 1")):
            forward_jit(step, donate_argnums=bad)
    with pytest.raises(ValueError, match=re.escape("forward_jit donate_argnums=3: fn(m, x, cache=None, *, scale=1.0) "
                                                   "has positional arguments 0..2 (0 the module); allowed: 1..2")):
        forward_jit(step, donate_argnums=3)
    with pytest.raises(ValueError, match=re.escape("forward_jit static_argnames=1: allowed: a parameter name")):
        forward_jit(step, static_argnames=1)
    with pytest.raises(ValueError, match=re.escape("forward_jit static_argnames='nope': fn(m, x, cache=None, *, "
                                                   "scale=1.0) has no such parameter; allowed: x, cache, scale")):
        forward_jit(step, static_argnames="nope")
    with pytest.raises(ValueError, match=re.escape("forward_jit static_argnames='m': that is fn's module parameter")):
        forward_jit(step, static_argnames=("scale", "m"))
    with pytest.raises(ValueError, match=re.escape("forward_jit fn=3: allowed: a callable")):
        forward_jit(3)
    forward_jit(lambda m, *args, **kwargs: m, static_argnames="anything", donate_argnums=5)  # *args / **kwargs take them
