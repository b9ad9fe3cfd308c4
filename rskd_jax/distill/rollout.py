"""Teacher-mixed sampling (MiniLLM, paper Eq. 4) as one compiled loop; `greedy=True` decodes for evaluation.

Student and teacher each keep their own KV cache over the same image + prompt. At every step the next token is
drawn from the token-level mixture  p~ = alpha * p_teacher + (1 - alpha) * q_student  in probability space,
after temperature / top-k / top-p are applied to both distributions (as MiniLLM's patched `generate` does).
alpha = 0 is plain on-policy sampling; `greedy=True` takes the argmax of the mixture (alpha = 0: the student's
greedy decode, the argmax of its logits, as transformers' greedy search).

Everything here runs inside `jax.jit`: prefill, then a `lax.while_loop` over new tokens that stops as soon as
every row has emitted EOS (no Python per token).

The image placeholder id (`model.cfg.image_token_id`) is never generated when it lies inside the vocabulary:
fed back, the model would treat it as an image slot, not as text (transformers'
`generate(suppress_tokens=[id])` does the same). Its logit is set to -inf in both models before temperature /
top-k / top-p.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback


@flax.struct.dataclass
class TeacherStates:
    """What the rollout computed for the frozen teacher and the step reuses (`sample(keep_teacher=...)`).

    The teacher's states over the prompt and the sampled response depend on nothing the step changes, so its
    losses can read them instead of running the teacher over the prompt again (rskd_jax.distill.prefix).
    """

    cache: object  # KVCache after the decode: slots [0, P) the prompt (left-padded), [P, P + R) the response
    prompt_last: jax.Array  # [B, P, D] final-norm hidden states over the (left-padded) prompt
    prompt_hidden: dict  # {HF hidden-state index: [B, P, D]} over the prompt, the indices asked for
    response: jax.Array  # [B, R, D] final-norm hidden state predicting response token j (pad rows: unused)
    image_features: jax.Array | None  # [B, N, D] the teacher's projected image tokens (None without image)


@flax.struct.dataclass
class Rollout:
    """Output of `sample`. All arrays are [B, R] (R = max_new_tokens)."""

    tokens: jax.Array  # int32; pad after the first EOS
    mask: jax.Array  # float32; 1 for generated tokens up to and including the first EOS
    student_logprobs: jax.Array  # log q(y_t) under the processed (temperature/top-k/top-p) student distr.
    teacher_logprobs: jax.Array  # log p(y_t) under the processed teacher distribution (0 when no teacher)
    weights: jax.Array  # importance weights q / (alpha p + (1 - alpha) q) on the sampled tokens
    lengths: jax.Array  # int32 [B]: number of valid tokens (including EOS)
    teacher_states: TeacherStates | None = None  # only with sample(keep_teacher=...)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    alpha: float = 0.2  # teacher mix-in strength (paper: 0.2)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False


def process_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then top-p (HF order); removed entries become -inf. Float32 out."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        exclusive = jnp.cumsum(probs, axis=-1) - probs
        remove_sorted = (exclusive >= top_p).at[:, 0].set(False)  # HF TopPLogitsWarper; keeps the top token
        remove = (
            jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        )
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def _next_logits(model, ids, mask, cache, pixel_values=None, vision_features=None, return_hidden=()):
    """Runs `model` on `ids` with `cache`: (logits of the last position [B, V], image placeholder suppressed;
    the model's output, whose `cache` is the new cache)."""
    last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
    out = model(
        ids,
        pixel_values,
        attention_mask=mask,
        cache=cache,
        vision_features=vision_features,
        logits_at=last,
        return_hidden=return_hidden,
    )
    logits = out.logits[:, 0].astype(jnp.float32)
    image_id = getattr(getattr(model, "cfg", None), "image_token_id", None)
    if image_id is not None and 0 <= image_id < logits.shape[-1]:
        logits = logits.at[:, image_id].set(-jnp.inf)
    return logits, out


def sample(
    student,
    teacher,
    prompt_ids,
    prompt_mask,
    rng,
    cfg: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
    pixel_values=None,
    student_vision_features=None,
    teacher_vision_features=None,
    keep_teacher: Sequence[int] | None = None,
    on_token=None,
) -> Rollout:
    """Samples `cfg.max_new_tokens` tokens per row from the teacher-mixed distribution.

    prompt_ids / prompt_mask: [B, P], LEFT-padded (so every row's last prompt token sits at P - 1).
    teacher may be None (then alpha must be 0 and teacher_logprobs are 0).
    keep_teacher: HF hidden-state indices; when given (and a teacher is), the rollout also returns the
    teacher's states (`TeacherStates`: its KV cache, prompt hidden states at those indices, and the hidden
    state predicting each response token, recorded during the decode).
    on_token: optional host function `(step, tokens [B])` called from inside the loop as each token is chosen
    (`io_callback`, ordered; finished rows get `pad_id`), e.g. to stream text while generating.
    """
    if teacher is None and cfg.alpha > 0:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher model")
    keep = teacher is not None and keep_teacher is not None
    init, t_out = _prefill(
        student,
        teacher,
        prompt_ids,
        prompt_mask,
        rng,
        cfg.max_new_tokens,
        pad_id,
        pixel_values,
        (student_vision_features, teacher_vision_features),
        tuple(keep_teacher) if keep else None,
    )
    steps = cfg.max_new_tokens

    def cond(c):
        return (c["t"] < steps) & ~jnp.all(c["done"])

    body = functools.partial(
        _decode_step, student, teacher, cfg, eos_id=eos_id, pad_id=pad_id, keep=keep, on_token=on_token
    )
    c = jax.lax.while_loop(cond, body, init)
    states = None
    if keep:
        states = TeacherStates(
            cache=c["t_cache"],
            prompt_last=t_out.last_hidden,
            prompt_hidden=dict(t_out.hidden_states),
            response=c["t_hid"][:, :steps],
            image_features=t_out.image_features,
        )
    return Rollout(
        tokens=c["tokens"],
        mask=c["mask"],
        student_logprobs=c["s_lp"],
        teacher_logprobs=c["t_lp"],
        weights=c["w"],
        lengths=c["mask"].sum(-1).astype(jnp.int32),
        teacher_states=states,
    )


def _prefill(student, teacher, prompt_ids, prompt_mask, rng, steps, pad_id, pixel_values, vision, keep):
    """Both models over the prompt: the decode loop's initial carry and the teacher's prefill output (None
    without a teacher). vision: (student, teacher) precomputed vision features; keep: the teacher's hidden-state
    indices to record (None: record nothing)."""
    batch, plen = prompt_ids.shape
    total = plen + steps
    s_logits, s_out = _next_logits(
        student, prompt_ids, prompt_mask, student.init_cache(batch, total), pixel_values, vision[0]
    )
    t_out = None
    if teacher is not None:
        t_logits, t_out = _next_logits(
            teacher,
            prompt_ids,
            prompt_mask,
            teacher.init_cache(batch, total),
            pixel_values,
            vision[1],
            return_hidden=keep if keep is not None else (),
        )
        t_cache = t_out.cache
    else:
        t_logits, t_cache = jnp.zeros_like(s_logits), None
    zeros_f = jnp.zeros((batch, steps), jnp.float32)
    init = dict(
        t=jnp.int32(0),
        done=jnp.zeros((batch,), bool),
        rng=rng,
        s_logits=s_logits,
        t_logits=t_logits,
        s_cache=s_out.cache,
        t_cache=t_cache,
        tokens=jnp.full((batch, steps), pad_id, jnp.int32),
        mask=zeros_f,
        s_lp=zeros_f,
        t_lp=zeros_f,
        w=zeros_f,
    )
    if (
        keep is not None
    ):  # slot j + 1: the teacher's hidden state after feeding response token j (predicts j + 1)
        hid = t_out.last_hidden
        init["t_hid"] = jnp.zeros((batch, steps + 1, hid.shape[-1]), hid.dtype).at[:, 0].set(hid[:, -1])
    return init, t_out


def _mixture(cfg: SamplingConfig, s_logits, t_logits, use_teacher: bool):
    """(log q, log p, log of the mixture alpha p + (1 - alpha) q) of the processed distributions [B, V]."""
    proc = lambda lg: process_logits(lg, cfg.temperature, cfg.top_k, cfg.top_p)
    log_q = jax.nn.log_softmax(proc(s_logits), axis=-1)
    if not use_teacher:
        return log_q, jnp.zeros_like(log_q), log_q
    log_p = jax.nn.log_softmax(proc(t_logits), axis=-1)
    if cfg.alpha <= 0:
        return log_q, log_p, log_q
    if cfg.alpha >= 1:
        return log_q, log_p, log_p
    return log_q, log_p, jnp.logaddexp(jnp.log(cfg.alpha) + log_p, jnp.log1p(-cfg.alpha) + log_q)


def _choose(cfg: SamplingConfig, key, s_logits, log_mix):
    """The next token [B] (int32): sampled from the mixture, or its argmax with `cfg.greedy`."""
    if cfg.greedy and cfg.alpha == 0:  # argmax of the logits themselves, as HF greedy search does
        tok = jnp.argmax(s_logits, -1)
    elif cfg.greedy:
        tok = jnp.argmax(log_mix, -1)
    else:
        tok = jax.random.categorical(key, log_mix, axis=-1)
    return tok.astype(jnp.int32)


def _decode_step(student, teacher, cfg: SamplingConfig, c, *, eos_id, pad_id, keep, on_token):
    """One token of the decode loop: choose it, record its log-probabilities, feed it to both models."""
    rng, key = jax.random.split(c["rng"])
    log_q, log_p, log_mix = _mixture(cfg, c["s_logits"], c["t_logits"], teacher is not None)
    tok = _choose(cfg, key, c["s_logits"], log_mix)
    valid = ~c["done"]
    pick = lambda lp: jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
    lq, lp_, lm = pick(log_q), pick(log_p), pick(log_mix)
    t = c["t"]
    upd = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], t, axis=1)
    vf = valid.astype(jnp.float32)
    tokens = upd(c["tokens"], jnp.where(valid, tok, pad_id))
    if on_token is not None:
        io_callback(on_token, None, t, jnp.where(valid, tok, pad_id), ordered=True)
    # where, not multiply: a finished row's (unused) draw may have log q = -inf (outside the student's
    # top-k / top-p set when alpha > 0), and -inf * 0 is NaN in IEEE arithmetic (XLA currently rewrites
    # x * convert(pred) into a select, which hides it; that is an optimisation, not a guarantee).
    out = dict(
        c,
        t=t + 1,
        rng=rng,
        tokens=tokens,
        mask=upd(c["mask"], vf),
        s_lp=upd(c["s_lp"], jnp.where(valid, lq, 0.0)),
        t_lp=upd(c["t_lp"], jnp.where(valid, lp_, 0.0)),
        w=upd(c["w"], jnp.where(valid, jnp.exp(lq - lm), 0.0)),
        done=c["done"] | (valid & (tok == eos_id)),
    )
    feed = jnp.where(valid, tok, pad_id)[:, None]
    feed_mask = valid.astype(jnp.int32)[:, None]
    out["s_logits"], s_step = _next_logits(student, feed, feed_mask, c["s_cache"])
    out["s_cache"] = s_step.cache
    if teacher is not None:
        out["t_logits"], t_step = _next_logits(teacher, feed, feed_mask, c["t_cache"])
        out["t_cache"] = t_step.cache
        if keep:
            out["t_hid"] = jax.lax.dynamic_update_slice_in_dim(c["t_hid"], t_step.last_hidden, t + 1, 1)
    return out
