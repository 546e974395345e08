"""Shared builders for the MoE layer tests."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wideep_jax import MoELayer, MoESpec, RouterSpec, load_moe_config
from wideep_jax.routing import Routing


def make_mesh(ep: int):
    return jax.make_mesh((ep,), ("ep",), devices=jax.devices()[:ep])


def make_spec(*, kind="softmax", experts=16, top_k=2, hidden=32, inter=16, shared=0,
              dtype=jnp.float32, on_input=False, **router) -> MoESpec:
    if kind == "noaux_tc":
        router = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5) | router
    if kind == "llama4":
        router = dict(norm_topk_prob=False) | router
    return MoESpec(hidden_size=hidden, intermediate_size=inter, num_experts=experts, top_k=top_k,
                   router=RouterSpec(kind=kind, **router), num_shared_experts=shared,
                   dtype=dtype, param_dtype=dtype, apply_router_weight_on_input=on_input)


def make_layer(spec: MoESpec, *, backend="WIDEEP", ep=4, seed=0, layer_idx=None, **cfg) -> MoELayer:
    config = load_moe_config({"backend": backend, **cfg}, num_experts=spec.num_experts,
                             ep_size=ep if backend == "WIDEEP" else None)
    mesh = make_mesh(ep) if (backend == "WIDEEP" or ep > 1) else None
    layer = MoELayer(spec, config, mesh=mesh, layer_idx=layer_idx, rngs=nnx.Rngs(seed))
    if spec.router.kind == "noaux_tc":
        # A non-zero correction bias, so selection and weights differ.
        bias = jax.random.normal(jax.random.key(seed + 7), (spec.num_experts,)) * 0.1
        layer.correction_bias[...] = jax.device_put(bias, layer.correction_bias[...].sharding)
    return layer


def unsharded(tree):
    """Plain single-device copies (the dense reference knows nothing of meshes)."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


def random_tokens(rng: np.random.Generator, num_tokens: int, hidden: int, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal((num_tokens, hidden)), dtype)


def random_routing(rng: np.random.Generator, num_tokens: int, num_experts: int, top_k: int,
                   *, experts=None) -> Routing:
    """Distinct experts per token, drawn from ``experts`` (default all)."""
    pool = np.arange(num_experts) if experts is None else np.asarray(experts)
    ids = np.stack([rng.choice(pool, top_k, replace=False) for _ in range(num_tokens)])
    weights = rng.uniform(0.1, 1.0, (num_tokens, top_k)).astype(np.float32)
    return Routing(jnp.asarray(ids, jnp.int32), jnp.asarray(weights))


@nnx.jit
def run_layer(layer: MoELayer, x, token_mask=None, routing=None):
    return layer(x, token_mask=token_mask, routing=routing)


def assert_close(actual, expected, rtol=1e-5):
    """Relative error of the whole array (norm-wise), NaN never passes."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite output"
    err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@contextlib.contextmanager
def count_compiles(event: str = "/jax/core/compile/backend_compile_duration"):
    """Counts XLA backend compilations inside the block: ``with count_compiles() as n: ...; n[0]``.

    ``event``: another of jax's compile-stage events, e.g. :data:`TRACE_EVENT`."""
    from jax._src import monitoring
    count = [0]

    def listener(name, duration, **kwargs):
        if name == event:
            count[0] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        monitoring.unregister_event_duration_listener(listener)


# A function traced to a jaxpr: a jit cache miss, even where XLA reuses a compiled program.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
