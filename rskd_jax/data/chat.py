"""GeoChat conversation templates and their tokenization into ids + loss mask.

Rendering follows GeoChat's `conversation.py` (`SeparatorStyle.TWO`, geochat.md section 3):

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

`vicuna_v1` (training) and `llava_v1` (evaluation) differ only in the system text ("user" vs "human").
The `<image>` placeholder is moved to the front of the first human turn followed by "\\n" (LLaVA
`preprocess_multimodal`).

Tokenization works on *segments* of the rendered string, so the loss mask is exact by construction (no
re-tokenize-and-count arithmetic as in LLaVA's `preprocess_v1`):

    [BOS] "{system} USER: " [IMAGE x N] "\\n{q1} ASSISTANT:" <"{a1}"> [EOS]
          "USER: {q2} ASSISTANT:" <"{a2}"> [EOS]

Text segments are tokenized separately without special tokens; BOS is added once; `[IMAGE x N]` is the
image token repeated `image_seq_length` times; answers `<...>` and their EOS are the loss targets.

Dummy-prefix choice ("▁"): a LLaMA SentencePiece tokenizer prepends "▁" to every separately tokenized
chunk. We keep GeoChat's `tokenizer_image_token` behaviour exactly: "USER: " ends with a "▁" token
(the trailing space) and the chunk after the image starts with "▁" + "<0x0A>", i.e. "▁" on both sides
of the image, which is what the GeoChat teacher saw in training and at evaluation. The space between
"ASSISTANT:" and the answer is carried by the answer's own dummy prefix ("▁answer"), which equals
tokenizing "ASSISTANT: answer" in one piece and equals what a model generates after the prompt
"... ASSISTANT:". Hence the prompt ids are always a prefix of the training ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rskd_jax.data.errors import DataError

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


VICUNA_V1 = ChatTemplate(
    "vicuna_v1",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
LLAVA_V1 = ChatTemplate(
    "llava_v1",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
)
TEMPLATES = {t.name: t for t in (VICUNA_V1, LLAVA_V1)}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


_ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


def normalize_turns(conversations: Any, where: str = "record", add_image: bool = True) -> list[str]:
    """Validates `[{from, value}, ...]` and returns the messages (human, gpt, human, ...).

    Exactly one `<image>` is allowed, in the first human turn (anywhere in it); it is moved to the front
    as `<image>\\n` like LLaVA's `preprocess_multimodal`. If there is none and `add_image`, it is added.
    A conversation may end with a human turn (an evaluation prompt with no reference answer).
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise DataError(
            f"{where}: 'conversations' must be a non-empty list, got {type(conversations).__name__}"
        )
    msgs = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(
                f"{where}: turn {i} must be a dict with 'from' and a string 'value', got {turn!r:.120}"
            )
        role = _ROLES.get(str(turn["from"]).lower())
        if role != i % 2:
            want = "human" if i % 2 == 0 else "gpt"
            raise DataError(
                f"{where}: turn {i} is from {turn['from']!r}, expected {want!r} (turns must alternate, "
                "starting with human)"
            )
        msgs.append(turn["value"])
    n_img = [m.count(IMAGE_TOKEN) for m in msgs]
    if sum(n_img) > 1 or sum(n_img[1:]) > 0:
        raise DataError(f"{where}: expected one {IMAGE_TOKEN} in the first human turn, found counts {n_img}")
    if n_img[0] == 0 and not add_image:
        raise DataError(f"{where}: no {IMAGE_TOKEN} in the first human turn")
    msgs[0] = (IMAGE_TOKEN + "\n" + msgs[0].replace(IMAGE_TOKEN, "").strip()).strip()
    return msgs


def render(messages: Sequence[str], template: str | ChatTemplate) -> str:
    """The exact GeoChat prompt string; a trailing human turn ends with "ASSISTANT:" (generation prompt)."""
    t = get_template(template)
    out = t.system + t.sep
    for i, m in enumerate(messages):
        out += f"{t.roles[i % 2]}: {m}" + (t.sep if i % 2 == 0 else t.sep2)
    if len(messages) % 2 == 1:
        out += t.roles[1] + ":"
    return out


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # "text" | "image" | "answer" | "eos"
    text: str = ""

    @property
    def rendered(self) -> str:
        """This segment's piece of `render()`'s string."""
        return {"text": self.text, "image": IMAGE_TOKEN, "answer": " " + self.text, "eos": "</s>"}[self.kind]


