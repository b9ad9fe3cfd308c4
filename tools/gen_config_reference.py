r"""Generates docs/config_reference.md from configs/: every key of every config file, its value in the default
preset and in each preset that changes it, and a one-line description.

    python tools/gen_config_reference.py            # rewrite docs/config_reference.md
    python tools/gen_config_reference.py --check    # exit 1 if the committed file is out of date

Values come from calling each config's `get_config("<preset>")` (nothing is hard-coded here), so the
reference cannot drift from the configs; tests/test_docs.py checks the committed file. Descriptions come from
`DESCRIPTIONS` below, else from the config line's own trailing comment (`c.key = value  # comment`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config_reference.md"
CONFIGS = ("distill", "geochat13b_to_7b", "sft", "eval", "compare")  # configs/<name>.py, in this order
DESCRIBED_LIKE = {
    "sft": "distill",
    "compare": "distill",
    "geochat13b_to_7b": "distill",
}  # sft.py builds on distill.py: shared keys share descriptions

# One line per key (a key missing here shows its trailing comment in the config file, if any). Keep them short
# and true; a key listed here that no preset has any more is an error (tests/test_docs.py).
DESCRIPTIONS = {
    "distill": {
        "preset": "Preset chosen by `:preset` (set for you).",
        "seed": "Base seed: teacher SFT uses it, student SFT `seed+1`, distillation `seed+2`.",
        "total_steps": "Distillation steps; `optim.total_steps` refers to it (schedule length).",
        "log_every": "Steps between progress lines and `metrics.jsonl` / TensorBoard records (averaged).",
        "ckpt_every": "Steps between checkpoints (the last step is always saved).",
        "keep_checkpoints": "Newest checkpoints kept per stage.",
        "eval_every": "Periodic evaluation interval (0 = only at the end). Not wired into "
        "launch/train.py yet: the rs-synth report runs once, after distillation.",
        "max_nonfinite_in_a_row": "Non-finite steps are skipped; this many in a row stop the run.",
        "debug.kill_stage": "Tests only: stage whose process signals itself.",
        "debug.kill_at_step": "Tests only: step after which it signals itself (-1 = never).",
        "debug.kill_signal": "Tests only: `SIGKILL` or `SIGTERM`.",
        "mesh.data": "Mesh axis `data` (pure data parallelism).",
        "mesh.fsdp": "Mesh axis `fsdp` (batch + parameter sharding); -1 = all remaining devices.",
        "mesh.tensor": "Mesh axis `tensor` (heads / MLP / vocabulary sharding).",
        "teacher.preset": "Model preset (`rskd_jax.models.get_preset`): tiny, geochat_7b, geochat_13b, "
        "llava15_7b.",
        "teacher.checkpoint": "Converted model directory (docs/convert.md); empty = random init.",
        "teacher.vision": "VisionConfig fields replacing the preset's (random-init models only).",
        "teacher.text": "TextConfig fields replacing the preset's (random-init models only).",
        "teacher.overrides": "Other LlavaConfig fields (e.g. `remat_policy`), random-init models only.",
        "teacher.lr": "Peak learning rate of the teacher SFT stage.",
        "student.preset": "Model preset of the student (see `teacher.preset`).",
        "student.checkpoint": "Converted student directory; empty = random init of the preset.",
        "student.vision": "VisionConfig fields replacing the preset's (random-init models only).",
        "student.text": "TextConfig fields replacing the preset's (random-init models only).",
        "student.overrides": "Other LlavaConfig fields, random-init models only.",
        "student.sft_steps": "Steps of the student SFT stage (MiniLLM phase 1); 0 = skip.",
        "student.lr": "Peak learning rate of the student SFT stage.",
        "lora.rank": "LoRA rank (`trainable=lora`; GeoChat's r=64).",
        "lora.alpha": "LoRA alpha; the update is scaled by alpha / rank (GeoChat's 16).",
        "lora.dropout": "Dropout on the LoRA input (GeoChat's 0.05).",
        "lora.targets": "LLM linear layers that get adapters (never the vision tower, projector, lm_head).",
        "data.name": "`rs-synth` (generated, no files) or `geochat_instruct` (needs `instruct_json`).",
        "data.image_size": "Input resolution for random-init models (a checkpoint keeps its own, e.g. 504).",
        "data.train_size": "rs-synth: records in the training split.",
        "data.eval_size": "rs-synth: records in the evaluation split (final report).",
        "data.synth.grid": "rs-synth: box coordinates and sides on multiples of this (0-100 grid; 1 = any).",
        "data.synth.object_scale": "rs-synth: object size factor (1 = the default sizes).",
        "data.synth.angle_step": "rs-synth: rotations are multiples of this in [0, 180) (180 = unrotated).",
        "data.synth.max_objects": "rs-synth: at most this many objects per image.",
        "data.synth.tasks": "rs-synth: task -> weight of the training (and evaluation) mix; {} = DEFAULT_TASKS.",
        "data.synth.eval_cycle": "rs-synth evaluation split: task groups cycled in blocks (() = the mix).",
        "data.synth.eval_block": "rs-synth evaluation split: records per block of `eval_cycle`.",
        "eval.divergence_limit": "Records of the evaluation split (spread evenly) for the KL-to-teacher table "
        "(0 = all).",
        "sft_control": "Adds the control stage `student_sft_more/` (student SFT continued, no teacher, "
        "the distillation's steps, batches and lr) and its report column.",
        "data.batch_size": "Global batch size (split over processes, and over `grad_accum` micro-batches).",
        "data.seq_len": "Width of `input_ids` (prompt + answer), image tokens included.",
        "data.prompt_len": "Width of the left-padded `prompt_ids` the rollout starts from.",
        "data.num_workers": "Grain worker processes (0 = in the training process).",
        "data.tokenizer": "Tokenizer directory; empty = train a `vocab_size` rs-synth tokenizer into the "
        "workdir. Set it (e.g. to the converted checkpoint) for real models.",
        "data.vocab_size": "Size of the rs-synth tokenizer trained when `data.tokenizer` is empty.",
        "data.instruct_json": "GeoChat_Instruct.json (or any LLaVA-format .json/.jsonl file).",
        "data.image_root": "Folder the instruct file's `image` paths are relative to.",
        "data.template": "Chat template: `vicuna_v1` (GeoChat training) or `llava_v1` (GeoChat evaluation).",
        "data.skip_bad_records": "Skip (count + log) unreadable records instead of stopping with an error.",
        "sampling.max_new_tokens": "Rollout length R (tokens sampled per prompt).",
        "sampling.alpha": "Teacher mix-in: sample from alpha·p + (1-alpha)·q (MiniLLM 0.2; 0 = on-policy).",
        "sampling.temperature": "Sampling temperature of both models.",
        "sampling.top_k": "Top-k filter before mixing (0 = off).",
        "sampling.top_p": "Top-p filter before mixing (1.0 = off).",
        "loss.weights.rkl": "Single-step reverse KL, full vocabulary, at sampled response positions.",
        "loss.weights.pg": "Long-term policy gradient (PPO-clipped, length-normalised returns).",
        "loss.weights.feat_image": "Feature alignment on image-token positions (hidden states).",
        "loss.weights.feat_text": "Feature alignment on answer-token positions (hidden states).",
        "loss.weights.feat_proj": "Feature alignment of the projector outputs (image tokens before the LLM).",
        "loss.weights.sft": "Cross-entropy on the ground-truth answers.",
        "loss.weights.fkl": "Forward KL to the teacher on the ground-truth answers.",
        "loss.clip_eps": "PPO clip range of the importance ratio (MiniLLM 0.2).",
        "loss.gamma": "Discount of the long-term return (paper 1.0; MiniLLM code 0.95).",
        "loss.include_current": "False: advantage R_{t+1} (paper); True: R_t (MiniLLM code).",
        "loss.length_norm": "Divide the return by the number of tokens it sums (paper's R^Norm).",
        "loss.pack_views": "One forward over [GT conversation | sampled response] instead of two (they share "
        "the prompt); same losses, less work.",
        "loss.reuse_teacher_prefix": "The teacher's prompt and response states come from the rollout (its KV "
        "cache, prefill and decode hidden states), so its ground-truth forward runs only the tokens after the "
        "prompt; same losses, less work (docs/distill.md).",
        "loss.whiten": "Whiten advantages over valid tokens (MiniLLM code whitens, pads included).",
        "loss.temperature": "Temperature of both distributions in the KL / PG terms (no τ² factor).",
        "loss.feature_kind": "`cosine` (1 - cos), `mse`, or `mse_std` (MSE after per-token standardising).",
        "loss.divergence": "Single-step term (weight `rkl`) on sampled responses: `rkl` (MiniLLM), `fkl`, "
        "`skew_fkl`, `skew_rkl` (DistiLLM) or `jsd` (GKD).",
        "loss.skew_alpha": "Mixing weight of `skew_fkl` / `skew_rkl` (DistiLLM's 0.1).",
        "loss.jsd_beta": "Mixture weight of `jsd` (TRL's convention: 0 = forward KL, 1 = reverse KL).",
        "loss.feature_layers": "(student, teacher) hidden-state index pairs to align; -1 = last (post-norm).",
        "optim.lr": "Peak learning rate of the distillation stage.",
        "optim.warmup_steps": "Linear warm-up steps (clamped to the run length).",
        "optim.schedule": "`cosine`, `linear` or `constant` after warm-up.",
        "optim.end_lr_factor": "Cosine: final lr = lr × this.",
        "optim.weight_decay": "AdamW weight decay.",
        "optim.b1": "AdamW beta1.",
        "optim.b2": "AdamW beta2 (MiniLLM 0.95).",
        "optim.eps": "AdamW epsilon.",
        "optim.grad_clip": "Clip gradients to this global norm.",
        "optim.grad_accum": "Micro-batches per step (data.batch_size must divide by it; one rollout each).",
        "optim.total_steps": "Schedule length; refers to `total_steps`.",
        "eval.tasks": "Tasks of the final rs-synth report (scene, vqa, grounding, caption).",
        "eval.limit": "Records evaluated per model (0 = all).",
        "eval.max_new_tokens": "Greedy decoding length in the final report.",
        "eval.batch_size": "Evaluation batch size.",
    },
    "sft": {
        "preset": "Preset chosen by `:preset` (set for you).",
        "mode": "`sft`: launch/train.py fine-tunes `model` alone (no teacher, no distillation), then "
        "evaluates it.",
        "model.preset": "Model preset of the fine-tuned model (see `teacher.preset` in configs/distill.py).",
        "model.checkpoint": "Converted model directory (docs/convert.md); empty = random init.",
        "model.sft_steps": "Fine-tuning steps.",
        "model.lr": "Peak learning rate.",
        "model.trainable": "all \\| all+vision \\| lora \\| regex on parameter paths.",
        "model.vision": "VisionConfig fields replacing the preset's (random-init models only).",
        "model.text": "TextConfig fields replacing the preset's (random-init models only).",
        "model.overrides": "Other LlavaConfig fields, random-init models only.",
    },
    "compare": {
        "preset": "Preset chosen by `:preset` (set for you; `default` or `tiny`).",
        "total_steps": "Steps of every method (the schedule follows), from the same start.",
        "export_student": "No transformers export of the compared students.",
        "compare.methods": "Methods to run (rskd_jax.train.compare.METHODS; docs/distill.md).",
        "compare.seeds": "Seed indices 0..seeds-1 per method (same data orders for every method).",
        "compare.start": "A demo workdir with teacher/ and student_sft/ to start from (else trained here).",
        "compare.eval_limit": "Task-metric records per model (0 = the whole eval split).",
        "compare.kl_every": "Steps between the KL-curve points (0 = start and end only).",
        "compare.kl_batches": "Eval batches of each KL-curve point.",
        "compare.report_only": "Only write the table / figure of the runs finished so far.",
        "compare.compile_cache": "Persistent XLA compilation cache in the workdir (runs recompile the same "
        "programs).",
    },
    "eval": {
        "preset": "Preset chosen by `:preset` (a task, `all`, `synth` or `params`).",
        "data_dir": "Dataset folder or jsonl (per preset: configs/eval.py docstring, docs/data.md).",
        "image_root": "Images of jsonl files (default: next to the file).",
        "rsvqa_prefix": "RSVQA file prefix: `LR`, or `USGS` for HR.",
        "vqa_split": "RSVQA split: `test` (LR), `test_phili` (HR test set 2, GeoChat's).",
        "tasks": "Tasks to evaluate (each task preset sets its own).",
        "skip_bad_records": "Skip (count + log) unreadable records instead of stopping with an error.",
        "batch_size": "Generation batch size.",
        "max_new_tokens": "Greedy decoding length (GeoChat's 256; a batch stops when every row has emitted EOS).",
        "synth_size": "`synth`: records of the rs-synth test split.",
        "synth_image_size": "`synth`: image size of rs-synth.",
        "models": "`params`: comma-separated model presets for the parameters / FLOPs table.",
        "seq_len": "`params`: sequence length of the full multimodal FLOPs (0 = image tokens + 64).",
        "paper_text_tokens": "`params`: text tokens of the paper's FLOPs convention (LLM-only forward; 512 = Table 8).",
        "progress": "Show a progress bar.",
        "seed": "rs-synth seed (`synth`) and random-model seed.",
    },
}

_COMMENT = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=.*#\s*(.+?)\s*$")


def load(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"configs.{name}")


def presets_and_args(module) -> tuple[list[str], dict]:
    """Presets (the default first) and `get_config`'s argument keys with their defaults, from the source.

    Presets are `module.PRESETS` when defined, else the strings `a.preset` is compared with in `get_config`.
    """
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    literals = {}  # `name = <literal>` anywhere in the file (e.g. a dict of presets)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                literals[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    args, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_arg":
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Attribute)
            and node.left.attr == "preset"
        ):
            for comp in node.comparators:
                if isinstance(comp, ast.Name):
                    value = literals.get(comp.id)
                elif isinstance(comp, (ast.Constant, ast.Tuple)):
                    value = ast.literal_eval(comp)
                else:
                    value = None
                found += [value] if isinstance(value, str) else list(value or ())
    names = list(getattr(module, "PRESETS", ())) or list(dict.fromkeys(found))
    default = args.get("preset")
    if default in names:
        names.remove(default)
    return [default] + names, args


def flatten(d: dict, prefix: str = "") -> dict:
    """Dotted keys; an empty dict is a leaf (`{}`), so keys such as `teacher.vision` are listed too."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def inline_comments(module) -> dict:
    """`c.key = ...  # comment` -> {key: comment}; the first assignment of a key wins (the defaults)."""
    out = {}
    for line in pathlib.Path(module.__file__).read_text().splitlines():
        m = _COMMENT.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).replace("|", "\\|")
    return out


