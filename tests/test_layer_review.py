"""Review of the MoE layer's top: input checks that used to run silently or fail unnamed,
and the named-kernel dtype check against the experts' compute dtype."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_helpers import assert_close, make_layer, make_spec, random_tokens, run_layer, unsharded
from wideep_jax import MoELayer, MoESpec, moe_forward
from wideep_jax.reference import dense_moe_reference


def _call(layer, x, weights=None, **kw):
    w = layer.weights() if weights is None else weights
    return moe_forward(x, w, spec=kw.pop("spec", layer.spec), config=kw.pop("config", layer.config),
                       mesh=layer.mesh, **kw)


def test_float_slot_table_is_refused_not_truncated(rng):
    """A float slot_to_expert was cast to int32 inside: 2.7 ran expert 2, silently."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, ep=2)
    x = random_tokens(rng, 6, spec.hidden_size)
    w = layer.weights()
    table = w.slot_to_expert.astype(jnp.float32) + 0.5
    with pytest.raises(ValueError, match=r"weights.slot_to_expert has dtype float32; allowed: an integer dtype"):
        _call(layer, x, w._replace(slot_to_expert=table))


@pytest.mark.parametrize("name", ["w_down", "router"])
def test_integer_weights_are_refused_not_cast(rng, name):
    """int8 weights (say, quantized without their scales) were cast to float and run."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, ep=2)
    x = random_tokens(rng, 6, spec.hidden_size)
    w = layer.weights()
    bad = w._replace(**{name: getattr(w, name).astype(jnp.int8)})
    with pytest.raises(ValueError, match=rf"weights.{name} has dtype int8; allowed: a floating dtype"):
        _call(layer, x, bad)


def test_wrong_argument_types_are_named(rng):
    """A dict config, a plain tuple of weights, a list x or slot table failed with an
    AttributeError naming no argument."""
    spec = make_spec(experts=8)
    layer = make_layer(spec, backend="CUTLASS", ep=1)
    x = random_tokens(rng, 4, spec.hidden_size)
    with pytest.raises(TypeError, match=r"MoELayer config: got dict; allowed: a MoEConfig"):
        MoELayer(spec, {"backend": "CUTLASS"}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"MoELayer spec: got dict; allowed: a MoESpec"):
        MoELayer({"hidden_size": 32}, None, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"config: got NoneType; allowed: a MoEConfig"):
        _call(layer, x, config=None)
    with pytest.raises(TypeError, match=r"spec: got dict; allowed: a MoESpec"):
        _call(layer, x, spec={})
    with pytest.raises(TypeError, match=r"weights: got tuple; allowed: a MoEWeights"):
        _call(layer, x, tuple(layer.weights()))
    with pytest.raises(TypeError, match=r"weights.slot_to_expert: got list; allowed: an array"):
        _call(layer, x, layer.weights()._replace(slot_to_expert=list(range(8))))
    # A list x is taken as its array, like a list token_mask.
    y, _ = _call(layer, np.asarray(x).tolist())
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_call(layer, x)[0]))
    with pytest.raises(TypeError, match=r"x: got str; allowed: a float \[tokens, hidden_size\] array"):
        _call(layer, "tokens")


def test_spec_dtype_none_is_refused():
    """dtype=None read as NumPy's float64 and was stored as None (Flax's None means
    'infer from the input', which this layer does not do)."""
    for name in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=rf"MoESpec.{name}=None: allowed: a floating dtype"):
            MoESpec(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, **{name: None})


def test_named_kernel_dtype_check_reads_the_compute_dtype(rng):
    """The experts compute in MoESpec.dtype (x and weights are cast to it): the named-kernel
    check read x's dtype instead, refusing bf16 compute fed float32 tokens (the README's
    example: a bf16 preset and jax.random.normal's float32 x) and letting float32 compute
    through to the kernel when x was bf16."""
    bf16 = make_spec(experts=8, top_k=2, dtype=jnp.bfloat16)  # widths 32 / 16: triton's multiples of 16
    layer = make_layer(bf16, ep=2, expert_kernel="triton")  # on CPU the kernel runs interpreted
    x = random_tokens(rng, 8, bf16.hidden_size)  # float32 tokens
    y, _ = run_layer(layer, x)
    assert y.dtype == jnp.float32
    assert_close(y, dense_moe_reference(x, unsharded(layer.weights()), bf16), rtol=2e-2)
    f32 = make_spec(experts=8, top_k=2, dtype=jnp.float32)
    layer = make_layer(f32, ep=2, expert_kernel="triton")
    with pytest.raises(ValueError, match=r"expert_kernel='triton' takes bfloat16 or float16 operands, got "
                                         r"MoESpec.dtype=float32"):
        run_layer(layer, x.astype(jnp.bfloat16))



def test_alltoall_env_change_between_eager_calls_takes_effect(rng, monkeypatch):
    """$WIDEEP_ALLTOALL is read when the program is traced; called eagerly, the layer keeps
    one compiled program per setup, so the variable is part of that key: set between two
    calls of the same shape it took effect only for new shapes (found in review)."""
    monkeypatch.delenv("WIDEEP_ALLTOALL", raising=False)
    layer = make_layer(make_spec())
    x = random_tokens(rng, 8, 32)
    y, _ = layer(x)
    monkeypatch.setenv("WIDEEP_ALLTOALL", "bogus")
    with pytest.raises(ValueError, match="WIDEEP_ALLTOALL='bogus' is not a communication backend"):
        layer(x)
    monkeypatch.setenv("WIDEEP_ALLTOALL", "xla")
    np.testing.assert_array_equal(np.asarray(layer(x)[0]), np.asarray(y))
