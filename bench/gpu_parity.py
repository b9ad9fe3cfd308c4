"""GPU numerics checks run by bench/gpu_check.py: attention kernels, and the model against transformers.

    python -m bench.gpu_parity attention --out attention.json [--dry-run]
    python -m bench.gpu_parity models --out models.json [--dry-run]

`attention`: our XLA attention, `jax.nn.dot_product_attention(implementation='xla')` fed by the same
argument-building code as the cuDNN path (`layers.sdpa_arguments`) and, on a GPU, cuDNN flash attention, against
a written-out softmax attention (GQA by `jnp.repeat`, fp32 at HIGHEST precision) on causal masks with left- and
right-padded rows. Forward output and the gradients of q, k, v are compared at the real query rows; every row
(the pad queries too) must be finite. fp32 and bf16 inputs; cuDNN with fp32 must refuse with the documented
ValueError. On a GPU the forward + backward time of each bf16 kernel is recorded.

`models`: our LlavaModel against transformers' LlavaForConditionalGeneration (PyTorch, fp32, CPU) with the
same weights, logits at the real positions of a left-padded (prompt) and a right-padded (conversation) batch:
fp32 at HIGHEST matmul precision, fp32 at the default precision (TF32 on Ampere+ GPUs), bf16 compute with fp32
and with bf16 weights, and bf16 with cuDNN attention (GPU). Metric: max|ours - ref| / max(1, max|ref|) (as the
test suite's assert_close) and the share of positions whose top-1 token agrees.

Each check has a tolerance (TOLERANCES, stated in docs/gpu.md); the exit code is 0 when all pass. `--dry-run`
uses small shapes (the test suite runs it on CPU, where the cuDNN rows check the documented refusal instead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rskd_jax.models import layers  # noqa: E402

# relative error bounds: max|ours - ref| / max(1, max|ref|) (attention: / max|ref|)
TOLERANCES = {
    "attention fp32": 5e-3,  # TF32 dots on GPUs at the default precision; ~1e-6 on CPU
    "attention bf16": 3e-2,  # bf16 inputs/outputs; fp32 softmax
    "attention bf16 grad": 6e-2,
    "model fp32 highest": 1e-4,  # the test suite's tolerance
    "model fp32 default": 3e-2,  # TF32 matmuls (10-bit mantissa)
    "model bf16": 5e-2,  # bf16 compute, fp32 or bf16 weights (as tests/test_models_llava.py)
}
MIN_TOP1 = {"model fp32 highest": 1.0, "model fp32 default": 0.97, "model bf16": 0.9}


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def rel_err(ours, ref, rows=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if rows is not None:
        ours, ref = ours[rows], ref[rows]
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ----------------------------------------------------------------------------------------------- attention
def reference_attention(q, k, v, mask):
    """Written-out softmax attention, head-major: KV heads repeated (HF repeat_kv), fp32, HIGHEST precision.
    Rows with no key to attend attend every key (what sdpa_arguments passes to cuDNN)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    s = jnp.einsum("bhtd,bhsd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    mask = mask | ~mask.any(-1, keepdims=True)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, -1), v, precision="highest")


def attention_inputs(dry_run: bool, seed: int = 0):
    """q [B,H,T,D], k/v [B,K,T,D], causal mask with left- and right-padded rows, real query rows [B,T]."""
    b, h, kh, t, d = (2, 4, 2, 24, 16) if dry_run else (4, 32, 8, 1024, 128)
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, h, t, d))
    k, v = jax.random.normal(kk, (b, kh, t, d)), jax.random.normal(kv, (b, kh, t, d))
    valid = np.ones((b, t), bool)
    valid[0, : t // 4] = False  # left-padded (a prompt): its first queries see no key at all
    valid[1, t - t // 3 :] = False  # right-padded (a conversation)
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    cot = jax.random.normal(kg, q.shape) * valid[:, None, :, None]  # cotangent: real query rows only
    return q, k, v, jnp.asarray(mask), valid, cot


def _sdpa_xla(q, k, v, mask):
    return jax.nn.dot_product_attention(
        **layers.sdpa_arguments(q, k, v, mask), implementation="xla"
    ).swapaxes(1, 2)


def attention_check(dry_run: bool) -> list[dict]:
    q, k, v, mask, valid, cot = attention_inputs(dry_run)
    real = np.broadcast_to(valid[:, None, :], q.shape[:3])  # [B,H,T] real query rows
    ref_fn = lambda q, k, v: reference_attention(q, k, v, mask)
    ref_out, ref_vjp = jax.vjp(ref_fn, q, k, v)
    ref_grads = ref_vjp(cot)
    impls = {
        "xla": lambda q, k, v: layers.attention_heads(q, k, v, mask, "xla"),
        "sdpa_xla": lambda q, k, v: _sdpa_xla(q, k, v, mask),
        "cudnn": lambda q, k, v: layers.attention_heads(q, k, v, mask, "cudnn"),
    }
    rows = []
    for dtype in ("float32", "bfloat16"):
        args = tuple(x.astype(dtype) for x in (q, k, v))
        for name, fn in impls.items():
            row = dict(check=f"attention {name} {dtype}", impl=name, dtype=dtype)
            rows.append(row)
            if name == "cudnn" and (dtype == "float32" or not on_gpu()):
                # documented refusals: no GPU -> NotImplementedError, fp32 on a GPU -> ValueError
                want = NotImplementedError if not on_gpu() else ValueError
                try:
                    fn(*args)
                    row.update(status="fail", error=f"expected {want.__name__}, got a result")
                except want as e:
                    row.update(status="pass", refused=f"{want.__name__}: {e}")
                continue
            try:  # an error (e.g. a shape the installed cuDNN rejects) is a result, not the end of the run
                out, vjp = jax.jit(lambda q, k, v, fn=fn: jax.vjp(fn, q, k, v))(*args)
                grads = vjp(cot.astype(dtype))
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}")
                continue
            tol = TOLERANCES[f"attention {'fp32' if dtype == 'float32' else 'bf16'}"]
            gtol = tol if dtype == "float32" else TOLERANCES["attention bf16 grad"]
            row.update(
                out_err=rel_err(out, ref_out, real),
                grad_err=max(rel_err(g, r) for g, r in zip(grads, ref_grads)),
                finite=bool(np.isfinite(np.asarray(out, np.float32)).all()),
                tol=tol,
                grad_tol=gtol,
            )
            ok = row["out_err"] <= tol and row["grad_err"] <= gtol and row["finite"]
            row["status"] = "pass" if ok else "fail"
            if on_gpu() and not dry_run and dtype == "bfloat16":
                row["fwd_bwd_ms"] = _time_ms(
                    jax.jit(lambda q, k, v, fn=fn: jax.grad(lambda *a: fn(*a).sum())(q, k, v)), args
                )
    return rows


def _time_ms(fn, args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


# ----------------------------------------------------------------------------------------------- models
def model_configs(dry_run: bool):
    """(name, LlavaConfig) pairs: the tiny preset (GQA 4/2 heads); on a GPU also a 1024-wide, head_dim-128
    GQA model at 112 px (cuDNN's common head size)."""
    from bench import common as C  # noqa: PLC0415
    from rskd_jax.models import get_preset  # noqa: PLC0415

    out = [("tiny", get_preset("tiny"))]
    if not dry_run:
        _, s = C._pair(C.vision(256, 4, 4, 112, 14), 8000, (1024, 4, 8, 2816), (1024, 4, 8, 2816))
        out.append(("medium_gqa", s.replace(text=dataclasses.replace(s.text, num_kv_heads=2))))
    return out


def _batches(cfg, seed: int = 0):
    """A left-padded prompt view and a right-padded conversation view (bench.common.token_batch)."""
    from bench import common as C  # noqa: PLC0415

    bc = C.BenchConfig("parity", cfg, cfg, batch=4, text_tokens=24, loss_tokens=8)
    b = C.token_batch(bc, seed)
    return b["pixel_values"], {
        "prompt (left-padded)": (b["prompt_ids"], b["prompt_mask"]),
        "conversation (right-padded)": (b["input_ids"], b["attention_mask"]),
    }


def hf_logits(hf, ids, mask, px) -> np.ndarray:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return (
            hf(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
                position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
            )
            .logits.float()
            .numpy()
        )


def model_variants():
    """(name, tolerance key, LlavaConfig fields, matmul precision); cuDNN rows only on a GPU."""
    out = [
        ("fp32 highest", "model fp32 highest", {}, "highest"),
        ("fp32 default precision", "model fp32 default", {}, None),
        ("bf16 compute, fp32 weights", "model bf16", dict(dtype="bfloat16"), None),
        ("bf16 compute, bf16 weights", "model bf16", dict(dtype="bfloat16", param_dtype="bfloat16"), None),
    ]
    if on_gpu():
        out.append(
            ("bf16 + cuDNN attention", "model bf16", dict(dtype="bfloat16", attention_impl="cudnn"), None)
        )
    return out


def models_check(dry_run: bool) -> list[dict]:
    from flax import nnx  # noqa: PLC0415

    from bench import common as C  # noqa: PLC0415

    rows = []
    for cname, cfg in model_configs(dry_run):
        hf = C.hf_llava(cfg, seed=3).eval()
        px, views = _batches(cfg)
        refs = {v: hf_logits(hf, ids, m, px) for v, (ids, m) in views.items()}
        for vname, tol_key, fields, precision in model_variants():
            model = C.jax_from_hf(cfg.replace(**fields), hf)
            fwd = nnx.jit(lambda m, i, p, a: m(i, p, a).logits)
            for view, (ids, m) in views.items():
                row = dict(check=f"model {cname} {vname} {view}", config=cname, variant=vname, view=view)
                rows.append(row)
                try:  # an error (e.g. cuDNN rejecting a shape) is a result, not the end of the run
                    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
                        out = fwd(model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(m))
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}")
                    continue
                ours, ref, real = np.asarray(out, np.float64), refs[view], m.astype(bool)
                err = float(np.abs(ours[real] - ref[real]).max() / max(1.0, np.abs(ref[real]).max()))
                top1 = float((ours[real].argmax(-1) == ref[real].argmax(-1)).mean())
                ok = err <= TOLERANCES[tol_key] and top1 >= MIN_TOP1[tol_key]
                row.update(err=err, tol=TOLERANCES[tol_key], top1=top1, min_top1=MIN_TOP1[tol_key])
                row["status"] = "pass" if ok else "fail"
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["attention", "models"])
    p.add_argument("--dry-run", action="store_true", help="small shapes (CPU test mode)")
    p.add_argument("--out", required=True, help="JSON result path")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = (attention_check if a.what == "attention" else models_check)(a.dry_run)
    failed = [r["check"] for r in rows if r["status"] != "pass"]
    result = dict(
        what=a.what,
        dry_run=a.dry_run,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        tolerances=TOLERANCES,
        rows=rows,
        failed=failed,
        wall_s=time.perf_counter() - t0,
    )
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        nums = {k: r[k] for k in ("out_err", "grad_err", "err", "top1", "fwd_bwd_ms") if k in r}
        print(f"{r['status']:4s}  {r['check']}  " + " ".join(f"{k}={v:.3g}" for k, v in nums.items()))
    print(f"{len(rows) - len(failed)}/{len(rows)} checks pass; wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
