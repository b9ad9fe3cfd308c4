"""`step_parts(spec)`: which forwards and which loss terms one train step runs.

The one place that reads the config switches (term weights, packing, teacher prefix reuse, shared vision,
sampling alpha) and turns them into the step's parts; `step.compute_loss` runs exactly these parts and
`rskd_jax.train.plan.step_flops` counts exactly these parts.

Per micro-batch, in order:
1. rollout (`rollout`): student and teacher prefill + decode, sampling from the teacher-mixed distribution
   (`teacher_mix`: alpha > 0; with alpha = 0 the teacher still runs: its log-probs are the rewards);
2. the response view: the student over prompt + response (`packed`: in one forward with the ground truth),
   the teacher's response states from `teacher_response`;
3. the ground-truth view (`gt`): the student over `input_ids` (unless packed), the teacher's from `teacher_gt`;
4. the terms: `rollout_terms` on the response, `token_terms` (sft / fkl) and the feature terms
   (`feature_layers`, `feat_proj`) on the ground truth.
"""

from __future__ import annotations

import dataclasses

from rskd_jax.distill.spec import GT_TERMS, ROLLOUT_TERMS, StepSpec


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What one step runs (see the module docstring). Source strings name where a teacher view comes from:
    "rollout" (the rollout's recorded states), "prefix" (a suffix forward against the rollout's prompt cache,
    distill/prefix.py), "packed" (the teacher's packed [GT | response] forward), "forward" (its own forward);
    None when the teacher's view is not needed."""

    teacher: bool  # a frozen teacher takes part (False for SFT)
    shared_vision: bool  # the teacher's vision features feed both models
    rollout: bool  # responses are sampled (a rollout-side term has a weight)
    teacher_mix: bool  # the teacher's distribution is mixed into the sampling (alpha > 0)
    reuse_prefix: bool  # the rollout keeps the teacher's states for the losses (loss.reuse_teacher_prefix)
    packed: bool  # one student forward over [ground truth | response] instead of two
    teacher_response: str | None  # source of the teacher's response states
    gt: bool  # a ground-truth-side term has a weight: the student's ground-truth view runs
    teacher_gt: str | None  # source of the teacher's ground-truth view
    rollout_terms: tuple  # weighted terms on the sampled responses: subset of ("rkl", "pg")
    token_terms: tuple  # vocabulary-sized terms on the answer tokens: subset of ("sft", "fkl")
    feature_layers: tuple  # ((student_idx, teacher_idx), ...) aligned hidden layers; () when off
    feat_proj: bool  # projected image tokens are aligned

    @property
    def student_layers(self) -> tuple:
        return tuple(p[0] for p in self.feature_layers)

    @property
    def teacher_layers(self) -> tuple:
        return tuple(p[1] for p in self.feature_layers)


def _teacher_sources(spec: StepSpec, teacher: bool, packed: bool) -> tuple:
    """(teacher_response, teacher_gt) sources (StepParts docstring)."""
    reuse = spec.reuse_teacher_prefix and teacher
    need_gt = teacher and spec.needs_teacher_gt
    response = None
    if spec.needs_rollout:
        response = "rollout" if reuse else "packed" if packed and need_gt else "forward"
    gt = None
    if need_gt:
        gt = "prefix" if spec.needs_rollout and reuse else "packed" if packed else "forward"
    return response, gt


def step_parts(spec: StepSpec, teacher: bool = True) -> StepParts:
    """The parts of the step `spec` describes; `teacher`: whether a teacher model is given (False: SFT)."""
    gt = any(spec.w(k) > 0 for k in GT_TERMS)
    rollout = spec.needs_rollout
    packed = rollout and gt and spec.pack_views
    t_response, t_gt = _teacher_sources(spec, teacher, packed)
    feat = teacher and gt and spec.w("feat_image") + spec.w("feat_text") > 0
    token_terms = tuple(k for k in ("sft", "fkl") if spec.w(k) > 0 and (k == "sft" or t_gt is not None))
    return StepParts(
        teacher=teacher,
        shared_vision=spec.shared_vision and teacher,
        rollout=rollout,
        teacher_mix=rollout and spec.sampling.alpha > 0,
        reuse_prefix=rollout and teacher and spec.reuse_teacher_prefix,
        packed=packed,
        teacher_response=t_response,
        gt=gt,
        teacher_gt=t_gt,
        rollout_terms=tuple(k for k in ROLLOUT_TERMS if spec.w(k) > 0),
        token_terms=token_terms,
        feature_layers=tuple(spec.feature_layers) if feat else (),
        feat_proj=teacher and spec.w("feat_proj") > 0,
    )
