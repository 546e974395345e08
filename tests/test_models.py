"""Models: Hugging Face parity (committed tiny fixtures), loading errors, KV cache."""
from __future__ import annotations

import collections
import gc
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_helpers import TRACE_EVENT, count_compiles, make_mesh
from wideep_jax.config import ConfigError, load_moe_config
from wideep_jax.models import from_hf_config, from_pretrained
from wideep_jax.models.config import CheckpointError
from wideep_jax.models.loading import Checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "llama4_text"]


def fixture(name: str):
    folder = FIXTURES / f"{name}_tiny"
    expected = np.load(folder / "expected.npz")
    return folder, expected["input_ids"], expected["logits"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_local(arch):
    folder, ids, want = fixture(arch)
    model = from_pretrained(folder, dtype=jnp.float32)
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), want) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_wide_ep_with_replicas(arch):
    """WIDEEP over 4 devices with extra slots: replicas are filled from their experts."""
    folder, ids, want = fixture(arch)
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    num_slots = -(-(cfg.num_experts + 2) // 4) * 4  # >= 2 replicas, a multiple of EP
    moe = load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": num_slots}},
                          num_experts=cfg.num_experts, ep_size=4)
    model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(4), dtype=jnp.float32)
    layer = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "slot_to_expert"))
    assert layer.w_gate_up[...].shape[0] == num_slots
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), want) <= 1e-4


def test_placement_for_a_layer_that_is_not_moe_is_refused():
    """DeepSeek-V3's first layer is dense: a placement for it names the layers and what the
    model has, instead of being ignored; one for the layer past the model (its MTP layer,
    which TensorRT-LLM places when it runs MTP) is dropped with a warning; one that leaves
    an MoE layer out is refused before any layer is built."""
    from wideep_jax import MoELayer
    from wideep_jax.config import ConfigWarning
    from wideep_jax.models import CausalLM
    folder, _, _ = fixture("deepseek_v3")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    assert 0 not in cfg.moe_layers
    e = cfg.num_experts
    reversed_experts = list(range(e))[::-1]
    for layer in (0, cfg.num_hidden_layers):
        placed = {m: reversed_experts for m in cfg.moe_layers} | {layer: list(range(e))}
        moe = load_moe_config({"backend": "WIDEEP", "load_balancer": {"initial_global_assignments": placed}},
                              num_experts=e, ep_size=4)
        if layer == 0:
            message = f"layers [{layer}] are not MoE layers of this model (it has layers"
            with pytest.raises(ConfigError, match=re.escape(message)):
                CausalLM(cfg, moe, mesh=make_mesh(4), rngs=nnx.Rngs(0))
            continue
        with pytest.warns(ConfigWarning, match=re.escape(f"layers [{layer}] are past the model's {layer} decoder")):
            model = CausalLM(cfg, moe, mesh=make_mesh(4), rngs=nnx.Rngs(0))
        placements = [lay.mlp.slot_to_expert[...].tolist() for lay in model.layers if isinstance(lay.mlp, MoELayer)]
        assert len(placements) == len(cfg.moe_layers) and all(p == reversed_experts for p in placements)
    first, *rest = cfg.moe_layers
    moe = load_moe_config({"backend": "WIDEEP", "load_balancer": {"initial_global_assignments": {
        m: list(range(e)) for m in rest}}}, num_experts=e, ep_size=4)
    with pytest.raises(ConfigError, match=re.escape(f"MoE layers [{first}] have no placement")):
        CausalLM(cfg, moe, mesh=make_mesh(4), rngs=nnx.Rngs(0))


def test_fused_expert_layout_loads_the_same(tmp_path):
    """transformers 5's fused ``experts.gate_up_proj`` tensors give the same model."""
    from safetensors.numpy import save_file

    folder, ids, want = fixture("qwen3_moe")
    ckpt = Checkpoint(folder)
    tensors = {}
    for name in list(ckpt._where):
        value = np.asarray(ckpt.get(name))
        if ".experts." not in name:
            tensors[name] = value
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    for i in cfg.moe_layers:
        p = f"model.layers.{i}.mlp.experts"
        get = lambda e, n: np.asarray(ckpt.get(f"{p}.{e}.{n}.weight"))
        tensors[f"{p}.gate_up_proj"] = np.stack(
            [np.concatenate([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(cfg.num_experts)])
        tensors[f"{p}.down_proj"] = np.stack([get(e, "down_proj") for e in range(cfg.num_experts)])
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), want) <= 1e-4


