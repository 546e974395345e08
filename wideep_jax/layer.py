"""Flax NNX MoE layer: routed SwiGLU experts stored as slots, optional shared experts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wideep_jax.config import MoEConfig
from wideep_jax.moe import MoEStats, MoEWeights, forward_config, moe_forward
from wideep_jax.routing import Routing
from wideep_jax.spec import MoESpec


class Placement(nnx.Variable):
    """Slot -> expert table (data, not a parameter: it never gets gradients)."""


class RouterBias(nnx.Variable):
    """DeepSeek's ``e_score_correction_bias``: set by load balancing, not by gradients."""


class LayerIndex(nnx.Variable):
    """The layer's index in its model, -1 for none. Data, not a static attribute, so the
    layers of a model share compiled programs (and can be stacked)."""


def _normal(key, shape, fan_in: int, dtype):
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)


def _slot_weights(key, slot_to_expert, shape, fan_in, dtype):
    """Per-slot weights drawn from a per-expert key, so every replica of an
    expert is identical and each device can generate its own slots."""
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(slot_to_expert)
    return jax.vmap(lambda k: _normal(k, shape, fan_in, dtype))(keys)


class MoELayer(nnx.Module):
    """A Mixture-of-Experts layer with wide expert parallelism.

    ``y, stats = layer(x)`` for ``x: [tokens, hidden]``. With a mesh, the
    ``num_slots`` expert slots are sharded over the mesh axis ``config.ep_axis``
    and tokens are data-parallel over the same axis. ``backend: WIDEEP`` sends
    tokens to their slots' ranks by all-to-all; ``CUTLASS`` gathers every rank's
    tokens on every rank and reduce-scatters the expert sums back (TensorRT-LLM's
    two EP paths). ``stats`` (:class:`MoEStats`) holds per-expert counts for load
    balancing.

    Args:
      spec: model dims and router (:class:`MoESpec`).
      config: how to run it (:class:`MoEConfig`, e.g. from ``load_moe_config``);
        ``None`` = ``MoEConfig()`` (``CUTLASS``, one slot per expert, no balancer).
      mesh: device mesh; required for ``WIDEEP``.
      layer_idx: this layer's index in the model, used to look up
        ``initial_global_assignments`` (one that leaves it out raises ``ConfigError``);
        ``None`` = default placement. Kept as data (``layer_index``, read back as
        ``layer_idx``), and ``config`` is kept less ``initial_global_assignments`` (this
        layer's row is ``slot_to_expert``): layers that differ only in them share
        compiled programs.
      rngs: ``nnx.Rngs`` for initialization.
    """

    def __init__(self, spec: MoESpec, config: MoEConfig | None = None, *,
                 mesh: Mesh | None = None, layer_idx: int | None = None, rngs: nnx.Rngs):
        if not isinstance(spec, MoESpec):
            raise TypeError(f"MoELayer spec: got {type(spec).__name__}; allowed: a MoESpec")
        if config is not None and not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer config: got {type(config).__name__}; allowed: a MoEConfig (e.g. "
                            "load_moe_config(path or dict)) or None (MoEConfig())")
        config = config if config is not None else MoEConfig()
        # initial_global_assignments is read once, below, into slot_to_expert; kept in the
        # config (a static attribute), it would make layers built from different placement
        # files compile separately.
        self.spec, self.config, self.mesh = spec, forward_config(config), mesh
        wide = config.backend == "WIDEEP"
        if wide and (mesh is None or config.ep_axis not in mesh.axis_names):
            raise ValueError(
                f"backend='WIDEEP' needs a mesh with an axis named ep_axis={config.ep_axis!r}; "
                f"got {None if mesh is None else mesh.axis_names}; allowed: such a mesh, or backend CUTLASS "
                "(an LLM-API options file with enable_attention_dp: true runs WIDEEP, as TensorRT-LLM does)"
            )
        if mesh is not None and config.ep_axis not in mesh.axis_names:
            # moe_forward would refuse it at the first call; say so where the layer is built.
            raise ValueError(f"moe_config ep_axis={config.ep_axis!r} is not an axis of the mesh "
                             f"{mesh.axis_names}; allowed: one of them, or mesh=None (no expert parallelism)")
        sharded = mesh is not None
        ep_size = mesh.shape[config.ep_axis] if sharded else 1
        placement = config.slot_to_expert(layer_idx, num_experts=spec.num_experts, ep_size=ep_size)
        if layer_idx is not None and layer_idx > np.iinfo(np.int32).max:  # >= 0 checked just above
            raise ValueError(f"MoELayer layer_idx: got {layer_idx}; allowed: an int in [0, 2**31) or None")
        self.num_slots = int(placement.shape[0])
        self.ep_size = ep_size

        h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        key_router, key_up, key_down, key_shared = jax.random.split(rngs.params(), 4)
        slot_sharding = self._sharding(P(config.ep_axis) if sharded else P())
        make_slots = jax.jit(
            lambda key, s2e, shape, fan_in: _slot_weights(key, s2e, shape, fan_in, spec.param_dtype),
            static_argnums=(2, 3), out_shardings=slot_sharding,
        )
        s2e = jnp.asarray(placement)
        self.router = nnx.Param(self._put(_normal(key_router, (h, e), h, spec.param_dtype)))
        self.w_gate_up = nnx.Param(make_slots(key_up, s2e, (h, 2 * i), h))
        self.w_down = nnx.Param(make_slots(key_down, s2e, (i, h), i))
        self.slot_to_expert = Placement(self._put(s2e))
        self.layer_index = LayerIndex(self._put(jnp.int32(-1 if layer_idx is None else layer_idx)))
        self.correction_bias = (
            RouterBias(self._put(jnp.zeros((e,), jnp.float32))) if spec.router.kind == "noaux_tc" else None
        )
        if spec.num_shared_experts:
            width = spec.shared_width
            k1, k2 = jax.random.split(key_shared)
            self.shared_gate_up = nnx.Param(self._put(_normal(k1, (h, 2 * width), h, spec.param_dtype)))
            self.shared_down = nnx.Param(self._put(_normal(k2, (width, h), width, spec.param_dtype)))
        else:
            self.shared_gate_up = self.shared_down = None

    @property
    def layer_idx(self) -> int | None:
        """The ``layer_idx`` the layer was built with (from ``layer_index``). Read it outside
        jit: inside, the layers of a model share one traced program, and it raises."""
        value = self.layer_index.get_value()
        if isinstance(value, jax.core.Tracer):
            raise TypeError("MoELayer.layer_idx read inside a jit-traced function: it is data there (layers that "
                            "differ only in it share one program); allowed: read it outside jit (e.g. to label "
                            "each layer's MoEStats after the call), or use layer.layer_index[...] as an array")
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError("MoELayer.layer_idx of an abstract layer (nnx.eval_shape): it holds no values yet")
        if getattr(value, "ndim", 0):
            raise ValueError(f"MoELayer.layer_idx of stacked layers (layer_index has shape {tuple(value.shape)}, "
                             "e.g. from nnx.vmap): allowed: read layer.layer_index[...] for every layer's index")
        index = int(value)
        return None if index < 0 else index

    def _sharding(self, spec: P):
        return None if self.mesh is None else NamedSharding(self.mesh, spec)

    def _put(self, value):
        sharding = self._sharding(P())
        return value if sharding is None else jax.device_put(value, sharding)

    def weights(self) -> MoEWeights:
        """The layer's arrays as the functional forward takes them."""
        value = lambda v: None if v is None else v[...]
        return MoEWeights(
            router=self.router[...], w_gate_up=self.w_gate_up[...], w_down=self.w_down[...],
            slot_to_expert=self.slot_to_expert[...], correction_bias=value(self.correction_bias),
            shared_gate_up=value(self.shared_gate_up), shared_down=value(self.shared_down),
        )

    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None,
                 routing: Routing | None = None) -> tuple[jax.Array, MoEStats]:
        """Runs the layer on ``x: [tokens, hidden]``.

        Args:
          x: tokens (data-parallel over the EP axis when there is a mesh).
          token_mask: bool [tokens] (a list is converted); False rows are padding (output 0,
            not counted).
          routing: precomputed top-k to bypass the router: a :class:`Routing` or a plain
            ``(ids, weights)`` tuple, in that order (see :func:`moe_forward`).

        Returns:
          ``(y [tokens, hidden], MoEStats)``.
        """
        return moe_forward(x, self.weights(), spec=self.spec, config=self.config, mesh=self.mesh,
                           token_mask=token_mask, routing=routing)
