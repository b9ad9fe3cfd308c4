"""Helpers for the chat / predict / web-demo tests (this file holds no tests): a tiny random transformers
`LlavaForConditionalGeneration` directory with its tokenizer, i.e. the layout `launch/convert.py export` and
the demo's `student_hf/` write, and small images."""

import pathlib

import numpy as np
import transformers
from PIL import Image
from test_distill_testlib import cross_entropy
from test_models_testlib import randomize_

from rskd_jax.convert import from_torch
from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.eval import runner


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


def memorizing_model(d: pathlib.Path, image, question: str, answer: str, steps: int = 150):
    """A tiny model trained (Adam, cross-entropy on the answer, llava_v1 template) until it answers `question`
    about `image` with `answer`, exported with `export_model` as a transformers Llava directory `d/model`
    (the layout of the demo's `student_hf/`). A random model never writes boxes; this one does.
    Returns (model directory, final loss)."""
    import jax
    import optax
    from flax import nnx

    from rskd_jax.convert.exporter import export_model
    from rskd_jax.data import ExampleTransform

    tok = train_synth_tokenizer(d / "tok", vocab_size=400, num_records=300)
    cfg = runner.smoke_config("tiny", tok)
    model = runner.random_model(cfg, seed=1)
    tf = ExampleTransform(
        tok,
        image_size=cfg.vision.image_size,
        image_seq_length=cfg.image_seq_length,
        max_len=256,
        max_prompt_len=192,
        template="llava_v1",
    )
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    ex = {k: v[None] for k, v in tf({"image": image, "conversations": turns}).items()}
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids, mask, target, px):
        def loss_fn(m):
            logits = m(ids, px, attention_mask=mask).logits
            return cross_entropy(logits[:, :-1], ids[:, 1:], target[:, 1:])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(steps):
        loss = step(model, opt, ex["input_ids"], ex["attention_mask"], ex["loss_mask"], ex["pixel_values"])
    export_model(model, cfg, d / "model", tokenizer_dir=d / "tok")
    return d / "model", float(jax.device_get(loss))
