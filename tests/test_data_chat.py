"""Chat template rendering and tokenization (ids + loss mask) against independent constructions."""

import re

import numpy as np
import pytest
import sentencepiece as spm
from test_data_testlib import tokenizer_image_token

from rskd_jax.data import chat
from rskd_jax.data.errors import DataError
from rskd_jax.data.tokenizer import TextEncoder, special_ids, train_tokenizer

N_IMG = 5
CONV = [
    {"from": "human", "value": "What kind of area is shown here?\n<image>"},
    {"from": "gpt", "value": "An airport with 2 planes."},
    {"from": "human", "value": "[refer] Give me the location of <p> plane </p>"},
    {"from": "gpt", "value": "{<16><55><24><63>|<11>}"},
]
EXPECTED_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat kind of area is shown here? "
    "ASSISTANT: An airport with 2 planes.</s>USER: [refer] Give me the location of <p> plane </p> "
    "ASSISTANT: {<16><55><24><63>|<11>}</s>"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [
        EXPECTED_VICUNA.replace("<image>", " "),
        chat.LLAVA_V1.system,
        "Classify the given image in one of the following classes. Classes: forest, water. "
        "Answer in one word or a short phrase.",
        "Is there a ship? Yes No 0123456789 {<>}|",
    ] * 20
    train_tokenizer(texts, d, vocab_size=420)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from rskd_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def test_render_two_turns_exact():
    msgs = chat.normalize_turns(CONV)
    assert chat.render(msgs, "vicuna_v1") == EXPECTED_VICUNA
    llava = chat.render(msgs[:1], "llava_v1")
    assert llava == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What kind of area is shown here? ASSISTANT:"
    )
    segs = chat.segments(msgs, "vicuna_v1")
    assert "".join(s.rendered for s in segs) == EXPECTED_VICUNA
    assert [s.kind for s in segs] == ["text", "image", "text", "answer", "eos", "text", "answer", "eos"]


def _independent(rendered, encode, bos, eos, img):
    """ids/mask rebuilt from the rendered string: rounds split on '</s>', answers after ' ASSISTANT: ',
    the image split out of round 0; each text piece tokenized separately (GeoChat tokenizer_image_token)."""
    ids, mask = [bos], [0]
    rounds = [r for r in rendered.split("</s>") if r]
    for k, rnd in enumerate(rounds):
        instr, answer = rnd.split(" ASSISTANT: ")
        instr += " ASSISTANT:"
        pieces = instr.split("<image>") if k == 0 else [instr]
        for j, p in enumerate(pieces):
            if j:
                ids += [img] * N_IMG
                mask += [0] * N_IMG
            t = encode(p)
            ids += t
            mask += [0] * len(t)
        a = encode(answer)
        ids += a + [eos]
        mask += [1] * (len(a) + 1)
    return np.array(ids), np.array(mask)


def test_ids_and_loss_mask_match_independent_construction(tok, tok_dir):
    s = special_ids(tok)
    enc = chat.encode(
        chat.normalize_turns(CONV),
        "vicuna_v1",
        TextEncoder(tok),
        image_token_id=s.image,
        image_seq_length=N_IMG,
        bos_id=s.bos,
        eos_id=s.eos,
    )
    hf = lambda t: tok(t, add_special_tokens=False).input_ids
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sentencepiece.model")).encode
    for encode in (hf, sp):  # transformers' tokenizer, and the raw SentencePiece model
        ids, mask = _independent(EXPECTED_VICUNA, encode, s.bos, s.eos, s.image)
        np.testing.assert_array_equal(enc.ids, ids)
        np.testing.assert_array_equal(enc.loss_mask, mask)
    # "▁" on both sides of the image (GeoChat chunking), answers start with a "▁" word.
    toks = tok.convert_ids_to_tokens(enc.ids.tolist())
    first, last = toks.index("<image>"), len(toks) - 1 - toks[::-1].index("<image>")
    assert toks[first - 1] == "▁" and toks[last + 1] == "▁" and toks[last + 2] == "<0x0A>"
    assert (enc.ids == s.image).sum() == N_IMG
    runs = np.split(enc.ids, np.flatnonzero(np.diff(enc.loss_mask)) + 1)[1::2]  # the masked runs
    assert [tok.decode(r) for r in runs] == ["An airport with 2 planes.</s>", "{<16><55><24><63>|<11>}</s>"]
    # prompt of the last answer = ids up to its first token; that prompt tokenizes identically alone.
    p = enc.prompt_ends[-1]
    gen_prompt = chat.render(chat.normalize_turns(CONV)[:3], "vicuna_v1")
    alone = chat.encode(
        chat.normalize_turns(CONV[:3]),
        "vicuna_v1",
        TextEncoder(tok),
        image_token_id=s.image,
        image_seq_length=N_IMG,
        bos_id=s.bos,
        eos_id=s.eos,
    )
    np.testing.assert_array_equal(alone.ids, enc.ids[:p])
    assert gen_prompt.endswith("ASSISTANT:") and alone.prompt_ends == enc.prompt_ends
    # GeoChat's tokenizer_image_token on the single-turn prompt equals our first-round prompt.
    single = chat.render(chat.normalize_turns(CONV)[:1], "vicuna_v1")
    np.testing.assert_array_equal(tokenizer_image_token(single, tok, N_IMG), enc.ids[: enc.prompt_ends[0]])


