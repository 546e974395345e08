"""FP8 block-quantized checkpoints (DeepSeek-V3/R1's format) are dequantized on load."""
from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file  # writes F8_E4M3 / F8_E5M2 from ml_dtypes arrays

from moe_helpers import make_mesh
from test_models import fixture, rel_err
from wideep_jax.config import load_moe_config
from wideep_jax.models import from_hf_config, from_pretrained
from wideep_jax.models.config import CheckpointError
from wideep_jax.models.loading import Checkpoint

# Attention projections, dense MLP, routed and shared experts; not norms, embeddings,
# the router (``mlp.gate.weight``), its correction bias or lm_head.
LINEAR = re.compile(r"_proj(_with_mqa)?\.weight$").search
# Relative logit error allowed against the unquantized fixture. Measured: 0.20 with 128x128
# blocks, 0.24 with 32x16 (3 mantissa bits, amplified by the tiny random-weight model: its
# bf16 load is already off by 0.02); scales applied to the wrong blocks give 0.82.
FP8_LOGITS_TOL = 0.35


def quantize(w: np.ndarray, block, fp8=ml_dtypes.float8_e4m3fn):
    """(fp8 weight, float32 scale_inv) with one scale per block of the last two axes."""
    (rows, cols), (out, inp) = block, w.shape[-2:]
    nr, nc = -(-out // rows), -(-inp // cols)
    padded = np.zeros(w.shape[:-2] + (nr * rows, nc * cols), np.float32)
    padded[..., :out, :inp] = w
    amax = np.abs(padded.reshape(w.shape[:-2] + (nr, rows, nc, cols))).max(axis=(-3, -1))
    scale = (np.maximum(amax, 1e-12) / float(ml_dtypes.finfo(fp8).max)).astype(np.float32)
    return (w / broadcast(scale, block, w.shape)).astype(fp8), scale


def broadcast(scale: np.ndarray, block, shape) -> np.ndarray:
    """Each block's scale repeated over its entries (cut to ``shape`` where blocks are partial)."""
    full = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return full[..., :shape[-2], :shape[-1]]


def dequantize(q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """The reference: every entry times its block's scale, in float32."""
    return q.astype(np.float32) * broadcast(scale, block, q.shape)


def fp8_copy(dst, block=(128, 128), config_block=True, edit=None, quant=None):
    """The DeepSeek-V3 fixture with its linear weights in FP8; returns (folder, tensors of the
    dequantized reference checkpoint). ``config_block=False`` leaves ``weight_block_size`` out."""
    folder, _, _ = fixture("deepseek_v3")
    ckpt = Checkpoint(folder)
    tensors, reference = {}, {}
    for name in list(ckpt._where):
        w = np.asarray(ckpt.get(name))
        if LINEAR(name):
            tensors[name], tensors[f"{name}_scale_inv"] = quantize(w, block)
            reference[name] = dequantize(tensors[name], tensors[f"{name}_scale_inv"], block)
        else:
            tensors[name] = reference[name] = w
    if edit is not None:
        edit(tensors)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"} | (
        {"weight_block_size": list(block)} if config_block else {}) | (quant or {})
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, dst / "model.safetensors")
    return dst, reference


def save_plain(dst, tensors):
    """A float32 checkpoint with the fixture's config (no quantization_config)."""
    folder, _, _ = fixture("deepseek_v3")
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    save_file(tensors, dst / "model.safetensors")
    return dst


def flat_state(model) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def logits(model, ids):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def test_checkpoint_get_dequantizes_random_tensors(tmp_path, rng):
    """Random shapes (partial blocks, a stacked 3-D tensor), both FP8 formats: ``get`` equals
    the NumPy reference exactly, and reading the weights uses their scales."""
    block = tuple(int(b) for b in rng.integers(1, 40, size=2))
    shapes = {"a.weight": tuple(rng.integers(1, 100, size=2)),
              "b.weight": (block[0] * 2 + 1, block[1] * 3 - 1),
              "c.weight": (3,) + tuple(rng.integers(1, 100, size=2))}
    tensors, want = {}, {}
    for (name, shape), fp8 in zip(shapes.items(), [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
                                                   ml_dtypes.float8_e4m3fn]):
        w = rng.standard_normal(shape).astype(np.float32) * rng.lognormal(size=shape[:-2] + (1, 1))
        tensors[name], tensors[f"{name}_scale_inv"] = quantize(w, block, fp8)
        want[name] = dequantize(tensors[name], tensors[f"{name}_scale_inv"], block)
    tensors["norm.weight"] = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path, block)
    for name, shape in shapes.items():
        got = ckpt.get(name, shape)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want[name])
    assert ckpt.unused == {"norm.weight"}
    assert ckpt.get("norm.weight").dtype == ml_dtypes.bfloat16  # not quantized: as stored


@pytest.mark.parametrize("block,config_block", [((128, 128), True), ((32, 16), True), ((128, 128), False)],
                         ids=["128x128", "32x16", "default"])
