"""For a lent GPU: MFU of the distillation step (~1B student / ~2B teacher, bf16) and rollout tokens/s.

Models: CLIP-L/14 at 336 px (576 image tokens) + a LLaMA decoder; student text 2048 wide x 16 layers
(~0.94B LLM parameters), teacher 2560 x 24 (~2.07B), vocabulary 32000; bf16 compute, the student's weights
and Adam moments in fp32, the teacher's weights in bf16. Batch 8 x (576 image + 128 text) tokens, the losses
on the last 64 (a fixed pre-sampled response, as bench/step.py: the rollout is timed separately).
The step is bench/step.py's (make_train_step, reverse KL + feature alignment, AdamW) on randomly initialised
models. MFU = analytic model FLOPs (rskd_jax.eval.flops; step.py's `step_flops`) / median step time / the
chip's dense bf16 peak; the bf16 matmul ceiling measured in the same run is reported next to it.

`--quick` runs the same code on the `tiny` config in bf16 (on CPU: the test's mode; MFU is then relative to
the measured matmul ceiling since a CPU has no listed peak).

    python bench/gpu.py [--quick] [--attention cudnn|xla] [--batch 8] [--new_tokens 64]
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common as C  # noqa: E402
from bench.step import OursRunner, make_jax_step, step_flops, time_interleaved  # noqa: E402
from rskd_jax.distill import rollout as R  # noqa: E402
from rskd_jax.models import LlavaModel, param_counts  # noqa: E402

# dense bf16 peak FLOP/s by device_kind substring (NVIDIA data sheets, without sparsity)
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def gpu_config(batch: int, attention: str) -> C.BenchConfig:
    vision = dataclasses.replace(C.vision(1024, 24, 16, 336, 14))
    t, s = C._pair(
        vision, 32000, (2560, 24, 20, 6912), (2048, 16, 16, 5504), dtype="bfloat16", attention_impl=attention
    )
    return C.BenchConfig(
        "gpu_1b_2b", t.replace(param_dtype="bfloat16"), s, batch=batch, text_tokens=128, loss_tokens=64
    )


def quick_config(attention: str) -> C.BenchConfig:
    bc = C.bench_config("tiny")
    t, s = (c.replace(dtype="bfloat16", attention_impl=attention) for c in (bc.teacher, bc.student))
    return dataclasses.replace(bc, name="tiny_bf16", teacher=t.replace(param_dtype="bfloat16"), student=s)


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for key, v in PEAK_BF16.items():  # ordered: the specific names first
        if key in kind:
            return v
    return None


def init_model(cfg, seed: int):
    """Randomly initialised LlavaModel (eager: one small op per weight, no init compile)."""
    return LlavaModel(cfg, rngs=nnx.Rngs(seed))


def measure(bc: C.BenchConfig, *, new_tokens: int, warmup: int, reps: int) -> dict:
    """Rollout tokens/s, then step time (the step donates and updates the student), on fresh models."""
    t0 = time.perf_counter()
    teacher, student = init_model(bc.teacher, 1), init_model(bc.student, 2)
    init_s = time.perf_counter() - t0
    batch = C.token_batch(bc, seed=0)
    cfg = R.SamplingConfig(max_new_tokens=new_tokens, alpha=0.2)
    sample = jax.jit(
        lambda s, t, ids, m, pix, k: R.sample(s, t, ids, m, k, cfg, eos_id=-1, pad_id=0, pixel_values=pix)
    )
    j_in = [
        jnp.asarray(batch["prompt_ids"]),
        jnp.asarray(batch["prompt_mask"]),
        jnp.asarray(batch["pixel_values"], jnp.bfloat16),
    ]
    t0 = time.perf_counter()
    sample_c = sample.lower(student, teacher, *j_in, jax.random.key(0)).compile()
    rollout_compile_s = time.perf_counter() - t0
    keys = iter(jax.random.split(jax.random.key(1), 10**4))
    roll_fn = lambda: jax.block_until_ready(sample_c(student, teacher, *j_in, next(keys)))
    roll = time_interleaved({"r": roll_fn}, warmup=max(warmup, 1), reps=reps)["r"]
    built = make_jax_step(bc.teacher, bc.student, teacher, student, batch)
    run = OursRunner(built)
    t0 = time.perf_counter()
    metrics = run()
    first_s = time.perf_counter() - t0
    step = time_interleaved({"s": run}, warmup=warmup, reps=reps)["s"]
    return dict(
        step=step,
        rollout=roll,
        loss_total=float(metrics["loss/total"]),
        times=dict(
            init_s=init_s, rollout_compile_s=rollout_compile_s, step_first_call_s=first_s, **built["times"]
        ),
    )


def main():
    p = C.parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--attention", default="", help="cudnn | xla (default: cudnn on GPU, xla elsewhere)")
    p.add_argument("--matmul_n", type=int, default=8192)
    a = p.parse_args()
    C.BURST_S = a.burst_s
    on_gpu = jax.default_backend() == "gpu"
    attention = a.attention or ("cudnn" if on_gpu else "xla")
    make = (lambda att: quick_config(att)) if a.quick else (lambda att: gpu_config(a.batch, att))
    warmup, reps = (0, 1) if a.quick else (a.warmup, a.reps)
    new_tokens = 4 if a.quick else a.new_tokens
    n = 256 if a.quick else a.matmul_n
    ceiling = C.jax_matmul_gflops(n, dtype="bfloat16") * 1e9
    bc, fallback = make(attention), None
    try:
        m = measure(bc, new_tokens=new_tokens, warmup=warmup, reps=reps)
    except Exception as e:  # noqa: BLE001 - e.g. a cuDNN attention the installed cuDNN rejects
        if attention == "xla":
            raise
        fallback = f"attention {attention!r} failed ({type(e).__name__}: {str(e)[:300]}); re-ran with 'xla'"
        print(fallback)
        attention, bc = "xla", make("xla")
        m = measure(bc, new_tokens=new_tokens, warmup=warmup, reps=reps)
    flops = step_flops(bc, logits="answer", vision_layers="used", packed=True)  # what our step executes
    peak = peak_flops() if on_gpu else None
    med = m["step"]["median_s"]
    row = dict(
        config=bc.name,
        device=jax.devices()[0].device_kind,
        attention=attention,
        step_ms=1e3 * med,
        tokens_per_s=bc.batch * bc.seq_len / med,
        model_tflops=flops / med / 1e12,
        mfu_pct=100 * flops / med / peak if peak else None,
        pct_of_matmul_ceiling=100 * flops / med / ceiling,
        rollout_tokens_per_s=bc.batch * new_tokens / m["rollout"]["median_s"],
    )
    print(C.table([row], list(row)))
    params = dict(student=param_counts(bc.student), teacher=param_counts(bc.teacher))
    print(
        f"params: student LLM {params['student']['llm'] / 1e9:.2f}B, teacher LLM "
        f"{params['teacher']['llm'] / 1e9:.2f}B; bf16 matmul ceiling n={n}: {ceiling / 1e12:.2f} TFLOP/s; "
        f"peak {peak}; loss {m['loss_total']:.4f}; times {m['times']}"
    )
    C.write_result(
        "gpu",
        dict(
            name="gpu",
            quick=a.quick,
            command=" ".join(sys.argv),
            machine=C.machine(),
            config=dict(
                batch=bc.batch,
                seq_len=bc.seq_len,
                image_tokens=bc.image_tokens,
                loss_tokens=bc.loss_tokens,
                new_tokens=new_tokens,
                teacher=bc.teacher.to_dict(),
                student=bc.student.to_dict(),
            ),
            params=params,
            results=row,
            step_flops=flops,
            peak_flops=peak,
            matmul_ceiling_flops=ceiling,
            step_times_s=m["step"]["times_s"],
            rollout_times_s=m["rollout"]["times_s"],
            loss_total=m["loss_total"],
            times=m["times"],
            attention_fallback=fallback,
            warmup=warmup,
            reps=reps,
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