def describe(desc: dict, key: str) -> str:
    """The description of `key`; model size keys (`teacher.vision.hidden_size`, ...) share one pattern."""
    if key in desc:
        return desc[key]
    m = re.fullmatch(r"(teacher|student|model)\.(vision|text)\.(\w+)", key)
    if m:
        return f"`{m.group(2).capitalize()}Config.{m.group(3)}` of the random-init {m.group(1)}."
    return ""


_ABSENT = object()  # a key missing from a preset


def fmt(v) -> str:
    if v is _ABSENT:
        return "—"
    s = repr(v)
    return "`" + s.replace("|", "\\|") + "`"


def section(name: str) -> str:
    module = load(name)
    presets, args = presets_and_args(module)
    values = {p: flatten(module.get_config(p).to_dict()) for p in presets}
    keys = list(dict.fromkeys(k for p in presets for k in values[p]))
    desc = {}
    for source in (DESCRIBED_LIKE.get(name), name):
        if source:
            desc.update({**inline_comments(load(source)), **DESCRIPTIONS.get(source, {})})
    default = presets[0]
    lines = [
        f"## `configs/{name}.py`",
        "",
        f"Presets: {', '.join(f'`{p}`' for p in presets)} (default `{default}`). "
        f"Pick one with `--config configs/{name}.py:PRESET`.",
        "",
    ]
    if args:
        extra = [k for k in args if k != "preset"]
        listed = ", ".join(f"`{k}` (default `{args[k]!r}`)" for k in extra)
        lines += [
            f"Shorthand arguments after the preset (`configs/{name}.py:{default},{extra[0]}=...`): {listed}.",
            "",
        ]
    lines += [f"| key | `{default}` | other presets (where different) | description |", "|---|---|---|---|"]
    for k in keys:
        base = values[default].get(k, _ABSENT)
        diffs = [
            f"{p}: {fmt(values[p].get(k, _ABSENT))}" for p in presets[1:] if values[p].get(k, _ABSENT) != base
        ]
        lines.append(f"| `{k}` | {fmt(base)} | {'<br>'.join(diffs)} | {describe(desc, k)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    head = [
        "# Config reference",
        "",
        "<!-- Generated by tools/gen_config_reference.py from configs/. Do not edit by hand: run",
        "     `python tools/gen_config_reference.py` (tests/test_docs.py fails when this file is stale). -->",
        "",
        "Every key of every config, its value in the default preset, the presets that change it, and what it",
        "does. Override any key on the command line with `--config.KEY=VALUE` (dotted keys, e.g.",
        "`--config.loss.weights.rkl=0.5`); a key that does not exist, or a value of the wrong type, is an",
        "error before anything runs. A `—` means the key does not exist in that preset (so it cannot be",
        "overridden there). The loss terms and where their defaults come from: [distill.md](distill.md).",
        "",
        "",
    ]
    return "\n".join(head) + "\n".join(section(n) for n in CONFIGS)


def stale_descriptions() -> list[str]:
    """DESCRIPTIONS keys that no preset of their config has (the config changed; fix the table)."""
    out = []
    for name, table in DESCRIPTIONS.items():
        module = load(name)
        presets, _ = presets_and_args(module)
        keys = {k for p in presets for k in flatten(module.get_config(p).to_dict())}
        out += [f"{name}: {k}" for k in table if k not in keys]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config_reference.md is out of date")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(
                f"{OUT.relative_to(ROOT)} is out of date: run python tools/gen_config_reference.py",
                file=sys.stderr,
            )
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
