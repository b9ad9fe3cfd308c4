"""Analytic FLOPs of one LLaVA forward, and the paper's Table 8 (parameters and GFLOPs).

Counting convention (stated once, used everywhere):
* Only matrix products count, at 2·m·n·k FLOPs each (one multiply + one add per MAC): the patch-embedding
  convolution, every linear layer, the attention scores Q·Kᵀ and the attention-weighted values P·V, the
  projector and the LM head. Biases, norms, activations, softmax, RoPE, residual adds and embedding
  lookups are not counted (they are O(tokens·width), well under 1–2 % at real sizes).
* Attention is counted for the full S×S score matrix (``causal_halved=False``): that is what a dense
  masked implementation computes. ``causal_halved=True`` counts the S·(S+1)/2 visible pairs only.
* The vision tower sees ``num_positions`` = patches + 1 (CLS) tokens per image; ``vision_layers="all"``
  counts every encoder layer (what HF / GeoChat run), ``"used"`` only those up to ``vision_feature_layer``
  (GeoChat's −2 = all but the last). The projector runs on ``image_seq_length`` tokens per image.
* ``seq_len`` is the LLM sequence length INCLUDING the image tokens; the LM head runs at every position
  unless ``logits_positions`` says otherwise (1 = next-token logits only).

The seed paper's Table 8 uses another convention (``paper_flops``): an LLM-only forward over 512 TEXT tokens
(decoder layers + LM head at every position, full S×S attention; no CLIP tower, no projector, no image tokens).
That reproduces its 6904.53 G (GeoChat-7B) and 13377.05 G (GeoChat-13B) within 0.05 % (6903.09 G / 13374.80 G);
the full count of a real multimodal forward (1296 image tokens + text, CLIP + projector + LLM) is ~2.9× larger.
``configs/eval.py:params`` prints both.

XLA's ``compiled.cost_analysis()['flops']`` agrees with this on an unrolled model (it adds the elementwise
ops we leave out and puts exp/tanh under ``transcendentals``); for a model whose layers run under
``lax.scan`` XLA counts the loop body ONCE, so it reports roughly one layer instead of all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rskd_jax.models.counts import param_counts

CONVENTION = (
    "matmul FLOPs only (2*m*n*k): patch embedding, linear layers, attention scores and values "
    "(full S*S unless causal_halved), projector, LM head; seq_len includes image tokens"
)

PAPER_TEXT_TOKENS = 512
PAPER_CONVENTION = (
    "paper Table 8: LLM-only forward over 512 text tokens (decoder layers + LM head at every position, full "
    "S*S attention, matmul FLOPs 2*m*n*k); no CLIP tower, projector or image tokens"
)


def _attention_pairs(n: int, causal_halved: bool) -> int:
    return n * (n + 1) // 2 if causal_halved else n * n


def vision_flops(v, num_layers: int | None = None) -> dict[str, int]:
    """FLOPs of one image through a CLIP vision tower (duck-typed config ``v``)."""
    d, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    c = getattr(v, "num_channels", 3)
    patches = (v.image_size // p) ** 2
    t = getattr(v, "num_positions", patches + 1)
    layers = v.num_layers if num_layers is None else num_layers
    patch_embed = 2 * patches * (c * p * p) * d
    proj = 2 * t * d * d * 4  # q, k, v, out
    attn = 2 * 2 * t * t * d  # scores + values, all heads together (heads · head_dim = d)
    mlp = 2 * 2 * t * d * i
    return dict(
        patch_embed=patch_embed,
        layers=layers * (proj + attn + mlp),
        attention=layers * attn,
        total=patch_embed + layers * (proj + attn + mlp),
    )


def projector_flops(cfg, tokens: int) -> int:
    """FLOPs of the multimodal projector on ``tokens`` image tokens."""
    dv, dt = cfg.vision.hidden_size, cfg.text.hidden_size
    kind = getattr(cfg, "projector_type", "mlp2x_gelu")
    if kind == "mlp2x_gelu":
        return 2 * tokens * dv * dt + 2 * tokens * dt * dt
    if kind == "linear":
        return 2 * tokens * dv * dt
    raise ValueError(f"projector_type {kind!r}: expected 'mlp2x_gelu' or 'linear'")


def llm_flops(t, seq_len: int, *, logits_positions: int | None = None, causal_halved: bool = False) -> dict:
    """FLOPs of a LLaMA decoder (duck-typed config ``t``) over ``seq_len`` tokens, LM head included."""
    d, i, v = t.hidden_size, t.intermediate_size, t.vocab_size
    hd = getattr(t, "head_dim", None) or d // t.num_heads
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    s = seq_len
    proj = 2 * s * d * (q + 2 * kv) + 2 * s * q * d
    attn = 2 * 2 * _attention_pairs(s, causal_halved) * q
    mlp = 3 * 2 * s * d * i  # gate, up, down
    head = 2 * (s if logits_positions is None else logits_positions) * d * v
    return dict(
        layers=t.num_layers * (proj + attn + mlp),
        attention=t.num_layers * attn,
        lm_head=head,
        total=t.num_layers * (proj + attn + mlp) + head,
    )


def paper_flops(cfg, text_tokens: int = PAPER_TEXT_TOKENS) -> int:
    """FLOPs in the seed paper's Table 8 convention (``PAPER_CONVENTION``): the LLM alone over ``text_tokens``
    text tokens, LM head at every position, full S×S attention."""
    return llm_flops(cfg.text, text_tokens)["total"]


def _vision_layers(cfg, which: str) -> int:
    n = cfg.vision.num_layers
    if which == "all":
        return n
    if which == "used":  # hidden_states[k] is the output of k layers; negative k counts from n + 1 states
        return getattr(cfg, "vision_feature_layer", -2) % (n + 1)
    raise ValueError(f"vision_layers={which!r}: expected 'all' or 'used'")


def image_tokens(cfg) -> int:
    """Image tokens per image in the LLM sequence (``image_seq_length``, else patches)."""
    n = getattr(cfg, "image_seq_length", None)
    return n if n is not None else (cfg.vision.image_size // cfg.vision.patch_size) ** 2


def forward_flops(
    cfg,
    seq_len: int,
    *,
    num_images: int = 1,
    logits_positions: int | None = None,
    causal_halved: bool = False,
    vision_layers: str = "all",
) -> dict[str, int]:
    """FLOPs of one forward of a LLaVA model on one sequence of ``seq_len`` tokens (image tokens included)
    with ``num_images`` images. Returns ints: vision, projector, llm (decoder layers), lm_head, attention
    (the score/value part of vision + llm, informational), total."""
    n_img = image_tokens(cfg) * num_images
    if seq_len < n_img:
        raise ValueError(f"seq_len={seq_len} is shorter than the {n_img} image tokens it must contain")
    vis = vision_flops(cfg.vision, _vision_layers(cfg, vision_layers))
    proj = projector_flops(cfg, n_img)
    llm = llm_flops(cfg.text, seq_len, logits_positions=logits_positions, causal_halved=causal_halved)
    out = dict(
        vision=num_images * vis["total"],
        projector=proj,
        llm=llm["layers"],
        lm_head=llm["lm_head"],
        attention=num_images * vis["attention"] + llm["attention"],
    )
    out["total"] = out["vision"] + proj + llm["total"]
    return out


def _default_params_fn():
    return param_counts


def params_flops_metrics(
    cfg,
    seq_len: int,
    params: Mapping[str, int] | None = None,
    params_fn: Callable | None = None,
    paper_text_tokens: int = PAPER_TEXT_TOKENS,
    **flops_kw,
) -> dict:
    """Report-ready dict(task='params_flops', params, flops, seq_len, flops_convention, paper_flops,
    paper_text_tokens, paper_flops_convention): ``flops`` is the full multimodal forward over ``seq_len``
    tokens, ``paper_flops`` the paper's Table 8 count (LLM only, ``paper_text_tokens`` text tokens).

    ``params`` defaults to ``rskd_jax.models.presets.param_counts(cfg)`` (keys vision, projector, llm,
    paper_total, total; computed on an abstract model, nothing allocated).
    """
    if params is None:
        params = (params_fn or _default_params_fn())(cfg)
    return dict(
        task="params_flops",
        params=dict(params),
        flops=forward_flops(cfg, seq_len, **flops_kw),
        seq_len=seq_len,
        flops_options=dict(flops_kw),
        flops_convention=CONVENTION,
        paper_flops=paper_flops(cfg, paper_text_tokens),
        paper_text_tokens=paper_text_tokens,
        paper_flops_convention=PAPER_CONVENTION,
    )


def format_table_8(
    cfgs: Mapping[str, object],
    seq_len: int | None = None,
    *,
    params_fn: Callable | None = None,
    paper_text_tokens: int = PAPER_TEXT_TOKENS,
    **flops_kw,
) -> str:
    """Paper Table 8 style Markdown: parameters (M) per component, GFLOPs in the paper's convention and GFLOPs
    of the full multimodal forward, with a note saying what each column counts.

    ``seq_len`` defaults per model to its image tokens + 64 text tokens (stated in the table caption).
    ``params_fn`` defaults to ``presets.param_counts``.
    """
    params_fn = params_fn or _default_params_fn()
    rows = [
        "| model | vision (M) | projector (M) | LLM (M) | params (M, paper) | total (M) "
        "| GFLOPs (paper) | seq len | GFLOPs (full) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cfg in cfgs.items():
        s = seq_len if seq_len is not None else image_tokens(cfg) + 64
        p = params_fn(cfg)
        f = forward_flops(cfg, s, **flops_kw)
        m = [p[k] / 1e6 for k in ("vision", "projector", "llm", "paper_total", "total")]
        cells = [*(f"{x:.2f}" for x in m), f"{paper_flops(cfg, paper_text_tokens) / 1e9:.2f}", str(s)]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {f['total'] / 1e9:.1f} |")
    note = (
        "\n\nparams (M, paper) = LLM + projector + CLIP position table (CLIP encoder excluded), the seed "
        "paper's convention; total (M) = every weight of the model.\n"
        f"GFLOPs (paper) = the seed paper's Table 8 convention: an LLM-only forward over {paper_text_tokens} "
        "text tokens (decoder + LM head at every position, full S×S attention, matmul FLOPs 2·m·n·k); no CLIP "
        "tower, projector or image tokens.\n"
        "GFLOPs (full) = one real multimodal forward: matmul FLOPs (2·m·n·k) of CLIP tower + projector + LLM "
        "incl. LM head at every position, full S×S attention; seq len includes the image tokens."
    )
    return "\n".join(rows) + note
