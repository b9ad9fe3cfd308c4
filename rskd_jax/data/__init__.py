"""Input pipeline: sources, rs-synth, GeoChat chat template + tokenizer, image transforms, Grain batches.

Batch contract (per host, fixed shapes): `pixel_values` f32 [B, S, S, 3] CLIP-normalised; `prompt_ids`,
`prompt_mask` i32 [B, P] left-padded; `input_ids`, `attention_mask`, `loss_mask` i32 [B, T] right-padded
(loss_mask[t] = 1: token t is a target). Image positions are `input_ids == image_token_id`.
"""

from rskd_jax.data.chat import LLAVA_V1, VICUNA_V1, ChatTemplate, get_template, render
from rskd_jax.data.errors import DataError
from rskd_jax.data.pipeline import eval_batches, make_dataset, make_iterator
from rskd_jax.data.sources import (
    CaptionSource,
    GeoChatBenchSource,
    InstructSource,
    ListSource,
    RSVQASource,
    SceneFolderSource,
)
from rskd_jax.data.synth import SynthSource
from rskd_jax.data.tokenizer import load_tokenizer, special_ids, train_tokenizer
from rskd_jax.data.transforms import ExampleTransform, decode_image, preprocess_image

__all__ = [
    "LLAVA_V1",
    "VICUNA_V1",
    "ChatTemplate",
    "get_template",
    "render",
    "DataError",
    "eval_batches",
    "make_dataset",
    "make_iterator",
    "CaptionSource",
    "GeoChatBenchSource",
    "InstructSource",
    "ListSource",
    "RSVQASource",
    "SceneFolderSource",
    "SynthSource",
    "load_tokenizer",
    "special_ids",
    "train_tokenizer",
    "ExampleTransform",
    "decode_image",
    "preprocess_image",
]
