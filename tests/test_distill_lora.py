"""LoRA in distillation: dropout only in the student's training forwards (distill and SFT steps), feature terms
that would only train a discarded map are refused, and the geochat13b_to_7b preset's LoRA settings."""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_distill_step import IMG, configs, make_batch

from configs import distill as distill_config
from rskd_jax.distill import rollout as R
from rskd_jax.distill import step as S
from rskd_jax.distill.checks import ConfigError, check_config, check_feature_terms
from rskd_jax.models import LlavaModel, LoRAConfig, apply_lora
from rskd_jax.models.layers import Linear


# ------------------------------------------------------------------------------------------ the layer itself
@pytest.mark.parametrize("path", ["call", "split_heads", "merge_heads"])
def test_lora_dropout_branch_is_an_inverted_bernoulli_mask(path):
    """With A = B = identity the LoRA branch is scale * dropout(x): every element is 0 or x / (1 - p), zeros
    at rate p; without a key (or with p = 0) it is scale * x exactly."""
    d, heads, scale, p = 64, 4, 2.0, 0.25
    lin = Linear(
        d, d, ("embed", "mlp"), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    lin.lora_a, lin.lora_b = nnx.LoRAParam(jnp.eye(d)), nnx.LoRAParam(jnp.eye(d))
    lin.lora_scale, lin.lora_dropout = scale, p
    w = np.asarray(lin.kernel[...])
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 32, d)))
    if path == "call":
        fwd, inp, base = (lambda k: lin(jnp.asarray(x), k)), x, x @ w
    elif path == "split_heads":  # [B, T, d] -> [B, H, T, d/H], read back as [B, T, d]
        fwd = lambda k: lin.split_heads(jnp.asarray(x), heads, k).swapaxes(1, 2).reshape(x.shape)
        inp, base = x, x @ w
    else:  # [B, H, T, d/H] -> [B, T, d]; dropout acts on the head-major input
        o = x.reshape(4, 32, heads, -1).swapaxes(1, 2)
        fwd = lambda k: lin.merge_heads(jnp.asarray(o), k)
        inp, base = x, x @ w  # o read back as [B, T, d] is x
    branch = lambda k: (np.asarray(fwd(k)) - base) / scale
    np.testing.assert_allclose(branch(None), inp, rtol=1e-4, atol=1e-4)  # eval: no dropout
    ratio = branch(jax.random.key(2)) / inp
    dropped = np.abs(ratio) < 1e-3
    np.testing.assert_allclose(ratio[~dropped], 1 / (1 - p), rtol=1e-3)
    assert abs(dropped.mean() - p) < 0.03  # 8192 draws: 6 standard deviations
    assert not np.array_equal(dropped, np.abs(branch(jax.random.key(3)) / inp) < 1e-3)  # the key matters
    lin.lora_dropout = 0.0
    np.testing.assert_allclose(branch(jax.random.key(2)), inp, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the step
@functools.cache  # building a model eagerly takes seconds here; the tests below never modify it
def lora_student(dropout: float):
    _, scfg = configs()
    st = LlavaModel(scfg, rngs=nnx.Rngs(1))
    apply_lora(st, LoRAConfig(rank=4, alpha=8.0, dropout=dropout), rngs=nnx.Rngs(2))
    keys = iter(jax.random.split(jax.random.key(3), 64))
    for _, m in nnx.iter_modules(st):  # B != 0: the adapters change the output
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.5 * jax.random.normal(next(keys), m.lora_b.shape)
    return st


@functools.cache
def teacher_model():
    tcfg, _ = configs()
    return LlavaModel(tcfg, rngs=nnx.Rngs(0))


def spec_of(weights, **kw):
    return S.StepSpec(
        weights=weights,
        sampling=R.SamplingConfig(max_new_tokens=3, alpha=0.2),
        eos_id=2,
        pad_id=0,
        image_token_id=IMG,
        chunk_size=4,
        **kw,
    )


_COMPILED: dict = {}


def metrics_of(student, teacher, spec, key):
    """compute_loss metrics, jitted once per (student graph, teacher graph, spec): the key is an argument."""
    g, st = nnx.split(S.StudentWithMaps(student, {}))
    tg, ts = nnx.split(teacher) if teacher is not None else (None, None)
    if (g, tg, repr(spec)) not in _COMPILED:
        batch = {k: jnp.asarray(v) for k, v in make_batch(seed=5).items()}

        def f(st, ts, key):
            te = nnx.merge(tg, ts) if tg is not None else None
            return S.compute_loss(nnx.merge(g, st), te, batch, key, spec)[1]

        _COMPILED[(g, tg, repr(spec))] = jax.jit(f)
    return {k: float(v) for k, v in _COMPILED[(g, tg, repr(spec))](st, ts, key).items()}


def test_sft_loss_uses_lora_dropout_only_when_its_rate_is_positive():
    spec = S.StepSpec(weights=dict(sft=1.0), sampling=None, eos_id=2, pad_id=0, image_token_id=IMG)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    off = lora_student(0.0)
    assert metrics_of(off, None, spec, k0) == metrics_of(
        off, None, spec, k1
    )  # rate 0: the key changes nothing
    on = lora_student(0.5)
    a, b = metrics_of(on, None, spec, k0), metrics_of(on, None, spec, k1)
    assert a == metrics_of(on, None, spec, k0)  # a function of the key (resume is exact)
    assert a["loss/sft"] != b["loss/sft"] and a["loss/sft"] != metrics_of(off, None, spec, k0)["loss/sft"]


@pytest.mark.parametrize("pack", [True, False])
def test_distill_dropout_in_training_forwards_not_in_the_rollout(pack):
    """Same key: the rollout (sampling by the student without dropout) is identical with dropout 0 and 0.5,
    while the losses of the student's training forwards (response view and ground-truth view) change."""
    spec = spec_of(dict(rkl=1.0, pg=1.0, sft=0.5), pack_views=pack)
    teacher, key = teacher_model(), jax.random.key(7)
    off, on = (metrics_of(lora_student(p), teacher, spec, key) for p in (0.0, 0.5))
    for k in ("rollout/length", "rollout/rev_kl_k3", "rollout/iw_mean"):
        assert on[k] == off[k], k
    for k in ("loss/rkl", "loss/sft"):
        assert abs(on[k] - off[k]) > 1e-4 * abs(off[k]), k


def test_sft_step_with_dropout_is_reproducible_from_its_state():
    spec = S.StepSpec(weights=dict(sft=1.0), sampling=None, eos_id=2, pad_id=0, image_token_id=IMG)
    tx = optax.adam(1e-3)
    init, step, parts = S.make_train_step(
        S.StudentWithMaps(lora_student(0.5)), None, spec, tx, "lora", donate=False
    )
    batch = make_batch(seed=6)
    s0 = init(parts["params"], jax.random.key(0))
    s1, m1 = step(s0, parts["frozen"], None, batch)
    s1b, m1b = step(s0, parts["frozen"], None, batch)  # "resumed" from the same state
    s2, m2 = step(s1, parts["frozen"], None, batch)
    assert float(m1["loss/sft"]) == float(m1b["loss/sft"])
    jax.tree.map(np.testing.assert_array_equal, s1.params, s1b.params)
    kd = lambda s: np.asarray(jax.random.key_data(s.rng))
    assert not np.array_equal(kd(s1), kd(s2))  # a fresh dropout key every step, carried in the state


# --------------------------------------------------------------------- feature terms and discarded maps
LORA_PATHS = [
    "model/llm/layers/q_proj/lora_a",
    "model/llm/layers/q_proj/lora_b",
    "maps/layer0/w",
    "maps/proj/w",
]


def test_check_feature_terms_rule():
    w = dict(feat_image=1.0, feat_text=1.0, feat_proj=0.0)
    check_feature_terms(w, LORA_PATHS, "lora", shared_vision=True)  # the LLM hidden states reach the adapters
    with pytest.raises(
        ValueError, match=r"^config loss\.weights\.feat_proj=1: with trainable='lora'.*\['proj'\]"
    ):
        check_feature_terms(dict(w, feat_proj=1.0), LORA_PATHS, "lora", shared_vision=True)
    with pytest.raises(ValueError, match="feat_proj"):  # own but frozen vision tower: still nothing to train
        check_feature_terms(dict(feat_proj=1.0), LORA_PATHS, "lora", shared_vision=False)
    check_feature_terms(dict(feat_proj=1.0), ["model/projector/linear_1/kernel", "maps/proj/w"], "all", True)
    check_feature_terms(dict(feat_proj=1.0), ["model/vision/x/kernel", "maps/proj/w"], "all+vision", False)
    only_maps = ["maps/layer0/w", "model/llm/lm_head/kernel"]  # the LM head is after every hidden state
    with pytest.raises(ValueError, match="feat_image"):
        check_feature_terms(dict(feat_image=0.5), only_maps, "maps/.*|.*lm_head.*", True)


def test_the_rule_matches_autodiff_and_the_step_refuses():
    """Gradients of each feature term w.r.t. a LoRA student with shared vision: feat_proj reaches only its
    map (every adapter gradient exactly 0), feat_image reaches the adapters; make_train_step refuses the
    first configuration with the config key in one line."""
    tcfg, scfg = configs()
    teacher, student = teacher_model(), lora_student(0.0)
    layers = ((-1, -1),)
    maps = S.feature_maps_for(layers, scfg, tcfg, nnx.Rngs(4), with_proj=True)
    ds = S.StudentWithMaps(student, maps)
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=8).items()}
    filt = S.trainable_filter("lora")
    g, params, frozen = nnx.split(ds, filt, ...)
    tg, ts = nnx.split(teacher)

    def grads(weights):
        spec = spec_of(weights, feature_layers=layers, shared_vision=True)
        f = lambda p: S.compute_loss(
            nnx.merge(g, p, frozen), nnx.merge(tg, ts), batch, jax.random.key(0), spec
        )[0]
        flat = nnx.to_flat_state(jax.jit(jax.grad(f))(params))
        norm = lambda pred: sum(float(jnp.abs(v[...]).sum()) for p, v in flat if pred(S.path_str(p)))
        return norm(lambda s: s.startswith("model/")), norm(lambda s: s.startswith("maps/proj"))

    lora_g, map_g = grads(dict(feat_proj=1.0))
    assert lora_g == 0.0 and map_g > 0
    assert grads(dict(feat_image=1.0))[0] > 0
    tx = optax.adam(1e-3)
    with pytest.raises(ValueError, match=r"loss\.weights\.feat_proj=1: .*export discards"):
        S.make_train_step(ds, teacher, spec_of(dict(feat_proj=1.0), shared_vision=True), tx, "lora")
    S.make_train_step(
        ds, teacher, spec_of(dict(feat_image=1.0), feature_layers=layers, shared_vision=True), tx, "lora"
    )