def segments(messages: Sequence[str], template: str | ChatTemplate) -> list[Segment]:
    """Splits the rendered conversation into text / image / answer / eos segments (see module doc)."""
    t = get_template(template)
    out: list[Segment] = []

    def flush(ctx: str):
        for j, chunk in enumerate(ctx.split(IMAGE_TOKEN)):
            if j:
                out.append(Segment("image"))
            if chunk:
                out.append(Segment("text", chunk))

    ctx = t.system + t.sep
    for i, m in enumerate(messages):
        if i % 2 == 0:
            ctx += f"{t.roles[0]}: {m}{t.sep}{t.roles[1]}:"
        else:
            flush(ctx)
            out += [Segment("answer", m), Segment("eos")]
            ctx = ""
    flush(ctx)
    return out


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray  # int32 [L]: the whole conversation
    loss_mask: np.ndarray  # int32 [L]: 1 on answer tokens and their EOS
    prompt_ends: list[int]  # for each answer, the length of the prompt that precedes it (+ a trailing prompt)


def encode(
    messages: Sequence[str],
    template: str | ChatTemplate,
    encode_texts,
    *,
    image_token_id: int,
    image_seq_length: int,
    bos_id: int,
    eos_id: int,
    where: str = "record",
) -> Encoded:
    """Token ids + loss mask of a conversation. `encode_texts(list[str]) -> list[list[int]]` tokenizes
    without special tokens (e.g. `tokenizer.TextEncoder`)."""
    segs = segments(messages, template)
    texts = [s.text for s in segs if s.kind in ("text", "answer")]
    toks = iter(encode_texts(texts) if texts else [])
    ids, mask, prompt_ends = [bos_id], [0], []
    for s in segs:
        if s.kind == "image":
            piece = [image_token_id] * image_seq_length
        elif s.kind == "eos":
            piece = [eos_id]
        else:
            piece = list(next(toks))
            if image_token_id in piece:
                raise DataError(
                    f"{where}: text contains the image token {IMAGE_TOKEN!r} outside the image slot: "
                    f"{s.text!r:.120}"
                )
        if s.kind == "answer":
            prompt_ends.append(len(ids))
        ids += piece
        mask += [int(s.kind in ("answer", "eos"))] * len(piece)
    if segs and segs[-1].kind != "eos":  # trailing human turn: the generation prompt is everything
        prompt_ends.append(len(ids))
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32), prompt_ends)


@dataclasses.dataclass
class Fitted:
    arrays: dict[str, np.ndarray]
    truncated: bool  # input_ids cut at max_len
    prompt_fallback: bool  # prompt_ids use an earlier round because the last one exceeds max_prompt_len
    no_target: bool  # no loss token left


def fit(
    enc: Encoded,
    *,
    max_len: int,
    max_prompt_len: int,
    pad_id: int,
    image_token_id: int,
    where: str = "record",
) -> Fitted:
    """Fixed-length arrays: `input_ids`/`attention_mask`/`loss_mask` [max_len] right-padded and
    `prompt_ids`/`prompt_mask` [max_prompt_len] left-padded.

    Truncation: the conversation is cut at `max_len` (counted). The prompt is the context of the last
    answer; if longer than `max_prompt_len`, the latest earlier round that fits is used (counted). An image
    cut by `max_len`, or a first-round prompt longer than `max_prompt_len`, raises `DataError`.
    """
    ids, mask = enc.ids, enc.loss_mask
    img = np.flatnonzero(ids == image_token_id)
    if img.size and img[-1] >= max_len:
        raise DataError(f"{where}: max_len={max_len} cuts the image tokens (they end at {img[-1] + 1})")
    fits = [p for p in enc.prompt_ends if p <= max_prompt_len]
    if not fits:
        raise DataError(
            f"{where}: prompt of {enc.prompt_ends[0] if enc.prompt_ends else len(ids)} tokens "
            f"exceeds max_prompt_len={max_prompt_len}"
        )
    p = fits[-1]
    n = min(len(ids), max_len)
    out = {
        "input_ids": np.full(max_len, pad_id, np.int32),
        "attention_mask": np.zeros(max_len, np.int32),
        "loss_mask": np.zeros(max_len, np.int32),
        "prompt_ids": np.full(max_prompt_len, pad_id, np.int32),
        "prompt_mask": np.zeros(max_prompt_len, np.int32),
    }
    out["input_ids"][:n], out["attention_mask"][:n], out["loss_mask"][:n] = ids[:n], 1, mask[:n]
    out["prompt_ids"][max_prompt_len - p :], out["prompt_mask"][max_prompt_len - p :] = ids[:p], 1
    return Fitted(
        out,
        truncated=len(ids) > max_len,
        prompt_fallback=p != enc.prompt_ends[-1],
        no_target=not out["loss_mask"].any() and bool(mask.any()),
    )
