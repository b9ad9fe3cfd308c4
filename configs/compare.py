r"""A controlled comparison of distillation methods on the demo's teacher and SFT student.

    python launch/compare.py --config configs/compare.py                      # default: ~60 min on 2 CPU cores
    python launch/compare.py --config configs/compare.py --config.compare.start=runs/demo   # reuse the demo's stages
    python launch/compare.py --config configs/compare.py:tiny                 # seconds (tests)

Everything of configs/distill.py's demo preset (models, data, the distillation loss = the `full` method,
optimiser) plus a `compare` section. Scale it up on a GPU / TPU with `--config.total_steps`,
`--config.compare.seeds`, `--config.compare.eval_limit`, `--config.compare.methods`, the model sizes
(`--config.teacher.text.hidden_size`, ...) and `--config.data.train_size` / `eval_size`. The methods:
rskd_jax.train.compare.METHODS (docs/distill.md, "Methods and ablations").
"""

import ml_collections

from configs import distill
from configs.common import parse_arg

ALL_METHODS = (
    "sft",
    "word_kd",
    "seqkd",
    "minillm",
    "minillm_code",
    "full",
    "no_pg",
    "no_feat_image",
    "no_feat_text",
    "alpha0",
    "no_single_step",
    "no_length_norm",
    "skew_fkl",
    "skew_rkl",
    "jsd",
    "whiten",
    "clip10",
    "sft1_pg025",
    "sft1_nopg",
)


def get_config(arg=None):
    a = parse_arg(arg, preset="default", steps=-1, seeds=-1)
    base = {"default": "demo", "tiny": "tiny"}
    if a.preset not in base:
        raise KeyError(f"configs/compare.py: unknown preset {a.preset!r}; expected one of {sorted(base)}")
    c = distill.get_config(base[a.preset])
    c.preset = "compare" if a.preset == "default" else "compare_" + a.preset
    c.export_student = False
    # The comparison's `full` / `minillm` are the paper's method, long-term PG included (the demo preset drops it:
    # configs/distill.py); `no_pg` is the demo's recipe.
    c.loss.weights.pg = 1.0
    c.compare = ml_collections.ConfigDict(
        dict(
            methods=ALL_METHODS,
            seeds=3,  # seed indices 0..seeds-1: the same data orders for every method
            start="",  # a demo workdir with teacher/ and student_sft/ to start from (else trained here)
            eval_limit=0,  # task-metric records per model (0 = every record of the eval split)
            kl_every=20,  # steps between KL-to-teacher points of the curves (0 = start and end only)
            kl_batches=1,  # eval batches of those points
            report_only=False,  # only write the table / figure of the runs finished so far
            compile_cache=True,  # persistent XLA cache in the workdir (the runs recompile the same programs)
        )
    )
    c.total_steps = 60  # steps per method (the schedule follows)
    c.log_every = 10
    if a.preset == "tiny":
        c.total_steps = 2
        c.log_every = 1
        c.compare.update(seeds=1, kl_every=1, methods=("sft", "word_kd", "seqkd", "alpha0"))
    if a.steps > 0:
        c.total_steps = a.steps
    if a.seeds > 0:
        c.compare.seeds = a.seeds
    return c
