r"""Real-size check (not in CI): a GeoChat-7B-shaped checkpoint, end to end, with the time and peak host memory
of every step.

Steps (each heavy one in its own child process, so its peak memory is its own and a failure cannot take the
parent down):

    write    random fp16 weights in GeoChat's original release layout: ROOT/geochat7b (LLaMA keys + mm_projector,
             4 pytorch_model-*.bin shards + index, GeoChat config.json, a 32000-entry LLaMA tokenizer) and
             ROOT/clip (a CLIP-ViT-L/14-336 CLIPModel directory, fp16); written shard by shard with torch
    import   rskd_jax.convert.import_checkpoint(--format geochat --vision-tower ROOT/clip --image-size 504
             --dtype bfloat16), as `launch/convert.py import` runs it
    load     rskd_jax.load_pretrained(ROOT/ours, dtype="bfloat16"); peak / bytes of the loaded weights
    forward  one jitted forward at 504 px (1296 image tokens) over a UC Merced image + a 28-token prompt
             (1324 tokens), compiled with rskd_jax.models.compiler_options(); also the compiled program's
             temp bytes (XLA memory_analysis), and those of the same program under XLA's default CPU options
    generate a few greedy tokens with rskd_jax.eval.generate.Generator (the project's decode loop)
    export   rskd_jax.convert.export_checkpoint -> ROOT/hf (transformers LlavaForConditionalGeneration)
    hf       transformers on the export in bf16: logits at the prompt's text positions and at the generated
             tokens (teacher-forced); top-1 agreement and relative logit error against ours

load, forward and generate run in one child (`run`); its peak is measured per stage (VmHWM reset between
stages). Memory columns: peak RssAnon (anonymous memory, sampled every 2 ms; excludes the page cache of
memory-mapped files) and VmHWM (peak resident set, includes mapped file pages), both of the step's process.

    python bench/real_size.py --layers 2                  # reduced depth: a quick try (~3 GB of files)
    python bench/real_size.py                             # GeoChat-7B: ~30 GB under --root, <= 40 min
    python bench/real_size.py --steps import,run,export,hf  # reuse the files written before

Results: bench/results/real_size[_L<layers>].json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.convert import AnonSampler, _status  # noqa: E402

STEPS = ("write", "import", "run", "export", "hf")
VOCAB, HIDDEN, MLP, HEADS, LAYERS = 32000, 4096, 11008, 32, 32  # Vicuna-7B
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
IMAGE_SIZE, TEXT_TOKENS, SHARDS = 504, 28, 4
QUESTION = "Classify the image within one of the given classes: dense residential, forest, river."
GiB = 2**30


# ------------------------------------------------------------------------------------------------ write
def llm_shapes(layers: int) -> dict[str, tuple]:
    """GeoChat's original keys (LLaMA `model.*` + `model.mm_projector.0/2`) and torch shapes."""
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            s[f"{p}self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.up_proj.weight"] = (MLP, HIDDEN)
        s[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    s["model.norm.weight"] = (HIDDEN,)
    s["model.mm_projector.0.weight"], s["model.mm_projector.0.bias"] = (HIDDEN, 1024), (HIDDEN,)
    s["model.mm_projector.2.weight"], s["model.mm_projector.2.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
    s["lm_head.weight"] = (VOCAB, HIDDEN)
    return s


def write(root: pathlib.Path, layers: int) -> dict:
    import torch
    import transformers

    from tools.make_rehearsal import save_tokenizer

    torch.manual_seed(0)
    clip = root / "clip"
    cfg = transformers.CLIPConfig(vision_config=dict(image_size=336, patch_size=14, **CLIP_L336))
    transformers.CLIPModel(cfg).half().save_pretrained(str(clip))

    d = root / "geochat7b"
    d.mkdir(parents=True)
    shapes = llm_shapes(layers)
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    per_shard, shards, cur = total / SHARDS, [[]], 0
    for k, s in shapes.items():
        if cur >= per_shard * len(shards) and len(shards) < SHARDS:
            shards.append([])
        shards[-1].append(k)
        cur += 2 * int(np.prod(s))
    weight_map = {}
    for i, keys in enumerate(shards):  # one shard in memory at a time
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        part = {}
        for k in keys:
            t = torch.empty(shapes[k], dtype=torch.float16)
            part[k] = t.fill_(1.0) if k.endswith("norm.weight") else t.normal_(0.0, 0.02)
        torch.save(part, d / name)
        weight_map.update({k: name for k in keys})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config = dict(
        architectures=["GeoChatLlamaForCausalLM"],
        model_type="geochat",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=1024,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        torch_dtype="float16",
    )
    (d / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(d, VOCAB)
    return dict(llm_bytes=total, shards=len(shards), clip_bytes=_dir_bytes(clip))


def _dir_bytes(d: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- import
def import_(root: pathlib.Path) -> dict:
    from launch.convert import tune_malloc

    tune_malloc()
    from rskd_jax.convert import import_checkpoint

    import_checkpoint(
        root / "geochat7b",
        root / "ours",
        fmt="geochat",
        vision_tower=root / "clip",
        image_size=IMAGE_SIZE,
        dtype="bfloat16",
        progress=False,
    )
    return dict(checkpoint_bytes=_dir_bytes(root / "ours"))


def export(root: pathlib.Path) -> dict:
    from launch.convert import tune_malloc

    tune_malloc()
    from rskd_jax.convert import export_checkpoint

    export_checkpoint(root / "ours", root / "hf", progress=False)
    return dict(export_bytes=_dir_bytes(root / "hf"))


# ------------------------------------------------------------------------------------ load/forward/generate
def prompt(root: pathlib.Path, image_token_id: int, image_tokens: int):
    """(ids [1, T] int32, pixel_values [1, S, S, 3] float32, image name): BOS + image tokens + 27 text tokens
    of a scene question, over a UC Merced image (random pixels when the data is absent)."""
    from rskd_jax.data.tokenizer import load_tokenizer
    from rskd_jax.data.transforms import decode_image, preprocess_image

    tok = load_tokenizer(root / "geochat7b")
    text = tok(QUESTION, add_special_tokens=False).input_ids[: TEXT_TOKENS - 1]
    ids = np.asarray([[tok.bos_token_id] + [image_token_id] * image_tokens + text], np.int32)
    shared = pathlib.Path(os.environ.get("RSKD_SHARED_DATA", "/work/shared/data"))
    img = shared / "UCMerced_LandUse" / "Images" / "denseresidential" / "denseresidential00.jpg"
    if img.exists():
        px = preprocess_image(decode_image(str(img)), IMAGE_SIZE)
        name = str(img.relative_to(shared))
    else:
        px = np.random.default_rng(0).normal(size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        name = "random pixels"
    return ids, px[None], name


def _reset_peak(sampler: AnonSampler | None) -> AnonSampler:
    """Stops `sampler`, resets this process's VmHWM and starts a new sampler."""
    if sampler is not None:
        sampler.stop()
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    s = AnonSampler()
    s.start()
    return s


def _stage(sampler: AnonSampler, t0: float, **extra) -> dict:
    peak = sampler.stop()
    return dict(seconds=round(time.time() - t0, 1), peak_rss_anon=peak, vm_hwm=_status()["VmHWM"], **extra)


def run(root: pathlib.Path, new_tokens: int) -> dict:
    import functools

    import jax
    from flax import nnx

    from rskd_jax import load_pretrained
    from rskd_jax.eval.generate import Generator
    from rskd_jax.models import compiler_options

    out = {}
    sampler = _reset_peak(None)
    base = _status()["RssAnon"]
    t0 = time.time()
    model, cfg = load_pretrained(root / "ours", dtype="bfloat16")
    state = nnx.state(model)
    jax.block_until_ready(state)
    weights = sum(x.nbytes for x in jax.tree.leaves(state))
    out["load"] = _stage(sampler, t0, weight_bytes=weights, baseline_rss_anon=base)

    ids, px, image = prompt(root, cfg.image_token_id, cfg.image_seq_length)
    text_at = np.arange(ids.shape[1] - (TEXT_TOKENS - 1) - 1, ids.shape[1], dtype=np.int32)[None]
    graphdef = nnx.graphdef(model)

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def forward(state, ids, px, at):
        return nnx.merge(graphdef, state)(ids, px, logits_at=at).logits

    sampler = _reset_peak(sampler)
    t0 = time.time()
    compiled = forward.lower(state, ids, px, text_at).compile()
    compile_s = time.time() - t0
    logits = np.asarray(compiled(state, ids, px, text_at))
    temp = compiled.memory_analysis().temp_size_in_bytes
    out["forward"] = _stage(
        sampler, t0, compile_seconds=round(compile_s, 1), xla_temp_bytes=int(temp), tokens=int(ids.shape[1])
    )
    # The same program compiled with XLA's default CPU options (compiled only: running it needs a float32 copy
    # of every weight, which does not fit here): the figure compiler_options() removes.
    plain = jax.jit(lambda state, ids, px, at: nnx.merge(graphdef, state)(ids, px, logits_at=at).logits)
    default_temp = plain.lower(state, ids, px, text_at).compile().memory_analysis().temp_size_in_bytes
    out["forward"]["xla_temp_bytes_default_options"] = int(default_temp)
    out["forward"]["image"] = image

    sampler = _reset_peak(sampler)
    t0 = time.time()
    gen = Generator(model, root / "geochat7b", new_tokens, batch_size=1, bucket=None, eos_id=-1)
    tokens, _ = gen.generate_ids(ids, np.ones_like(ids), px)
    out["generate"] = _stage(sampler, t0, new_tokens=new_tokens)
    np.savez(root / "ours_outputs.npz", ids=ids, px=px, text_at=text_at, logits=logits, tokens=tokens)
    return out


# ------------------------------------------------------------------------------------------------------ hf
def hf(root: pathlib.Path) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    ours = np.load(root / "ours_outputs.npz")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        root / "hf", dtype=torch.bfloat16
    ).eval()
    ids = np.concatenate([ours["ids"], ours["tokens"][:, :-1]], 1)  # teacher-forced: prompt + our tokens
    px = torch.from_numpy(ours["px"]).permute(0, 3, 1, 2).to(torch.bfloat16)
    t0 = time.time()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids).long(), pixel_values=px).logits[0].float().numpy()
    seconds = time.time() - t0
    p = ours["ids"].shape[1]
    want = logits[ours["text_at"][0], :VOCAB]
    got = ours["logits"][0]
    hf_greedy = logits[p - 1 :, :VOCAB].argmax(-1)
    return dict(
        forward_seconds=round(seconds, 1),
        top1_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()),
        relative_logit_error=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        max_abs_logit_diff=float(np.abs(got - want).max()),
        positions=int(want.shape[0]),
        greedy_agreement=float((hf_greedy == ours["tokens"][0]).mean()),
        greedy_tokens=int(hf_greedy.size),
    )


# ------------------------------------------------------------------------------------------------- driver
def child(step: str, root: pathlib.Path, new_tokens: int) -> None:
    if step == "run":
        print(json.dumps(run(root, new_tokens)))
        return
    sampler = _reset_peak(None)
    t0 = time.time()
    res = dict(write=write, import_=import_, export=export, hf=hf)[step.replace("import", "import_")]
    extra = res(root, args_layers()) if step == "write" else res(root)
    print(json.dumps(dict(step=_stage(sampler, t0, **extra))))


def args_layers() -> int:
    return int(os.environ["RSKD_REAL_SIZE_LAYERS"])


def mem_available() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(need: int, wait_s: float, quiet: bool) -> None:
    """Waits up to wait_s for `need` bytes of available memory and, for the heavy steps (`quiet`), for running
    pytest processes (other engineers' tests) to finish; exits 3 if the memory is still short."""
    deadline = time.time() + wait_s
    while True:
        busy = quiet and subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode == 0
        avail = mem_available()
        if avail >= need and (not busy or time.time() > deadline):
            return
        if time.time() > deadline:
            print(
                f"real_size: {avail / GiB:.1f} GiB available, need {need / GiB:.1f} GiB; stopping",
                file=sys.stderr,
            )
            sys.exit(3)
        time.sleep(10)


def run_child(step: str, root: pathlib.Path, layers: int, new_tokens: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", RSKD_REAL_SIZE_LAYERS=str(layers))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's process
    cmd = [sys.executable, __file__, "--child", step, "--root", str(root), "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"step {step} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: dict, weights: int | None) -> str:
    lines = [
        "| step | seconds | peak RssAnon GiB | peak RSS (VmHWM) GiB | peak RssAnon / bf16 weights | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        ratio = f"{r['peak_rss_anon'] / weights:.2f}" if weights else ""
        notes = ", ".join(
            f"{k}={v}"
            for k, v in r.items()
            if k not in ("seconds", "peak_rss_anon", "vm_hwm", "baseline_rss_anon")
        )
        lines.append(
            f"| {name} | {r['seconds']} | {r['peak_rss_anon'] / GiB:.2f} | {r['vm_hwm'] / GiB:.2f} | {ratio} "
            f"| {notes} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/rskd_real_size", help="where the ~30 GB of files go")
    p.add_argument("--layers", type=int, default=LAYERS, help="LLM depth (32 = GeoChat-7B)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens to generate")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for memory / running pytest")
    p.add_argument("--out", help="results stem (default bench/results/real_size[_L<layers>])")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = pathlib.Path(args.root)
    if args.child:
        child(args.child, root, args.new_tokens)
        return 0
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        print(f"real_size: unknown steps {bad}; expected some of {','.join(STEPS)}", file=sys.stderr)
        return 2
    if "write" in steps and root.exists() and any(root.iterdir()):
        print(
            f"real_size: {root} exists and is not empty (remove it, or leave out the write step)",
            file=sys.stderr,
        )
        return 2
    root.mkdir(parents=True, exist_ok=True)
    llm = sum(2 * int(np.prod(s)) for s in llm_shapes(args.layers).values())
    # bf16 weights (LLM + CLIP ~0.6 GB) plus the forward's working set; transformers maps the export instead
    need = dict(run=int(1.05 * llm) + int(2.5 * GiB), hf=int(1.05 * llm) + 2 * GiB)
    rows = {}
    for step in steps:
        wait_for_memory(need.get(step, 2 * GiB), args.wait, quiet=step in need)
        print(f"[{datetime.datetime.now(datetime.UTC):%H:%M:%S}] {step} ...", flush=True)
        res = run_child(step, root, args.layers, args.new_tokens)
        if step == "run":
            rows.update(res)
        else:
            rows[step] = res["step"]
        print(table({k: rows[k] for k in rows if k in res or k == step}, None), flush=True)
    weights = rows.get("load", {}).get("weight_bytes")
    result = dict(
        date=f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        command="python bench/real_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        layers=args.layers,
        llm_fp16_bytes=llm,
        steps=rows,
        load_peak_over_weights=round(rows["load"]["peak_rss_anon"] / weights, 3) if weights else None,
        load_vm_hwm_over_weights=round(rows["load"]["vm_hwm"] / weights, 3) if weights else None,
        machine=dict(cpus=os.cpu_count(), mem_total_gib=round(os.sysconf("SC_PHYS_PAGES") * 4096 / GiB, 1)),
    )
    stem = (
        pathlib.Path(args.out)
        if args.out
        else ROOT
        / "bench"
        / "results"
        / ("real_size" if args.layers == LAYERS else f"real_size_L{args.layers}")
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = f"{result['date']}, `{result['command']}`\n\n{table(rows, weights)}\n"
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
