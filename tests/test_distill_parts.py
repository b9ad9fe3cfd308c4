"""`step_parts`: the config switches select the step's forwards and terms; compute_loss runs those terms and
plan.step_flops counts those parts (per-part FLOPs against matmul-by-matmul formulas written out here)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_distill_step import configs, full_spec, make_batch
from test_plan import decoder_fwd, mm, vision_fwd

from configs import distill
from rskd_jax.distill import step as S
from rskd_jax.distill.parts import step_parts
from rskd_jax.models import LlavaModel
from rskd_jax.train import plan as P

FEAT = ("feat_image", "feat_text", "feat_proj")


def tiny():
    config = distill.get_config("tiny")
    s_cfg, t_cfg = P.model_configs(config, P.resolve_settings(config))
    return config, s_cfg, t_cfg, S.spec_from_config(config, s_cfg)


def with_weights(spec, **weights):
    return dataclasses.replace(spec, weights=weights)


# ------------------------------------------------------------------------------- the switches
def test_alpha_zero_samples_without_the_teacher_mix():
    spec = full_spec()
    assert step_parts(spec).teacher_mix
    p0 = step_parts(dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, alpha=0.0)))
    assert not p0.teacher_mix
    assert p0.rollout and p0.teacher_response == "rollout"  # the teacher's log-probs are still the rewards


def test_feature_alignment_off_has_no_feature_terms():
    spec = full_spec()
    on = step_parts(spec)
    assert on.feature_layers == spec.feature_layers and on.feat_proj
    off = step_parts(with_weights(spec, **{k: v for k, v in spec.weights.items() if k not in FEAT}))
    assert off.feature_layers == () and not off.feat_proj
    assert off.teacher_gt is not None  # fkl still needs the teacher's ground-truth view
    no_teacher_gt = step_parts(with_weights(spec, rkl=1.0, pg=1.0, sft=1.0))
    assert no_teacher_gt.teacher_gt is None and no_teacher_gt.token_terms == ("sft",)


def test_sft_spec_runs_no_teacher_and_no_rollout():
    config, s_cfg, _, _ = tiny()
    parts = step_parts(S.sft_spec(config, s_cfg), teacher=False)
    assert not parts.teacher and not parts.rollout and parts.gt
    assert parts.teacher_response is None and parts.teacher_gt is None
    assert parts.token_terms == ("sft",) and parts.feature_layers == () and not parts.feat_proj
    assert not parts.shared_vision


@pytest.mark.parametrize(
    "pack,reuse,response,gt",
    [
        (True, True, "rollout", "prefix"),
        (False, True, "rollout", "prefix"),
        (True, False, "packed", "packed"),
        (False, False, "forward", "forward"),
    ],
)
def test_packing_and_prefix_reuse_choose_the_teacher_views(pack, reuse, response, gt):
    parts = step_parts(full_spec(pack_views=pack, reuse_teacher_prefix=reuse))
    assert (parts.packed, parts.reuse_prefix) == (pack, reuse)
    assert (parts.teacher_response, parts.teacher_gt) == (response, gt)
    # without a ground-truth term nothing is packed and the teacher's ground-truth view is not needed
    ro_only = step_parts(with_weights(full_spec(pack_views=pack, reuse_teacher_prefix=reuse), rkl=1.0))
    assert not ro_only.packed and not ro_only.gt and ro_only.teacher_gt is None
    assert ro_only.rollout_terms == ("rkl",) and ro_only.teacher_response == (
        "rollout" if reuse else "forward"
    )
    # without a rollout term the teacher's ground-truth view is its own forward
    gt_only = step_parts(with_weights(full_spec(pack_views=pack, reuse_teacher_prefix=reuse), fkl=1.0))
    assert not gt_only.rollout and gt_only.teacher_gt == "forward" and gt_only.token_terms == ("fkl",)


@pytest.mark.parametrize(
    "weights",
    [
        dict(rkl=1.0, pg=1.0, feat_image=0.5, feat_text=0.5, feat_proj=0.5, sft=0.5, fkl=0.5),
        dict(rkl=1.0, sft=1.0),
        dict(fkl=1.0, feat_text=1.0),
    ],
)
def test_compute_loss_reports_exactly_the_terms_of_its_parts(weights):
    spec = with_weights(full_spec(), **weights)
    parts = step_parts(spec)
    tcfg, scfg = configs()
    teacher = LlavaModel(tcfg, rngs=nnx.Rngs(0))
    student = S.StudentWithMaps(
        LlavaModel(scfg, rngs=nnx.Rngs(1)), S.maps_for_spec(spec, scfg, tcfg, nnx.Rngs(3))
    )
    batch = {k: jax.numpy.asarray(v) for k, v in make_batch().items()}
    _, metrics = nnx.eval_shape(
        lambda s, t: S.compute_loss(s, t, batch, jax.random.key(0), spec), student, teacher
    )
    expected = {f"loss/{k}" for k in parts.rollout_terms + parts.token_terms} | {"loss/total"}
    for i, _ in enumerate(parts.feature_layers):
        expected |= {f"loss/{k}/{i}" for k in ("feat_image", "feat_text") if spec.w(k) > 0}
    expected |= {"loss/feat_proj"} if parts.feat_proj else set()
    assert {k for k in metrics if k.startswith("loss/")} == expected
    assert any(k.startswith("rollout/") for k in metrics) == parts.rollout


# ------------------------------------------------------------------------------- FLOPs per part
def test_flop_components_follow_the_parts():
    config, s_cfg, t_cfg, spec = tiny()
    paths = ["model/llm/layers/q_proj/kernel"]
    comps = lambda sp: set(P.step_flops(config, s_cfg, t_cfg, sp, paths, 1)["components"])
    assert comps(with_weights(spec, sft=1.0)) == {
        "student fwd+bwd (ground truth)",
        "heads (ground-truth chunks)",
    }
    assert comps(dataclasses.replace(with_weights(spec, rkl=1.0), reuse_teacher_prefix=False)) == {
        "rollout prefill",
        "rollout decode",
        "student fwd+bwd (prompt+response)",
        "teacher fwd (prompt+response)",
        "heads (response chunks)",
    }
    fkl_feat = comps(with_weights(spec, fkl=1.0, feat_text=1.0))
    assert fkl_feat == {
        "student fwd+bwd (ground truth)",
        "teacher fwd (ground truth)",
        "heads (ground-truth chunks)",
        "feature maps",
    }


def test_flops_per_part_equal_written_out_formulas():
    """configs/distill.py:tiny (trainable 'all', no remat, own CLIP towers) part by part."""
    config, s_cfg, t_cfg, spec = tiny()
    paths = ["model/llm/layers/q_proj/kernel", "model/llm/lm_head/kernel", "model/projector/l1/kernel"]
    b = 4
    comps = P.step_flops(config, s_cfg, t_cfg, spec, paths, b)["components"]
    c, v = config.data, dict(config.teacher.vision)
    s, t = dict(config.student.text), dict(config.teacher.text)
    p, r, n, vocab = c.prompt_len, config.sampling.max_new_tokens, c.seq_len, c.vocab_size
    ds, dt = s["hidden_size"], t["hidden_size"]
    n_img = (c.image_size // v["patch_size"]) ** 2

    # decode: r steps of both models, one token against all p + r cache slots, no image, a 1-position head
    def decode_one(m):
        dense, attn = decoder_fwd(m, 1, p + r)
        return dense + attn + mm(1, m["hidden_size"], vocab)

    assert comps["rollout decode"] == b * r * (decode_one(s) + decode_one(t))

    # prefill: the prompt, with the image (own tower: 1 of 2 layers, + the 2-layer projector)
    def prefill_one(m):
        dense, attn = decoder_fwd(m, p, p + r)
        vis = vision_fwd(v, c.image_size, 1)
        proj = mm(n_img, v["hidden_size"], m["hidden_size"]) + mm(n_img, m["hidden_size"], m["hidden_size"])
        return dense + attn + vis + proj + mm(1, m["hidden_size"], vocab)

    assert comps["rollout prefill"] == b * (prefill_one(s) + prefill_one(t))

    # response heads, chunked over r positions (r < chunk): student fwd + recompute + dX + dW, teacher x2
    assert comps["heads (response chunks)"] == b * (4 * mm(r, ds, vocab) + 2 * mm(r, dt, vocab))
    # feature maps: one ds -> dt map on every ground-truth position of each aligned layer, forward + dX + dW
    layers = len(config.loss.feature_layers)
    assert layers >= 1 and comps["feature maps"] == b * 3 * layers * mm(n, ds, dt)
    np.testing.assert_equal(sum(comps.values()), P.step_flops(config, s_cfg, t_cfg, spec, paths, b)["total"])
