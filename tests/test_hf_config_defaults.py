"""config.json keys left out take transformers' defaults (a checkpoint must route as it does there)."""
from __future__ import annotations

import json
from pathlib import Path

from wideep_jax.models.config import CheckpointError, from_hf_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _without(arch: str, *keys: str) -> dict:
    cfg = json.loads((FIXTURES / f"{arch}_tiny" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in keys}


def test_deepseek_v3_routing_and_layout_defaults_are_transformers():
    # transformers' DeepseekV3Config: n_group=8, topk_group=4, routed_scaling_factor=2.5,
    # n_shared_experts=1, first_k_dense_replace=3, norm_topk_prob=True.
    raw = _without("deepseek_v3", "n_group", "topk_group", "routed_scaling_factor", "n_shared_experts",
                   "first_k_dense_replace", "norm_topk_prob")
    raw["n_routed_experts"] = 16  # 8 groups of 2
    raw["num_hidden_layers"] = 5
    cfg = from_hf_config(raw)
    r = cfg.router
    assert (r.n_group, r.topk_group, r.routed_scaling_factor, r.norm_topk_prob) == (8, 4, 2.5, True)
    assert cfg.n_shared_experts == 1 and cfg.moe_layers == (3, 4)
    written = from_hf_config(_without("deepseek_v3"))  # the fixture writes every key: they are used
    assert (written.router.n_group, written.router.topk_group) == (4, 2)


def test_qwen3_moe_norm_topk_prob_default_is_false():
    assert from_hf_config(_without("qwen3_moe", "norm_topk_prob")).norm_topk_prob is False
    assert from_hf_config(_without("qwen3_moe")).norm_topk_prob is True  # the fixture says True


def test_eos_and_pad_token_ids_are_read():
    """eos_token_id: an int or a list (several stop tokens) or absent; pad_token_id too;
    Llama 4's multimodal config may give them outside text_config."""
    import pytest

    base = _without("qwen3_moe", "eos_token_id", "pad_token_id")
    cfg = from_hf_config(base)
    assert (cfg.eos_token_id, cfg.pad_token_id) == ((), None)
    assert from_hf_config(base | {"eos_token_id": 7}).eos_token_id == (7,)
    cfg = from_hf_config(base | {"eos_token_id": [7, 9], "pad_token_id": 3})
    assert (cfg.eos_token_id, cfg.pad_token_id) == ((7, 9), 3)
    for bad in ("7", [7, 1.5], True):
        with pytest.raises(CheckpointError, match=r"config.json: eos_token_id=.*allowed: an int token id, a list"):
            from_hf_config(base | {"eos_token_id": bad})
    text = _without("llama4_text", "eos_token_id", "pad_token_id")
    outer = {"model_type": "llama4", "text_config": text, "eos_token_id": [5, 6], "pad_token_id": 4}
    assert (from_hf_config(outer).eos_token_id, from_hf_config(outer).pad_token_id) == ((5, 6), 4)
    inner = outer | {"text_config": text | {"eos_token_id": 8}}
    assert from_hf_config(inner).eos_token_id == (8,)  # the text model's own ids win
