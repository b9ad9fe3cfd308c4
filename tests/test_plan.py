"""launch/plan.py, the AOT memory / FLOPs plan. Fast path: 8 fake CPU devices on the tiny distill config (CI
has no libtpu). One slow test compiles for a real TPU topology (v5p-8) when libtpu is installed."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import distill
from rskd_jax.distill import step as S
from rskd_jax.train import plan as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/distill.py:tiny", "--batch_size", "8"]


def run_cli(args, tmp_path, name):
    """launch/plan.py in a subprocess. The inherited XLA_FLAGS ask for 2 devices on purpose: the CLI must set
    --xla_force_host_platform_device_count itself. A persistent compilation cache lets a second run of the
    same program (another HBM size) skip the compile."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    out_json = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "launch/plan.py", *args, "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out_json.read_text()) if out_json.exists() else None
    return proc, report


def shard_bytes(tree, skip=()) -> int:
    """Per-device bytes of sharded ShapeDtypeStructs from each sharding's shard_shape (a PRNG key is 2 x
    uint32); leaves whose path contains a `skip` word are left out."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(w in jax.tree_util.keystr(path) for w in skip):
            continue
        shard = x.sharding.shard_shape(x.shape)
        item = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        total += math.prod(shard) * item
    return total


# ------------------------------------------------------------------------------- independent FLOPs count
def mm(m, k, n):
    return 2 * m * k * n


def vision_fwd(v, image, layers):
    """CLIP tower: patch conv + `layers` encoder layers over patches + CLS, matmul by matmul."""
    patches = (image // v["patch_size"]) ** 2
    t, d, i, h = patches + 1, v["hidden_size"], v["intermediate_size"], v["num_heads"]
    per_layer = (
        4 * mm(t, d, d)  # q, k, v, out projections
        + h * (mm(t, d // h, t) + mm(t, t, d // h))  # scores, weighted values per head
        + mm(t, d, i)
        + mm(t, i, d)
    )
    return mm(patches, 3 * v["patch_size"] ** 2, d) + layers * per_layer


def decoder_fwd(t, queries, keys):
    """(dense, attention) matmul FLOPs of all decoder layers: `queries` tokens attending `keys` keys."""
    d, i, h = t["hidden_size"], t["intermediate_size"], t["num_heads"]
    hd = d // h
    dense = 3 * mm(queries, d, h * hd) + mm(queries, h * hd, d) + 3 * mm(queries, d, i)
    attn = h * (mm(queries, hd, keys) + mm(queries, keys, hd))
    return t["num_layers"] * dense, t["num_layers"] * attn


def tiny_step_flops(c, batch, reuse=True):
    """configs/distill.py:tiny: trainable 'all', no remat, each model runs its own CLIP tower in every call
    with pixels, loss terms rkl, pg, sft, fkl, feat_image/feat_text on one layer pair (no feat_proj); the
    response and ground-truth views packed into one sequence (loss.pack_views); with teacher prefix reuse
    the teacher runs only the n - p ground-truth tokens after its cached prompt (max(p + r, n) slots)."""
    v, image, vocab = dict(c.teacher.vision), c.data.image_size, c.data.vocab_size
    s, t = dict(c.student.text), dict(c.teacher.text)
    n_img = (image // v["patch_size"]) ** 2
    vis = vision_fwd(v, image, 1)  # vision_feature_layer -2 of a 2-layer tower = 1 layer
    proj = lambda d: mm(n_img, v["hidden_size"], d) + mm(n_img, d, d)
    head = lambda m, n: mm(n, m["hidden_size"], vocab)
    p, r, n = c.data.prompt_len, c.sampling.max_new_tokens, c.data.seq_len

    def frozen(m, q, k, image):
        dense, attn = decoder_fwd(m, q, k)
        return dense + attn + ((vis + proj(m["hidden_size"])) if image else 0)

    def student_grad(tokens):  # fwd + dX + dW (attention: both operands); projector fwd + dW; tower fwd
        dense, attn = decoder_fwd(s, tokens, tokens)
        return 3 * dense + 3 * attn + 2 * proj(s["hidden_size"]) + vis

    pad = lambda k: -(-k // min(128, k)) * min(128, k)  # loss chunks of 128 positions
    per_seq = (
        frozen(s, p, p + r, True)
        + head(s, 1)
        + frozen(t, p, p + r, True)
        + head(t, 1)  # prefill
        + r * (frozen(s, 1, p + r, False) + head(s, 1) + frozen(t, 1, p + r, False) + head(t, 1))  # decode
        + student_grad(n + r)
        + (frozen(t, n - p, max(p + r, n), False) if reuse else frozen(t, n + r, n + r, True))
        + 4 * head(s, pad(r))
        + 2 * head(t, pad(r))  # student fwd + recompute + dX + dW; teacher x2
        + 4 * head(s, pad(n))
        + 2 * head(t, pad(n))
        + 3 * mm(n, s["hidden_size"], t["hidden_size"])  # the trained feature map
    )
    return batch * per_seq


# ------------------------------------------------------------------------------- tests
def test_cpu_fallback_tiny_report_and_exit_codes(tmp_path):
    proc, rep = run_cli(TINY + ["--topology", "8xH100"], tmp_path, "fit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PESSIMISTIC XLA:CPU estimate" in proc.stdout and "verdict: FITS" in proc.stdout
    assert "| argument | output | alias | temp | code | **total** |" in proc.stdout
    assert "[plan] compile took" in proc.stderr  # progress lines
    assert rep["devices"] == 8 and rep["backend"] == "cpu"
    assert rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mem = rep["memory"]
    assert all(mem[k] > 0 for k in ("argument", "output", "alias", "temp", "total"))
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
    assert mem["peak"] is None  # meaningless on XLA:CPU
    assert rep["hbm_bytes"] == 80 * 10**9 and rep["fits"]
    assert rep["xla_flops_per_device"] > 0 and rep["step_time_s"]["40%"] > rep["step_time_s"]["100%"] > 0

    # argument bytes per device == the per-device shard sizes of the abstract inputs. jit drops unused
    # arguments from the executable: CLIP's final LayerNorm (post_ln), unused with vision_feature_layer=-2.
    config = distill.get_config("tiny")
    lo = P.lower_step(config, jax.devices()[:8], batch_size=8)
    assert mem["argument"] == shard_bytes(lo.args, skip=["post_ln"])
    assert shard_bytes(lo.args) - mem["argument"] == 4 * 64 * 4 // 8  # scale + bias, 2 towers, f32, 8 shards
    assert mem["alias"] == shard_bytes(lo.args[0])  # the donated train state

    # analytic FLOPs == the matmul-by-matmul count above; per device = global / 8; time from the H100 peak
    expected = tiny_step_flops(config, 8)
    assert rep["flops"]["total"] == expected and sum(rep["flops"]["components"].values()) == expected
    assert rep["flops"]["per_device"] == pytest.approx(expected / 8)
    assert rep["step_time_s"]["100%"] == pytest.approx(expected / 8 / 989e12)

    # a tiny fake HBM: the same program (compile cache hit) does not fit, exit code 3
    proc2, rep2 = run_cli(TINY + ["--topology", "8xH100", "--hbm_gib", "0.001"], tmp_path, "nofit")
    assert proc2.returncode == 3, proc2.stderr[-3000:]
    assert "DOES NOT FIT" in proc2.stdout and not rep2["fits"]
    assert rep2["memory"]["total"] == mem["total"]


def test_flops_remat_and_lora():
    """Full remat adds one student forward of the decoder layers; LoRA-only training drops dW of the dense
    decoder weights, the head and the projector and adds the adapters."""
    config = distill.get_config("tiny")
    s_cfg, t_cfg = P.model_configs(config, P.resolve_settings(config))
    spec = S.spec_from_config(config, s_cfg)
    all_paths = ["model/llm/layers/q_proj/kernel", "model/llm/lm_head/kernel", "model/projector/l1/kernel"]
    base = P.step_flops(config, s_cfg, t_cfg, spec, all_paths, 8)["total"]
    full = P.step_flops(config, s_cfg.replace(remat_policy="full"), t_cfg, spec, all_paths, 8)["total"]
    s, c, r = dict(config.student.text), config.data, config.sampling.max_new_tokens
    pk = c.seq_len + r  # the packed [ground truth | response] sequence
    dense_pk, attn_pk = decoder_fwd(s, pk, pk)
    assert full - base == 8 * (dense_pk + attn_pk)

    lora = P.step_flops(config, s_cfg, t_cfg, spec, ["model/llm/layers/q_proj/lora_a"], 8)["total"]
    d, i, rank = s["hidden_size"], s["intermediate_size"], config.lora.rank
    # x@A@B on q, k, v, o (d -> d) and gate, up (d -> i), down (i -> d), per token, all layers
    per_token = s["num_layers"] * (
        4 * (mm(1, d, rank) + mm(1, rank, d)) + 3 * (mm(1, d, rank) + mm(1, rank, i))
    )
    n_img = (c.image_size // config.student.vision["patch_size"]) ** 2
    proj = mm(n_img, config.student.vision["hidden_size"], d) + mm(n_img, d, d)
    head = lambda k: mm(k, d, c.vocab_size)
    # no dW for the decoder, the head (ground truth padded to 256) and the projector
    delta = (
        -dense_pk - head(r) - head(256) - proj + per_token * (c.prompt_len + r + 3 * pk)
    )  # adapters: prefill, decode, 2 grad passes; one projector dW (one packed forward)
    assert lora - base == 8 * delta

    # with loss.pack_views=False: the two views as separate forwards
    config.loss.pack_views = False
    spec2 = S.spec_from_config(config, s_cfg)
    base2 = P.step_flops(config, s_cfg, t_cfg, spec2, all_paths, 8)["total"]
    full2 = P.step_flops(config, s_cfg.replace(remat_policy="full"), t_cfg, spec2, all_paths, 8)["total"]
    ro, gt = c.prompt_len + r, c.seq_len
    dense_ro, attn_ro = decoder_fwd(s, ro, ro)
    dense_gt, attn_gt = decoder_fwd(s, gt, gt)
    assert full2 - base2 == 8 * (dense_ro + attn_ro + dense_gt + attn_gt)


def test_teacher_prefix_reuse_flops_and_kept_bytes():
    """Reuse replaces the teacher's forward over [ground truth | response] by one over the answer tokens after
    the cached prompt: >= 15 % fewer FLOPs per step for geochat13b_to_7b; the tiny count by hand both ways."""
    tiny = distill.get_config("tiny")
    s_cfg, t_cfg = P.model_configs(tiny, P.resolve_settings(tiny))
    spec = S.spec_from_config(tiny, s_cfg)
    paths = ["model/llm/layers/q_proj/kernel", "model/llm/lm_head/kernel", "model/projector/l1/kernel"]
    for flag in (True, False):
        sp = dataclasses.replace(spec, reuse_teacher_prefix=flag)
        assert P.step_flops(tiny, s_cfg, t_cfg, sp, paths, 8)["total"] == tiny_step_flops(tiny, 8, flag)

    geo = distill.get_config("geochat13b_to_7b")
    s_cfg, t_cfg = P.model_configs(geo, P.resolve_settings(geo))
    spec = S.spec_from_config(geo, s_cfg)
    assert spec.reuse_teacher_prefix  # the default
    on, off = (
        P.step_flops(geo, s_cfg, t_cfg, dataclasses.replace(spec, reuse_teacher_prefix=f), paths, 64)["total"]
        for f in (True, False)
    )
    assert on <= 0.85 * off, (on, off)
    # teacher KV cache of one micro-batch (32 sequences) over 32 devices: 40 layers x 40 heads x 128 x 2048
    # slots x (k, v) x bf16; hidden states: the prompt (1792) + 256 + 1 response positions x 5120 x bf16
    kept = P.teacher_states_bytes(geo, t_cfg, spec, 32, 64)
    assert kept["cache"] == 2 * 40 * 32 * 40 * 2048 * 128 * 2 // 32
    assert kept["hidden"] == 32 * 5120 * 2 * (1792 + 257) // 32


def test_settings_precedence_and_topologies():
    geo = distill.get_config("geochat13b_to_7b")
    st = P.resolve_settings(geo)
    # the preset's own overrides (what training reads too), not plan-only defaults
    assert st["teacher_param_dtype"] == (None, "config (bfloat16)") and st["remat"] == (None, "config (full)")
    assert st["student_param_dtype"] == (None, "model default")
    assert P.resolve_settings(geo, remat="dots_saveable")["remat"] == ("dots_saveable", "flag")
    s_cfg, t_cfg = P.model_configs(geo, st)
    assert (t_cfg.param_dtype, t_cfg.dtype, s_cfg.param_dtype, s_cfg.dtype, s_cfg.remat_policy) == (
        "bfloat16",
        "bfloat16",
        "float32",
        "bfloat16",
        "full",
    )
    assert s_cfg.vision.image_size == 504 and t_cfg.text.num_layers == 40 and s_cfg.text.vocab_size == 32000
    tiny = distill.get_config("tiny")
    assert all(src == "model default" for _, src in P.resolve_settings(tiny).values())
    assert P.model_configs(tiny, P.resolve_settings(tiny))[0].text.vocab_size == tiny.data.vocab_size
    v5p = P.get_topology("v5p-64")
    assert (v5p.devices, v5p.topology_name, v5p.chip_config) == (32, "v5:2x4x4", "megacore")
    assert P.get_topology("v4-32").devices == 16 and P.get_topology("v5e-256").devices == 256
    with pytest.raises(KeyError, match="count TensorCores"):
        P.get_topology("v5p-33")
    with pytest.raises(RuntimeError, match="not a TPU target"):
        P.backend_for(P.get_topology("8xH100"), "tpu")


def test_bad_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"global batch 4 .* data\*fsdp=8"):
        P.lower_step(distill.get_config("tiny"), jax.devices()[:8])


@pytest.mark.slow
def test_tpu_topology_v5p8_tiny(tmp_path):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed (pip install -e .[plan])")
    proc, rep = run_cli(["--config", "configs/distill.py:tiny", "--topology", "v5p-8"], tmp_path, "tpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rep["backend"] == "tpu" and rep["devices"] == 4 and "libtpu deviceless compile" in proc.stdout
    mem = rep["memory"]
    assert mem["peak"] > 0 and mem["code"] > 0 and mem["total"] > mem["argument"] > 0
    assert rep["hbm_bytes"] == 95 * 1024**3 and rep["fits"]
