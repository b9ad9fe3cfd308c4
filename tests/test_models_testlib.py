"""Helpers shared by the model tests (this file holds no tests).

HF reference models are built tiny and re-randomised with non-trivial scales (default HF init, std 0.02,
makes attention nearly uniform and every layer nearly the identity, which would hide masking/RoPE bugs).
"""

import numpy as np
import torch
from flax import nnx

from rskd_jax.convert import from_torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm scales 1+0.2N, biases 0.1N, embeddings/tables N(0,1), matrices N(0, 1/fan_in). In place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * n)
            elif p.ndim == 1 and "class_embedding" not in name:
                p.copy_(0.1 * n)
            elif "embed" in name:
                p.copy_(n)
            else:
                p.copy_(n / np.sqrt(np.prod(p.shape[1:])))
    return module


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def abstract(make):
    """An nnx model with nothing allocated (weights are loaded afterwards; avoids init compiles)."""
    return nnx.eval_shape(make)


def assert_close(ours, ref, tol: float = 1e-4, what: str = ""):
    """max|ours - ref| <= tol * max(1, max|ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol} * {scale:.3g}"
    return err


def llava_from_hf(cfg, hf_model):
    from rskd_jax.models import LlavaModel

    m = abstract(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    return from_torch.load_params(m, from_torch.llava_params_from_hf_state_dict(cfg, state_dict_np(hf_model)))


def causal_lm(model, input_ids, attention_mask=None, positions=None, cache=None, return_hidden=()):
    """A LlamaModel as transformers' LlamaForCausalLM (text only): -> (logits fp32 [B,T,V], {index: hidden},
    cache)."""
    last, hidden, cache = model(model.embed(input_ids), attention_mask, positions, cache, return_hidden)
    return model.logits(last), hidden, cache