def test_llama4_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Llama 4's Hub checkpoints are multimodal: config under ``text_config``, the decoder's
    tensors under ``language_model.``, and an image tower that text generation skips."""
    from safetensors.numpy import save_file

    folder, ids, want = fixture("llama4_text")
    ckpt = Checkpoint(folder)
    tensors = {f"language_model.{name}": np.asarray(ckpt.get(name)) for name in list(ckpt._where)}
    tensors["vision_model.patch_embedding.linear.weight"] = np.zeros((4, 3), np.float32)
    tensors["multi_modal_projector.linear_1.weight"] = np.zeros((48, 4), np.float32)
    text = json.loads((folder / "config.json").read_text())
    config = {"model_type": "llama4", "text_config": text, "vision_config": {"hidden_size": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "model.safetensors")
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), want) <= 1e-4
    # Anything else left over is still an error.
    tensors["language_model.model.layers.0.feed_forward.extra"] = np.zeros((2,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: checkpoint tensors not used by llama4_text: "
                                                        "['language_model.model.layers.0.feed_forward.extra']")):
        from_pretrained(tmp_path, dtype=jnp.float32)


def test_llama4_config_reading():
    text = json.loads((FIXTURES / "llama4_text_tiny" / "config.json").read_text())
    cfg = from_hf_config(text)
    assert cfg.moe_layers == (1, 3) and cfg.nope_layers == (3,) and cfg.chunked_layers == (0, 1, 2)
    assert cfg.moe_spec().apply_router_weight_on_input and cfg.moe_spec().router.kind == "llama4"
    assert (cfg.intermediate_size, cfg.moe_intermediate_size, cfg.rope.kind) == (64, 20, "llama3")
    # Scout's defaults: every layer MoE, every 4th layer NoPE, the rest chunked.
    scout = {k: v for k, v in text.items() if k not in ("moe_layers", "no_rope_layers", "layer_types")}
    cfg = from_hf_config(scout | {"interleave_moe_layer_step": 1, "num_hidden_layers": 8})
    assert cfg.moe_layers == tuple(range(8)) and cfg.nope_layers == (3, 7)
    assert cfg.chunked_layers == (0, 1, 2, 4, 5, 6)
    for bad, fragment in (({"layer_types": ["sliding_attention"] * 4}, "layer_types=['sliding_attention', "),
                          ({"no_rope_layers": [1, 0]}, "no_rope_layers=[1, 0] has 2 entries"),
                          ({"attention_bias": True}, "attention_bias=true"),
                          ({"attention_chunk_size": None}, "attention_chunk_size=None (missing)")):
        with pytest.raises(CheckpointError, match=re.escape(f"config.json: {fragment}")):
            from_hf_config(text | bad)


def _edited_copy(tmp_path, edit):
    from safetensors.numpy import save_file

    folder, _, _ = fixture("qwen3_moe")
    ckpt = Checkpoint(folder)
    tensors = {name: np.asarray(ckpt.get(name)) for name in list(ckpt._where)}
    edit(tensors)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_loading_errors_name_the_tensor(tmp_path):
    (tmp_path / "a").mkdir()
    missing = _edited_copy(tmp_path / "a", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(KeyError, match="model.layers.2.mlp.experts.5.up_proj.weight"):
        from_pretrained(missing, dtype=jnp.float32)

    def bad_shape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 48), np.float32)
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors: tensor 'model.layers.0.self_attn.k_proj."
                                                        "weight': shape (5, 48), expected (32, 48)")):
        from_pretrained(_edited_copy(tmp_path / "b", bad_shape), dtype=jnp.float32)

    def extra(t):
        t["model.layers.0.mlp.shared_expert.weight"] = np.zeros((2,), np.float32)
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match=re.escape("not used by qwen3_moe: "
                                                        "['model.layers.0.mlp.shared_expert.weight']")):
        from_pretrained(_edited_copy(tmp_path / "c", extra), dtype=jnp.float32)

    (tmp_path / "d").mkdir()
    cfg = json.loads((FIXTURES / "qwen3_moe_tiny" / "config.json").read_text()) | {"model_type": "llama"}
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=re.escape("config.json: model_type='llama' is not supported; "
                                                        "allowed: ('qwen3_moe',")):
        from_pretrained(tmp_path / "d")


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_then_decode_matches_full_forward(arch):
    """Prefill 4 tokens, then decode one at a time under one jit: every step's logits equal
    the full forward's at that position (Mixtral's sliding window of 5 included), and the
    decode steps never recompile."""
    folder, ids, want = fixture(arch)
    model = from_pretrained(folder, dtype=jnp.float32)
    ids = jnp.asarray(ids)
    step = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache)[:2])
    cache = model.init_cache(ids.shape[0], 16)
    logits, cache = step(model, ids[:, :4], cache)
    got = [np.asarray(logits)]
    decode = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache)[:2])
    logits, cache = decode(model, ids[:, 4:5], cache)
    got.append(np.asarray(logits))
    with count_compiles() as compiles:
        for t in range(5, ids.shape[1]):
            logits, cache = decode(model, ids[:, t:t + 1], cache)
            got.append(np.asarray(logits))
    assert compiles[0] == 0
    assert rel_err(np.concatenate(got, axis=1), want) <= 1e-4


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_is_the_last_positions_of_the_full_forward(keep):
    """A prefill that keeps the last ``keep`` positions' logits (no vocabulary projection
    for the others) returns exactly the full forward's last positions; bad values are errors."""
    folder, ids, want = fixture("deepseek_v3")
    model = from_pretrained(folder, dtype=jnp.float32)
    ids = jnp.asarray(ids)
    full = nnx.jit(lambda model, ids: model(ids))(model, ids)
    kept = nnx.jit(lambda model, ids: model(ids, logits_to_keep=keep))(model, ids)
    assert kept.shape == (ids.shape[0], keep, full.shape[-1])
    np.testing.assert_allclose(np.asarray(kept), np.asarray(full)[:, -keep:], rtol=1e-6, atol=1e-6)
    for bad in (-1, ids.shape[1] + 1, 1.0):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)


