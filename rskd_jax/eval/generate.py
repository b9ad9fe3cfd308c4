"""Batched greedy generation for evaluation: jitted decode loop (KV cache) + text decoding.

The loop is `rskd_jax.distill.rollout.sample` in greedy mode (prefill + `lax.while_loop`, stops when every row has
emitted EOS). Shapes are fixed so XLA compiles few programs: every call runs `batch_size` rows (short
batches are padded by repeating the last row) and the left-padded prompt is cut to the shortest *bucket* that
holds the batch's longest prompt (`bucket` multiples, capped at the prompt width), so one compile per bucket
serves a whole dataset. The model is passed to the jitted function at every call, so a model trained in place
between calls (periodic evaluation) is always the current one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from rskd_jax.data.tokenizer import load_tokenizer
from rskd_jax.distill.rollout import SamplingConfig, sample
from rskd_jax.models.cpu_compile import compiler_options

EOS_TEXT = "</s>"


def load_tokenizer_any(tokenizer):
    """A loaded HF tokenizer from a directory path (with `<image>` added), or the tokenizer itself."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def clean_text(text: str) -> str:
    """Strip whitespace and any trailing `</s>` (a tokenizer that does not mark EOS special leaves it)."""
    text = text.strip()
    while text.endswith(EOS_TEXT):
        text = text[: -len(EOS_TEXT)].rstrip()
    return text


class Generator:
    """`Generator(model, tokenizer, max_new_tokens, batch_size)(batch) -> list[str]`.

    model: an `LlavaModel` (its `cfg.eos_token_id` / `pad_token_id` are the defaults for EOS and padding; the
    tokenizer's EOS wins when they differ). tokenizer: a directory or a loaded HF tokenizer.
    bucket: prompt widths are rounded up to a multiple of this (None = always the full width).
    temperature > 0 samples (with `top_p`, from `seed`) instead of greedy decoding (chat). stream=True calls
    `self.on_tokens(step, tokens [batch])`, when set, from inside the compiled loop as tokens are chosen.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int,
        batch_size: int,
        *,
        bucket: int | None = 64,
        eos_id: int | None = None,
        pad_id: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stream: bool = False,
    ):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
        self.model = model
        self.tokenizer = load_tokenizer_any(tokenizer)
        self.max_new_tokens, self.batch_size, self.bucket = int(max_new_tokens), int(batch_size), bucket
        cfg = getattr(model, "cfg", None)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_id = eos_id if eos_id is not None else tok_eos if tok_eos is not None else cfg.eos_token_id
        tok_pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = pad_id if pad_id is not None else tok_pad if tok_pad is not None else cfg.pad_token_id
        steps, eos, pad = self.max_new_tokens, int(self.eos_id), int(self.pad_id)

        sampling = SamplingConfig(
            steps, alpha=0.0, temperature=temperature or 1.0, top_p=top_p, greedy=temperature <= 0
        )
        self.on_tokens = None

        def emit(t, toks):
            if self.on_tokens is not None:
                self.on_tokens(int(t), np.asarray(toks))

        self._key = jax.random.key(seed)

        def run(graphdef, state, ids, mask, pixels, key):
            r = sample(
                nnx.merge(graphdef, state),
                None,
                ids,
                mask,
                key,
                sampling,
                eos_id=eos,
                pad_id=pad,
                pixel_values=pixels,
                on_token=emit if stream else None,
            )
            return r.tokens, r.lengths

        self._run_fn, self._jitted = run, (None, None)
        self.compiled_shapes: set[tuple[int, int]] = set()  # (batch, prompt width) run: one compile each

    def _run(self, ids, mask, pixels, key):
        """The jitted loop on the current model: split at every call (a model trained in place between
        calls is the current one), recompiled only if its structure changed. compiler_options keep 16-bit
        weights from being copied to float32 on CPU (rskd_jax/models/cpu_compile.py)."""
        graphdef, state = nnx.split(self.model)
        if self._jitted[0] is None or self._jitted[0] != graphdef:
            fn = functools.partial(self._run_fn, graphdef)
            self._jitted = (graphdef, jax.jit(fn, compiler_options=compiler_options()))
        return self._jitted[1](state, ids, mask, pixels, key)

    def width(self, prompt_mask: np.ndarray) -> int:
        """Prompt width for a batch: its longest prompt rounded up to the bucket, at most the full width."""
        full = prompt_mask.shape[1]
        need = max(int(np.asarray(prompt_mask).sum(1).max()), 1)
        if not self.bucket:
            return full
        return min(full, -(-need // self.bucket) * self.bucket)

    def generate_ids(self, prompt_ids, prompt_mask, pixel_values=None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [n, max_new_tokens] padded after EOS, lengths [n] incl. EOS), LEFT-padded prompts."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        if prompt_ids.shape != prompt_mask.shape or prompt_ids.ndim != 2:
            raise ValueError(
                f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape}: need equal [B, P]"
            )
        if (np.diff(prompt_mask.astype(np.int8), axis=1) < 0).any():
            raise ValueError(
                "prompt_mask is not left-padded (a pad after a real token); the batch contract "
                "gives left-padded prompt_ids / prompt_mask"
            )
        n = prompt_ids.shape[0]
        toks, lens = [], []
        for s in range(0, n, self.batch_size):
            sl = slice(s, min(n, s + self.batch_size))
            ids, mask = prompt_ids[sl], prompt_mask[sl]
            px = None if pixel_values is None else np.asarray(pixel_values[sl], np.float32)
            k = ids.shape[0]
            if k < self.batch_size:  # fixed batch shape: repeat the last row, drop its outputs below
                idx = np.minimum(np.arange(self.batch_size), k - 1)
                ids, mask, px = ids[idx], mask[idx], None if px is None else px[idx]
            w = self.width(mask)
            ids, mask = ids[:, -w:].astype(np.int32), mask[:, -w:].astype(np.int32)
            self.compiled_shapes.add(ids.shape)
            self._key, key = jax.random.split(self._key)
            t, ln = self._run(ids, mask, px, key)
            toks.append(np.asarray(t)[:k])
            lens.append(np.asarray(ln)[:k])
        return np.concatenate(toks), np.concatenate(lens)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Texts of generated rows: up to the first EOS (excluded), special tokens skipped, stripped."""
        out = []
        for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
            ids = [int(t) for t in row[: int(n)]]
            if ids and ids[-1] == self.eos_id:
                ids = ids[:-1]
            out.append(clean_text(self.tokenizer.decode(ids, skip_special_tokens=True)))
        return out

    def generate(self, prompt_ids, prompt_mask, pixel_values=None) -> list[str]:
        return self.decode(*self.generate_ids(prompt_ids, prompt_mask, pixel_values))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> list[str]:
        """Texts for a batch of the data contract (`prompt_ids`, `prompt_mask`, optional `pixel_values`)."""
        return self.generate(batch["prompt_ids"], batch["prompt_mask"], batch.get("pixel_values"))
