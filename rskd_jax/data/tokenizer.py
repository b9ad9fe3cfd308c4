"""Tokenizers: the model directory's HF tokenizer with `<image>` added (llava-hf style), or a small
offline SentencePiece BPE trained on dataset texts and saved as an HF tokenizer directory.

Only local paths are read; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable

from rskd_jax.data.chat import IMAGE_TOKEN
from rskd_jax.data.errors import log


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    image: int
    vocab_size: int  # len(tokenizer), including added tokens


def add_image_token(tok):
    """Adds `<image>` as a special token if missing (llava-hf: id = old vocab size, e.g. 32000)."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a local model/tokenizer directory (no hub access), with `<image>` added."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers/sentencepiece: slow, only tokenizer users)

    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 (transformers/sentencepiece: slow, only tokenizer users)

    # An original GeoChat / LLaVA directory's config.json names a model type transformers does not know; its
    # "You are using a model of type geochat ..." warning says nothing about the tokenizer: keep it quiet.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    return add_image_token(tok)


def special_ids(tok) -> SpecialIds:
    """BOS/EOS/`<image>` ids; pad = the tokenizer's pad id, else 0 (LLaMA `<unk>`, as GeoChat pads)."""
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image is None or image == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; load it with load_tokenizer()")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError("tokenizer needs BOS and EOS tokens (LLaMA style)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return SpecialIds(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=pad, image=image, vocab_size=len(tok))


class TextEncoder:
    """Picklable `list[str] -> list[list[int]]` without special tokens. Uses the fast tokenizer's Rust
    backend when there is one, so Grain worker processes need not import transformers (or torch)."""

    def __init__(self, tok):
        self.backend = getattr(tok, "backend_tokenizer", None)
        self.tok = None if self.backend is not None else tok

    def __call__(self, texts) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000):
    """Trains a LLaMA-like SentencePiece BPE (byte fallback, split digits, dummy prefix, whitespace kept
    as is, `<unk>`=0 `<s>`=1 `</s>`=2) on `texts`, saves it as an HF tokenizer directory with `<image>`
    added, and returns the loaded tokenizer (env-probe.md section 8, recipe A).

    `vocab_size` counts the 256 byte pieces and 3 specials; it is raised to the minimum the characters
    of `texts` need.
    """
    import sentencepiece as spm  # noqa: PLC0415 (transformers/sentencepiece: slow, only tokenizer users)
    from transformers import LlamaTokenizer  # noqa: PLC0415 (transformers/sentencepiece: slow, only tokenizer users)

    lines = [t.replace("\r", " ") for text in texts for t in text.split("\n") if t.strip()]
    if not lines:
        raise ValueError("train_tokenizer: no text")
    n_chars = len(set("".join(lines)))
    if vocab_size < 256 + 3 + n_chars + 8:
        log.warning(
            "train_tokenizer: vocab_size %d raised to %d (256 bytes + 3 specials + %d characters + 8)",
            vocab_size,
            256 + 3 + n_chars + 8,
            n_chars,
        )
        vocab_size = 256 + 3 + n_chars + 8
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = pathlib.Path(tmp, "corpus.txt")
        corpus.write_text("\n".join(lines), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(pathlib.Path(tmp, "sp")),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            minloglevel=2,
        )
        sp_dir = pathlib.Path(tmp, "sp_dir")
        sp_dir.mkdir()
        shutil.copy(pathlib.Path(tmp, "sp.model"), sp_dir / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(sp_dir), add_bos_token=True)
        add_image_token(tok)
        tok.save_pretrained(str(out_dir))
        shutil.copy(pathlib.Path(tmp, "sp.model"), out_dir / "sentencepiece.model")  # for reference checks
    return load_tokenizer(out_dir)
