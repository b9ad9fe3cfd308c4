"""Shared benchmark helpers: configs, twin models (same weights in PyTorch and JAX), timing, matmul ceiling,
tables and JSON results.

Every bench script times with warm-up runs followed by repeated runs and reports the MEDIAN (the machine may
be shared), records the machine and its load, and writes its result to bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from rskd_jax.models.presets import LlavaConfig, TextConfig, VisionConfig

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A teacher/student pair plus the batch shape. Sequence = image tokens + text tokens; the loss (and the
    pre-sampled response) covers the last `loss_tokens` text tokens."""

    name: str
    teacher: LlavaConfig
    student: LlavaConfig
    batch: int
    text_tokens: int
    loss_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.student.image_seq_length

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.loss_tokens


def _pair(vision: VisionConfig, vocab: int, teacher: tuple, student: tuple, dtype="float32", **kw):
    """MHA text configs from (hidden, layers, heads, mlp); image placeholder = the last vocabulary id."""
    text = lambda h, n, a, m: TextConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=m,
        num_layers=n,
        num_heads=a,
        num_kv_heads=a,
        max_position_embeddings=4096,
    )
    make = lambda t: LlavaConfig(
        vision=vision,
        text=text(*t),
        vision_feature_layer=-2,
        select_strategy="patch",
        image_token_id=vocab - 1,
        dtype=dtype,
        **kw,
    )
    return make(teacher), make(student)


def vision(hidden: int, layers: int, heads: int, image: int, patch: int) -> VisionConfig:
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_heads=heads,
        image_size=image,
        patch_size=patch,
    )


def bench_config(name: str) -> BenchConfig:
    """The issue's two fp32 configs (batch 8, MHA, vision MLP 4x, layer -2, CLS dropped)."""
    if name == "tiny":
        t, s = _pair(vision(64, 2, 4, 32, 8), 512, (128, 4, 4, 344), (64, 2, 4, 172))
        return BenchConfig("tiny", t, s, batch=8, text_tokens=48, loss_tokens=32)
    if name == "small":
        t, s = _pair(vision(256, 4, 8, 112, 14), 8000, (512, 8, 8, 1376), (256, 6, 8, 688))
        return BenchConfig("small", t, s, batch=8, text_tokens=128, loss_tokens=32)
    raise KeyError(f"unknown bench config {name!r}: expected 'tiny' or 'small'")


# ----------------------------------------------------------------------------------------------- models
def init_weights_(module, seed: int):
    """Re-randomise a torch module in place (norm scales 1 + 0.1N, biases 0.02N, embeddings N(0,1),
    matrices N(0, 1/fan_in)) so that logits are not near-uniform and the loss check is meaningful."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * n)
            elif p.ndim == 1 and "class_embedding" not in name:
                p.copy_(0.02 * n)
            elif "embed" in name:
                p.copy_(n)
            else:
                p.copy_(n / np.sqrt(np.prod(p.shape[1:])))
    return module


def hf_llava(cfg: LlavaConfig, seed: int):
    """transformers' LlavaForConditionalGeneration for `cfg` (fp32, default SDPA attention), re-randomised."""
    import transformers

    from rskd_jax.models import from_torch

    return init_weights_(transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(cfg)), seed)


def jax_from_hf(cfg: LlavaConfig, hf_model):
    """Our LlavaModel with hf_model's weights (built abstract, then loaded: no init compile)."""
    from flax import nnx

    from rskd_jax.models import LlavaModel, from_torch

    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    return from_torch.load_params(model, from_torch.llava_params_from_hf_state_dict(cfg, sd))


def token_batch(bc: BenchConfig, seed: int = 0, *, pad_rows: bool = True) -> dict:
    """NumPy batch of the step/rollout contract for `bc` (pixel_values NHWC).

    prompt = [BOS] + image tokens + prompt text, LEFT-padded to prompt_len (row b is b % 4 tokens shorter when
    pad_rows); response = loss_tokens random tokens (the fixed pre-sampled response); the ground-truth
    conversation = prompt + a different random answer of loss_tokens tokens, RIGHT-padded to seq_len,
    loss_mask on the answer.
    """
    rng = np.random.default_rng(seed)
    b, plen, r, img = bc.batch, bc.prompt_len, bc.loss_tokens, bc.student.image_token_id
    vocab = bc.student.text.vocab_size
    words = lambda n: rng.integers(3, vocab - 1, size=n)  # never pad/bos/eos (0/1/2) or the image id
    prompt, pmask = np.zeros((b, plen), np.int32), np.zeros((b, plen), np.int32)
    ids, amask, lmask = (np.zeros((b, bc.seq_len), np.int32) for _ in range(3))
    for i in range(b):
        short = i % 4 if pad_rows else 0
        p = [1] + [img] * bc.image_tokens + list(words(plen - 1 - bc.image_tokens - short))
        prompt[i, plen - len(p) :], pmask[i, plen - len(p) :] = p, 1
        full = p + list(words(r))
        ids[i, : len(full)], amask[i, : len(full)], lmask[i, len(p) : len(full)] = full, 1, 1
    v = bc.student.vision
    pixels = rng.normal(size=(b, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return dict(
        pixel_values=pixels,
        prompt_ids=prompt,
        prompt_mask=pmask,
        response=words(b * r).reshape(b, r).astype(np.int32),
        input_ids=ids,
        attention_mask=amask,
        loss_mask=lmask,
    )


# ----------------------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], object], *, warmup: int, reps: int) -> dict:
    """Runs fn `warmup` times untimed, then `reps` times; fn must block until its work is done.
    Returns median / min / all run times in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=[round(t, 6) for t in times])


def jax_matmul_gflops(n: int, dtype="float32", reps: int = 5) -> float:
    """Achieved GFLOP/s of a jitted [n, n] @ [n, n] jnp.dot (median of `reps`): the matmul ceiling."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    t = time_fn(lambda: f(a, b).block_until_ready(), warmup=2, reps=reps)["median_s"]
    return 2 * n**3 / t / 1e9


def torch_matmul_gflops(n: int, reps: int = 5) -> float:
    """Achieved GFLOP/s of an fp32 torch.mm [n, n] @ [n, n] (median of `reps`)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_fn(lambda: torch.mm(a, b), warmup=2, reps=reps)["median_s"]
    return 2 * n**3 / t / 1e9


# ----------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    """Where and when: CPU model, cores, load average, library versions, JAX backend."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = dict(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu,
        cores=os.cpu_count(),
        loadavg_1m=round(os.getloadavg()[0], 2),
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
    )
    try:
        import torch
        import transformers

        out.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            torch_threads=torch.get_num_threads(),
        )
    except ImportError:
        pass
    return out


_T0 = time.perf_counter()


def log(msg: str):
    """Progress line with the seconds since start (flushed: long runs on a shared machine)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    """Plain fixed-width text table of `cols` from `rows` (floats to 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_result(name: str, result: dict, out: str | None = None) -> pathlib.Path:
    """JSON to `out`, default bench/results/<name>.json (<name>.quick.json for --quick runs)."""
    if out:
        path = pathlib.Path(out)
    else:
        path = RESULTS / f"{name}{'.quick' if result.get('quick') else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return path


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every bench script shares."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config, one timed run (the test's mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
    p.add_argument(
        "--burst_s",
        type=float,
        default=BURST_S,
        help="a timed sample = back-to-back calls lasting at least this long (0: single calls, cold starts)",
    )
    return p


BURST_S = 0.5  # bench.step.time_interleaved's default; the scripts set it from --burst_s


def set_torch_threads() -> int:
    """torch uses as many intra-op threads as XLA's CPU client does (all cores)."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
