"""Helpers for the chat / predict / web-demo tests (this file holds no tests): a tiny random transformers
`LlavaForConditionalGeneration` directory with its tokenizer, i.e. the layout `launch/convert.py export` and
the demo's `student_hf/` write, and small images."""

import pathlib

import numpy as np
import transformers
from PIL import Image
from test_models_testlib import randomize_

from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.eval import runner
from rskd_jax.models import from_torch


def tiny_hf_model(d: pathlib.Path, seed: int = 5):
    """Writes a randomised tiny HF Llava + rs-synth tokenizer into `d`; returns (hf model, tokenizer, cfg)."""
    tok = train_synth_tokenizer(d / "tok", vocab_size=400, num_records=300)
    cfg = runner.smoke_config("tiny", tok)
    hf = randomize_(transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(cfg)).eval(), seed)
    hf.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return hf, tok, cfg


def write_image(path: pathlib.Path, size: int = 40, seed: int = 0) -> pathlib.Path:
    """A random RGB PNG (square, so GeoChat's pad-to-square leaves it unchanged)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path
