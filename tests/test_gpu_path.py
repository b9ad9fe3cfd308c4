"""The GPU path, checked where it can be without a GPU (docs/gpu.md).

* The arguments our cuDNN attention passes to `jax.nn.dot_product_attention` (layout, GQA head mapping, mask
  shape, pad rows) give a written-out NumPy softmax attention when the same call runs with
  implementation='xla'.
* Selecting cuDNN on CPU fails with the documented error: in the model, and at the command line (one line,
  exit 2, nothing written).
* The config shorthands that switch a run to bf16 / cuDNN / remat reach both the trainer and the planner,
  also for converted checkpoints.
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_convert_testlib import IMAGE_ID, save_tokenizer, tiny_llava

from configs import distill
from rskd_jax.models import layers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def numpy_attention(q, k, v, mask):
    """Head-major q [B,H,T,D], k/v [B,K,S,D]; query head h reads KV head h // (H // K); rows with no key attend
    every key (the documented pad-row rule); float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, t, d = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, hi] @ k[bi, hi // g].T / np.sqrt(d)
            m = mask[bi] | ~mask[bi].any(-1, keepdims=True)
            s = np.where(m, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, hi // g]
    return out


@pytest.fixture(scope="module")
def qkv_mask():
    rng = np.random.default_rng(0)
    b, h, kh, t, d = 3, 6, 2, 10, 8
    q, k, v = (
        rng.standard_normal(s).astype(np.float32) for s in [(b, h, t, d), (b, kh, t, d), (b, kh, t, d)]
    )
    valid = np.ones((b, t), bool)
    valid[0, :4] = False  # left-padded prompt: queries 0-3 see no key at all
    valid[1, 7:] = False  # right-padded conversation
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    return q, k, v, mask, valid


def test_sdpa_arguments_follow_the_jax_contract(qkv_mask):
    q, k, v, mask, valid = qkv_mask
    args = layers.sdpa_arguments(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert args["query"].shape == (3, 10, 6, 8) and args["key"].shape == (3, 10, 2, 8)  # BTNH / BSKH
    assert args["mask"].shape == (3, 1, 10, 10) and args["mask"].dtype == jnp.bool_  # broadcast to BNTS
    out = jax.nn.dot_product_attention(**args, implementation="xla").swapaxes(1, 2)
    ref = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)  # every row, pad queries too
    assert np.abs(ref[0, :, :4] - ref[0, :, 5:6]).max() > 1e-3  # pad rows are not trivially equal to others
    ours = layers.attention_heads(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), "xla")
    real = np.broadcast_to(valid[:, None, :], ref.shape[:3])
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=2e-6, rtol=0)  # same at real rows


def test_sdpa_arguments_without_mask(qkv_mask):
    q, k, v, _, _ = qkv_mask
    args = layers.sdpa_arguments(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None)
    assert args["mask"] is None
    out = jax.nn.dot_product_attention(**args, implementation="xla").swapaxes(1, 2)
    full = np.ones((3, 10, 10), bool)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, full), atol=2e-6, rtol=0)


def test_cudnn_on_cpu_gives_the_documented_error(qkv_mask):
    if jax.default_backend() == "gpu":
        pytest.skip("CPU-only check")
    q, k, v, mask, _ = qkv_mask
    with pytest.raises(NotImplementedError) as e:
        layers.attention_heads(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(mask), "cudnn")
    assert str(e.value) == layers.CUDNN_NEEDS_GPU
    assert layers.CUDNN_NEEDS_GPU in (ROOT / "docs" / "gpu.md").read_text()


def test_train_cli_refuses_cudnn_on_cpu(tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("CPU-only check")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", "configs/distill.py:tiny,attention=cudnn"]
    p = subprocess.run(
        [*cmd, "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: teacher.overrides.attention_impl='cudnn' needs a GPU")
    assert "Traceback" not in p.stderr and not workdir.exists()


def test_config_shorthands_reach_trainer_and_planner():
    from rskd_jax.train import plan

    c = distill.get_config(
        "geochat13b_to_7b,attention=cudnn,dtype=bfloat16,teacher_param_dtype=bfloat16,remat=full"
    )
    assert dict(c.teacher.overrides) == dict(attention_impl="cudnn", dtype="bfloat16", param_dtype="bfloat16")
    assert dict(c.student.overrides) == dict(attention_impl="cudnn", dtype="bfloat16", remat_policy="full")
    settings = plan.resolve_settings(c)
    assert {k: src.split(" (")[0] for k, (_, src) in settings.items()} == dict(
        compute_dtype="config",
        teacher_param_dtype="config",
        student_param_dtype="model default",
        remat="config",
    )
    s_cfg, t_cfg = plan.model_configs(c, settings)
    assert (s_cfg.dtype, s_cfg.param_dtype, s_cfg.remat_policy, s_cfg.attention_impl) == (
        "bfloat16",
        "float32",
        "full",
        "cudnn",
    )
    assert (t_cfg.dtype, t_cfg.param_dtype, t_cfg.attention_impl) == ("bfloat16", "bfloat16", "cudnn")
    base = distill.get_config(
        "geochat13b_to_7b"
    )  # the preset's own settings; no attention choice unless asked
    assert "attention_impl" not in base.student.overrides and "attention_impl" not in base.teacher.overrides
    with pytest.raises(KeyError, match="attn"):
        distill.get_config("tiny,attn=cudnn")


def test_overrides_apply_to_converted_checkpoints(tmp_path):
    """build_model with a checkpoint: the section's overrides (dtypes, attention, remat) reach the model."""
    from rskd_jax import build
    from rskd_jax.parallel import mesh as mesh_lib

    src = tmp_path / "hf"
    tiny_llava().save_pretrained(src)
    save_tokenizer(src, IMAGE_ID)
    config = distill.get_config("tiny,attention=cudnn,dtype=bfloat16,teacher_param_dtype=bfloat16")
    mc = config.teacher
    mc.checkpoint = str(src)
    saved = build.checkpoint_config(
        src
    )  # the section describes the checkpoint's sizes, as a real config does
    mc.vision = {f: getattr(saved.vision, f) for f in build.VISION_ARCH}
    mc.text = {f: getattr(saved.text, f) for f in build.TEXT_ARCH}
    config.data.image_size = saved.vision.image_size
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = build.build_model(config, mc, "teacher", mesh=mesh, seed=0)
    assert (model.cfg.dtype, model.cfg.param_dtype, model.cfg.attention_impl) == (
        "bfloat16",
        "bfloat16",
        "cudnn",
    )
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
