"""Dense reference MoE: every expert on every token, masked by the routing.

Slow and memory-hungry on purpose (no dispatch, no sorting, no grouped GEMM):
the yardstick the tests hold the real layer to.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wideep_jax.experts import shared_experts, swiglu
from wideep_jax.moe import MoEWeights, _on_host
from wideep_jax.routing import Routing, route
from wideep_jax.spec import MoESpec


def expert_weights(weights: MoEWeights, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-expert [E, ...] weights from slot weights (first replica of each expert).

    An expert that ``weights.slot_to_expert`` gives no slot is refused where the table
    is concrete; under jit it cannot be, and such an expert reads slot 0's weights.
    """
    table = weights.slot_to_expert
    if _on_host(table):
        missing = sorted(set(range(num_experts)) - set(np.asarray(table).ravel().tolist()))
        if missing:  # argmax of an all-False row is 0: slot 0's weights, silently
            raise ValueError(f"weights.slot_to_expert gives experts {missing[:8]} no slot; "
                             f"allowed: every expert in [0, {num_experts}) in >= 1 slot")
    first_slot = jnp.argmax(weights.slot_to_expert[None, :] == jnp.arange(num_experts)[:, None], axis=1)
    return weights.w_gate_up[first_slot], weights.w_down[first_slot]


def dense_moe_reference(x: jax.Array, weights: MoEWeights, spec: MoESpec, *,
                        routing: Routing | None = None, token_mask: jax.Array | None = None) -> jax.Array:
    """The MoE layer's output computed densely in float32."""
    x32 = x.astype(jnp.float32)
    if token_mask is not None:
        # Masked-out rows are not routed: zeroed, as the layer does, so whatever they hold
        # (NaN, inf) reaches no gradient.
        x32 = jnp.where(token_mask[:, None], x32, 0.0)
    if routing is None:
        logits = x32 @ weights.router.astype(jnp.float32)
        routing = route(logits, spec.top_k, spec.router, correction_bias=weights.correction_bias)
    if token_mask is not None:
        # Nor are their routing weights used (a caller's may be NaN, with ids of -1): 0 * NaN
        # would reach the expert weights' gradients.
        routing = Routing(routing.ids, jnp.where(token_mask[:, None], routing.weights, 0.0))
    w_gate_up, w_down = (w.astype(jnp.float32) for w in expert_weights(weights, spec.num_experts))

    def every_expert(tokens):  # [T, H] -> [E, T, H]: each expert's SwiGLU output for every token
        hidden = jnp.einsum("th,ehf->etf", tokens, w_gate_up)
        return jnp.einsum("etf,efh->eth", swiglu(hidden, jnp.float32), w_down)

    if spec.apply_router_weight_on_input:
        # Each (token, k) pair feeds its expert x * weight; pairs are summed unweighted.
        y = jnp.zeros_like(x32)
        for k in range(routing.ids.shape[1]):
            out = every_expert(x32 * routing.weights[:, k, None].astype(jnp.float32))
            y = y + jnp.take_along_axis(out, routing.ids[None, :, k, None], axis=0)[0]
    else:
        combine = jnp.zeros((x.shape[0], spec.num_experts), jnp.float32)
        combine = combine.at[jnp.arange(x.shape[0])[:, None], routing.ids].add(routing.weights)
        y = jnp.einsum("te,eth->th", combine, every_expert(x32))
    if weights.shared_gate_up is not None:
        y = y + shared_experts(x32, weights.shared_gate_up.astype(jnp.float32),
                               weights.shared_down.astype(jnp.float32))
    if token_mask is not None:
        y = jnp.where(token_mask[:, None], y, 0.0)
    return y