def test_generate_greedy_matches_step_by_step_argmax():
    """Left-padded prompts of different lengths: greedy tokens equal argmax of the full
    forward on each prompt alone, re-run with every generated token appended."""
    from wideep_jax.models.generate import generate, sample

    folder, ids, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    prompts = [list(ids[0, :7]), list(ids[1, :3])]
    result = generate(model, prompts, max_new_tokens=4)
    with count_compiles() as compiles:  # same shapes again: nothing compiles, warm-up included
        again = generate(model, prompts, max_new_tokens=4)
    assert compiles[0] == 0
    np.testing.assert_array_equal(again.tokens, result.tokens)
    forward = nnx.jit(lambda m, x: m(x))
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for t in range(4):
            nxt = int(np.argmax(np.asarray(forward(model, jnp.asarray([seq])))[0, -1]))
            assert result.tokens[row, t] == nxt, (row, t)
            seq.append(nxt)
    assert result.expert_counts.shape == (2, 8)  # 2 MoE layers (layer 1 is dense)
    # (7 + 3 prompt tokens + 2 x 3 decoded) tokens x top-2, per MoE layer.
    assert (result.expert_counts.sum(axis=1) == (10 + 6) * 2).all()
    # Sampling: top_p -> 0 keeps only the most likely token, i.e. greedy.
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    np.testing.assert_array_equal(sample(logits, jax.random.key(1), temperature=1.0, top_p=1e-6),
                                  np.argmax(np.asarray(logits), axis=-1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, max_new_tokens=0)


def test_generate_warns_past_max_position_embeddings(tmp_path):
    """Past max_position_embeddings nothing is clamped (the cache fits every token, RoPE is
    computed per position), the model extrapolates: a warning naming both numbers, at the
    caller's line; none at the limit. The limit is config.json's."""
    import shutil
    import warnings

    from wideep_jax.models.generate import generate

    folder, ids, _ = fixture("qwen3_moe")
    shutil.copytree(folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text()) | {"max_position_embeddings": 9}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    model = from_pretrained(tmp_path / "model", dtype=jnp.float32)
    assert model.cfg.max_position_embeddings == 9
    prompts = [list(ids[0, :7]), list(ids[1, :3])]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generate(model, prompts, max_new_tokens=2)  # 7 + 2 = 9 positions: at the limit
    assert not [w for w in seen if "max_position_embeddings" in str(w.message)]
    with pytest.warns(UserWarning, match=re.escape(
            "the longest prompt (7 tokens) + max_new_tokens (3) = 10 positions, past the model's "
            "max_position_embeddings=9")) as seen:
        generate(model, prompts, max_new_tokens=3)
    assert [w.filename for w in seen if "max_position" in str(w.message)] == [__file__]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama4_text"])
def test_attention_data_parallel_with_cache(arch):
    """Batch 2 over EP 2: attention and the KV cache are split by sequence, and the
    cached decode still equals transformers' logits."""
    folder, ids, want = fixture(arch)
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    moe = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=2)
    model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(2), dtype=jnp.float32)
    ids = jnp.asarray(ids)
    cache = model.init_cache(ids.shape[0], 16)
    assert cache[0][0].keys.sharding.spec[0] == "ep"  # each device holds one sequence's cache
    step = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache)[:2])
    logits, cache = step(model, ids[:, :6], cache)
    got = [np.asarray(logits)]
    for t in range(6, ids.shape[1]):
        logits, cache = step(model, ids[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    assert rel_err(np.concatenate(got, axis=1), want) <= 1e-4
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, ids), want) <= 1e-4


def test_generate_over_ep_matches_local_and_never_recompiles():
    """generate on an EP-2 model (attention split by sequence, MoE over 2 devices) gives
    the single-device model's greedy tokens; a second call compiles nothing, so no step
    of the first call's decode loop met an input sharding its warm-up had not compiled."""
    from wideep_jax.models.generate import generate

    folder, ids, _ = fixture("deepseek_v3")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    moe = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=2)
    prompts = [list(ids[0, :5]), list(ids[1, :3])]
    local = generate(from_pretrained(folder, dtype=jnp.float32), prompts, max_new_tokens=5)
    model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(2), dtype=jnp.float32)
    first = generate(model, prompts, max_new_tokens=5)
    with count_compiles() as compiles:
        second = generate(model, prompts, max_new_tokens=5)
    assert compiles[0] == 0
    np.testing.assert_array_equal(first.tokens, local.tokens)
    np.testing.assert_array_equal(second.tokens, local.tokens)
    np.testing.assert_array_equal(first.expert_counts, local.expert_counts)


def test_generate_balances_an_online_model_by_itself():
    """An online load_balancer in the model's moe_config re-places layers during
    generate with no balancer passed: one step per prefill and decode step, one
    balancer per model across calls, nothing compiled in the timed steps of the first
    call nor anywhere in the second, the same greedy tokens as the single-device
    model; balance=False keeps the placements."""
    from wideep_jax.models.generate import generate, model_balancer

    folder, ids, _ = fixture("deepseek_v3")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    prompts = [list(ids[0, :5]), list(ids[1, :3])]
    local = generate(from_pretrained(folder, dtype=jnp.float32), prompts, max_new_tokens=4)
    static = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=2)
    assert model_balancer(from_pretrained(folder, moe_config=static, mesh=make_mesh(2), dtype=jnp.float32)) is None
    online = load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": cfg.num_experts + 2,
                                                                    "layer_updates_per_iter": 1, "tolerance": 0.0}},
                             num_experts=cfg.num_experts, ep_size=2)
    model = from_pretrained(folder, moe_config=online, mesh=make_mesh(2), dtype=jnp.float32)
    from wideep_jax.models import generate as generate_module

    decode = generate_module._DECODE_STEP.jitted
    with count_compiles(TRACE_EVENT) as traces:
        # Traces and decode-step cache entries (a new one per input sharding: jax's fast
        # path missing) seen after the timed prefill (after_step) and after each timed
        # decode step (on_token): the warm-up made them all, so they stay level.
        seen = []
        def look(_):
            seen.append((traces[0], decode._cache_size()))
        first = generate(model, prompts, max_new_tokens=6, after_step=look, on_token=look)
    assert len(seen) == 6 + 5 and len(set(seen)) == 1, seen  # 6 after_step, 5 on_token calls
    balancer = model_balancer(model)
    assert int(balancer.state.iteration) == 6  # the prefill and 5 decode steps
    with count_compiles() as compiles:
        second = generate(model, prompts, max_new_tokens=6)
    assert compiles[0] == 0 and model_balancer(model) is balancer
    assert int(balancer.state.iteration) == 12
    # The layers follow the balancer's placements, which moved off the default.
    placements = np.stack([np.asarray(layer.mlp.slot_to_expert[...]) for layer in model.layers
                           if hasattr(layer.mlp, "slot_to_expert")])
    np.testing.assert_array_equal(placements, np.asarray(balancer.state.placement))
    assert (placements != np.arange(cfg.num_experts + 2) % cfg.num_experts).any()
    for got in (first, second):
        np.testing.assert_array_equal(got.tokens[:, :4], local.tokens)
    third = generate(model, prompts, max_new_tokens=4, balance=False)
    assert int(balancer.state.iteration) == 12
    np.testing.assert_array_equal(third.tokens, local.tokens)


