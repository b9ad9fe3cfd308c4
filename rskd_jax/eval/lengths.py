"""Prompt / sequence widths for evaluation, sized from the data's own text (no image is decoded).

A fixed default (image tokens + 256) fails on long prompts: AID's 30-class scene prompt needs 309 text tokens
with a non-LLaMA tokenizer. `choose_lengths` runs one text-only pass over the records to be evaluated and
rounds the longest prompt (and conversation) up to a multiple of `BUCKET`, so close datasets share widths
(and compiled programs). Widths the user sets are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from rskd_jax.data import ExampleTransform
from rskd_jax.data.errors import DataError

log = logging.getLogger(__name__)

BUCKET = 64
_UNBOUNDED = 1 << 30


def bucket(n: int, step: int = BUCKET) -> int:
    return max(step, -(-int(n) // step) * step)


def longest(transform, records: Iterable[dict]) -> tuple[int, int]:
    """(longest prompt, longest conversation) in tokens, image tokens included; records whose text cannot
    be encoded are left to the real pass, which reports or skips them."""

    prompt = total = 0
    for r in records:
        try:
            enc = transform.encode_text(r)
        except DataError:
            continue
        prompt, total = (
            max(prompt, enc.prompt_ends[-1] if enc.prompt_ends else len(enc.ids)),
            max(total, len(enc.ids)),
        )
    return prompt, total


def choose_lengths(
    tok,
    subsets: Sequence,
    *,
    image_seq_length: int,
    template: str,
    max_new_tokens: int,
    max_prompt_len: int | None = None,
    max_len: int | None = None,
) -> tuple[int, int]:
    """(max_prompt_len, max_len) for evaluating `subsets` (random-access record sequences); unset ones are
    sized from the data and logged."""
    if not max_prompt_len or not max_len:
        probe = ExampleTransform(
            tok,
            image_size=1,
            image_seq_length=image_seq_length,
            max_len=_UNBOUNDED,
            max_prompt_len=_UNBOUNDED,
            template=template,
        )
        prompt, total = longest(probe, (s[k] for s in subsets for k in range(len(s))))
        n = sum(len(s) for s in subsets)
        chosen = []
        if not max_prompt_len:
            max_prompt_len = bucket(prompt or image_seq_length)
            chosen.append(f"max_prompt_len={max_prompt_len} (longest prompt {prompt} tokens)")
        if not max_len:
            max_len = bucket(max(total, max_prompt_len + max_new_tokens))
            chosen.append(f"max_len={max_len} (longest conversation {total} tokens)")
        log.info("sized from %d records' text (multiples of %d): %s", n, BUCKET, ", ".join(chosen))
    return max_prompt_len, max(max_len, max_prompt_len)
