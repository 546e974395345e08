"""Expert Parallelism Load Balancer (EPLB): statistics, placement, re-sharding.

Offline (TensorRT-LLM's workflow): record per-rank expert counts with
:class:`StatsRecorder`, turn them into a placement file with
:func:`generate_placement` / :func:`write_placement_file` (or ``wideep eplb generate``),
and load that file as ``moe_config.load_balancer``.

Online (``layer_updates_per_iter > 0``): :class:`OnlineBalancer` over a model's
MoE layers, or the functional jitted step
``state, weights = eplb_update(state, weights, counts, config=..., mesh=...)``.

Placement algorithm: :func:`compute_placement` (JAX, jit-compiled, vectorised over
layers; migration-aware when given the current placement).
"""
from wideep_jax.eplb.algorithm import compute_placement, greedy_placement, imbalance, rank_loads
from wideep_jax.eplb.balancer import OnlineBalancer
from wideep_jax.eplb.offline import generate_placement, report, write_placement_file
from wideep_jax.eplb.online import eplb_update
from wideep_jax.eplb.resharding import make_master_copy
from wideep_jax.eplb.state import EplbConfig, EplbState, init_state
from wideep_jax.eplb.stats_files import StatsRecorder, load_stats

__all__ = [
    "compute_placement", "greedy_placement", "imbalance", "rank_loads",
    "OnlineBalancer", "eplb_update", "EplbConfig", "EplbState", "init_state", "make_master_copy",
    "StatsRecorder", "load_stats", "generate_placement", "write_placement_file", "report",
]