def test_generate_timed_steps_find_their_compiled_program_with_committed_weights():
    """A model whose arrays are committed to one device (device_put, no mesh): the
    step outputs come back committed while the host's inputs are not, a separate jit
    cache entry with an equal sharding. The warm-up must cover it: nothing is traced,
    compiled or added to the decode step's cache during the timed steps."""
    from wideep_jax.models import generate as generate_module

    folder, ids, _ = fixture("deepseek_v3")
    model = from_pretrained(folder, dtype=jnp.float32)
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    decode = generate_module._DECODE_STEP.jitted
    seen = []
    with count_compiles() as compiles, count_compiles(TRACE_EVENT) as traces:
        def look(_):
            seen.append((traces[0], compiles[0], decode._cache_size()))
        generate_module.generate(model, [list(ids[0, :4])], max_new_tokens=5, after_step=look, on_token=look)
    assert len(seen) == 5 + 4 and len(set(seen)) == 1, seen


def test_generate_uses_the_callers_balancer_once():
    """A balancer the caller built over the model's layers is the one generate steps,
    once per step even when also passed as after_step (no second balancer, no second
    host copy); balancers over only some layers are refused, naming the way out."""
    from wideep_jax.eplb.balancer import OnlineBalancer
    from wideep_jax.models.generate import generate, model_balancer

    folder, ids, _ = fixture("deepseek_v3")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    online = load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": cfg.num_experts + 2,
                                                                    "layer_updates_per_iter": 1}},
                             num_experts=cfg.num_experts, ep_size=2)
    prompts = [list(ids[0, :4])]
    model = from_pretrained(folder, moe_config=online, mesh=make_mesh(2), dtype=jnp.float32)
    layers = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "slot_to_expert")]
    mine = OnlineBalancer(layers)
    assert model_balancer(model) is mine
    generate(model, prompts, max_new_tokens=3, after_step=mine.step)
    assert int(mine.state.iteration) == 3  # the prefill and 2 decode steps, each once
    seen = []
    generate(model, prompts, max_new_tokens=3, after_step=seen.append)
    assert int(mine.state.iteration) == 6 and len(seen) == 3
    # A wrapper around the balancer's step would count each iteration twice: refused.
    with pytest.raises(ValueError, match="after_step stepped the model's balancer"):
        generate(model, prompts, max_new_tokens=3, after_step=lambda s: mine.step(s))
    # Throwaway balancers (over all layers, or one), dropped: the kept one goes on.
    before = int(mine.state.iteration)
    for part_layers in (layers, layers[:1]):
        OnlineBalancer(part_layers)
        gc.collect()
        assert model_balancer(model) is mine and int(mine.state.iteration) == before
    assert len(layers) == 2  # the fixture: one dense layer, then two MoE layers
    fresh = from_pretrained(folder, moe_config=online, mesh=make_mesh(2), dtype=jnp.float32)
    part = OnlineBalancer([layer.mlp for layer in fresh.layers if hasattr(layer.mlp, "slot_to_expert")][:1])
    with pytest.raises(ValueError, match="balance=False"):
        generate(fresh, prompts, max_new_tokens=2)
    generate(fresh, prompts, max_new_tokens=2, balance=False, after_step=lambda s: part.step(s[:1]))
    assert int(part.state.iteration) == 2


def _fixture_tensors(arch: str) -> dict:
    folder, _, _ = fixture(arch)
    ckpt = Checkpoint(folder)
    return {name: np.asarray(ckpt.get(name)) for name in list(ckpt._where)}


def _write_checkpoint(folder: Path, config: dict, files: dict) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name, tensors in files.items():
        save_file(tensors, folder / name)
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_of_layers_past_the_model_are_errors_but_deepseek_mtp_layers(tmp_path, rng, arch):
    """A tensor of a layer at or past num_hidden_layers is an error naming it, except
    DeepSeek-V3's num_nextn_predict_layers multi-token-prediction layers (1 when the
    key is absent), which inference skips; a config.json with too few layers too."""
    folder, _, _ = fixture(arch)
    config = json.loads((folder / "config.json").read_text())
    tensors = _fixture_tensors(arch)
    n = config["num_hidden_layers"]
    value = rng.standard_normal((int(rng.integers(1, 5)), 3)).astype(np.float32)
    suffix = str(rng.choice(["eh_proj.weight", "self_attn.q_proj.weight", "enorm.weight"]))

    def load(name, layer, cfg, files=None):
        extra = {f"model.layers.{layer}.{suffix}": value}
        return from_pretrained(_write_checkpoint(tmp_path / name, cfg, files or {"m.safetensors": tensors | extra}),
                               dtype=jnp.float32)

    nextn = int(rng.integers(1, 4))
    if arch == "deepseek_v3":
        assert config["num_nextn_predict_layers"] == 1
        load("mtp", n, config)  # DeepSeek-V3 ships one MTP layer, right past the model
        load("mtp_default", n, {k: v for k, v in config.items() if k != "num_nextn_predict_layers"})
        load("mtp_n", n + nextn - 1, config | {"num_nextn_predict_layers": nextn})
        past = n + nextn
        with pytest.raises(CheckpointError, match=re.escape(f"model.layers.{past}.{suffix}")):
            load("past_mtp", past, config | {"num_nextn_predict_layers": nextn})
        with pytest.raises(CheckpointError, match=re.escape(f"model.layers.{n}.{suffix}")):
            load("no_mtp", n, config | {"num_nextn_predict_layers": 0})
        with pytest.raises(CheckpointError, match=re.escape("config.json: num_nextn_predict_layers=-1; allowed: an "
                                                            "int >= 0")):
            load("bad_count", n, config | {"num_nextn_predict_layers": -1})
    else:
        layer = n + int(rng.integers(0, 3))
        with pytest.raises(CheckpointError, match=re.escape(f"'model.layers.{layer}.{suffix}' belongs to a layer "
                                                            f"past config.json num_hidden_layers={n}")):
            load("extra", layer, config)
    # config.json says one layer fewer than the checkpoint holds: the last layer is left over
    # (for DeepSeek-V3 with no MTP layer, else it would pass for one).
    fewer = config | {"num_hidden_layers": n - 1} | ({"num_nextn_predict_layers": 0} if arch == "deepseek_v3" else {})
    if arch == "llama4_text":  # per-layer lists, trimmed to the layers kept
        fewer |= {"layer_types": config["layer_types"][:n - 1], "no_rope_layers": config["no_rope_layers"][:n - 1],
                  "moe_layers": [i for i in config["moe_layers"] if i < n - 1]}
    with pytest.raises(CheckpointError, match=re.escape(f"'model.layers.{n - 1}.") + r".*num_hidden_layers="
                       + str(n - 1)):
        from_pretrained(_write_checkpoint(tmp_path / "fewer", fewer, {"m.safetensors": tensors}), dtype=jnp.float32)


