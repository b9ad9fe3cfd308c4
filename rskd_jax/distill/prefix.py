"""Teacher prefix reuse: the frozen teacher's ground-truth view from the rollout's prompt states.

The rollout's prefill already ran the teacher over the prompt, which is a prefix of the ground-truth
conversation (`input_ids`, the data contract of `ExampleTransform`). Nothing the step changes reaches the
teacher, so its hidden states at the prompt's positions are those of the prefill, and the tokens after the
prompt (the reference answer) only need a forward of their own that attends to the prefill's cached
keys / values (`rollout.TeacherStates`). This module builds that view: a suffix forward of `s = T - P` tokens
per row (seq_len - prompt_len, a static shape) against the prompt cache, joined with the prefill's hidden
states into the [B, T, D] arrays a full teacher forward over `input_ids` gives.

A micro-batch where some row's conversation goes on for more than `s` tokens after its prompt, or has an
image token after its prompt, falls back to the full teacher forward over `input_ids` (a `lax.cond`: only
one branch runs); the fraction of micro-batches that did is logged as `teacher/prefix_fallback`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rskd_jax.distill.rollout import TeacherStates
from rskd_jax.models.llama import KVCache
from rskd_jax.models.llava import LlavaOutput


def suffix_len(batch) -> int:
    """Static number of ground-truth tokens after the prompt the suffix forward computes (T - P)."""
    return batch["input_ids"].shape[1] - batch["prompt_ids"].shape[1]


def _suffix(batch, s: int, image_token_id: int):
    """The `s` ground-truth tokens after each row's prompt: ids, mask, positions [B, s], and whether every
    row's conversation ends within them with no image token among them (else the view falls back)."""
    ids, amask = batch["input_ids"], batch["attention_mask"].astype(jnp.int32)
    plen = batch["prompt_mask"].astype(jnp.int32).sum(1)
    t = ids.shape[1]
    pos = plen[:, None] + jnp.arange(s)[None]  # GT index (= position) of suffix token j
    src = jnp.minimum(pos, t - 1)
    s_ids = jnp.take_along_axis(ids, src, 1)
    s_mask = (pos < t) & (jnp.take_along_axis(amask, src, 1) > 0)
    beyond = (jnp.arange(t)[None] >= plen[:, None] + s) & (amask > 0)
    fits = ~jnp.any(beyond) & ~jnp.any(s_mask & (s_ids == image_token_id))
    return s_ids, s_mask, pos, plen, fits


def _suffix_cache(cache: KVCache, prompt_mask, plen, s: int) -> tuple[KVCache, jax.Array]:
    """The rollout's cache with room for the suffix at slots [P, P + s), and the suffix's attention mask
    over all slots: the prompt's valid slots, then the suffix causally (the response slots are not read)."""
    p = prompt_mask.shape[1]
    grow = max(0, p + s - cache.max_len)
    k, v, valid = cache.k, cache.v, cache.valid
    if grow:
        pad = ((0, 0), (0, 0), (0, 0), (0, grow), (0, 0))
        k, v, valid = jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(valid, ((0, 0), (0, grow)))
    c = KVCache(k=k, v=v, valid=valid, index=jnp.asarray(p, jnp.int32), next_pos=plen)
    return c, c.max_len


def _attn_mask(prompt_mask, s_mask, slots: int):
    """bool [B, s, slots]: suffix token j attends the valid prompt slots and the valid suffix slots <= j."""
    p, s = prompt_mask.shape[1], s_mask.shape[1]
    m = jnp.arange(slots)
    j = jnp.arange(s)
    key_ok = jnp.concatenate(
        [prompt_mask.astype(bool), s_mask, jnp.zeros((s_mask.shape[0], slots - p - s), bool)], 1
    )
    in_suffix_order = (m[None, :] < p) | (m[None, :] - p <= j[:, None])  # [s, slots]
    return key_ok[:, None, :] & in_suffix_order[None]


def _join(prompt_h, suffix_h, plen, t: int):
    """[B, P, D] (left-padded prompt) + [B, s, D] (suffix) -> [B, T, D] at the ground truth's positions;
    positions past the suffix (padding, when the view fits) get the suffix's last state."""
    p, s = prompt_h.shape[1], suffix_h.shape[1]
    both = jnp.concatenate([prompt_h, suffix_h.astype(prompt_h.dtype)], 1)
    i = jnp.arange(t)[None]
    src = jnp.where(i < plen[:, None], p - plen[:, None] + i, p + i - plen[:, None])
    return jnp.take_along_axis(both, jnp.clip(src, 0, p + s - 1)[..., None], 1)


def teacher_gt_view(teacher, batch, states: TeacherStates, layers, full_forward, image_token_id: int):
    """The teacher's ground-truth view (`LlavaOutput` without logits: last_hidden and hidden_states[layers]
    [B, T, D], image_features) from the rollout's prompt states plus a suffix forward; `full_forward()` (the
    teacher over `input_ids`) where the micro-batch does not fit. -> (view, 1.0 if it fell back else 0.0)."""
    s = suffix_len(batch)
    if s <= 0:  # no room after the prompt (seq_len <= prompt_len): nothing to reuse
        return full_forward(), jnp.float32(1.0)
    s_ids, s_mask, pos, plen, fits = _suffix(batch, s, image_token_id)
    t = batch["input_ids"].shape[1]

    def reuse():
        cache, slots = _suffix_cache(states.cache, batch["prompt_mask"], plen, s)
        attn = _attn_mask(batch["prompt_mask"], s_mask, slots)
        out = teacher(
            s_ids,
            None,
            attention_mask=s_mask.astype(jnp.int32),
            positions=pos,
            cache=cache,
            attn_mask=attn,
            return_hidden=layers,
            compute_logits=False,
        )
        return LlavaOutput(
            logits=None,
            last_hidden=_join(states.prompt_last, out.last_hidden, plen, t),
            hidden_states={k: _join(states.prompt_hidden[k], out.hidden_states[k], plen, t) for k in layers},
            image_features=states.image_features,
            cache=None,
        )

    def full():
        out = full_forward()
        return out.replace(cache=None, logits=None)

    view = jax.lax.cond(fits, reuse, full)
    return view, 1.0 - fits.astype(jnp.float32)