# ------------------------------------------------------------------------------------- the real preset
def test_geochat_preset_lora_settings():
    c = distill_config.get_config("geochat13b_to_7b")
    assert c.trainable == "lora" and c.shared_vision
    assert c.loss.weights["feat_proj"] == 0.0 and c.loss.weights["feat_image"] > 0
    assert c.lora.dropout == 0.05 and (c.lora.rank, c.lora.alpha) == (64, 16.0)  # GeoChat's LoRA
    check_feature_terms(dict(c.loss.weights), LORA_PATHS, c.trainable, c.shared_vision)
    assert c.optim.lr == 2e-4  # GeoChat's LoRA lr (scripts/finetune_lora.sh)


def test_lora_step_moves_weights_like_the_documented_factor():
    """The lr argument of configs/distill.py: one Adam step of size lr on a freshly initialised r=64,
    alpha=16 adapter of a 4096-wide layer moves W by ~0.018·lr (rms), so MiniLLM's full-FT 5e-6 would move
    the weights ~55× less than it does in MiniLLM, and 2e-4 moves them by MiniLLM's order (~3.6e-6)."""

    class Block(nnx.Module):
        def __init__(self):
            kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
            self.q_proj = Linear(4096, 4096, ("embed", "mlp"), **kw)

    lin = apply_lora(
        Block(), LoRAConfig(rank=64, alpha=16.0, targets=("q_proj",), exclude=()), rngs=nnx.Rngs(1)
    ).q_proj
    a, b = lin.lora_a[...], lin.lora_b[...]
    lr = 2e-4
    tx = optax.adam(lr)
    gr = dict(
        a=jax.random.normal(jax.random.key(2), a.shape), b=jax.random.normal(jax.random.key(3), b.shape)
    )
    upd, _ = tx.update(gr, tx.init(dict(a=a, b=b)))
    dw = lin.lora_scale * ((a + upd["a"]) @ (b + upd["b"]) - a @ b)
    factor = float(jnp.sqrt(jnp.mean(dw**2))) / lr
    assert factor == pytest.approx(0.018, rel=0.05)
    assert 1e-6 < lr * factor < 1e-5 and 5e-6 * factor < 1e-7


def test_check_config_and_the_cli_refuse_before_loading_anything(tmp_path):
    """The named trainable subsets are checked on the config alone; launch/train.py stops with one line and
    status 2 before it reads a checkpoint (the preset's checkpoint paths are empty here)."""
    c = distill_config.get_config("geochat13b_to_7b")
    check_config(c)  # the preset as shipped
    c.loss.weights["feat_proj"] = 1.0
    with pytest.raises(ConfigError, match=r"loss\.weights\.feat_proj=1"):
        check_config(c)
    c.trainable = "all"  # the projector trains: accepted
    check_config(c)
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [
            sys.executable,
            str(root / "launch" / "train.py"),
            "--config",
            str(root / "configs" / "distill.py") + ":geochat13b_to_7b",
            "--config.loss.weights.feat_proj=1.0",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: config loss.weights.feat_proj=1: with trainable='lora'"), (
        lines[-3:]
    )
    assert "Traceback" not in out.stderr
