r"""Evaluation configs (big_vision style): one preset per task, `all`, `synth` (smoke) and `params` (Table 8).

    python launch/eval.py --config configs/eval.py:scene --config.checkpoint=/ckpt/geochat7b \
        --config.data_dir=/data/UCMerced_LandUse/Images            # or AID/, or GeoChat-Bench UCmerced.jsonl
    python launch/eval.py --config configs/eval.py:vqa --config.checkpoint=... \
        --config.data_dir=/data/RSVQA_LR
    python launch/eval.py --config configs/eval.py:grounding --config.checkpoint=... \
        --config.data_dir=/data/GeoChat-Bench/referring.jsonl --config.image_root=/data/GeoChat_images
    python launch/eval.py --config configs/eval.py:caption --config.checkpoint=... \
        --config.data_dir=/data/GeoChat-Bench/region_captioning.jsonl --config.image_root=/data/GeoChat_images
    python launch/eval.py --config configs/eval.py:all --config.checkpoint=... --config.data_dir=/data
    python launch/eval.py --config configs/eval.py:synth --config.limit=32     # random tiny model, seconds
    python launch/eval.py --config configs/eval.py:params                      # paper Table 8, no weights
    python launch/eval.py --config.predictions=answers.jsonl   # score launch/predict.py's output, no model

data_dir per preset:
* scene: a folder of class folders (UCMerced_LandUse[/Images], AID) or a GeoChat-Bench scene jsonl;
* vqa: an RSVQA folder (`{rsvqa_prefix}_split_{vqa_split}_*.json`; LR: prefix LR, split test; HR: prefix USGS,
  split test_phili) or a GeoChat-Bench VQA jsonl (then `rsvqa_dir` supplies the answers);
* grounding: GeoChat-Bench referring.jsonl;
* caption: GeoChat-Bench region_captioning.jsonl or a captions jsonl (ucm_captions.jsonl);
* all: a folder with any of UCMerced_LandUse/, AID/, RSVQA_LR/, RSVQA_HR/, referring.jsonl,
  region_captioning.jsonl, ucm_captions.jsonl.
`image_root`: images of jsonl files (default: next to the file). checkpoint: our converted model directory or
anything `rskd_jax.load_pretrained` reads (e.g. a transformers Llava directory); tokenizer defaults to it.
"""

import ml_collections

from configs.common import parse_arg

PRESETS = ("scene", "vqa", "grounding", "caption", "all", "synth", "params")


def get_config(arg=None):
    a = parse_arg(arg, preset="all", limit=0, batch_size=0)
    if a.preset not in PRESETS:
        raise KeyError(f"unknown preset {a.preset!r}; known: {list(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = a.preset
    c.checkpoint = ""  # model directory (converted or transformers Llava)
    c.tokenizer = ""  # tokenizer directory; "" = the checkpoint directory (synth: trained into out_dir)
    c.model = "tiny"  # synth without checkpoint: random model of this preset
    c.model_name = ""  # row label in the report ("" = the checkpoint's folder name)
    c.dtype = ""  # compute dtype override, e.g. "bfloat16" ("" = the checkpoint's)
    c.data_dir = ""
    c.image_root = ""
    c.rsvqa_dir = ""  # RSVQA folder answering a GeoChat-Bench VQA jsonl
    c.rsvqa_prefix = "LR"
    c.vqa_split = "test"
    c.tasks = ("scene", "vqa", "grounding", "caption")
    c.image_size = 0  # 0 = the model's own input size
    c.max_prompt_len = 0  # 0 = the longest prompt of the data, rounded up to a multiple of 64
    c.max_len = 0  # 0 = the longest of conversation and max_prompt_len + max_new_tokens, rounded up likewise
    c.batch_size = a.batch_size or 8
    # GeoChat's own eval scripts decode up to 256 new tokens (geochat.md §3); a grounding answer with several
    # boxes is longer than 64. Batched decoding stops as soon as every row of a batch has emitted EOS, so short
    # scene / VQA answers cost no extra decode steps (only KV-cache room for 256 tokens).
    c.max_new_tokens = 256
    c.limit = a.limit  # 0 = every record; else that many per dataset, spread evenly
    c.out_dir = ""  # "" = runs/eval/<preset>
    c.meteor = True  # METEOR 1.5 via pycocoevalcap (needs Java); False = ROUGE only
    c.strict = False  # GeoChat's exact-string matching instead of the robust matcher
    c.rotated = True  # rotated-box IoU (False: enclosing axis-aligned boxes)
    c.skip_bad_records = False
    c.predictions = ""  # a predictions jsonl (launch/predict.py --out) to score instead of generating
    c.progress = True
    c.seed = 0
    # synth preset: rs-synth test split
    c.synth_size = 200
    c.synth_image_size = 64
    # params preset: models of paper Table 8; sequence length of the full multimodal FLOPs (0 = image tokens
    # + 64); text tokens of the paper's convention (an LLM-only forward, 512 reproduces Table 8 within 0.05 %)
    c.models = "geochat_7b,geochat_13b"
    c.seq_len = 0
    c.paper_text_tokens = 512

    if a.preset in ("scene", "vqa", "grounding", "caption"):
        c.tasks = (a.preset,)
    elif a.preset == "synth":
        c.max_new_tokens = 32
        c.meteor = False
        c.limit = a.limit or 64
    return c
