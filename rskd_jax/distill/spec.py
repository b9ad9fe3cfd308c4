"""`StepSpec`: the static description of one train step (which terms, their weights, sampling, packing, ...),
derived once from the ml_collections config (`spec_from_config`, `sft_spec`)."""

from __future__ import annotations

import dataclasses

from rskd_jax.distill import rollout as R

GT_TERMS = ("sft", "fkl", "feat_image", "feat_text", "feat_proj")  # terms computed on the ground truth
FEATURE_TERMS = ("feat_image", "feat_text", "feat_proj")
ROLLOUT_TERMS = ("rkl", "pg")  # terms computed on the sampled responses


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of one step; built from the ml_collections config by `spec_from_config`."""

    weights: dict
    sampling: R.SamplingConfig
    clip_eps: float = 0.2
    gamma: float = 1.0
    include_current: bool = False
    length_norm: bool = True
    whiten: bool = False
    temperature: float = 1.0
    feature_kind: str = "cosine"
    divergence: str = "rkl"  # the single-step term on sampled responses (L.TOKEN_DIVERGENCES)
    skew_alpha: float = 0.1  # skew_fkl / skew_rkl mixing weight (DistiLLM's 0.1)
    jsd_beta: float = 0.5  # jsd mixture weight (TRL's convention)
    feature_layers: tuple = ()  # ((student_idx, teacher_idx), ...) HF hidden-state indices
    shared_vision: bool = False
    grad_accum: int = 1
    chunk_size: int = 128  # sequence chunk of the vocabulary-sized losses (only [B, chunk, V] logits live)
    pack_views: bool = True  # one forward over [GT | response] instead of two (forwards.packed_view)
    reuse_teacher_prefix: bool = True  # the teacher's prompt/response states from the rollout (prefix.py)
    eos_id: int = 2
    pad_id: int = 0
    image_token_id: int = 0

    def w(self, name):
        return float(self.weights.get(name, 0.0))

    @property
    def needs_rollout(self):
        return any(self.w(k) > 0 for k in ROLLOUT_TERMS)

    @property
    def needs_teacher_gt(self):
        return self.w("fkl") > 0 or any(self.w(k) > 0 for k in FEATURE_TERMS)


def sft_spec(config, model_cfg) -> StepSpec:
    """Cross-entropy on the answer tokens only (teacher / baseline-student fine-tuning)."""
    return StepSpec(
        weights=dict(sft=1.0),
        sampling=None,
        grad_accum=config.optim.get("grad_accum", 1),
        chunk_size=config.loss.get("chunk_size", 128),
        eos_id=model_cfg.eos_token_id,
        pad_id=model_cfg.pad_token_id,
        image_token_id=model_cfg.image_token_id,
    )


def spec_from_config(cfg, model_cfg) -> StepSpec:
    """The distillation step a `configs/distill.py` config describes (`model_cfg`: the student's special ids)."""
    lo, sa = cfg.loss, cfg.sampling
    return StepSpec(
        weights=dict(lo.weights),
        sampling=R.SamplingConfig(
            max_new_tokens=sa.max_new_tokens,
            alpha=sa.alpha,
            temperature=sa.temperature,
            top_k=sa.top_k,
            top_p=sa.top_p,
        ),
        clip_eps=lo.clip_eps,
        gamma=lo.gamma,
        include_current=lo.include_current,
        length_norm=lo.length_norm,
        whiten=lo.whiten,
        temperature=lo.temperature,
        feature_kind=lo.feature_kind,
        divergence=lo.get("divergence", "rkl"),
        skew_alpha=lo.get("skew_alpha", 0.1),
        jsd_beta=lo.get("jsd_beta", 0.5),
        feature_layers=tuple(tuple(p) for p in lo.feature_layers),
        shared_vision=cfg.get("shared_vision", False),
        grad_accum=cfg.optim.get("grad_accum", 1),
        chunk_size=lo.get("chunk_size", 128),
        pack_views=lo.get("pack_views", True),
        reuse_teacher_prefix=lo.get("reuse_teacher_prefix", True),
        eos_id=model_cfg.eos_token_id,
        pad_id=model_cfg.pad_token_id,
        image_token_id=model_cfg.image_token_id,
    )
