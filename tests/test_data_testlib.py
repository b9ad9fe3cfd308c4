"""Helpers shared by the data and serving tests (this file holds no tests)."""

from rskd_jax.data.chat import IMAGE_TOKEN
from rskd_jax.data.tokenizer import special_ids


def tokenizer_image_token(prompt: str, tok, image_seq_length: int = 1) -> list[int]:
    """GeoChat's `tokenizer_image_token` (the reference our chat encoding is checked against): split on
    `<image>`, tokenize chunks separately, BOS once, and put `image_seq_length` image tokens between chunks
    (GeoChat puts one -200 sentinel there)."""
    ids = special_ids(tok)
    pieces = tok(prompt.split(IMAGE_TOKEN), add_special_tokens=False)["input_ids"]
    out = [ids.bos]
    for i, p in enumerate(pieces):
        if i:
            out += [ids.image] * image_seq_length
        out += p
    return out
