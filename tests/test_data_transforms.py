"""Image decoding / GeoChat preprocessing (vs transformers' CLIPImageProcessor) and the example transform."""

import io

import numpy as np
import pytest
from PIL import Image

from rskd_jax.data import chat
from rskd_jax.data.errors import DataError
from rskd_jax.data.synth import SynthSource, train_synth_tokenizer
from rskd_jax.data.transforms import CLIP_MEAN, CLIP_STD, ExampleTransform, decode_image, preprocess_image


def _clip_reference(img: np.ndarray, size: int) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    out = proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    return np.transpose(out, (1, 2, 0))


@pytest.mark.parametrize("h, w, size", [(37, 53, 48), (60, 41, 32), (40, 40, 56)])
def test_preprocess_matches_clip_image_processor(h, w, size):
    img = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    # GeoChat eval scripts: no padding, shortest-edge resize + centre crop.
    np.testing.assert_allclose(
        preprocess_image(img, size, pad_to_square=False), _clip_reference(img, size), atol=1e-5
    )
    # GeoChat training: expand2square with (122, 116, 104), image centred, then the same processor.
    side = max(h, w)
    padded = np.empty((side, side, 3), np.uint8)
    padded[...] = (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top : top + h, left : left + w] = img
    out = preprocess_image(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _clip_reference(padded, size), atol=1e-5)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_modes():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        decode_image(_encode(Image.fromarray(grey), "PNG")), np.stack([grey] * 3, -1)
    )
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 77, np.uint8)], -1)
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgba), "PNG")), rgb)
    # palette
    pal = Image.fromarray(rgb).quantize(colors=16)
    lut = np.array(pal.getpalette()[:48], np.uint8).reshape(16, 3)
    np.testing.assert_array_equal(decode_image(_encode(pal, "PNG")), lut[np.asarray(pal)])
    # 16-bit grey (PNG and TIFF) -> top 8 bits, rounded
    g16 = rng.integers(0, 65536, (9, 7)).astype(np.uint16)
    want = np.stack([np.clip(np.rint(g16 / 257.0), 0, 255).astype(np.uint8)] * 3, -1)
    for fmt in ("PNG", "TIFF"):
        np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(g16), fmt)), want)
    # 1-bit, RGB TIFF, arrays
    bits = Image.fromarray(grey > 128)
    np.testing.assert_array_equal(decode_image(_encode(bits, "PNG"))[..., 0], np.where(grey > 128, 255, 0))
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgb), "TIFF")), rgb)
    np.testing.assert_array_equal(decode_image(grey), np.stack([grey] * 3, -1))
    assert decode_image(rgba).shape == (9, 7, 3)


def test_corrupt_and_missing_images(tmp_path):
    good = _encode(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100), "JPEG")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"{bad}: cannot decode image"):
        decode_image(str(bad))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=rf"{junk}: cannot decode image"):
        decode_image(junk)
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.jpg'}: image file not found"):
        decode_image(str(tmp_path / "nope.jpg"))


def test_ucm_tif_and_jpg_are_the_same_image(shared_data):
    tif = decode_image(shared_data / "UCMerced_LandUse_tif/Images/forest/forest00.tif")
    jpg = decode_image(shared_data / "UCMerced_LandUse/Images/forest/forest00.jpg")
    assert tif.shape == jpg.shape == (256, 256, 3)
    assert np.abs(tif.astype(float) - jpg).mean() < 4  # JPEG q95 re-encoding


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_synth_tokenizer(tmp_path_factory.mktemp("tok"), num_records=300)


def test_example_transform_contract(tok):
    src = SynthSource(8, image_size=40, seed=1)
    tr = ExampleTransform(tok, image_size=32, image_seq_length=9, max_len=128, max_prompt_len=112)
    img_id = tok.convert_tokens_to_ids("<image>")
    for i in range(8):
        rec = src[i]
        ex = tr(rec)
        assert {k: (v.shape, v.dtype.name) for k, v in ex.items()} == {
            "pixel_values": ((32, 32, 3), "float32"),
            "input_ids": ((128,), "int32"),
            "attention_mask": ((128,), "int32"),
            "loss_mask": ((128,), "int32"),
            "prompt_ids": ((112,), "int32"),
            "prompt_mask": ((112,), "int32"),
        }
        np.testing.assert_allclose(ex["pixel_values"], preprocess_image(rec["image"], 32), atol=0)
        n, p = ex["attention_mask"].sum(), ex["prompt_mask"].sum()
        assert (ex["input_ids"] == img_id).sum() == 9 and (ex["prompt_ids"] == img_id).sum() == 9
        np.testing.assert_array_equal(ex["prompt_ids"][112 - p :], ex["input_ids"][:p])  # prompt = prefix
        answer = rec["conversations"][1]["value"]
        assert tok.decode(ex["input_ids"][ex["loss_mask"] == 1]) == answer + "</s>"
        assert ex["loss_mask"][:p].sum() == 0 and ex["loss_mask"][p:n].all() and ex["input_ids"][n - 1] == 2
        rendered = chat.render(chat.normalize_turns(rec["conversations"]), "vicuna_v1")
        text = tok.decode(ex["input_ids"][:n]).replace("<image>" * 9, "<image>")
        assert text == "<s> " + rendered.replace("USER: <image>\n", "USER: <image> \n")  # "▁" after the image
    assert tr.stats["examples"] == 8 and not tr.stats["truncated"]


def test_truncation_is_counted(tok, caplog):
    tr = ExampleTransform(tok, image_size=16, image_seq_length=4, max_len=64, max_prompt_len=60)
    rec = {
        "id": "long",
        "image": np.zeros((8, 8, 3), np.uint8),
        "conversations": [
            {"from": "human", "value": "<image>\nIs there a ship?"},
            {"from": "gpt", "value": "Yes " * 40},
        ],
    }
    with caplog.at_level("WARNING"):
        ex = tr(rec)
    assert ex["attention_mask"].all() and tr.stats["truncated"] == 1
    assert "long: truncated (1 so far" in caplog.text
