"""Expert compute on received rows: expand, sort by slot, grouped SwiGLU, reduce.

Input is a set of token rows, each with up to ``K`` (local slot, weight) pairs
(``slot == -1``: no pair). Each pair becomes one row, rows are sorted by slot,
the two grouped GEMMs run on the sorted rows, and each token's rows are summed
back with their weights into one partial sum per token.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul, grouped_swiglu
from pallas_kernels import triton_backend
from pallas_kernels import permute as permute_kernels
from wideep_jax.dispatch import check_pairs


class ExpertOutput(NamedTuple):
    partial: jax.Array  # [N, H] weighted sum over the token's local pairs
    group_sizes: jax.Array  # int32 [S_local] rows computed per local slot


def swiglu(gate_up: jax.Array, dtype) -> jax.Array:
    """SiLU(gate) * up on ``[..., 2I]`` laid out as gate | up, in float32."""
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(dtype)


class PairOrder(NamedTuple):
    """Where each (token, k) pair goes in slot-sorted order, and back."""

    row_token: jax.Array  # int32 [N*K] source token row of each sorted row
    row_weight: jax.Array  # float32 [N*K] routing weight of each sorted row
    position: jax.Array  # int32 [N, K] sorted row of each pair
    pair_valid: jax.Array  # bool [N, K] pairs that are computed
    group_sizes: jax.Array  # int32 [S] sorted rows per slot (padding rows last)


# Up to this many (pair, key) cells a counting sort (one-hot prefix sums) orders the
# pairs; beyond it a stable argsort, whose XLA sort is slow at decode-sized plans
# (sort_pairs at 8192 pairs on one H200: 68 µs with it, 33-46 without; RESULTS.md).
COUNTING_SORT_MAX_CELLS = 1 << 20


def stable_order(key: jax.Array, num_keys: int, *,
                 counting: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(order, position, sizes)`` of int32 ``key`` [P] in ``[0, num_keys)``, sorted stably.

    ``order[i]`` is the element at sorted place ``i``; ``position`` is its inverse;
    ``sizes`` [num_keys] counts each key. ``counting`` forces the counting sort (True)
    or argsort (False); None picks by size.
    """
    num = key.shape[0]
    if counting is None:
        counting = num * num_keys <= COUNTING_SORT_MAX_CELLS
    index = jnp.arange(num, dtype=jnp.int32)
    if not counting:
        order = jnp.argsort(key, stable=True).astype(jnp.int32)
        sizes = jnp.zeros((num_keys,), jnp.int32).at[key].add(1)
        return order, jnp.zeros((num,), jnp.int32).at[order].set(index, unique_indices=True), sizes
    onehot = (key[:, None] == jnp.arange(num_keys, dtype=key.dtype)[None, :]).astype(jnp.int32)
    before = jnp.cumsum(onehot, axis=0) - onehot  # same-key elements ahead of each one
    sizes = onehot.sum(axis=0)
    position = (jnp.cumsum(sizes) - sizes)[key] + jnp.take_along_axis(before, key[:, None], axis=1)[:, 0]
    return jnp.zeros((num,), jnp.int32).at[position].set(index, unique_indices=True), position, sizes


