r"""Supervised fine-tuning of one model (a teacher, or the baseline student) — cross-entropy on the answers only.

    python launch/train.py --config configs/sft.py                      # the demo's tiny teacher on rs-synth
    python launch/train.py --config configs/sft.py:student              # the demo's tiny student
    python launch/train.py --config configs/sft.py:geochat_7b \
        --config.model.checkpoint=/ckpt/geochat7b --config.data.instruct_json=... --config.data.image_root=...

Same sections as configs/distill.py (data, optim, mesh, checkpointing, eval); `model` is the model trained, with
`model.sft_steps` steps at `model.lr`, and `model.trainable` (all | all+vision | lora | regex).
"""

from configs import distill
from configs.common import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, preset="teacher", steps=-1)
    base = {"teacher": "demo", "student": "demo", "tiny": "tiny", "geochat_7b": "geochat13b_to_7b"}
    if a.preset not in base:
        raise KeyError(f"configs/sft.py: unknown preset {a.preset!r}; expected one of {sorted(base)}")
    c = distill.get_config(base[a.preset])
    c.mode = "sft"
    c.model = (
        c.student if a.preset in ("student", "geochat_7b") else c.teacher
    ).copy_and_resolve_references()
    c.model.trainable = "lora" if a.preset == "geochat_7b" else "all+vision"
    if a.preset == "geochat_7b":
        c.model.sft_steps, c.model.lr = 5000, 2e-4  # GeoChat's LoRA recipe (geochat.md 1c)
    if a.steps > 0:
        c.model.sft_steps = a.steps
    return c