def test_a_tensor_in_two_checkpoint_files_is_an_error(tmp_path, rng):
    """The same tensor name in two shards (which one would be read depends on the file
    names' order) is an error naming the tensor and both files."""
    tensors = _fixture_tensors("qwen3_moe")
    names = sorted(tensors)
    name = names[int(rng.integers(len(names)))]
    first, second = sorted(f"model-{i:05d}-of-{int(rng.integers(2, 9)):05d}.safetensors" for i in (1, 2))
    copy = (tensors[name] + rng.standard_normal(tensors[name].shape)).astype(tensors[name].dtype)
    files = {first: tensors, second: {name: copy}}
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'dup'}: tensor {name!r} is in two checkpoint "
                                                        f"files: {first!r} and {second!r}")):
        from_pretrained(_write_checkpoint(tmp_path / "dup", json.loads(
            (FIXTURES / "qwen3_moe_tiny" / "config.json").read_text()), files), dtype=jnp.float32)
    # Split without duplicates, the shards load as one checkpoint.
    model = from_pretrained(_write_checkpoint(tmp_path / "split", json.loads(
        (FIXTURES / "qwen3_moe_tiny" / "config.json").read_text()), {
            first: {k: v for k, v in tensors.items() if k != name}, second: {name: tensors[name]}}),
        dtype=jnp.float32)
    assert len(model.layers) == 3


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_kv_cache_overflow_is_an_error_when_the_length_is_concrete(arch, rng):
    """Eager calls past the cache's max_len raise, naming the cache length, the new tokens
    and max_len (the write would be clamped onto the last slot, corrupting the cache);
    up to max_len the cached logits still equal the full forward's."""
    folder, ids, _ = fixture(arch)
    model = from_pretrained(folder, dtype=jnp.float32)
    ids = jnp.asarray(ids[:1])
    max_len = int(rng.integers(3, ids.shape[1]))
    prefill = int(rng.integers(1, max_len + 1))
    full = np.asarray(model(ids[:, :max_len]))
    cache = model.init_cache(1, max_len)
    with pytest.raises(ValueError, match=re.escape(f"cache length 0 + {max_len + 1} new tokens = {max_len + 1} "
                                                   f"> max_len={max_len}")):
        model(ids[:, :max_len + 1], cache=cache)
    logits, cache, _ = model(ids[:, :prefill], cache=cache)
    got = [np.asarray(logits)]
    for t in range(prefill, max_len):
        logits, cache, _ = model(ids[:, t:t + 1], cache=cache)
        got.append(np.asarray(logits))
    assert rel_err(np.concatenate(got, axis=1), full) <= 1e-4
    assert int(cache[1].length) == max_len
    with pytest.raises(ValueError, match=re.escape(f"cache length {max_len} + 1 new tokens = {max_len + 1} > "
                                                   f"max_len={max_len}")):
        model(ids[:, max_len:max_len + 1], cache=cache)
    # The attention layer alone (its own cache write) checks too.
    layers, meta = cache
    x = jnp.asarray(rng.standard_normal((1, 2, model.cfg.hidden_size)), jnp.float32)
    pos = jnp.full((1, 2), max_len, jnp.int32)
    with pytest.raises(ValueError, match=re.escape(f"cache length {max_len} + 2 new tokens")):
        model.layers[0].attn(x, pos, jnp.ones((1, 2), bool), layers[0], meta)


def test_generate_warms_up_once_per_signature_and_holds_one_cache(monkeypatch, rng):
    """The warm-up (compiling the steps so the timed ones do not) runs once per step
    signature: a later call with the same shapes, other token ids and sampling values
    skips it and compiles nothing. Its throwaway cache is dropped before the real one
    is allocated: one cache's arrays live during the timed decode loop."""
    from wideep_jax.models import generate as generate_module

    folder, _, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    cfg = model.cfg
    monkeypatch.setattr(generate_module, "_WARMED", collections.OrderedDict(), raising=False)
    warm_ups = []
    real_warm_up = getattr(generate_module, "_warm_up", None)
    monkeypatch.setattr(generate_module, "_warm_up", lambda *a, **k: (warm_ups.append(1), real_warm_up(*a, **k)),
                        raising=False)
    batch, width, new = int(rng.integers(1, 4)), int(rng.integers(2, 7)), int(rng.integers(3, 6))
    shape = (batch, width + new, cfg.num_key_value_heads, cfg.head_dim)

    def prompts():
        return [list(rng.integers(0, cfg.vocab_size, width)) for _ in range(batch)]
    gc.collect()
    seen = []

    def on_token(_):
        seen.append(sum(1 for a in jax.live_arrays() if a.shape == shape and not a.is_deleted()))
    sampling = dict(temperature=float(rng.uniform(0.5, 1.5)), top_p=float(rng.uniform(0.5, 1.0)))
    generate_module.generate(model, prompts(), max_new_tokens=new, on_token=on_token, **sampling)
    assert seen == [2 * cfg.num_hidden_layers] * (new - 1)  # keys and values per layer: one cache
    assert len(warm_ups) == 1
    with count_compiles() as compiles:
        generate_module.generate(model, prompts(), max_new_tokens=new, temperature=float(rng.uniform(0.1, 2.0)),
                                 top_p=float(rng.uniform(0.1, 1.0)), seed=int(rng.integers(1 << 30)))
    assert compiles[0] == 0 and len(warm_ups) == 1
    generate_module.generate(model, prompts(), max_new_tokens=new)  # greedy: other static flag
    assert len(warm_ups) == 2
    generate_module.generate(model, prompts(), max_new_tokens=new + 1, **sampling)  # another cache size
    assert len(warm_ups) == 3
    generate_module.generate(model, prompts(), max_new_tokens=new, **sampling)
    assert len(warm_ups) == 3