def sort_pairs(slot: jax.Array, weight: jax.Array, valid: jax.Array, num_slots: int) -> PairOrder:
    """Orders the live (token, k) pairs by slot; dead pairs go last, as padding."""
    valid = check_pairs(slot, weight, valid, names=("slot", "weight"), rows="rows")
    num_rows, top_k = slot.shape
    # One row per (token, k) pair: every pair may be live (a caller's routing may
    # even repeat an expert), so nothing can be cut off whatever the routing.
    # A slot past the last is no slot, like -1 (under jit it cannot be refused; read, it
    # would compute a clamped row of another slot).
    pair_valid = valid[:, None] & (slot >= 0) & (slot < num_slots)
    key = jnp.where(pair_valid, slot, num_slots).reshape(-1)
    order, position, sizes = stable_order(key, num_slots + 1)
    return PairOrder(
        row_token=(order // top_k).astype(jnp.int32),
        row_weight=weight.reshape(-1)[order].astype(jnp.float32),
        position=position.reshape(num_rows, top_k),
        pair_valid=pair_valid,
        group_sizes=sizes[:num_slots],
    )


@jax.custom_vjp
def _pallas_gather(x: jax.Array, index: jax.Array) -> jax.Array:
    return permute_kernels.gather_rows(x, index)


def _pallas_gather_fwd(x, index):
    return _pallas_gather(x, index), (index, x.shape[0])


def _pallas_gather_bwd(residuals, dy):
    index, num_rows = residuals
    # Into the rows the forward read: the kernel clamps an index outside [0, N) (a bare
    # .at[index] would wrap a negative one onto the last rows and drop one >= N).
    index = jnp.clip(index, 0, max(num_rows - 1, 0))
    dx = jnp.zeros((num_rows, dy.shape[1]), jnp.float32).at[index].add(dy.astype(jnp.float32))
    return dx.astype(dy.dtype), None


_pallas_gather.defvjp(_pallas_gather_fwd, _pallas_gather_bwd)


def permute_rows(x: jax.Array, pairs: PairOrder, *, implementation: str | None = None) -> jax.Array:
    """[N*K, H] token rows in slot-sorted order (one copy per pair).

    ``implementation``: ``pallas`` (`pallas_kernels.permute.gather_rows`, GPU: 1.3-1.7x
    XLA's gather on H100 at 1k-16k tokens, benchmarks/RESULTS.md) or ``xla``;
    None picks ``pallas`` on GPU (where jax still has Pallas' Triton backend) and
    ``xla`` elsewhere.
    """
    if implementation is None:
        implementation = ("pallas" if jax.default_backend() == "gpu" and triton_backend.available()
                          else "xla")
    if implementation == "pallas":
        return _pallas_gather(x, pairs.row_token)
    if implementation != "xla":
        raise ValueError(f"permute_rows implementation must be 'pallas', 'xla' or None, got {implementation!r}")
    return x[pairs.row_token]


def combine_rows(out: jax.Array, pairs: PairOrder, dtype) -> jax.Array:
    """[N, H]: each token's sum over its valid pairs' rows of ``out`` (float32 sum).

    Rows of invalid pairs and padding rows are never selected (``where``, not a
    multiply, so their unspecified values, NaN included, cannot leak in).
    """
    return permute_kernels.combine_rows_reference(out, pairs.position, pairs.pair_valid, dtype)


def routed_experts(
    x: jax.Array,
    slot: jax.Array,
    weight: jax.Array,
    valid: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    gmm_implementation: str | None = None,
    weight_on_input: bool = False,
) -> ExpertOutput:
    """Runs the routed SwiGLU experts for ``N`` token rows.

    Args:
      x: [N, H] token rows.
      slot: int32 [N, K] local slot per pair, -1 = none (so is any value outside [0, S):
        not checked under jit; `MoELayer` never produces one).
      weight: float32 [N, K] routing weight per pair.
      valid: bool [N] rows that carry a token (others are ignored whatever
        their slots hold).
      w_gate_up: [S, H, 2I] gate and up projections side by side.
      w_down: [S, I, H].
      gmm_implementation: grouped-matmul implementation name (None = default).
      weight_on_input: scale each pair's input row by its weight (Llama 4) instead
        of its output row.

    Returns:
      Per-row partial sums (x.dtype) and rows per slot.
    """
    pairs = sort_pairs(slot, weight, valid, w_gate_up.shape[0])
    if x.ndim != 2 or x.shape[0] != slot.shape[0]:  # a short x would be read clamped
        raise ValueError(f"x has shape {tuple(x.shape)}; allowed: [{slot.shape[0]}, hidden]")
    rows = permute_rows(x, pairs)
    if weight_on_input:
        # SwiGLU is not linear: the weight must scale what enters the expert, per pair.
        rows = (rows.astype(jnp.float32) * pairs.row_weight[:, None]).astype(x.dtype)
    # Two kernel launches: gate/up with the SwiGLU epilogue, down scaled by the routing weight.
    act = grouped_swiglu(rows, w_gate_up.astype(x.dtype), pairs.group_sizes,
                         implementation=gmm_implementation)
    out = grouped_matmul(act, w_down.astype(x.dtype), pairs.group_sizes,
                         row_scale=None if weight_on_input else pairs.row_weight,
                         implementation=gmm_implementation)
    return ExpertOutput(combine_rows(out, pairs, x.dtype), pairs.group_sizes)


def shared_experts(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU MLP applied to every token (DeepSeek's shared experts)."""
    hidden = jnp.dot(x, w_gate_up.astype(x.dtype), preferred_element_type=jnp.float32)
    act = swiglu(hidden, x.dtype)
    return jnp.dot(act, w_down.astype(x.dtype), preferred_element_type=jnp.float32)
