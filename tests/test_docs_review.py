"""Docs review: claims of README.md / configs/CONFIG_TABLE.md checked against the code."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from wideep_jax import MoELayer, MoESpec, load_moe_config

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> str:
    start = text.index("| key | default | rule |")
    return text[start:text.index("\n\n", start)]


def test_config_table_is_the_readmes():
    """configs/CONFIG_TABLE.md repeats the README's table; an edit to one must reach the other."""
    assert _table((ROOT / "README.md").read_text()) == _table((ROOT / "configs" / "CONFIG_TABLE.md").read_text())


def test_backend_without_mesh_as_documented():
    """Config table, `backend`: without a mesh every slot is local, for CUTLASS only; WIDEEP needs a mesh."""
    spec = MoESpec(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    y, stats = MoELayer(spec, load_moe_config({"backend": "CUTLASS"}), rngs=nnx.Rngs(0))(jnp.ones((3, 16)))
    assert y.shape == (3, 16) and stats.slot_counts.shape == (4,)
    with pytest.raises(ValueError, match="WIDEEP.*needs a mesh"):
        MoELayer(spec, load_moe_config({"backend": "WIDEEP"}), rngs=nnx.Rngs(0))
