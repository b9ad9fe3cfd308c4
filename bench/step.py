"""Distillation step throughput: rskd_jax's compiled step vs the PyTorch reference step (bench/torch_ref.py).

Both sides run the same teacher/student weights (HF Llava models converted with rskd_jax.models.from_torch)
on the same batch and do the same work per step: teacher forward + student forward/backward over
prompt + a FIXED pre-sampled response (single-step reverse KL at the response positions) and over the
ground-truth conversation (feature alignment of the final hidden states: image tokens and answer tokens,
learned linear map), then clip + AdamW. The teacher-mixed rollout that our step runs first is replaced by
that fixed response (rollout.sample is patched while the step is traced), so the rollout is NOT in these
numbers; bench/rollout.py measures it. Our step is rskd_jax.distill.step.make_train_step with a StepSpec of
weights {rkl, feat_image, feat_text}; logits are computed only at the response positions.

Reported per config: tokens/s (batch x sequence length / median step time), the ratio ours / torch,
FLOPs (analytic model FLOPs; XLA cost analysis of an unrolled build of our step; torch FlopCounterMode
of the peer's step) and achieved GFLOP/s against the fp32 matmul ceiling measured in the same run.
Runs alternate between the implementations so that load from other processes hits all of them alike.

    python bench/step.py [--configs tiny,small] [--quick] [--reps 7]
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import sys
import time
from unittest import mock

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common as C  # noqa: E402
from bench import torch_ref  # noqa: E402
from rskd_jax.distill import rollout as R  # noqa: E402
from rskd_jax.distill import step as S  # noqa: E402
from rskd_jax.eval.flops import forward_flops  # noqa: E402

WEIGHTS = dict(rkl=1.0, feat_image=1.0, feat_text=1.0)
LR = 1e-4
JAX_KEYS = ("pixel_values", "prompt_ids", "prompt_mask", "input_ids", "attention_mask", "loss_mask")


# ----------------------------------------------------------------------------------------------- FLOPs
def step_flops(bc: C.BenchConfig, *, logits: str, vision_layers: str, packed: bool = False) -> int:
    """Analytic matmul FLOPs of one step (rskd_jax.eval.flops convention; backward = 2x forward for the
    trained student parts, 1x for the first projector layer whose input needs no gradient).

    logits: "answer" = LM head at the R response positions of the response view only (ours, torch lean);
    "all" = at every position of both views (forward), back-propagated in the response view only.
    vision_layers: "used" (ours: stops at layer -2) or "all" (transformers runs every CLIP layer).
    packed: the two views as ONE forward over GT + response (seq_len + R tokens, one vision pass; ours,
    `StepSpec.pack_views`) instead of two forwards over seq_len tokens each.
    """
    s_len, r = bc.seq_len, bc.loss_tokens
    ds, dt, dv = bc.student.text.hidden_size, bc.teacher.text.hidden_size, bc.student.vision.hidden_size
    n_img = bc.image_tokens

    def fwd(cfg, lp, length=s_len):
        return forward_flops(cfg, length, logits_positions=lp, vision_layers=vision_layers)

    def student_bwd(f):
        proj_first = 2 * n_img * dv * ds  # weight gradient only
        return 2 * (f["llm"] + f["lm_head"] + f["projector"]) - proj_first

    feature_map = 3 * 2 * s_len * ds * dt
    if packed:
        if logits != "answer":
            raise ValueError("packed views compute logits at the response positions only")
        fs = fwd(bc.student, r, s_len + r)
        return bc.batch * (
            fwd(bc.teacher, r, s_len + r)["total"] + fs["total"] + student_bwd(fs) + feature_map
        )
    lr_ = r if logits == "answer" else s_len
    lg_ = 0 if logits == "answer" else s_len
    resp = fwd(bc.teacher, lr_)["total"] + fwd(bc.student, lr_)["total"] + student_bwd(fwd(bc.student, lr_))
    f_gt = fwd(bc.student, lg_)
    gt = fwd(bc.teacher, lg_)["total"] + f_gt["total"] + student_bwd(dict(f_gt, lm_head=0))
    return bc.batch * (resp + gt + feature_map)


# ----------------------------------------------------------------------------------------------- our step
def fixed_sampler(response: np.ndarray):
    """Stands in for rollout.sample inside the step: the fixed pre-sampled response (a constant)."""
    tokens = np.asarray(response, np.int32)

    def sample(student, teacher, prompt_ids, prompt_mask, rng, cfg, **_):
        b, r = tokens.shape
        zeros = jnp.zeros((b, r), jnp.float32)
        return R.Rollout(
            tokens=jnp.asarray(tokens),
            mask=jnp.ones((b, r), jnp.float32),
            student_logprobs=zeros,
            teacher_logprobs=zeros,
            weights=jnp.ones((b, r), jnp.float32),
            lengths=jnp.full((b,), r, jnp.int32),
        )

    return sample


def make_jax_step(
    tcfg,
    scfg,
    teacher,
    student,
    batch: dict,
    *,
    maps_from=None,
    compile: bool = True,
    sampled: bool = False,
    reuse: bool = False,
) -> dict:
    """Our step (make_train_step, StepSpec {rkl, feat_image, feat_text}, fixed response) for the given models:
    lowered (and compiled). Returns the lowered and compiled step, the initial state, the inputs and the
    trace / compile times.

    sampled: the step runs its own teacher-mixed rollout of R = response length tokens (alpha 0.2, no EOS
    stop) instead of the fixed response (bench/full_step.py); reuse: `loss.reuse_teacher_prefix` (needs
    `sampled`: a fixed response comes with no teacher states)."""
    spec = S.StepSpec(
        weights=WEIGHTS,
        sampling=R.SamplingConfig(max_new_tokens=batch["response"].shape[1], alpha=0.2),
        feature_layers=((-1, -1),),
        eos_id=-1 if sampled else scfg.eos_token_id,
        pad_id=scfg.pad_token_id,
        image_token_id=scfg.image_token_id,
        reuse_teacher_prefix=reuse and sampled,
    )
    maps = S.feature_maps_for(spec.feature_layers, scfg, tcfg, nnx.Rngs(3), with_proj=False)
    if maps_from is not None:  # the same map weights as another build
        maps["layer0"].linear.kernel[...] = jnp.asarray(maps_from)
    tx = S.make_optimizer(
        ml_collections.ConfigDict(dict(lr=LR, total_steps=10**6, warmup_steps=0, schedule="constant"))
    )
    init, step, parts = S.make_train_step(S.StudentWithMaps(student, maps), teacher, spec, tx, "all")
    inputs = {k: jnp.asarray(batch[k]) for k in JAX_KEYS}
    state = init(parts["params"], jax.random.key(0))
    t1 = time.perf_counter()
    patch = (
        contextlib.nullcontext()
        if sampled
        else mock.patch.object(R, "sample", fixed_sampler(batch["response"]))
    )
    with patch:
        lowered = step.lower(state, parts["frozen"], parts["teacher"], inputs)
        t2 = time.perf_counter()
        compiled = lowered.compile() if compile else None
    t3 = time.perf_counter()
    return dict(
        lowered=lowered,
        compiled=compiled,
        step=step,
        state=state,
        frozen=parts["frozen"],
        teacher=parts["teacher"],
        inputs=inputs,
        map_kernel=np.asarray(maps["layer0"].linear.kernel[...]),
        times=dict(trace_lower_s=t2 - t1, compile_s=t3 - t2),
    )


def build_ours(
    bc: C.BenchConfig, hf_s, hf_t, batch: dict, *, scan: bool, maps_from=None, compile: bool = True, **kw
) -> dict:
    """`make_jax_step` (its keywords `kw`) on our models converted from the HF ones (the peer's weights)."""
    t0 = time.perf_counter()
    tcfg, scfg = bc.teacher.replace(scan_layers=scan), bc.student.replace(scan_layers=scan)
    teacher, student = C.jax_from_hf(tcfg, hf_t), C.jax_from_hf(scfg, hf_s)
    convert_s = time.perf_counter() - t0
    out = make_jax_step(tcfg, scfg, teacher, student, batch, maps_from=maps_from, compile=compile, **kw)
    out["times"] = dict(convert_s=convert_s, **out["times"])
    return out


class OursRunner:
    """Calls the compiled step, threading the (donated) state through; blocks on the result."""

    def __init__(self, built: dict):
        self.b, self.state = built, built["state"]

    def __call__(self) -> dict:
        b = self.b
        self.state, metrics = b["compiled"](self.state, b["frozen"], b["teacher"], b["inputs"])
        jax.block_until_ready((self.state, metrics))
        return metrics


def ours_terms(metrics: dict) -> dict:
    return dict(
        rkl=float(metrics["loss/rkl"]),
        feat_image=float(metrics["loss/feat_image/0"]),
        feat_text=float(metrics["loss/feat_text/0"]),
    )


# ----------------------------------------------------------------------------------------------- one config
def twin_models_and_batch(bc: C.BenchConfig):
    """(hf teacher, hf student, numpy batch, torch batch with NCHW pixels) of a bench config."""
    torch.manual_seed(0)
    hf_t, hf_s = C.hf_llava(bc.teacher, seed=1), C.hf_llava(bc.student, seed=2)
    batch = C.token_batch(bc, seed=0)
    tb = {
        k: torch.from_numpy(v).float() if k == "pixel_values" else torch.from_numpy(v).long()
        for k, v in batch.items()
    }
    tb["pixel_values"] = tb["pixel_values"].permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return hf_t, hf_s, batch, tb


def torch_feature_map(bc: C.BenchConfig, kernel) -> torch.nn.Linear:
    """The peer's student -> teacher feature map with our map's weights."""
    fmap = torch.nn.Linear(bc.student.text.hidden_size, bc.teacher.text.hidden_size, bias=False)
    with torch.no_grad():
        fmap.weight.copy_(torch.from_numpy(np.array(kernel.T)))
    return fmap


def with_threads(fn, n: int):
    """fn run with torch using n intra-op threads (restored afterwards)."""

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def run_config(
    bc: C.BenchConfig, *, warmup: int, reps: int, threads: list[int], lean: bool, unrolled_timing: bool
) -> dict:
    hf_t, hf_s, batch, tb = twin_models_and_batch(bc)
    C.log(f"{bc.name}: building and compiling our step")
    ours = build_ours(bc, hf_s, hf_t, batch, scan=True)
    fmap = torch_feature_map(bc, ours["map_kernel"])
    kinds = ("all", "answer") if lean else ("all",)
    peers = {
        k: torch_ref.TorchDistillStep(
            hf_s, hf_t, fmap, lr=LR, logits=k, image_token_id=bc.student.image_token_id
        )
        for k in kinds
    }
    # loss check at the initial weights (before any update): the same numbers on both sides
    with torch.no_grad():
        torch_terms = {k: {n: v.item() for n, v in p.loss(tb)[1].items()} for k, p in peers.items()}
    run_ours = OursRunner(ours)
    t0 = time.perf_counter()
    jax_terms = ours_terms(run_ours())
    first_call_s = time.perf_counter() - t0
    rel = max(abs(jax_terms[n] - t[n]) / max(abs(t[n]), 1e-6) for t in torch_terms.values() for n in t)

    # counted FLOPs: XLA cost analysis of an UNROLLED build of our step (a scanned body is counted once; the
    # lowered, pre-optimisation HLO, so no second compile), FlopCounterMode over one peer step
    C.log(f"{bc.name}: counting FLOPs")
    un = build_ours(bc, hf_s, hf_t, batch, scan=False, maps_from=ours["map_kernel"], compile=unrolled_timing)
    counted = dict(
        ours=float(un["lowered"].cost_analysis()["flops"]),
        ours_scanned_xla=float(ours["compiled"].cost_analysis()["flops"]),
    )
    name = lambda kind, n: ("torch" if kind == "all" else "torch_lean") + f"_{n}t"
    fns = {"ours": run_ours}
    for kind in kinds:
        with torch_ref.flop_counter_mode() as fc:
            peers[kind](tb)
        for n in threads:
            counted[name(kind, n)] = float(fc.get_total_flops())
            fns[name(kind, n)] = with_threads(lambda p=peers[kind]: p(tb), n)
    if unrolled_timing:
        fns["ours_unrolled"] = OursRunner(un)
        counted["ours_unrolled"] = counted["ours"]

    C.log(f"{bc.name}: timing {list(fns)}, {warmup} warm-up + {reps} runs each")
    times = time_interleaved(fns, warmup=warmup, reps=reps)
    # model FLOPs: the least work that computes the step (ours: packed views, LM head at the answer positions,
    # CLIP up to the used layer); every implementation's rate uses this one numerator
    model_flops = step_flops(bc, logits="answer", vision_layers="used", packed=True)
    analytic = dict(
        ours=model_flops,
        ours_unpacked=step_flops(bc, logits="answer", vision_layers="used"),
        torch=step_flops(bc, logits="all", vision_layers="all"),
        torch_lean=step_flops(bc, logits="answer", vision_layers="all"),
    )
    analytic_of = lambda impl: analytic[
        "ours" if impl.startswith("ours") else "torch_lean" if impl.startswith("torch_lean") else "torch"
    ]
    tokens = bc.batch * bc.seq_len
    rows = {}
    for impl, t in times.items():
        med = t["median_s"]
        rows[impl] = dict(
            impl=impl,
            step_ms=1e3 * med,
            tokens_per_s=tokens / med,
            model_gflops=model_flops / med / 1e9,  # the same useful work for everyone
            executed_gflops=counted[impl] / med / 1e9,
            analytic_flops=analytic_of(impl),
            counted_flops=counted[impl],
            times_s=t["times_s"],
        )
    torch_rows = [r for k, r in rows.items() if k.startswith("torch")]
    best_torch = min(torch_rows, key=lambda r: r["step_ms"])
    return dict(
        config=bc.name,
        batch=bc.batch,
        seq_len=bc.seq_len,
        image_tokens=bc.image_tokens,
        loss_tokens=bc.loss_tokens,
        tokens_per_step=tokens,
        rows=rows,
        ratio=best_torch["step_ms"] / rows["ours"]["step_ms"],
        ratio_vs=best_torch["impl"],
        ratios={k: r["step_ms"] / rows["ours"]["step_ms"] for k, r in rows.items() if k != "ours"},
        analytic_flops=analytic,
        flops_check=dict(
            xla_unrolled_over_analytic=counted["ours"] / analytic["ours"],
            **{
                f"{k}_counted_over_analytic": counted[f"{k}_{threads[0]}t"] / analytic[k]
                for k in ("torch", "torch_lean")
                if f"{k}_{threads[0]}t" in counted
            },
        ),
        loss_check=dict(
            ours=jax_terms,
            **{("torch" if k == "all" else "torch_lean"): v for k, v in torch_terms.items()},
            max_rel_diff=rel,
        ),
        ours_compile=dict(ours["times"], first_call_s=first_call_s),
    )


def time_interleaved(fns: dict, *, warmup: int, reps: int, burst_s: float | None = None) -> dict:
    """Warm-up each, then `reps` rounds; in each round every implementation runs one burst of back-to-back
    calls (alternating under shared load). A sample is the burst's time per call.

    Bursts measure the steady state of a training loop, where calls follow each other. Single calls
    alternating between implementations would measure cold starts instead: thread pools (torch's OpenMP
    workers, XLA's Eigen pool) go to sleep between calls and caches are cold. Measured on our tiny step:
    28 ms per call back-to-back, 44 ms for a call after 0.25 s of idling; torch lean 53 vs 56-63 ms.
    The burst length is ceil(burst_s / the last warm-up call's time); calls slower than burst_s run once
    (burst_s = 0: single calls). Default: `common.BURST_S` (the scripts' --burst_s).
    """
    burst_s = C.BURST_S if burst_s is None else burst_s
    n_of = {}
    for k, f in fns.items():
        dt = 0.0
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
        n_of[k] = max(1, math.ceil(burst_s / max(dt, 1e-6)))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(n_of[k]):
                f()
            times[k].append((time.perf_counter() - t0) / n_of[k])
    return {
        k: dict(median_s=float(np.median(v)), min_s=min(v), burst=n_of[k], times_s=[round(x, 6) for x in v])
        for k, v in times.items()
    }


def ceilings(n: int, threads: list[int]) -> dict:
    """fp32 matmul GFLOP/s: jitted jnp.dot and torch.mm at each torch thread count."""
    out = dict(jax=C.jax_matmul_gflops(n))
    for t in threads:
        out[f"torch_{t}t"] = with_threads(lambda: C.torch_matmul_gflops(n), t)()
    return out


def main():
    p = C.parser(__doc__)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--torch_threads", default="", help="comma list; default: all cores (= XLA's pool) and 1")
    p.add_argument("--unrolled_timing", action="store_true", help="also compile and time an unrolled build")
    a = p.parse_args()
    C.BURST_S = a.burst_s
    names = ["tiny"] if a.quick else a.configs.split(",")
    warmup, reps = (0, 1) if a.quick else (a.warmup, a.reps)
    cores = C.set_torch_threads()
    threads = (
        [int(t) for t in a.torch_threads.split(",")]
        if a.torch_threads
        else ([1] if a.quick or cores == 1 else [cores, 1])
    )  # quick: 1 thread (least sensitive to a loaded machine)
    n = 256 if a.quick else a.matmul_n
    load_before = C.machine()["loadavg_1m"]
    ceiling_before = ceilings(n, threads)
    results = [
        run_config(
            C.bench_config(c),
            warmup=warmup,
            reps=reps,
            threads=threads,
            lean=not a.quick,
            unrolled_timing=a.unrolled_timing,
        )
        for c in names
    ]
    ceiling_after = ceilings(n, threads)
    peak = max(*ceiling_before.values(), *ceiling_after.values())
    out = []
    for res in results:
        for r in res["rows"].values():
            r["executed_pct_of_ceiling"] = 100 * r["executed_gflops"] / peak
            out.append(dict(config=res["config"], **{k: v for k, v in r.items() if k != "times_s"}))
    fmt = lambda c: ", ".join(f"{k} {v:.1f}" for k, v in c.items())
    print(
        f"\nfp32 matmul ceiling n={n} (GFLOP/s): before [{fmt(ceiling_before)}], after [{fmt(ceiling_after)}]"
    )
    print(
        C.table(
            out,
            [
                "config",
                "impl",
                "step_ms",
                "tokens_per_s",
                "model_gflops",
                "executed_gflops",
                "executed_pct_of_ceiling",
            ],
        )
    )
    for res in results:
        print(
            f"{res['config']}: ours is {res['ratio']:.2f}x the fastest torch variant ({res['ratio_vs']}); "
            f"loss max rel diff {res['loss_check']['max_rel_diff']:.1e}; FLOP checks "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["flops_check"].items())
            + "; ours: "
            + ", ".join(f"{k} {v:.1f}" for k, v in res["ours_compile"].items())
        )
    machine = C.machine()
    machine["loadavg_1m_before"] = load_before
    C.write_result(
        "step",
        dict(
            name="step",
            quick=a.quick,
            command=" ".join(sys.argv),
            machine=machine,
            matmul_ceiling_gflops=dict(before=ceiling_before, after=ceiling_after, peak=peak),
            torch_threads=threads,
            warmup=warmup,
            reps=reps,
            configs=results,
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
