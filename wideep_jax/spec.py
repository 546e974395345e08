"""Model-side shape of an MoE layer (the config file says how to run it)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

from wideep_jax._checks import is_float_dtype
from wideep_jax.routing import RouterSpec


def _int_at_least(value: Any, minimum: int) -> bool:
    """An int (not a bool) >= ``minimum``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Dimensions and routing of one MoE layer.

    Attributes:
      hidden_size: model width H.
      intermediate_size: per-expert SwiGLU width I (``moe_intermediate_size``).
      num_experts: routed experts E.
      top_k: experts per token (``num_experts_per_tok``).
      router: the routing function.
      num_shared_experts: always-on experts (DeepSeek); 0 = none.
      shared_intermediate_size: width of the shared MLP; ``None`` =
        ``intermediate_size * num_shared_experts`` (DeepSeek-V3's layout).
      dtype: activation / compute dtype of the experts (router math is float32).
      param_dtype: storage dtype of the weights.
      apply_router_weight_on_input: scale each routed expert's *input* row by its
        routing weight instead of its output (Llama 4; TensorRT-LLM's name).
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    router: RouterSpec = dataclasses.field(default_factory=RouterSpec)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    apply_router_weight_on_input: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if not _int_at_least(value, 1):
                raise ValueError(f"MoESpec.{name}={value!r}: allowed: a positive int")
        if not _int_at_least(self.num_shared_experts, 0):
            raise ValueError(f"MoESpec.num_shared_experts={self.num_shared_experts!r}: allowed: an int >= 0")
        width = self.shared_intermediate_size
        if width is not None and not _int_at_least(width, 1):
            raise ValueError(f"MoESpec.shared_intermediate_size={width!r}: allowed: a positive int, or None "
                             "(intermediate_size * num_shared_experts)")
        if width is not None and self.num_shared_experts == 0:
            raise ValueError(f"MoESpec.shared_intermediate_size={width!r} with num_shared_experts=0 would be "
                             "ignored; allowed: None, or num_shared_experts >= 1")
        # numpy ints pass the checks; store plain ints (hashing, printing, static shapes).
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_shared_experts"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if width is not None:
            object.__setattr__(self, "shared_intermediate_size", int(width))
        if not isinstance(self.router, RouterSpec):
            raise ValueError(f"MoESpec.router={self.router!r}: allowed: a RouterSpec, e.g. "
                             "RouterSpec(kind='softmax')")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            # None reads as NumPy's default float64 (then float32 without x64): refused, not guessed.
            if value is None or not is_float_dtype(value):
                raise ValueError(f"MoESpec.{name}={value!r}: allowed: a floating dtype (e.g. bfloat16, float32)")
        if not isinstance(self.apply_router_weight_on_input, bool):
            raise ValueError(f"MoESpec.apply_router_weight_on_input={self.apply_router_weight_on_input!r}: "
                             "allowed: True or False")
        self.router.validate(num_experts=self.num_experts, top_k=self.top_k)

    @property
    def shared_width(self) -> int:
        """Width of the shared-expert MLP (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        if self.shared_intermediate_size is not None:
            return self.shared_intermediate_size
        return self.intermediate_size * self.num_shared_experts

    @classmethod
    def deepseek_v3(cls, **overrides) -> "MoESpec":
        """DeepSeek-V3/R1's MoE layer: 7168 wide, 256 experts of 2048, top-8 of
        8 groups (4 kept), 1 shared expert, sigmoid ``noaux_tc`` routing."""
        base = dict(
            hidden_size=7168,
            intermediate_size=2048,
            num_experts=256,
            top_k=8,
            router=RouterSpec(kind="noaux_tc", n_group=8, topk_group=4,
                              norm_topk_prob=True, routed_scaling_factor=2.5),
            num_shared_experts=1,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def llama4(cls, **overrides) -> "MoESpec":
        """Llama 4 Scout's MoE layer: 5120 wide, 16 experts of 8192, top-1 with
        ``llama4`` routing (sigmoid of the chosen logit) applied to the expert's
        input, 1 shared expert. Maverick: ``num_experts=128``."""
        base = dict(
            hidden_size=5120,
            intermediate_size=8192,
            num_experts=16,
            top_k=1,
            router=RouterSpec(kind="llama4", norm_topk_prob=False),
            num_shared_experts=1,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            apply_router_weight_on_input=True,
        )
        base.update(overrides)
        return cls(**base)
