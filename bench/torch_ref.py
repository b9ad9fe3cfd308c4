"""PyTorch peers written with transformers' LlavaForConditionalGeneration: the distillation step and a
MiniLLM-style teacher-mixed sampling loop.

`TorchDistillStep` does exactly the work of rskd_jax's step with weights {rkl, feat_image, feat_text} on a
fixed (pre-sampled) response:
  1. response view: teacher (no grad) and student forward over prompt + response; single-step reverse KL
     sum_v q (log q - log p) at the positions that predict the response, token mean (MiniLLM `_reg_loss`);
  2. ground-truth view: teacher and student forward over the GT conversation; feature alignment
     1 - cos(W h_s, h_t) of the final (post-norm) hidden states, image tokens and answer tokens averaged
     separately, through a learned linear map W (student -> teacher width);
  3. clip-by-global-norm 1.0 + AdamW (betas 0.9 / 0.95, eps 1e-8) over the student (vision frozen) and W.
`logits="all"` computes the LM head at every position (what `model(...).logits` gives, as MiniLLM's code
does); `logits="answer"` only at the positions the loss reads (the lean variant, same work as ours).

`mixed_sample` is MiniLLM's patched `generate` loop (t1101675/transformers@minillm `_sample`): student and
teacher each keep their own KV cache; per step both next-token distributions are computed and the token is
drawn from (1 - alpha) q + alpha p (probability space).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import flop_counter


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch (cumsum of the mask - 1, clipped at 0), as generate() derives them."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def hidden(model, ids, mask, pixels) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, D] of a LlavaForConditionalGeneration."""
    return model.model(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions(mask)
    ).last_hidden_state


class TorchDistillStep:
    """One optimizer step of reverse KL + feature alignment; see the module docstring."""

    def __init__(
        self,
        student,
        teacher,
        feature_map: torch.nn.Linear,
        *,
        lr: float = 1e-4,
        logits: str = "all",
        image_token_id: int,
    ):
        if logits not in ("all", "answer"):
            raise ValueError(f"logits={logits!r}: expected 'all' or 'answer'")
        self.student, self.teacher, self.map = student.train(), teacher.eval(), feature_map
        self.teacher.requires_grad_(False)
        self.student.model.vision_tower.requires_grad_(False)
        self.params = [p for p in (*student.parameters(), *feature_map.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        self.logits, self.image_token_id = logits, image_token_id

    def _head(self, model, h, pos):
        if self.logits == "all":
            return model.lm_head(h)[:, pos]
        return model.lm_head(h[:, pos])

    def loss(self, b: dict) -> tuple[torch.Tensor, dict]:
        # 1. response view: reverse KL at the positions predicting the response
        ids = torch.cat([b["prompt_ids"], b["response"]], 1)
        mask = torch.cat([b["prompt_mask"], torch.ones_like(b["response"])], 1)
        plen, r = b["prompt_ids"].shape[1], b["response"].shape[1]
        pos = torch.arange(plen - 1, plen - 1 + r)
        with torch.no_grad():
            t_logits = self._head(self.teacher, hidden(self.teacher, ids, mask, b["pixel_values"]), pos)
        s_logits = self._head(self.student, hidden(self.student, ids, mask, b["pixel_values"]), pos)
        lq, lp = F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1)
        rkl = (lq.exp() * (lq - lp)).sum(-1).mean()  # every response token is valid (fixed response)
        # 2. ground-truth view: feature alignment (no logits needed; "all" computes them as model(...) does)
        ids, mask, lmask = b["input_ids"], b["attention_mask"], b["loss_mask"].float()
        with torch.no_grad():
            t_h = hidden(self.teacher, ids, mask, b["pixel_values"])
            if self.logits == "all":
                self.teacher.lm_head(t_h)
        s_h = hidden(self.student, ids, mask, b["pixel_values"])
        if self.logits == "all":
            self.student.lm_head(s_h)  # computed (and discarded) like a plain model(...) call
        dist = 1 - F.cosine_similarity(self.map(s_h), t_h, dim=-1, eps=1e-8)
        img = ((ids == self.image_token_id) & (mask > 0)).float()
        mean = lambda m: (dist * m).sum() / m.sum().clamp(min=1)
        terms = {"rkl": rkl, "feat_image": mean(img), "feat_text": mean(lmask)}
        return rkl + terms["feat_image"] + terms["feat_text"], terms

    def __call__(self, b: dict) -> dict:
        self.opt.zero_grad(set_to_none=True)
        total, terms = self.loss(b)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return {k: v.item() for k, v in terms.items()} | {"total": total.item(), "grad_norm": norm.item()}


@torch.no_grad()
def mixed_sample(
    student,
    teacher,
    ids,
    mask,
    pixels,
    *,
    max_new_tokens: int,
    alpha: float,
    image_token_id: int,
    generator: torch.Generator | None = None,
) -> dict:
    """MiniLLM teacher-mixed sampling (temperature 1, no top-k/top-p), fixed length (no EOS stop).

    Returns tokens [B, N], the student / teacher log-probs of the drawn tokens and the importance weights
    q / ((1 - alpha) q + alpha p). The image placeholder is never drawn (as ours and `suppress_tokens`).
    """

    def step(model, out, tok, mask):
        if out is None:  # prefill: image + prompt, logits at the last position only
            return model(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=mask,
                position_ids=positions(mask),
                use_cache=True,
                logits_to_keep=1,
            )
        pos = mask.long().sum(1, keepdim=True) - 1
        return model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)

    def log_probs(out):
        logits = out.logits[:, -1].float()
        logits[:, image_token_id] = -float("inf")
        return F.log_softmax(logits, -1)

    s_out = step(student, None, None, mask)
    t_out = step(teacher, None, None, mask)
    toks, lqs, lps, ws = [], [], [], []
    for _ in range(max_new_tokens):
        lq, lp = log_probs(s_out), log_probs(t_out)
        probs = (1 - alpha) * lq.exp() + alpha * lp.exp()
        tok = torch.multinomial(probs, 1, generator=generator)
        q, p = lq.gather(1, tok), lp.gather(1, tok)
        toks.append(tok), lqs.append(q), lps.append(p), ws.append(q.exp() / probs.gather(1, tok))
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        s_out, t_out = step(student, s_out, tok, mask), step(teacher, t_out, tok, mask)
    cat = lambda xs: torch.cat(xs, 1)
    return dict(tokens=cat(toks), student_logprobs=cat(lqs), teacher_logprobs=cat(lps), weights=cat(ws))


# ------------------------------------------------------------------------------------------------ FLOP counts
def _cpu_flash(q, k, v, *args, out_shape=None, **kw):
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, out_shape=None, **kw):
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels SDPA dispatches to on CPU (torch 2.13
    registers only the CUDA ones). Same convention as rskd_jax.eval.flops: full S x S scores."""
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,  # FlopCounterMode wraps them
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    }
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
