r"""Distillation configs (big_vision style).

    python launch/train.py --config configs/distill.py                    # embedded demo (default)
    python launch/train.py --config configs/distill.py:tiny               # seconds-long smoke run (tests)
    python launch/train.py --config configs/distill.py:geochat13b_to_7b \
        --config.teacher.checkpoint=/ckpt/geochat13b --config.student.checkpoint=/ckpt/geochat7b \
        --config.data.tokenizer=/ckpt/geochat7b \
        --config.data.instruct_json=/data/GeoChat_Instruct.json --config.data.image_root=/data/images

Every knob of the method lives here: loss weights, sampling (alpha, temperature, top-k/p, max new tokens), the
trainable subset, optimiser, mesh, checkpointing and evaluation. Defaults for the paper's setting follow MiniLLM
(alpha 0.2, clip 0.2, lr 5e-6, AdamW betas (0.9, 0.95), grad-clip 1.0, cosine decay); the tiny presets pick their own.
"""

import ml_collections

from configs.common import parse_arg

# Tiny teacher / student pair used by the demo and the tests (see rskd_jax.models.presets for the real sizes).
TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, patch_size=8)
TINY_TEACHER_TEXT = dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=4)
TINY_STUDENT_TEXT = dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=4)


def _model(preset, checkpoint="", vision=None, text=None, **kw):
    return ml_collections.ConfigDict(
        dict(preset=preset, checkpoint=checkpoint, vision=vision or {}, text=text or {}, overrides=kw)
    )


def get_config(arg=None):
    a = parse_arg(arg, preset="demo", steps=-1, res=-1)
    c = ml_collections.ConfigDict()
    c.preset = a.preset
    c.seed = 0
    c.total_steps = ml_collections.FieldReference(200)
    c.log_every = 10
    c.ckpt_every = 100
    c.keep_checkpoints = 2
    c.eval_every = 0  # 0 = only at the end
    c.max_nonfinite_in_a_row = 5
    c.debug = ml_collections.ConfigDict(dict(kill_stage="", kill_at_step=-1, kill_signal="SIGKILL"))  # tests
    c.trainable = "all"  # all | all+vision | lora | regex on parameter paths (e.g. "model/projector/.*")
    c.export_student = (
        True  # write workdir/student_hf (transformers LlavaForConditionalGeneration) at the end
    )
    c.shared_vision = False  # True when teacher and student share the same frozen CLIP tower (GeoChat 7B/13B)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = all remaining devices

    # --- models
    c.teacher = _model("tiny", vision=TINY_VISION, text=TINY_TEACHER_TEXT)
    c.teacher.sft_steps = 300  # demo: fine-tune the tiny teacher on rs-synth first (reused from the workdir)
    c.teacher.lr = 3e-3
    c.student = _model("tiny", vision=TINY_VISION, text=TINY_STUDENT_TEXT)
    c.student.sft_steps = 100  # demo: the "student before distillation" baseline (MiniLLM phase 1)
    c.student.lr = 3e-3
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=64,
            alpha=16.0,
            dropout=0.05,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )

    # --- data
    c.data = ml_collections.ConfigDict(
        dict(
            name="rs-synth",
            image_size=64,
            train_size=4000,
            eval_size=200,
            batch_size=16,
            seq_len=184,
            prompt_len=160,
            num_workers=0,
            tokenizer="",
            vocab_size=600,
            instruct_json="",
            image_root="",
            template="vicuna_v1",
            skip_bad_records=False,
        )
    )

    # --- distillation method
    c.sampling = ml_collections.ConfigDict(
        dict(max_new_tokens=24, alpha=0.2, temperature=1.0, top_k=0, top_p=1.0)
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            weights=dict(rkl=1.0, pg=1.0, feat_image=0.5, feat_text=0.5, feat_proj=0.0, sft=0.5, fkl=0.5),
            clip_eps=0.2,
            gamma=1.0,
            include_current=False,
            length_norm=True,
            whiten=False,
            temperature=1.0,
            feature_kind="cosine",
            feature_layers=((-1, -1),),
            pack_views=True,
            reuse_teacher_prefix=True,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=20,
            schedule="cosine",
            end_lr_factor=0.1,
            weight_decay=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            grad_clip=1.0,
            grad_accum=1,
        )
    )
    c.optim.total_steps = c.get_ref("total_steps")
    c.eval = ml_collections.ConfigDict(
        dict(tasks=("scene", "vqa", "grounding", "caption"), limit=150, max_new_tokens=24, batch_size=32)
    )

    if a.preset == "demo":
        pass
    elif a.preset == "tiny":  # a few seconds; used by tests
        c.total_steps = 6
        c.log_every = 2
        c.ckpt_every = 3
        c.teacher.sft_steps = 4
        c.student.sft_steps = 2
        c.data.update(image_size=32, train_size=64, eval_size=16, batch_size=4, seq_len=136, prompt_len=112)
        c.sampling.max_new_tokens = 8
        c.eval.update(limit=8, max_new_tokens=8, batch_size=8)
    elif a.preset == "geochat13b_to_7b":
        c.teacher = _model("geochat_13b", checkpoint="")
        c.teacher.sft_steps = 0
        c.student = _model("geochat_7b", checkpoint="")
        c.student.sft_steps = 0
        c.shared_vision = True
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
        c.loss.weights = dict(rkl=1.0, pg=1.0, feat_image=1.0, feat_text=1.0, feat_proj=1.0, sft=0.5, fkl=0.5)
        c.optim.update(
            lr=5e-6, warmup_steps=100, schedule="cosine", end_lr_factor=0.0, weight_decay=1e-6, grad_accum=2
        )
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.eval.update(limit=0, max_new_tokens=256)
    else:
        raise KeyError(
            f"configs/distill.py: unknown preset {a.preset!r}; expected demo, tiny or geochat13b_to_7b"
        )

    if a.steps > 0:
        c.total_steps = a.steps
    if a.res > 0:
        c.data.image_size = a.res
    return c