def test_sampling_values_are_traced_and_checked(rng):
    """Other temperature / top_p values reuse the compiled steps (only greedy or not is
    static); a non-finite or negative temperature, or top_p outside (0, 1], is an error
    naming it; a tiny temperature samples the argmax instead of NaN garbage."""
    from wideep_jax.models.generate import generate, sample

    folder, ids, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    prompts = [list(ids[0, :int(rng.integers(2, 6))]), list(ids[1, :2])]
    generate(model, prompts, max_new_tokens=3, temperature=float(rng.uniform(0.5, 1.0)), top_p=0.9)
    for _ in range(2):
        kw = dict(temperature=float(rng.uniform(0.01, 3.0)), top_p=float(rng.uniform(0.05, 1.0)))
        with count_compiles() as compiles, count_compiles(TRACE_EVENT) as traces:
            generate(model, prompts, max_new_tokens=3, **kw)
        assert (compiles[0], traces[0]) == (0, 0), kw
    for bad in (float("nan"), float("inf"), -float(rng.uniform(1e-6, 2.0)), "1.0", None):
        with pytest.raises(ValueError, match=re.escape(f"temperature={bad!r}: allowed: a finite number >= 0")):
            generate(model, prompts, max_new_tokens=2, temperature=bad)
    for bad in (0.0, float("nan"), 1.0 + float(rng.uniform(1e-6, 1.0)), -0.5):
        with pytest.raises(ValueError, match=re.escape(f"top_p={bad!r}: allowed: a number with 0 < top_p <= 1")):
            generate(model, prompts, max_new_tokens=2, temperature=1.0, top_p=bad)
    with pytest.raises(ValueError, match="temperature=nan"):
        sample(jnp.zeros((1, 4)), jax.random.key(0), temperature=float("nan"), top_p=0.9)
    logits = jnp.asarray(rng.standard_normal((4, 50)) * 10, jnp.float32)
    for t in (1e-3, 1e-30, 1e-45):
        np.testing.assert_array_equal(sample(logits, jax.random.key(int(rng.integers(1 << 30))), temperature=t,
                                             top_p=float(rng.uniform(0.1, 1.0))), np.argmax(np.asarray(logits), -1))


def test_out_of_vocabulary_token_ids_are_errors(rng):
    """Prompt ids outside [0, vocab_size) (the embedding gather would clamp them to
    another token) are an error naming the prompt, the position, the value and the
    range; so are concrete ids given to the model itself."""
    from wideep_jax.models.generate import generate

    folder, _, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    v = model.cfg.vocab_size
    prompts = [list(map(int, rng.integers(0, v, int(rng.integers(1, 6))))) for _ in range(3)]
    row = int(rng.integers(3))
    col = int(rng.integers(len(prompts[row])))
    bad = int(rng.choice([-int(rng.integers(1, 1000)), v + int(rng.integers(0, 1000))]))
    prompts[row][col] = bad
    message = f"prompts[{row}][{col}]={bad}: token id outside the vocabulary; allowed: 0 <= id < vocab_size={v}"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(model, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape(f"prompts[{row}]=")):
        generate(model, [[1, 2]] * row + [[1.5, 2]], max_new_tokens=2)
    ids = rng.integers(0, v, (2, 5))
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=re.escape(f"input_ids[1, 3]={bad}: token id outside the vocabulary") +
                       ".*" + re.escape(f"allowed: 0 <= id < vocab_size={v}")):
        model(jnp.asarray(ids, jnp.int32))


def _checkpoint_with_config(folder: Path, arch: str, **changes) -> Path:
    """The fixture's weights (linked) under a config.json with ``changes``."""
    source, _, _ = fixture(arch)
    folder.mkdir()
    config = json.loads((source / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    for weights in source.glob("*.safetensors"):
        (folder / weights.name).symlink_to(weights)
    return folder


def _first_hits(tokens: np.ndarray, eos) -> np.ndarray:
    """Each row's index of its first token in ``eos`` (the row's length if none)."""
    hit = np.isin(tokens, list(eos))
    return np.where(hit.any(axis=1), hit.argmax(axis=1), tokens.shape[1])


def test_generate_eos_pads_the_finished_sequence_and_leaves_the_others(tmp_path, rng):
    """A sequence that emits an EOS keeps it, then holds the pad id (masked out of the MoE
    layers: fewer routed pairs); the other sequence is unchanged. Without an argument
    the ids come from config.json (pad: its pad_token_id, else the first EOS id)."""
    from wideep_jax.models.generate import generate, generated_lengths

    folder, ids, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    assert model.cfg.eos_token_id == () and model.cfg.pad_token_id is None  # the fixture gives none
    prompts, new = [list(ids[0, :7]), list(ids[1, :3])], 10
    base = generate(model, prompts, max_new_tokens=new)
    # (row, step) whose token appears neither earlier in the row nor in the other row.
    picks = [(row, j) for row in (0, 1) for j in range(new - 1)
             if base.tokens[row, j] not in base.tokens[row, :j] and base.tokens[row, j] not in base.tokens[1 - row]]
    assert picks
    row, j = picks[int(rng.integers(len(picks)))]
    eos, pad = int(base.tokens[row, j]), int(rng.integers(-5, model.cfg.vocab_size))
    got = generate(model, prompts, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
    want = base.tokens.copy()
    want[row, j + 1:] = pad
    np.testing.assert_array_equal(got.tokens, want)
    lengths = [new, new]
    lengths[row] = j + 1
    np.testing.assert_array_equal(generated_lengths(got.tokens, eos), lengths)
    # The finished row's new - 1 - j later decode tokens are not routed (top-2, per MoE layer).
    np.testing.assert_array_equal(got.expert_counts.sum(axis=1), base.expert_counts.sum(axis=1) - (new - 1 - j) * 2)
    # The same ids from config.json: a list (the unused id first, so it is the pad), then an int with a pad id.
    unused = next(t for t in range(model.cfg.vocab_size) if t not in base.tokens)
    listed = from_pretrained(_checkpoint_with_config(tmp_path / "listed", "qwen3_moe", eos_token_id=[unused, eos]),
                             dtype=jnp.float32)
    assert listed.cfg.eos_token_id == (unused, eos)
    want[row, j + 1:] = unused
    np.testing.assert_array_equal(generate(listed, prompts, max_new_tokens=new).tokens, want)
    padded = from_pretrained(_checkpoint_with_config(tmp_path / "padded", "qwen3_moe", eos_token_id=eos,
                                                     pad_token_id=pad), dtype=jnp.float32)
    want[row, j + 1:] = pad
    np.testing.assert_array_equal(generate(padded, prompts, max_new_tokens=new).tokens, want)
    np.testing.assert_array_equal(generate(padded, prompts, max_new_tokens=new, eos_token_id=None).tokens,
                                  base.tokens)
    # generation_config.json's ids win over config.json's, as in transformers' generate
    # (Qwen3: config.json 151645, generation_config.json [151645, 151643]).
    folder = _checkpoint_with_config(tmp_path / "generation", "qwen3_moe", eos_token_id=unused)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, eos], "pad_token_id": pad,
                                                               "temperature": 0.6}))
    from_generation = from_pretrained(folder, dtype=jnp.float32)
    assert from_generation.cfg.eos_token_id == (unused, eos) and from_generation.cfg.pad_token_id == pad
    np.testing.assert_array_equal(generate(from_generation, prompts, max_new_tokens=new).tokens, want)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'generation_config.json'}: eos_token_id='2'; "
                                                   "allowed: an int token id, a list of them, or null")):
        from_pretrained(folder, dtype=jnp.float32)


