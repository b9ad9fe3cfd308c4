"""Greedy generation for evaluation vs transformers' `generate` on the same converted tiny Llava.

The prompts are real `llava_v1` prompts of rs-synth records (a long scene prompt and a short VQA prompt, so
the batch is left-padded), tokenized by a small SentencePiece tokenizer trained here; the batch is padded from
2 to 4 rows and the prompt width cut to a bucket by the Generator, while transformers sees the full width:
equal outputs also check that padding and bucketing change nothing.
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_models_testlib import llava_from_hf, randomize_

from rskd_jax.convert import from_torch
from rskd_jax.data import ExampleTransform, SynthSource
from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.eval import runner
from rskd_jax.eval.generate import Generator, clean_text

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = train_synth_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400, num_records=300)
    cfg = runner.smoke_config("tiny", tok)  # vocab = len(tok), image token = <image>
    hf = randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(cfg)).eval(), seed=5
    )
    src = SynthSource(50, image_size=48, seed=1, split="test")
    picks = [next(i for i in range(50) if src.sample(i)[0]["task"] == t) for t in ("scene", "vqa")]
    tf = ExampleTransform(
        tok,
        image_size=32,
        image_seq_length=cfg.image_seq_length,
        max_len=320,
        max_prompt_len=300,
        template="llava_v1",
    )
    ex = [tf(src[i]) for i in picks]
    batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
    return tok, cfg, hf, llava_from_hf(cfg, hf), batch


def test_greedy_generation_equals_transformers_generate(setup):
    tok, cfg, hf, model, batch = setup
    lens = batch["prompt_mask"].sum(1)
    assert lens[0] != lens[1] and lens.max() <= 256  # left padding differs per row; bucket 256 < width 300
    gen = Generator(model, tok, STEPS, batch_size=4)
    tokens, lengths = gen.generate_ids(batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"])
    texts = gen(batch)
    assert gen.compiled_shapes == {(4, 256)}
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(batch["prompt_ids"]).long(),
            attention_mask=torch.tensor(batch["prompt_mask"]).long(),
            pixel_values=torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2),
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=0,
            suppress_tokens=[cfg.image_token_id],
        )
    ref = out[:, batch["prompt_ids"].shape[1] :].numpy()
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)
    assert (tokens[:, ref.shape[1] :] == 0).all()
    ref_texts = [t.strip() for t in tok.batch_decode(ref, skip_special_tokens=True)]
    assert texts == ref_texts
    assert all(texts)  # non-empty: the comparison is not between empty strings
    assert tokens.shape == (2, STEPS) and (lengths <= STEPS).all()


def test_decode_stops_at_eos_and_cleans(setup):
    tok, _, _, model, _ = setup
    gen = Generator(model, tok, STEPS, batch_size=1)
    words = tok(" forest", add_special_tokens=False)["input_ids"]
    row = np.array([words + [tok.eos_token_id] + [0] * 3, words + [5] * 4])
    texts = gen.decode(row, np.array([len(words) + 1, len(words) + 4]))
    assert texts[0] == "forest"
    assert texts[1].startswith("forest") and texts[1] != "forest"
    assert clean_text("  a ship </s></s> ") == "a ship"
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate_ids(np.array([[4, 5, 0]]), np.array([[1, 1, 0]]))


class _CountingModel(nnx.Module):
    """Delegates to a model and counts, at run time (a host callback inside the compiled loop), how many
    forwards the decode runs: 1 prefill + 1 per loop iteration."""

    def __init__(self, model, calls: list):
        self.model, self.cfg = model, model.cfg
        self._calls = calls

    def init_cache(self, *a, **kw):
        return self.model.init_cache(*a, **kw)

    def __call__(self, *a, **kw):
        jax.debug.callback(lambda: self._calls.append(1))
        return self.model(*a, **kw)


def test_batched_decoding_stops_when_every_row_has_finished(setup):
    """With max_new_tokens=256 (the eval default, GeoChat's), a batch whose rows all emit EOS by step k runs
    k decode iterations, not 256: the while loop exits early (counted by a callback in the forward)."""
    tok, _, _, model, batch = setup
    ids, mask, px = batch["prompt_ids"][:1], batch["prompt_mask"][:1], batch["pixel_values"][:1]
    ref, _ = Generator(model, tok, STEPS, batch_size=1, eos_id=-1).generate_ids(ids, mask, px)  # no EOS
    k = 4
    eos = int(ref[0, k - 1])
    first = int(np.flatnonzero(ref[0] == eos)[0]) + 1  # row stops at the first copy of that token (<= k)
    rows = lambda x: np.repeat(x, 3, axis=0)  # three rows, each finishing at step `first`
    calls: list = []
    gen = Generator(_CountingModel(model, calls), tok, 256, batch_size=3, eos_id=eos)
    tokens, lengths = gen.generate_ids(rows(ids), rows(mask), rows(px))
    jax.effects_barrier()
    assert (lengths == first).all() and first <= k
    np.testing.assert_array_equal(tokens[:, :first], rows(ref[:, :first]))
    assert (tokens[:, first:] == gen.pad_id).all() and tokens.shape == (3, 256)
    assert len(calls) == 1 + first  # prefill + one forward per generated token; 257 without early stop
    # and a row that never finishes runs the whole budget
    calls.clear()
    Generator(_CountingModel(model, calls), tok, 40, batch_size=1, eos_id=-1).generate_ids(ids, mask, px)
    jax.effects_barrier()
    assert len(calls) == 1 + 40
