"""launch/compare.py: the controlled comparison of methods (rskd_jax.train.compare)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_distill_step import IMG, build, full_spec, make_batch

from configs import compare as compare_config
from configs import distill as distill_config
from rskd_jax.data import load_tokenizer
from rskd_jax.distill import rollout as R
from rskd_jax.distill import step as S
from rskd_jax.train import compare as C
from rskd_jax.train import loop


class _Cfg:
    eos_token_id, pad_token_id, image_token_id = 2, 0, 1


def test_every_method_changes_what_it_names():
    c = compare_config.get_config()
    assert set(c.compare.methods) == set(C.METHODS)
    specs = {m: S.spec_from_config(C.method_config(c, m), _Cfg) for m in C.METHODS}
    full = specs["full"]
    assert full.weights == dict(c.loss.weights) and full.needs_rollout and full.w("feat_image") > 0
    assert not specs["word_kd"].needs_rollout and specs["word_kd"].w("fkl") > 0  # no sampling
    assert specs["minillm"].needs_rollout and not any(
        specs["minillm"].w(k) for k in ("feat_image", "feat_text", "feat_proj")
    )
    assert specs["alpha0"].sampling.alpha == 0 and full.sampling.alpha > 0
    assert specs["no_feat_image"].w("feat_image") == 0 and specs["no_feat_image"].w("feat_text") > 0
    assert specs["no_feat_text"].w("feat_text") == 0 and specs["no_feat_text"].w("feat_image") > 0
    assert specs["no_single_step"].w("rkl") == 0 and specs["no_single_step"].include_current
    assert not specs["no_length_norm"].length_norm and specs["whiten"].whiten and not full.whiten
    assert {specs[m].divergence for m in ("skew_fkl", "skew_rkl", "jsd")} == {"skew_fkl", "skew_rkl", "jsd"}
    no_pg = specs["no_pg"]
    assert (
        no_pg.w("pg") == 0 and no_pg.needs_rollout and {**no_pg.weights, "pg": full.w("pg")} == full.weights
    )
    code = specs["minillm_code"]  # microsoft/LMOps minillm/: A_t = whiten(G_t / n_t), gamma 0.95, clip 0.2
    assert (code.gamma, code.include_current, code.whiten, code.length_norm) == (0.95, True, True, True)
    assert (code.clip_eps, code.sampling.alpha, code.divergence) == (0.2, 0.2, "rkl")
    assert {
        k: code.w(k) for k in ("rkl", "pg", "sft", "fkl", "feat_image", "feat_text", "feat_proj")
    } == dict(rkl=1.0, pg=1.0, sft=0.5, fkl=0.5, feat_image=0.0, feat_text=0.0, feat_proj=0.0)
    assert (C.METHODS["sft"].kind, C.METHODS["seqkd"].kind) == ("sft", "seqkd")  # no teacher in the step
    with pytest.raises(KeyError, match="compare.methods"):
        C.check_methods(["full", "kd2"])


def test_minillm_code_is_pinned_against_recipe_changes():
    """A retuned recipe (weights, clip) changes `full` and `no_pg` but not MiniLLM's code settings."""
    c = compare_config.get_config()
    c.loss.weights.pg, c.loss.weights.sft, c.optim.grad_clip, c.loss.gamma = 0.25, 2.0, 9.0, 1.0
    code = C.method_config(c, "minillm_code")
    assert (code.loss.weights.pg, code.loss.weights.sft, code.optim.grad_clip, code.loss.gamma) == (
        1,
        0.5,
        1,
        0.95,
    )
    assert (
        C.method_config(c, "full").loss.weights.pg == 0.25
        and C.method_config(c, "no_pg").loss.weights.sft == 2
    )


def test_demo_recipe_is_no_pg_and_the_comparison_keeps_the_full_method():
    """The README demo distils with the comparison's `no_pg` recipe (docs/results.md); the comparison's `full`
    and `minillm` keep the paper's long-term PG term."""
    demo = S.spec_from_config(distill_config.get_config("demo"), _Cfg)
    c = compare_config.get_config()
    full, no_pg = (S.spec_from_config(C.method_config(c, m), _Cfg) for m in ("full", "no_pg"))
    assert demo.w("pg") == 0 and full.w("pg") == 1 and C.method_config(c, "minillm").loss.weights.pg == 1
    assert demo.weights == no_pg.weights and demo.sampling == no_pg.sampling and demo.needs_rollout


