"""A loaded model that chats about one image: GeoChat's `llava_v1` template with the history kept, task
prefixes, greedy or sampled decoding, text streamed while it is generated.

`ChatModel` holds the model, the tokenizer and one streaming `eval.generate.Generator` (the evaluation's
compiled decode loop, batch 1). Prompts are left-padded to a multiple of `bucket` tokens, so the loop is
compiled once per bucket: later questions of a conversation reuse the program until the history crosses into
the next bucket. Generation is serialised by a lock (the web demo's requests share one model and device).
`Conversation` is one image and its turns.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
from collections.abc import Callable

import numpy as np

from rskd_jax.data import chat
from rskd_jax.data.tokenizer import TextEncoder, special_ids
from rskd_jax.data.transforms import decode_image, preprocess_image
from rskd_jax.eval.boxes import Box
from rskd_jax.eval.generate import Generator, load_tokenizer_any
from rskd_jax.pretrained import load_pretrained
from rskd_jax.serve.draw import labelled_boxes

# GeoChat's task identifiers, written as its evaluation prompts write them (data/sources.py).
TASKS = {"plain": "", "grounding": "[grounding]", "refer": "[refer] ", "identify": "[identify] "}


def with_task(question: str, task: str | None) -> str:
    """`question` with the task's GeoChat prefix; unchanged for "plain"/None or when it has a `[tag]` already."""
    q = question.replace(chat.IMAGE_TOKEN, "").strip()
    if not task or task == "plain" or q.startswith("["):
        return q
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task] + q


@dataclasses.dataclass
class Reply:
    text: str
    seconds: float  # wall time of the generation (including a compile when `compiled`)
    new_tokens: int
    compiled: bool  # this reply's prompt width had not been run before (the loop was compiled for it)
    boxes: list[tuple[str, Box]]  # (grounded phrase or "", box) found in the text
    dropped_rounds: int = 0  # oldest question/answer rounds left out to fit the context


class ChatModel:
    """model: an `LlavaModel`; tokenizer: a directory or a loaded tokenizer. temperature 0 = greedy.
    max_new_tokens: None = 256 (GeoChat's demo), at most a quarter of the model's positions."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        bucket: int = 256,
        template: str = "llava_v1",
        pad_to_square: bool = True,
    ):
        self.model, self.cfg = model, model.cfg
        self.tokenizer = load_tokenizer_any(tokenizer)
        self.ids = special_ids(self.tokenizer)
        self.encoder = TextEncoder(self.tokenizer)
        self.template, self.pad_to_square, self.bucket = template, pad_to_square, int(bucket)
        self.max_context = int(self.cfg.text.max_position_embeddings)
        if not max_new_tokens:  # GeoChat's 256, less for small models so a few rounds of history fit
            max_new_tokens = max(16, min(256, self.max_context // 4))
        self.generator = Generator(
            model,
            self.tokenizer,
            max_new_tokens,
            1,
            bucket=self.bucket,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stream=True,
        )
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path, *, dtype: str | None = None, tokenizer=None, **kw) -> ChatModel:
        """From anything `rskd_jax.load_pretrained` reads; the tokenizer defaults to the model directory."""

        model, _ = load_pretrained(pathlib.Path(path), dtype=dtype or None)
        return cls(model, tokenizer or path, **kw)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        return preprocess_image(image, self.cfg.vision.image_size, self.pad_to_square)

    def prompt_ids(self, messages: list[str]) -> np.ndarray:
        """Token ids of the conversation (human, assistant, ..., human) ending with "ASSISTANT:"."""
        turns = [{"from": ("human", "gpt")[i % 2], "value": m} for i, m in enumerate(messages)]
        msgs = chat.normalize_turns(turns, "chat")
        return chat.encode(
            msgs,
            self.template,
            self.encoder,
            image_token_id=self.ids.image,
            image_seq_length=self.cfg.image_seq_length,
            bos_id=self.ids.bos,
            eos_id=self.ids.eos,
            where="chat",
        ).ids

    def fit(self, messages: list[str]) -> tuple[list[str], np.ndarray, int]:
        """Drops the oldest rounds until prompt + max_new_tokens fit the model's positions:
        (messages kept, their prompt ids, rounds dropped)."""
        dropped = 0
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) + self.generator.max_new_tokens <= self.max_context:
                return messages, ids, dropped
            if len(messages) < 3:
                raise ValueError(
                    f"the question needs {len(ids)} prompt tokens + {self.generator.max_new_tokens} new ones, "
                    f"more than the model's {self.max_context} positions"
                )
            messages, dropped = messages[2:], dropped + 1

    def reply(
        self, pixels: np.ndarray, messages: list[str], on_text: Callable[[str], None] | None = None
    ) -> Reply:
        """Answer to the last (human) message; `on_text(piece)` receives the text as it is generated."""
        messages, ids, dropped = self.fit(messages)
        width = -(-len(ids) // self.bucket) * self.bucket
        prompt = np.full((1, width), self.ids.pad, np.int32)
        mask = np.zeros((1, width), np.int32)
        prompt[0, width - len(ids) :], mask[0, width - len(ids) :] = ids, 1
        streamed: list[int] = []
        shown = [""]

        def on_tokens(_step: int, toks: np.ndarray) -> None:
            t = int(toks[0])
            if t == self.generator.eos_id or on_text is None:
                return
            streamed.append(t)
            text = self.tokenizer.decode(streamed, skip_special_tokens=True).lstrip()
            if not text.endswith("\ufffd"):  # not inside a multi-byte character (byte-fallback tokens)
                show(text)

        def show(text: str) -> None:
            if text.startswith(shown[0]) and len(text) > len(shown[0]):
                on_text(text[len(shown[0]) :])
                shown[0] = text

        with self.lock:
            seen = set(self.generator.compiled_shapes)
            self.generator.on_tokens = on_tokens
            t0 = time.perf_counter()
            try:
                toks, lens = self.generator.generate_ids(prompt, mask, pixels[None])
            finally:
                self.generator.on_tokens = None
            seconds = time.perf_counter() - t0
            compiled = (1, width) not in seen
        text = self.generator.decode(toks, lens)[0]
        if on_text is not None:
            show(text)  # whatever the stream held back
        return Reply(text, seconds, int(lens[0]), compiled, labelled_boxes(text), dropped)


class Conversation:
    """One image and the turns about it. image: a path, bytes, PIL image or uint8 array."""

    def __init__(self, model: ChatModel, image):
        self.model = model
        self.image = decode_image(image)
        self.pixels = model.pixels(self.image)
        self.messages: list[str] = []

    def ask(self, question: str, task: str | None = None, on_text=None) -> Reply:
        q = with_task(question, task)
        if not q:
            raise ValueError("empty question")
        r = self.model.reply(self.pixels, self.messages + [q], on_text)
        kept = self.messages[2 * r.dropped_rounds :]
        self.messages = kept + [q, r.text]
        return r

    def reset(self) -> None:
        self.messages = []
