"""MoE routers: turn router logits into (expert ids, combine weights).

Three families are supported:

* ``"softmax"``: Mixtral / Qwen3-MoE. Softmax over all experts, top-k, optional
  renormalisation of the k weights.
* ``"noaux_tc"``: DeepSeek-V3 ("no auxiliary loss, top-k with group limit").
  Sigmoid scores, a per-expert correction bias that only steers *selection*,
  group-limited selection, unbiased weights, optional renormalisation and a
  routed scaling factor.
* ``"llama4"``: Llama 4. Top-k of the raw logits, then a sigmoid of each chosen
  logit (TensorRT-LLM's ``Llama4`` routing method: top-k, then sigmoid); no
  renormalisation. Llama 4 also scales each expert's *input* by its weight, which
  is the layer's ``MoESpec.apply_router_weight_on_input``, not the router's.

All functions are pure, take logits ``[..., E]`` (``[T, E]`` in the model; any
float dtype), do their math in float32, and have static output shapes, so they
can be used under ``jax.jit`` / ``jax.vmap`` with no host syncs. Configuration
checks run in Python at trace time.

Output order: the k ids of a token are sorted by selection value, highest first;
equal values put the lower expert index first (``jax.lax.top_k``'s rule). The
group step of ``noaux_tc`` keeps groups by the same rule (lower group first).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from wideep_jax._checks import is_int as _is_int

__all__ = [
    "ROUTER_KINDS",
    "Routing",
    "RouterSpec",
    "softmax_topk",
    "noaux_tc_topk",
    "llama4_topk",
    "route",
]

ROUTER_KINDS: tuple[str, ...] = ("softmax", "noaux_tc", "llama4")

# DeepSeek-V3 adds this to the denominator when renormalising the top-k weights.
_NORM_EPS = 1e-20


class Routing(NamedTuple):
    """Per-token routing decision."""

    ids: jax.Array  # int32 [T, K] selected expert ids
    weights: jax.Array  # float32 [T, K] combine weights


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """Static router configuration (hashable, so it can be a jit static arg)."""

    kind: str = "softmax"  # "softmax" (Mixtral / Qwen3-MoE), "noaux_tc" (DeepSeek-V3) or "llama4"
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (must be False for llama4)
    n_group: int = 1  # noaux_tc only: expert groups
    topk_group: int = 1  # noaux_tc only: groups kept per token
    routed_scaling_factor: float = 1.0  # noaux_tc only: multiplies the final weights

    def validate(self, *, num_experts: int, top_k: int) -> None:
        """Raise ``ValueError`` (naming field, value and rule) if the spec is unusable."""
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterSpec.kind={self.kind!r} is not supported; allowed: {ROUTER_KINDS}")
        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r}: must be an int >= 1")
        if not _is_int(top_k) or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k={top_k!r}: must be an int with 1 <= top_k <= num_experts ({num_experts})"
            )
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"RouterSpec.norm_topk_prob={self.norm_topk_prob!r}: must be True or False")
        if not _is_int(self.n_group) or self.n_group < 1:
            raise ValueError(f"RouterSpec.n_group={self.n_group!r}: must be an int >= 1")
        if self.kind == "noaux_tc" and num_experts % self.n_group != 0:  # other kinds: must be 1, below
            raise ValueError(
                f"RouterSpec.n_group={self.n_group!r}: must divide num_experts ({num_experts})"
            )
        if not _is_int(self.topk_group) or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"RouterSpec.topk_group={self.topk_group!r}: must be an int with "
                f"1 <= topk_group <= n_group ({self.n_group})"
            )
        scale = self.routed_scaling_factor
        scale_ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
        if not (scale_ok and scale > 0):
            raise ValueError(f"RouterSpec.routed_scaling_factor={scale!r}: must be a finite number > 0")
        if self.kind in ("softmax", "llama4"):
            # These knobs would be silently ignored by these routers; refuse
            # them so a mis-typed config cannot route differently than it reads.
            for name, default in (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0)):
                value = getattr(self, name)
                if value != default:
                    raise ValueError(
                        f"RouterSpec.{name}={value!r}: only applies to kind='noaux_tc'; "
                        f"must be {default!r} for kind={self.kind!r}"
                    )
            if self.kind == "llama4" and self.norm_topk_prob is not False:
                raise ValueError(
                    f"RouterSpec.norm_topk_prob={self.norm_topk_prob!r}: kind='llama4' does not "
                    "renormalise its sigmoid weights; must be False"
                )
            return
        group_size = num_experts // self.n_group
        if self.n_group > 1 and group_size < 2:
            # The group score is the sum of the top-2 experts of the group.
            raise ValueError(
                f"RouterSpec.n_group={self.n_group!r}: groups of num_experts ({num_experts}) / n_group "
                f"= {group_size} expert(s); noaux_tc needs >= 2 experts per group"
            )
        if top_k > self.topk_group * group_size:
            raise ValueError(
                f"top_k={top_k!r}: must be <= topk_group * (num_experts // n_group) "
                f"= {self.topk_group} * {group_size} = {self.topk_group * group_size} "
                f"(RouterSpec.topk_group={self.topk_group!r}, n_group={self.n_group!r})"
            )


def _num_experts(logits: jax.Array) -> int:
    if logits.ndim < 1:
        raise ValueError(f"logits.shape={logits.shape}: need at least 1 dim ([..., num_experts])")
    return int(logits.shape[-1])


def _normalize(weights: jax.Array, eps: float = 0.0) -> jax.Array:
    return weights / (jnp.sum(weights, axis=-1, keepdims=True) + eps)


def softmax_topk(logits: jax.Array, top_k: int, *, norm_topk_prob: bool = True) -> Routing:
    """Mixtral / Qwen3-MoE router: softmax over all experts, then top-k.

    With ``norm_topk_prob`` the k weights are divided by their sum (Mixtral always
    does this; Qwen3-MoE has the switch).

    Selection is on the logits (softmax is monotone, so this is the same top-k):
    float32 probabilities underflow, and XLA flushes denormals, to exactly 0, which
    would tie distinct logits (e.g. -50 and -inf) and pick the lower index.
    """
    RouterSpec(kind="softmax", norm_topk_prob=norm_topk_prob).validate(
        num_experts=_num_experts(logits), top_k=top_k
    )
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, ids = jax.lax.top_k(logits, top_k)  # ties: lower index first
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = _normalize(weights)  # >= 1/E, never zero
    return Routing(ids.astype(jnp.int32), weights)


def noaux_tc_topk(
    logits: jax.Array,
    top_k: int,
    *,
    correction_bias: jax.Array | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """DeepSeek-V3 router (``topk_method="noaux_tc"``, ``scoring_func="sigmoid"``).

    ``scores = sigmoid(logits)``; selection uses ``choice = scores + correction_bias``.
    With ``n_group > 1`` the experts are split into ``n_group`` runs of consecutive
    ids; a group scores the sum of its top-2 ``choice`` values, the ``topk_group``
    best groups are kept (ties: lower group first) and all other experts get
    ``choice = -inf``. The ``top_k`` best experts by ``choice`` are picked; their
    weights are the *unbiased* scores, optionally renormalised (``/ (sum + 1e-20)``)
    and then multiplied by ``routed_scaling_factor``.

    Masking with ``-inf`` follows DeepSeek's reference inference code; Hugging Face
    ``transformers`` fills ``0.0`` instead, which only differs when a biased choice
    value in a kept group is negative (then HF may pick a masked-out expert).
    """
    num_experts = _num_experts(logits)
    RouterSpec(
        kind="noaux_tc",
        norm_topk_prob=norm_topk_prob,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    ).validate(num_experts=num_experts, top_k=top_k)

    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    if correction_bias is None:
        choice = scores
    else:
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(
                f"correction_bias.shape={tuple(correction_bias.shape)}: "
                f"must be ({num_experts},) = (num_experts,)"
            )
        choice = scores + correction_bias.astype(jnp.float32)

    if n_group > 1:
        lead = choice.shape[:-1]
        grouped = choice.reshape(*lead, n_group, num_experts // n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [..., G]
        _, kept = jax.lax.top_k(group_scores, topk_group)  # ties: lower group first
        keep = jnp.any(kept[..., :, None] == jnp.arange(n_group, dtype=kept.dtype), axis=-2)  # [..., G]
        choice = jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)

    _, ids = jax.lax.top_k(choice, top_k)  # validate() guarantees top_k finite candidates
    weights = jnp.take_along_axis(scores, ids, axis=-1)  # unbiased: the bias only steers selection
    if norm_topk_prob:
        weights = _normalize(weights, _NORM_EPS)
    weights = weights * jnp.float32(routed_scaling_factor)
    return Routing(ids.astype(jnp.int32), weights)


def llama4_topk(logits: jax.Array, top_k: int) -> Routing:
    """Llama 4 router: the ``top_k`` largest logits, each weighted by its sigmoid.

    Selection is on the raw logits (not on the sigmoid, which saturates in float32
    and would turn distinct large logits into ties); the weights are not
    renormalised.
    """
    RouterSpec(kind="llama4", norm_topk_prob=False).validate(num_experts=_num_experts(logits), top_k=top_k)
    values, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)  # ties: lower index first
    return Routing(ids.astype(jnp.int32), jax.nn.sigmoid(values))


def route(
    logits: jax.Array, top_k: int, spec: RouterSpec, *, correction_bias: jax.Array | None = None
) -> Routing:
    """Route with ``spec`` (validated at trace time), dispatching on ``spec.kind``."""
    spec.validate(num_experts=_num_experts(logits), top_k=top_k)
    if spec.kind != "noaux_tc" and correction_bias is not None:
        raise ValueError(f"correction_bias: only kind='noaux_tc' uses it; pass None for kind={spec.kind!r}")
    if spec.kind == "softmax":
        return softmax_topk(logits, top_k, norm_topk_prob=spec.norm_topk_prob)
    if spec.kind == "llama4":
        return llama4_topk(logits, top_k)
    return noaux_tc_topk(
        logits,
        top_k,
        correction_bias=correction_bias,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=spec.routed_scaling_factor,
    )
