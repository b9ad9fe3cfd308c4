"""CLIP tower vs transformers' CLIPVisionModel; GeoChat's bicubic position-table resize vs torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_models_testlib import abstract, assert_close, randomize_, state_dict_np

from rskd_jax.convert import from_torch
from rskd_jax.models import ClipVisionModel, get_preset, interpolate_pos_table

CFG = get_preset("tiny").vision  # 32 px, 8 px patches (4x4 grid), 3 layers


def hf_clip(cfg, seed=0):
    vc = from_torch.hf_llava_config(get_preset("tiny").replace(vision=cfg)).vision_config
    return randomize_(transformers.CLIPVisionModel(vc).eval(), seed)


def ours(cfg, sd, scan=True):
    m = abstract(lambda: ClipVisionModel(cfg, scan=scan, rngs=nnx.Rngs(0)))
    return from_torch.load_params(m, from_torch.clip_params_from_hf_state_dict(cfg, sd, scan=scan))


def hf_run(hf, px_nhwc):
    with torch.no_grad():
        return hf(pixel_values=torch.tensor(px_nhwc).permute(0, 3, 1, 2), output_hidden_states=True)


@pytest.mark.parametrize("scan", [True, False])
def test_clip_matches_hf(scan):
    hf = hf_clip(CFG)
    px = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)  # two different images
    ref = hf_run(hf, px)
    model = ours(CFG, state_dict_np(hf), scan=scan)
    out = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(model, jnp.asarray(px))
    assert len(out.hidden_states) == len(ref.hidden_states) == CFG.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b.numpy(), what=f"hidden {i}")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last")
    assert_close(out.pooler_output, ref.pooler_output.numpy(), what="pooled")
    assert not np.allclose(ref.hidden_states[-1][0].numpy(), ref.hidden_states[-1][1].numpy(), atol=1e-2)
    # Feature selection runs only the layers it needs; index -2 = output of the second-to-last layer.
    for idx in (-2, 0):
        h = nnx.jit(lambda m, x, i=idx: m.hidden_state(x, i))(model, jnp.asarray(px))
        assert_close(h, ref.hidden_states[idx].numpy(), what=f"hidden_state({idx})")


@pytest.mark.parametrize(
    "grid,new_grid,dtype", [(24, 36, torch.float32), (4, 6, torch.float64), (5, 3, torch.float64)]
)
def test_interpolate_pos_table_matches_torch(grid, new_grid, dtype):
    """GeoChat recipe: CLS row kept, grid -> torch bicubic(align_corners=True) -> flattened row-major."""
    d = 8
    table = np.random.default_rng(grid).standard_normal((1 + grid * grid, d))
    t = torch.tensor(table, dtype=dtype)
    g = t[1:].reshape(grid, grid, d).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(g, size=new_grid, mode="bicubic", align_corners=True)
    ref = torch.cat([t[:1], ref[0].permute(1, 2, 0).reshape(new_grid * new_grid, d)]).numpy()
    ours_t = interpolate_pos_table(table.astype(ref.dtype), new_grid)
    assert ours_t.shape == (1 + new_grid**2, d) and ours_t.dtype == ref.dtype
    np.testing.assert_allclose(ours_t, ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours_t[0], table[0].astype(ref.dtype))


def test_interpolate_pos_table_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_table(np.zeros((18, 4)), 6)


def test_encoder_at_new_resolution_matches_hf_with_that_table():
    """A 32 px tower (4x4 grid) run at 48 px (6x6): our auto-resized table == HF CLIP loaded with torch's."""
    hf32 = hf_clip(CFG, seed=3)
    sd = state_dict_np(hf32)
    cfg48 = CFG.__class__(**{**CFG.__dict__, "image_size": 48})
    hf48 = transformers.CLIPVisionModel(hf_clip(cfg48).config).eval()
    table = torch.tensor(sd["embeddings.position_embedding.weight"])
    grid = table[1:].reshape(4, 4, -1).permute(2, 0, 1)[None]
    grid = torch.nn.functional.interpolate(grid, size=6, mode="bicubic", align_corners=True)
    new_table = torch.cat([table[:1], grid[0].permute(1, 2, 0).reshape(36, -1)])
    hf48.load_state_dict(
        {**{k: torch.tensor(v) for k, v in sd.items()}, "embeddings.position_embedding.weight": new_table}
    )
    px = np.random.default_rng(1).standard_normal((2, 48, 48, 3)).astype(np.float32)
    ref = hf_run(hf48, px)
    model = ours(cfg48, sd)  # the 17-row table is resized to 37 rows on load
    assert model.pos_embed.shape == (37, CFG.hidden_size)
    out = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(model, jnp.asarray(px))
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b.numpy(), what=f"hidden {i} @48px")


def test_wrong_resolution_raises():
    hf = hf_clip(CFG)
    model = ours(CFG, state_dict_np(hf))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))
