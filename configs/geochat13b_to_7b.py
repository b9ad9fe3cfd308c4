r"""GeoChat 13B teacher -> GeoChat 7B student (the paper's setting; big_vision style: one experiment, one file).

    python launch/train.py --config configs/geochat13b_to_7b.py \
        --config.teacher.checkpoint=/ckpt/geochat13b --config.student.checkpoint=/ckpt/geochat7b \
        --config.data.tokenizer=/ckpt/geochat7b \
        --config.data.instruct_json=/data/GeoChat_Instruct.json --config.data.image_root=/data/images
    python tools/make_rehearsal.py ROOT
    python launch/train.py --config configs/geochat13b_to_7b.py:rehearsal,root=ROOT   # reduced size, CPU

Presets: `real` (default; the real sizes) and `rehearsal` (the same code path at reduced width and depth, on
the inputs tools/make_rehearsal.py writes). The old spellings `configs/distill.py:geochat13b_to_7b` and
`configs/distill.py:rehearsal` give the same configs. Every section not set here is configs/distill.py's
default; the shorthand arguments (steps, res, attention, dtype, teacher_param_dtype, remat, root) are its too.
"""

from configs import distill
from configs.common import parse_arg

PRESETS = ("real", "rehearsal")


def get_config(arg=None):
    a = parse_arg(
        arg,
        preset="real",
        steps=-1,
        res=-1,
        attention="",
        dtype="",
        teacher_param_dtype="",
        remat="",
        root="",
    )  # configs/distill.py's shorthand arguments
    return from_args(a)


def from_args(a):
    """The config of parsed arguments `a` (preset `real`, `geochat13b_to_7b` (its old name) or `rehearsal`)."""
    if a.preset not in ("real", "geochat13b_to_7b", "rehearsal"):
        raise KeyError(
            f"configs/geochat13b_to_7b.py: unknown preset {a.preset!r}; expected real or rehearsal"
        )
    c = distill.base("rehearsal" if a.preset == "rehearsal" else "geochat13b_to_7b")
    real(c)
    if a.preset == "rehearsal":
        rehearsal(c, a.root or "runs/rehearsal_inputs")
    return distill.shorthands(c, a)


def real(c):
    """The real sizes: GeoChat 13B teacher, GeoChat 7B student, LoRA, GeoChat_Instruct at 504 px."""
    # bf16 compute, bf16 frozen teacher, fp32 student master weights, per-layer full remat: what the
    # plan (launch/plan.py) compiles and what training builds (rskd_jax.build).
    c.teacher = distill.model_section("geochat_13b", checkpoint="", dtype="bfloat16", param_dtype="bfloat16")
    c.teacher.sft_steps = 0
    c.student = distill.model_section("geochat_7b", checkpoint="", dtype="bfloat16", remat_policy="full")
    c.student.sft_steps = 0
    c.shared_vision = True
    c.sft_control = False
    c.trainable = "lora"
    c.total_steps = 5000
    c.log_every, c.ckpt_every, c.eval_every = 10, 250, 500
    c.data.update(
        name="geochat_instruct",
        image_size=504,
        batch_size=64,
        seq_len=2048,
        prompt_len=1792,
        num_workers=8,
        template="vicuna_v1",
    )
    c.sampling.update(max_new_tokens=256)
    c.loss.feature_layers = ((-1, -1),)
    # feat_proj 0: the student's projector and CLIP tower are frozen here (LoRA on the LLM, shared vision),
    # so that term would only train its feature map, which export discards (refused by the step's check).
    c.loss.weights = dict(rkl=1.0, pg=1.0, feat_image=1.0, feat_text=1.0, feat_proj=0.0, sft=0.5, fkl=0.5)
    # lr 2e-4: GeoChat's own LoRA lr for these adapters (r 64, alpha 16; scripts/finetune_lora.sh). MiniLLM's
    # 5e-6 is a FULL fine-tuning lr: through a LoRA adapter (scale alpha/r = 0.25, A ~ U(±1/sqrt(d)), B = 0)
    # one Adam step of size lr moves W by about 0.25 * sqrt(64) * lr / sqrt(3 * 4096) = 0.018 * lr, so
    # 5e-6 would move the 7B weights ~55x less than MiniLLM's full fine-tuning; 2e-4 moves them by
    # ~3.6e-6 per step, MiniLLM's order of magnitude (docs/distill.md, "Learning rate with LoRA").
    c.optim.update(
        lr=2e-4, warmup_steps=100, schedule="cosine", end_lr_factor=0.0, weight_decay=1e-6, grad_accum=2
    )
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.eval.update(limit=0, max_new_tokens=256)


def rehearsal(c, root: str):
    """geochat13b_to_7b's code path at reduced width and depth (sizes, steps and batch only), on the inputs
    `python tools/make_rehearsal.py ROOT` writes in GeoChat's original layouts: a separate CLIP tower shared
    by both models, teacher and student LLaMA .bin shards with their mm_projector, a GeoChat_Instruct JSON over
    UC Merced and rs-synth images. `configs/geochat13b_to_7b.py:rehearsal,root=ROOT`; tests run it on 8 CPU
    devices as one process and as two."""
    vision = dict(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=1, patch_size=14)
    for name, ckpt, text in (
        ("teacher", "geochat13b", dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=2)),
        ("student", "geochat7b", dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=1)),
    ):
        sec = c[name]
        sec.checkpoint = f"{root}/{ckpt}"
        sec.checkpoint_format = "geochat"
        sec.vision_tower = f"{root}/clip"
        sec.vision = dict(vision)
        sec.text = dict(text, num_kv_heads=text["num_heads"], vocab_size=256)
    c.data.update(
        instruct_json=f"{root}/instruct.json",
        image_root=f"{root}/images",
        tokenizer=f"{root}/geochat7b",
        image_size=56,  # 4x4 patches of 14 px: 16 image tokens (GeoChat: 504 px, 1296)
        batch_size=8,
        prompt_len=448,  # character-level tokenizer: rs-synth's longest prompts need ~370
        seq_len=512,
        num_workers=0,
    )
    c.sampling.max_new_tokens = 8
    c.total_steps = 6
    c.log_every, c.ckpt_every, c.eval_every = 1, 3, 0
    c.lora.rank = 8
    c.optim.update(lr=2e-3, warmup_steps=1)  # a few steps must move the adapters visibly
    c.eval.update(max_new_tokens=16)
