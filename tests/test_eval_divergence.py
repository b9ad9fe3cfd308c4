"""Student-to-teacher divergences vs float64 KL sums over transformers' PyTorch logits.

Student and teacher are two randomised tiny HF Llava models (converted with from_torch). The sampled-response
reverse KL is recomputed from the returned samples with HF forwards over prompt + response; the ground-truth
forward / reverse KL from HF forwards over the answer batch. A third batch row is padding (example_id -1) and
must not count.
"""

import numpy as np
import pytest
import torch
import transformers
from test_models_testlib import llava_from_hf, randomize_

from rskd_jax.convert import from_torch
from rskd_jax.eval.divergence import divergence_to_teacher
from rskd_jax.models import get_preset

CFG = get_preset("tiny")
IMG = [CFG.image_token_id] * CFG.image_seq_length
STEPS = 5
PROMPTS = [[1, 5, 6, *IMG, 7, 8], [1, 9, *IMG, 10]]
ANSWERS = [[20, 21, 22, 2], [30, 31, 2]]


def make_batch():
    rows = PROMPTS + PROMPTS[:1]  # row 2: padding (a copy of row 0)
    answers = ANSWERS + ANSWERS[:1]
    p = max(map(len, rows))
    t = max(len(a) + len(b) for a, b in zip(rows, answers))
    b = dict(
        prompt_ids=np.zeros((3, p), np.int32),
        prompt_mask=np.zeros((3, p), np.int32),
        input_ids=np.zeros((3, t), np.int32),
        attention_mask=np.zeros((3, t), np.int32),
        loss_mask=np.zeros((3, t), np.int32),
        example_id=np.array([0, 1, -1], np.int32),
    )
    for i, (q, a) in enumerate(zip(rows, answers)):
        b["prompt_ids"][i, p - len(q) :], b["prompt_mask"][i, p - len(q) :] = q, 1
        n = len(q) + len(a)
        b["input_ids"][i, :n], b["attention_mask"][i, :n] = q + a, 1
        b["loss_mask"][i, len(q) : n] = 1
    b["pixel_values"] = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    return b


def hf_logprobs(hf, ids, mask, px):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids).long(),
            attention_mask=torch.tensor(mask).long(),
            position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)).long(),
            pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
        )
    return torch.log_softmax(out.logits.double(), -1).numpy()


def kl(la, lb):  # sum_v a (log a - log b), float64
    return float((np.exp(la) * (la - lb)).sum())


@pytest.fixture(scope="module")
def models():
    mk = lambda s: randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(CFG)).eval(), s
    )
    hf_s, hf_t = mk(3), mk(4)
    return hf_s, hf_t, llava_from_hf(CFG, hf_s), llava_from_hf(CFG, hf_t)


def test_divergences_match_hf_reference(models):
    hf_s, hf_t, student, teacher = models
    batch = make_batch()
    res = divergence_to_teacher(
        student, teacher, [(batch, None)], max_new_tokens=STEPS, seed=0, answer_len=3, return_samples=True
    )
    # (a) reverse KL at the student's own sampled responses.
    tokens, rmask = res["samples"][0]
    p = batch["prompt_ids"].shape[1]
    ids = np.concatenate([batch["prompt_ids"], tokens], 1)[:2]
    mask = np.concatenate([batch["prompt_mask"], rmask.astype(np.int32)], 1)[:2]
    lq = hf_logprobs(hf_s, ids, mask, batch["pixel_values"][:2])
    lp = hf_logprobs(hf_t, ids, mask, batch["pixel_values"][:2])
    vals = [kl(lq[b, p - 1 + t], lp[b, p - 1 + t]) for b in range(2) for t in range(STEPS) if rmask[b, t]]
    assert res["n_sampled_tokens"] == len(vals) == int(rmask[:2].sum())
    assert res["rkl_sampled"] == pytest.approx(np.mean(vals), rel=1e-4)
    assert res["rkl_sampled"] > 0.05  # different models: a real divergence, not ~0
    assert res["n_examples"] == 2
    # (b) ground-truth answers, teacher-forced; answer_len=3 keeps the first 3 targets of each row.
    lq = hf_logprobs(hf_s, batch["input_ids"][:2], batch["attention_mask"][:2], batch["pixel_values"][:2])
    lp = hf_logprobs(hf_t, batch["input_ids"][:2], batch["attention_mask"][:2], batch["pixel_values"][:2])
    fkl, rkl = [], []
    for b in range(2):
        targets = np.flatnonzero(batch["loss_mask"][b, 1:])[:3]  # position t predicts token t + 1
        fkl += [kl(lp[b, t], lq[b, t]) for t in targets]
        rkl += [kl(lq[b, t], lp[b, t]) for t in targets]
    assert res["n_gt_tokens"] == 6 and res["gt_tokens_dropped"] == 1  # row 0 has 4 targets, row 1 has 3
    assert res["fkl_gt"] == pytest.approx(np.mean(fkl), rel=1e-4)
    assert res["rkl_gt"] == pytest.approx(np.mean(rkl), rel=1e-4)
    assert res["fkl_gt"] != pytest.approx(res["rkl_gt"], rel=1e-3)
