"""The state a run's stages share (config, workdir, tokenizer, mesh, data sources) and its example transform."""

from __future__ import annotations

import dataclasses
import pathlib

from rskd_jax.data import ExampleTransform


@dataclasses.dataclass
class Context:
    config: object
    workdir: pathlib.Path
    tokenizer_dir: pathlib.Path
    ids: object  # SpecialIds
    vocab_size: int
    mesh: object
    train_source: object
    eval_source: object


def transform_for(ctx: Context, cfg) -> ExampleTransform:
    """The training chat template's example transform for a model of config `cfg` (tokenizer of the run)."""
    d = ctx.config.data
    return ExampleTransform(
        str(ctx.tokenizer_dir),
        image_size=cfg.vision.image_size,
        image_seq_length=cfg.image_seq_length,
        max_len=d.seq_len,
        max_prompt_len=d.prompt_len,
        template=d.template,
    )