def test_text_encoder_backend_equals_tokenizer_call(tok):
    texts = [
        "USER: hi",
        "\nClassify",
        " lead",
        "a  b\n\nc",
        "é🙂 z",
        "x<image>y",
        "</s>",
        "{<1><22>|<3>}",
        "",
    ]
    assert TextEncoder(tok)(texts) == tok(texts, add_special_tokens=False).input_ids


def test_fit_padding_truncation_and_prompt_fallback(tok):
    s = special_ids(tok)
    enc = chat.encode(
        chat.normalize_turns(CONV),
        "vicuna_v1",
        TextEncoder(tok),
        image_token_id=s.image,
        image_seq_length=N_IMG,
        bos_id=s.bos,
        eos_id=s.eos,
    )
    L, p0, p1 = len(enc.ids), enc.prompt_ends[0], enc.prompt_ends[1]
    f = chat.fit(enc, max_len=L + 7, max_prompt_len=p1 + 3, pad_id=s.pad, image_token_id=s.image)
    a = f.arrays
    assert not (f.truncated or f.prompt_fallback or f.no_target)
    np.testing.assert_array_equal(a["input_ids"][:L], enc.ids)
    assert (a["input_ids"][L:] == s.pad).all() and a["attention_mask"].sum() == L
    np.testing.assert_array_equal(a["loss_mask"][:L], enc.loss_mask)
    np.testing.assert_array_equal(a["prompt_ids"][3:], enc.ids[:p1])  # left-padded
    assert a["prompt_mask"].tolist() == [0] * 3 + [1] * p1
    # last prompt too long -> first-round prompt; conversation cut -> truncated
    f = chat.fit(enc, max_len=L - 2, max_prompt_len=p1 - 1, pad_id=s.pad, image_token_id=s.image)
    assert f.truncated and f.prompt_fallback and not f.no_target
    np.testing.assert_array_equal(f.arrays["prompt_ids"][-p0:], enc.ids[:p0])
    assert f.arrays["attention_mask"].all()
    with pytest.raises(DataError, match="exceeds max_prompt_len"):
        chat.fit(enc, max_len=L, max_prompt_len=p0 - 1, pad_id=s.pad, image_token_id=s.image)
    first_img = int(np.flatnonzero(enc.ids == s.image)[0])
    with pytest.raises(DataError, match="cuts the image tokens"):
        chat.fit(enc, max_len=first_img + 2, max_prompt_len=first_img, pad_id=s.pad, image_token_id=s.image)


@pytest.mark.parametrize(
    "conv, match",
    [
        ([{"from": "gpt", "value": "x"}], "expected 'human'"),
        ([{"from": "human", "value": "<image> a"}, {"from": "human", "value": "b"}], "expected 'gpt'"),
        ([{"from": "human", "value": "<image> a <image>"}], "one <image>"),
        (
            [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "<image>"},
            ],
            "one <image>",
        ),
        ([], "non-empty list"),
        ([{"from": "human"}], "string 'value'"),
    ],
)
def test_bad_conversations(conv, match):
    with pytest.raises(DataError, match=re.escape(match)):
        chat.normalize_turns(conv, "rec-7")


def test_missing_image_is_added_and_text_image_token_rejected(tok):
    assert chat.normalize_turns([{"from": "human", "value": "hi"}]) == ["<image>\nhi"]
    s = special_ids(tok)
    msgs = ["<image>\nq", "the <image> token"]
    with pytest.raises(DataError, match="outside the image slot"):
        chat.encode(
            msgs,
            "vicuna_v1",
            TextEncoder(tok),
            image_token_id=s.image,
            image_seq_length=2,
            bos_id=s.bos,
            eos_id=s.eos,
        )


def test_model_directory_with_only_sentencepiece_model(tok_dir, tmp_path):
    """A LLaMA/Vicuna-style model directory (tokenizer.model + tokenizer_config.json, no tokenizer.json):
    `<image>` is appended after the vocabulary (llava-hf: 32000 for LLaMA) and the segments tokenize as the
    SentencePiece model does."""
    import json
    import shutil

    from rskd_jax.data.tokenizer import load_tokenizer

    shutil.copy(tok_dir / "sentencepiece.model", tmp_path / "tokenizer.model")
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    s = special_ids(tok)
    assert (s.bos, s.eos, s.pad, s.image, s.vocab_size) == (
        1,
        2,
        0,
        sp.get_piece_size(),
        sp.get_piece_size() + 1,
    )
    enc = chat.encode(
        chat.normalize_turns(CONV),
        "vicuna_v1",
        TextEncoder(tok),
        image_token_id=s.image,
        image_seq_length=N_IMG,
        bos_id=s.bos,
        eos_id=s.eos,
    )
    ids, mask = _independent(EXPECTED_VICUNA, sp.encode, s.bos, s.eos, s.image)
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.loss_mask, mask)