@pytest.mark.parametrize("ep", [1, 2])
def test_generate_stops_once_every_sequence_has_finished(ep):
    """Once every sequence has emitted an EOS, decoding stops: _STOP_LAG decode steps
    later (the host reads the "all done" flag that late), or before the first decode
    step when the prefill's tokens are all EOS. The skipped columns are padding. Over
    EP 2 (WIDEEP) the steps after the last EOS route no token at all."""
    from wideep_jax.models import generate as generate_module
    from wideep_jax.models.generate import generate, generated_lengths

    folder, ids, _ = fixture("deepseek_v3")
    if ep == 1:
        model = from_pretrained(folder, dtype=jnp.float32)
    else:
        cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
        moe = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=ep)
        model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(ep), dtype=jnp.float32)
    prompts, new, pad = [list(ids[0, :5]), list(ids[1, :3])], 12, -1
    base = generate(model, prompts, max_new_tokens=new, eos_token_id=None)
    k = model.cfg.num_experts_per_tok
    assert (base.expert_counts.sum(axis=1) == (8 + 2 * (new - 1)) * k).all()
    for j in (0, 1, 3):
        eos = {int(t) for t in base.tokens[:, j]}  # each row ends at step j at the latest
        first = _first_hits(base.tokens, eos)
        steps = []
        got = generate(model, prompts, max_new_tokens=new, eos_token_id=sorted(eos), pad_token_id=pad,
                       on_token=steps.append)
        last = int(first.max())
        assert last <= j
        assert len(steps) == (0 if last == 0 else min(new - 1, last + generate_module._STOP_LAG)) < new - 1
        want = np.where(np.arange(new) > first[:, None], pad, base.tokens)
        np.testing.assert_array_equal(got.tokens, want)
        np.testing.assert_array_equal(generated_lengths(got.tokens, eos), first + 1)
        # Routed pairs per MoE layer: the prompts' tokens, then each row's decode tokens
        # up to its EOS (decode step t feeds token t - 1; a finished row's are masked).
        assert (got.expert_counts.sum(axis=1) == (8 + first.sum()) * k).all()
    # Without EOS ids every step runs.
    steps = []
    generate(model, prompts, max_new_tokens=new, eos_token_id=[], on_token=steps.append)
    assert len(steps) == new - 1


def test_eos_and_prompt_values_do_not_recompile(rng):
    """The EOS ids (up to 8, or none) and the pad id are data: other values, other prompt
    values of the same shapes, and stops at other steps compile and trace nothing."""
    from wideep_jax.models.generate import generate

    folder, _, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    v, new = model.cfg.vocab_size, 10
    lengths = [int(rng.integers(1, 6)), int(rng.integers(1, 6))]

    def prompts():
        return [list(map(int, rng.integers(0, v, n))) for n in lengths]
    generate(model, prompts(), max_new_tokens=new, eos_token_id=int(rng.integers(v)))
    steps = set()
    with count_compiles() as compiles, count_compiles(TRACE_EVENT) as traces:
        for _ in range(3):
            batch = prompts()
            base = generate(model, batch, max_new_tokens=new, eos_token_id=None).tokens
            j = int(rng.integers(0, new - 3))
            eos, pad, seen = [int(t) for t in base[:, j]], int(rng.integers(-3, v)), []
            got = generate(model, batch, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad,
                           on_token=seen.append)
            steps.add(len(seen))
            want = np.where(np.arange(new) > _first_hits(base, eos)[:, None], pad, base)
            np.testing.assert_array_equal(got.tokens, want)
        generate(model, prompts(), max_new_tokens=new, eos_token_id=list(map(int, rng.integers(0, v, 8))))
    assert (compiles[0], traces[0]) == (0, 0)
    assert min(steps) < new - 1  # at least one call stopped early