def test_parameters_equal_the_dequantized_reference(tmp_path, block, config_block):
    """Every parameter of the FP8 model equals that of the model loaded from the NumPy-dequantized
    float32 checkpoint, exactly in float32 and after the cast to bfloat16."""
    fp8, reference = fp8_copy(tmp_path / "fp8", block, config_block)
    if block == (32, 16):  # the fixture's dims (16..96) give partial blocks along both axes
        shapes = [t.shape for n, t in reference.items() if LINEAR(n)]
        assert any(s[0] % 32 for s in shapes) and any(s[1] % 16 for s in shapes)
    plain = save_plain(tmp_path / "plain", reference)
    for dtype in (jnp.float32, jnp.bfloat16):
        got, want = flat_state(from_pretrained(fp8, dtype=dtype)), flat_state(from_pretrained(plain, dtype=dtype))
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_logits_close_to_unquantized_and_bound_catches_misplaced_scales(tmp_path):
    _, ids, want = fixture("deepseek_v3")
    for block in ((128, 128), (32, 16)):
        folder, _ = fp8_copy(tmp_path / f"{block[0]}x{block[1]}", block)
        err = rel_err(logits(from_pretrained(folder, dtype=jnp.float32), ids), want)
        assert 0.01 < err <= FP8_LOGITS_TOL, (block, err)  # quantized, but not too far

    def roll_scales(tensors):  # each row block gets its neighbour's scales
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            tensors[name] = np.roll(tensors[name], 1, axis=0)
    folder, _ = fp8_copy(tmp_path / "rolled", (32, 16), edit=roll_scales)
    assert rel_err(logits(from_pretrained(folder, dtype=jnp.float32), ids), want) > 2 * FP8_LOGITS_TOL


def test_wide_ep_loads_fp8(tmp_path):
    """WIDEEP over 4 devices with replica slots gives the local FP8 model's logits."""
    _, ids, want = fixture("deepseek_v3")
    folder, _ = fp8_copy(tmp_path / "fp8", (32, 16))
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    moe = load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": cfg.num_experts + 4}},
                          num_experts=cfg.num_experts, ep_size=4)
    model = from_pretrained(folder, moe_config=moe, mesh=make_mesh(4), dtype=jnp.float32)
    local = logits(from_pretrained(folder, dtype=jnp.float32), ids)
    got = logits(model, ids)
    assert rel_err(got, local) <= 1e-4
    assert rel_err(got, want) <= FP8_LOGITS_TOL


def test_fp8_errors_name_the_tensor(tmp_path, rng):
    folder, _, _ = fixture("deepseek_v3")
    linear = sorted(n for n in Checkpoint(folder)._where if LINEAR(n))
    name = linear[rng.integers(len(linear))]
    scale = f"{name}_scale_inv"

    def no_scale(t):
        del t[scale]
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {re.escape(repr(name))}: dtype F8_E4M3 "
                       rf"without a block scale {re.escape(repr(scale))}"):
        from_pretrained(fp8_copy(tmp_path / "a", edit=no_scale)[0], dtype=jnp.float32)

    def bad_scale(t):
        t[scale] = np.ones((t[scale].shape[0] + 1, t[scale].shape[1]), np.float32)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(repr(scale))}: shape \(2, 1\), expected \(1, 1\) "
                       r".*quantization_config.weight_block_size"):
        from_pretrained(fp8_copy(tmp_path / "b", edit=bad_scale)[0], dtype=jnp.float32)

    def dequantized_but_scale_kept(t):  # the scale is read only with its FP8 weight
        t[name] = t[name].astype(np.float32)
    with pytest.raises(CheckpointError, match=rf"not used.*{re.escape(scale)}"):
        from_pretrained(fp8_copy(tmp_path / "c", edit=dequantized_but_scale_kept)[0], dtype=jnp.float32)

    def one_axis(t):  # an FP8 vector, even with a scale, is no block-quantized weight
        norm = "model.norm.weight"
        t[norm], t[f"{norm}_scale_inv"] = t[norm].astype(ml_dtypes.float8_e4m3fn), np.ones((1,), np.float32)
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors: tensor 'model.norm.weight': dtype "
                                                        "F8_E4M3 with shape (48,); allowed: FP8 weights with 2 or "
                                                        "more axes")):
        from_pretrained(fp8_copy(tmp_path / "d", edit=one_axis)[0], dtype=jnp.float32)

    for i, (key, value, allowed) in enumerate([("quant_method", "awq", "fp8"), ("fmt", "e2m1", "e4m3"),
                                               ("weight_block_size", [128], "two ints >= 1")]):
        folder, _ = fp8_copy(tmp_path / f"q{i}", quant={key: value})
        with pytest.raises(CheckpointError, match=rf"quantization_config\.{key}={re.escape(repr(value))}.*{allowed}"):
            from_pretrained(folder, dtype=jnp.float32)