def _method_step(method, batch, key=5):
    """Loss and metrics of one distillation step of `method` (configs/compare.py's loss with the method's
    overrides) on the small test models: the reduced run of one step."""
    c = C.method_config(compare_config.get_config("tiny"), method)
    c.sampling.max_new_tokens = 5
    spec = dataclasses.replace(
        S.spec_from_config(c, _Cfg), image_token_id=IMG, chunk_size=4, feature_layers=((-1, -1),)
    )
    _, _, parts = build(spec)
    student = nnx.merge(parts["graphdef"], parts["params"], parts["frozen"])
    teacher = nnx.merge(parts["teacher_graphdef"], parts["teacher"])
    loss, metrics = jax.jit(lambda b: S.compute_loss(student, teacher, b, jax.random.key(key), spec))(batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_no_pg_and_minillm_code_steps_change_only_their_terms():
    """Same rollout key: `no_pg` is the full loss minus its PG term (rollout and other terms unchanged);
    `minillm_code` samples the same responses as `minillm`, has the same single-step term, a different PG term
    (its whitened advantages), and no feature terms."""
    b = {k: jnp.asarray(v) for k, v in make_batch(seed=4).items()}
    runs = {m: _method_step(m, b) for m in ("full", "no_pg", "minillm", "minillm_code")}
    (full, fm), (nopg, nm) = runs["full"], runs["no_pg"]
    assert "loss/pg" in fm and "loss/pg" not in nm and nm["rollout/length"] == fm["rollout/length"]
    for k in ("loss/rkl", "loss/sft", "loss/fkl", "loss/feat_image/0", "loss/feat_text/0", "rollout/iw_mean"):
        assert nm[k] == pytest.approx(fm[k], rel=1e-5), k
    assert nopg == pytest.approx(full - fm["loss/pg"], rel=1e-4, abs=1e-5)  # pg weight 1
    (_, mm), (_, cm) = runs["minillm"], runs["minillm_code"]
    assert not any(k.startswith("loss/feat") for k in cm)
    for k in ("loss/rkl", "rollout/length", "rollout/iw_mean", "rollout/rev_kl_k3"):
        assert cm[k] == pytest.approx(mm[k], rel=1e-5), k
    assert abs(cm["loss/pg"] - mm["loss/pg"]) > 1e-3


def test_alpha0_rollout_is_pure_student_sampling():
    """alpha = 0 with a teacher draws exactly the tokens of student-only sampling with the same key."""
    spec = full_spec()
    _, _, parts = build(spec)
    student = nnx.merge(parts["graphdef"], parts["params"], parts["frozen"]).model
    teacher = nnx.merge(parts["teacher_graphdef"], parts["teacher"])
    b = {k: jnp.asarray(v) for k, v in make_batch(seed=2).items()}
    cfg = R.SamplingConfig(max_new_tokens=6, alpha=0.0)
    run = lambda t: R.sample(
        student, t, b["prompt_ids"], b["prompt_mask"], jax.random.key(3), cfg, eos_id=2, pad_id=0,
        pixel_values=b["pixel_values"],
    )  # fmt: skip
    mixed, alone = run(teacher), run(None)
    np.testing.assert_array_equal(np.asarray(mixed.tokens), np.asarray(alone.tokens))
    np.testing.assert_array_equal(np.asarray(mixed.weights)[np.asarray(mixed.mask) > 0], 1.0)


def test_term_gradients_add_up_to_the_total():
    """The per-term gradients of the diagnostics, weighted, sum to the gradient of the full loss."""
    from configs import distill  # noqa: PLC0415
    from rskd_jax.train.compare_diag import term_gradients  # noqa: PLC0415

    spec = full_spec()
    _, _, parts = build(spec)
    student = nnx.merge(parts["graphdef"], parts["params"], parts["frozen"]).model
    teacher = nnx.merge(parts["teacher_graphdef"], parts["teacher"])
    c = distill.get_config("tiny")
    c.sampling.max_new_tokens = 4
    c.loss.weights = dict(rkl=1.0, pg=0.5, sft=0.0)
    out = term_gradients(c, student, teacher, make_batch(seed=1), vectors=True)
    vec = out.pop("vectors")
    weights = {k: w for k, w in dict(c.loss.weights).items() if w > 0}
    assert set(vec) == {*weights, "total"}
    summed = sum(w * vec[k] for k, w in weights.items())
    np.testing.assert_allclose(np.asarray(summed), np.asarray(vec["total"]), rtol=1e-3, atol=1e-5)
    assert out["total"]["cos_total"] == pytest.approx(1.0, abs=1e-5)
    assert all(v["grad_norm"] > 0 for v in out.values())


@pytest.mark.slow
def test_reduced_comparison(tmp_path, monkeypatch):
    """configs/compare.py:tiny (1 seed, 2 steps, sft / seqkd / alpha0): the table, the figure, and
    what each method trained on; a rerun skips every finished run."""
    calls = {}
    real_fit = loop.fit

    def spy(job, opts):
        batch = next(iter(job.dataset))  # a fresh iterator: the run's own data order is untouched
        calls[job.name] = dict(teacher=job.teacher, spec=job.spec, batch=batch)
        return real_fit(job, opts)

    monkeypatch.setattr(loop, "fit", spy)
    c = compare_config.get_config("tiny")
    c.data.batch_size = 8  # the 8 test devices (conftest)
    c.total_steps, c.compare.kl_every = 3, 2  # the curve: start, the probe at step 2 and the end point
    c.data.train_size = 32  # 4 batches of seqkd teacher answers; 3 steps use 24 records
    c.eval.tasks = ("scene", "caption")  # the table's mechanics; every task's scorer: tests/test_eval_*.py
    methods = ("sft", "seqkd", "alpha0")  # word_kd: test_every_method_changes_what_it_names
    c.compare.update(methods=methods, compile_cache=False)  # no process-wide cache setting from a test
    starts = []
    real_start = C.start_models
    monkeypatch.setattr(
        C, "start_models", lambda ctx: starts[0] if starts else starts.append(real_start(ctx)) or starts[0]
    )
    C.compare(c, tmp_path)
    out = json.loads((tmp_path / "compare.json").read_text())
    assert list(out["table"]) == list(methods)
    for m in methods:
        row = out["table"][m]
        assert row["seeds"] == 1 and "scene OA" in row and "reverse KL, student samples" in row
        assert len(row["scene OA"]["values"]) == 1
    md = (tmp_path / "compare.md").read_text()
    assert all(f"| {m} | 1 |" in md for m in methods) and "| teacher |" in md
    assert (tmp_path / "compare.png").stat().st_size > 1000
    curve = [p["step"] for p in out["runs"][0]["curve"]]
    assert curve == [0, 2, 3]

    # the SFT control and seqkd never get a teacher; their steps log cross-entropy only
    for m in ("sft", "seqkd"):
        assert calls[f"{m}/seed0"]["teacher"] is None
        hist = json.loads((tmp_path / f"{m}/seed0/result.json").read_text())["history"]
        keys = {k for h in hist for k in h}
        assert {k for k in keys if k.startswith(("loss/", "rollout/"))} == {"loss/sft", "loss/total"}
    # alpha0: every sampled token's importance weight q / (0 p + q) is 1: pure student sampling
    a0 = json.loads((tmp_path / "alpha0/seed0/result.json").read_text())["history"]
    assert all(h["rollout/iw_min"] == h["rollout/iw_max"] == 1.0 for h in a0)
    assert calls["alpha0/seed0"]["spec"].sampling.alpha == 0.0
    # seqkd trains on the teacher's answers (cached), not on the references
    answers = json.loads((tmp_path / "seqkd_answers.json").read_text())
    tok = load_tokenizer(tmp_path / "tokenizer")
    for name, expect_teacher in (("seqkd/seed0", True), ("sft/seed0", False)):
        b = calls[name]["batch"]
        texts = []
        for ids, lm in zip(b["input_ids"], b["loss_mask"]):
            texts.append("".join(tok.decode(ids[lm > 0], skip_special_tokens=True).split()))
        hits = sum(t in {"".join(a.split()) for a in answers.values()} for t in texts)
        assert (hits == len(texts)) if expect_teacher else (hits < len(texts)), (name, texts)

    calls.clear()
    C.compare(c, tmp_path)  # resumable: nothing is trained again (the start models are memoised above)
    assert not [n for n in calls if "/seed" in n]