def test_bad_eos_and_pad_ids_are_errors(tmp_path, rng):
    """EOS ids outside [0, vocab_size) (never sampled: the sequence would never stop), or
    not ints, are an error naming eos_token_id, the value and the range, also when they
    come from config.json; a pad id that is not an int32 too."""
    from wideep_jax.models.generate import generate

    folder, ids, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    v = model.cfg.vocab_size
    prompts = [list(ids[0, :3])]
    for bad in (v + int(rng.integers(0, 1000)), -int(rng.integers(1, 1000))):
        for value in (bad, [int(rng.integers(v)), bad]):
            message = f"eos_token_id={value!r}: id {bad} outside the vocabulary; allowed: 0 <= id < vocab_size={v}"
            with pytest.raises(ValueError, match=re.escape(message)):
                generate(model, prompts, max_new_tokens=2, eos_token_id=value)
    for value in (True, 1.0, "1", [1, 2.5]):
        with pytest.raises(ValueError, match=re.escape(f"eos_token_id={value!r}: allowed: an int token id, a "
                                                       "sequence of them, or None")):
            generate(model, prompts, max_new_tokens=2, eos_token_id=value)
    for value in (2**31, -2**31 - 1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"pad_token_id={value!r}: allowed: an int32")):
            generate(model, prompts, max_new_tokens=2, eos_token_id=1, pad_token_id=value)
    bad = v + int(rng.integers(0, 1000))
    model = from_pretrained(_checkpoint_with_config(tmp_path / "bad", "qwen3_moe", eos_token_id=[1, bad]),
                            dtype=jnp.float32)
    with pytest.raises(ValueError, match=re.escape(f"eos_token_id=(1, {bad}) (the model config's eos_token_id): "
                                                   f"id {bad} outside the vocabulary")):
        generate(model, prompts, max_new_tokens=2)
    generate(model, prompts, max_new_tokens=2, eos_token_id=None)  # the way out


def test_batch_that_ep_does_not_divide_on_an_explicit_mesh():
    """jax.make_mesh's default (Explicit) axes, a batch EP does not divide (2 sequences over
    EP 4): the MoE output's token split cuts through sequences, and was reshaped to
    [batch, seq] as it was (ShardingTypeError). The forward and generate equal the local
    model's."""
    from wideep_jax.models.generate import generate

    folder, ids, want = fixture("qwen3_moe")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    mesh = jax.make_mesh((4,), ("ep",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Explicit,))
    moe = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=4)
    model = from_pretrained(folder, moe_config=moe, mesh=mesh, dtype=jnp.float32)
    ids = jnp.asarray(ids)[:2, :6]  # 12 tokens: split 3 per device, 2 sequences of 6
    assert rel_err(nnx.jit(lambda m, x: m(x))(model, ids), want[:2, :6]) <= 1e-4
    prompts = [list(map(int, ids[0])), list(map(int, ids[1, :2]))]
    local = generate(from_pretrained(folder, dtype=jnp.float32), prompts, max_new_tokens=3, eos_token_id=None)
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=3, eos_token_id=None).tokens,
                                  local.tokens)


def test_generate_argument_errors_name_the_value():
    """A generator of prompts was consumed by the emptiness check ("max() iterable argument
    is empty"), a 2-D array of prompts, a flat list of ids, a float or None max_new_tokens
    and a bad seed failed deep inside with messages naming none of them (or, for
    max_new_tokens=True, ran one step). Now: iterables and 2-D arrays work, the rest is a
    ValueError naming the argument, the value and what is allowed."""
    from wideep_jax.models.generate import generate

    folder, ids, _ = fixture("qwen3_moe")
    model = from_pretrained(folder, dtype=jnp.float32)
    rows = np.asarray(ids[:2, :4], np.int64)
    want = generate(model, [list(map(int, row)) for row in rows], max_new_tokens=2, eos_token_id=None).tokens
    for prompts in (rows, (list(row) for row in rows), tuple(map(tuple, rows))):
        np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=2, eos_token_id=None).tokens, want)
    allowed = "allowed: one or more prompts, each a non-empty list of token ids"
    for prompts, message in (([1, 2, 3], f"prompts[0]=1: a single value, not a prompt; {allowed}"),
                             ([], f"prompts=[]: {allowed}"), (iter([]), f"prompts=[]: {allowed}"),
                             ([[1], []], f"prompts[1] is empty; {allowed}"), (5, f"prompts=5: {allowed}"),
                             ("abc", f"prompts='abc': {allowed}"),
                             (rows[0], "prompts: an array of shape (4,); allowed: shape [batch, length]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            generate(model, prompts, max_new_tokens=2)
    for value in (0, -1, 2.0, None, True, "3"):
        with pytest.raises(ValueError, match=re.escape(f"max_new_tokens={value!r}: allowed: an int >= 1")):
            generate(model, rows, max_new_tokens=value)
    for value in (1.5, None, 2**63, -2**63 - 1, "0"):
        with pytest.raises(ValueError, match=re.escape(f"seed={value!r}: allowed: an int in [-2**63, 2**63)")):
            generate(model, rows, max_new_tokens=2, temperature=1.0, seed=value)


@pytest.mark.parametrize("arch", ["mixtral", "llama4_text"])
def test_generate_greedy_matches_the_uncached_forward_across_window_and_chunks(arch):
    """Mixtral's sliding window (5) and Llama 4's chunked (4) and NoPE layers, with
    left-padded prompts of lengths 1, 6 and 9 decoding past window and chunk boundaries:
    each row's greedy tokens are the argmax of the uncached full forward of that row alone
    (prompt + generated tokens; causal, so one forward checks every step)."""
    from wideep_jax.models.generate import generate

    folder, _, _ = fixture(arch)
    model = from_pretrained(folder, dtype=jnp.float32)
    rng = np.random.default_rng(3)  # fixed: margins between the top two logits checked below
    prompts = [list(map(int, rng.integers(0, model.cfg.vocab_size, n))) for n in (1, 6, 9)]
    new = 7
    got = generate(model, prompts, max_new_tokens=new, eos_token_id=None).tokens
    forward = nnx.jit(lambda m, x: m(x))
    for row, prompt in enumerate(prompts):
        logits = np.asarray(forward(model, jnp.asarray([prompt + list(map(int, got[row]))])))[0]
        steps = logits[len(prompt) - 1:len(prompt) - 1 + new]
        top2 = np.sort(steps, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-4).all()  # no near-tie the comparison would hinge on
        np.testing.assert_array_equal(got[row], np.argmax(steps, axis=-1), err_msg=f"row {row}")
