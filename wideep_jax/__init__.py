"""wideep_jax: Wide Expert Parallelism for Mixture-of-Experts inference in JAX.

Public API:
  - :func:`load_moe_config` / :class:`MoEConfig` / :class:`LoadBalancerConfig`: TensorRT-LLM
    ``moe_config`` YAML; bad values raise :class:`ConfigError`, inert ones warn :class:`ConfigWarning`.
  - :class:`MoESpec`, :class:`RouterSpec`: model-side dims and routing; :func:`route` and
    :class:`Routing` (top-k ids and weights, which ``layer(x, routing=...)`` accepts).
  - :class:`MoELayer`: the Flax NNX layer; ``y, stats = layer(x)``.
  - :func:`moe_forward`, :class:`MoEWeights`, :class:`MoEStats`: the functional core.
  - :func:`forward_jit`: jit a forward of an NNX module without copying its weights per call.
  - :mod:`wideep_jax.eplb`: the load balancer (placement, offline files, online ``OnlineBalancer``).
"""
from wideep_jax.config import ConfigError, ConfigWarning, LoadBalancerConfig, MoEConfig, load_moe_config
from wideep_jax.jit import forward_jit
from wideep_jax.layer import MoELayer
from wideep_jax.moe import MoEStats, MoEWeights, moe_forward
from wideep_jax.routing import Routing, RouterSpec, route
from wideep_jax.spec import MoESpec

__all__ = [
    "ConfigError", "ConfigWarning", "LoadBalancerConfig", "MoEConfig", "load_moe_config",
    "MoELayer", "MoEStats", "MoEWeights", "moe_forward", "forward_jit",
    "Routing", "RouterSpec", "route", "MoESpec",
]
__version__ = "0.1.0"
