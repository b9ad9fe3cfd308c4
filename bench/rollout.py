"""Teacher-mixed sampling throughput: rskd_jax's compiled rollout vs transformers' `generate` and a
MiniLLM-style PyTorch loop (bench/torch_ref.py), same weights, same prompts (image + left-padded text).

Implementations (all sample at temperature 1 without top-k/top-p, a fixed number of new tokens, no EOS stop,
the image placeholder suppressed, KV caches everywhere):
* ours          rskd_jax.distill.rollout.sample, student + teacher mixed (alpha 0.2), one jit-compiled
                prefill + lax.while_loop;
* ours_student  the same loop on the student alone (alpha 0), the like-for-like peer of `generate`;
* generate      transformers' student.generate(do_sample=True) (the student alone);
* minillm       the MiniLLM loop: student and teacher with their own KV caches, probabilities mixed per step.
tokens/s = batch x new tokens / median time of one whole rollout (prefill included). The recorded log-probs
of each side are checked against a full (cache-free) transformers forward over the sampled tokens.

    python bench/rollout.py [--configs tiny,small] [--new_tokens 32] [--quick]
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common as C  # noqa: E402
from bench import torch_ref  # noqa: E402
from bench.step import time_interleaved, with_threads  # noqa: E402
from rskd_jax.distill import rollout as R  # noqa: E402

ALPHA = 0.2


def jax_sampler(cfg: R.SamplingConfig, eos_id: int, pad_id: int, with_teacher: bool):
    """jit-compiled rollout taking the models as (pytree) arguments."""

    def run(student, teacher, ids, mask, pixels, key):
        return R.sample(
            student,
            teacher if with_teacher else None,
            ids,
            mask,
            key,
            cfg,
            eos_id=eos_id,
            pad_id=pad_id,
            pixel_values=pixels,
        )

    return jax.jit(run)


@torch.no_grad()
def full_forward_logprobs(model, ids, mask, pixels, tokens, image_token_id) -> np.ndarray:
    """log-probs of `tokens` under `model` from one cache-free forward over prompt + tokens."""
    full = torch.cat([ids, tokens], 1)
    fmask = torch.cat([mask, torch.ones_like(tokens)], 1)
    logits = (
        model(
            input_ids=full, pixel_values=pixels, attention_mask=fmask, position_ids=torch_ref.positions(fmask)
        )
        .logits[:, ids.shape[1] - 1 : -1]
        .float()
    )
    logits[..., image_token_id] = -float("inf")
    return F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].numpy()


def run_config(
    bc: C.BenchConfig,
    *,
    new_tokens: int,
    warmup: int,
    reps: int,
    threads: list[int],
    peers: bool = True,
    student_only: bool = True,
    unrolled: bool = False,
) -> dict:
    torch.manual_seed(0)
    hf_t, hf_s = C.hf_llava(bc.teacher, seed=1).eval(), C.hf_llava(bc.student, seed=2).eval()
    models = {True: (C.jax_from_hf(bc.student, hf_s), C.jax_from_hf(bc.teacher, hf_t))}
    if unrolled:  # the same weights with scan_layers=False (per-layer arrays: no slicing in the decode loop)
        un = lambda cfg, hf: C.jax_from_hf(cfg.replace(scan_layers=False), hf)
        models[False] = (un(bc.student, hf_s), un(bc.teacher, hf_t))
    batch = C.token_batch(bc, seed=0)
    img, pad = bc.student.image_token_id, bc.student.pad_token_id
    ids, mask = torch.from_numpy(batch["prompt_ids"]).long(), torch.from_numpy(batch["prompt_mask"]).long()
    pixels = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous()
    j_in = [jnp.asarray(batch[k]) for k in ("prompt_ids", "prompt_mask", "pixel_values")]
    cfg = R.SamplingConfig(max_new_tokens=new_tokens, alpha=ALPHA)
    cfg_s = R.SamplingConfig(max_new_tokens=new_tokens, alpha=0.0)
    compile_s, fns, outs = {}, {}, {}
    variants = [("ours", cfg, True, True)] + ([("ours_student", cfg_s, False, True)] if student_only else [])
    if unrolled:
        variants += [("ours_unrolled", cfg, True, False)]
        variants += [("ours_student_unrolled", cfg_s, False, False)] if student_only else []
    C.log(f"{bc.name}: compiling our rollout ({[v[0] for v in variants]})")
    for name, c, mixed, scan in variants:
        student, teacher = models[scan]
        fn = jax_sampler(c, eos_id=-1, pad_id=pad, with_teacher=mixed)
        t0 = time.perf_counter()
        compiled = fn.lower(student, teacher, *j_in, jax.random.key(0)).compile()
        compile_s[name] = time.perf_counter() - t0
        keys = iter(jax.random.split(jax.random.key(1), 10**4))

        def call(compiled=compiled, keys=keys, student=student, teacher=teacher):
            return jax.block_until_ready(compiled(student, teacher, *j_in, next(keys)))

        outs[name], fns[name] = call(), call
    gen = torch.Generator().manual_seed(0)

    def minillm():  # MiniLLM's loop: each model with its own KV cache, probabilities mixed per step
        return torch_ref.mixed_sample(
            hf_s,
            hf_t,
            ids,
            mask,
            pixels,
            max_new_tokens=new_tokens,
            alpha=ALPHA,
            image_token_id=img,
            generator=gen,
        )

    if peers:
        for n in threads:
            sfx = f"_{n}t"
            fns["generate" + sfx] = with_threads(
                lambda: hf_s.generate(
                    input_ids=ids,
                    pixel_values=pixels,
                    attention_mask=mask,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    suppress_tokens=[img],
                    pad_token_id=pad,
                ),
                n,
            )
            fns["minillm" + sfx] = with_threads(minillm, n)
    # check: each side's recorded log-probs == a cache-free transformers forward over its sampled tokens
    ours_tok = torch.from_numpy(np.array(outs["ours"].tokens)).long()
    check = dict(
        ours_student_lp=np.abs(
            np.asarray(outs["ours"].student_logprobs)
            - full_forward_logprobs(hf_s, ids, mask, pixels, ours_tok, img)
        ).max(),
        ours_teacher_lp=np.abs(
            np.asarray(outs["ours"].teacher_logprobs)
            - full_forward_logprobs(hf_t, ids, mask, pixels, ours_tok, img)
        ).max(),
    )
    if peers:
        ml = minillm()
        check.update(
            minillm_student_lp=np.abs(
                ml["student_logprobs"].numpy()
                - full_forward_logprobs(hf_s, ids, mask, pixels, ml["tokens"], img)
            ).max(),
            minillm_teacher_lp=np.abs(
                ml["teacher_logprobs"].numpy()
                - full_forward_logprobs(hf_t, ids, mask, pixels, ml["tokens"], img)
            ).max(),
        )
    check = {k: float(v) for k, v in check.items()}

    C.log(f"{bc.name}: timing {list(fns)}, {warmup} warm-up + {reps} runs each")
    times = time_interleaved(fns, warmup=warmup, reps=reps)
    tokens = bc.batch * new_tokens
    rows = {
        k: dict(
            impl=k,
            rollout_ms=1e3 * t["median_s"],
            tokens_per_s=tokens / t["median_s"],
            ms_per_step=1e3 * t["median_s"] / new_tokens,
            times_s=t["times_s"],
        )
        for k, t in times.items()
    }
    best = lambda prefix: min(
        (r for k, r in rows.items() if k.startswith(prefix)), key=lambda r: r["rollout_ms"], default=None
    )
    ratios = {}
    # ours: the mixed rollout (scanned layers, the default); ours_student: the like-for-like peer of generate
    pairs = [("ours", "generate"), ("ours", "minillm"), ("ours_student", "generate")]
    pairs += [("ours_unrolled", "minillm"), ("ours_student_unrolled", "generate")]
    for mine, prefix in pairs:
        if best(prefix) and mine in rows:
            ratios[f"{mine}_vs_{prefix}"] = best(prefix)["rollout_ms"] / rows[mine]["rollout_ms"]
            ratios[f"{mine}_vs_{prefix}_peer"] = best(prefix)["impl"]
    return dict(
        config=bc.name,
        batch=bc.batch,
        prompt_len=bc.prompt_len,
        new_tokens=new_tokens,
        alpha=ALPHA,
        rows=rows,
        ratios=ratios,
        logprob_check_max_abs=check,
        ours_compile_s=compile_s,
    )


def main():
    p = C.parser(__doc__)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--torch_threads", default="", help="comma list; default: all cores (= XLA's pool) and 1")
    p.add_argument("--unrolled_timing", action="store_true", help="also time unrolled-layer builds")
    a = p.parse_args()
    C.BURST_S = a.burst_s
    names = ["tiny"] if a.quick else a.configs.split(",")
    warmup, reps = (0, 1) if a.quick else (a.warmup, a.reps)
    new_tokens = 4 if a.quick else a.new_tokens
    cores = C.set_torch_threads()
    threads = (
        [int(t) for t in a.torch_threads.split(",")]
        if a.torch_threads
        else ([1] if a.quick or cores == 1 else [cores, 1])
    )  # quick: 1 thread (least sensitive to a loaded machine)
    load_before = C.machine()["loadavg_1m"]
    results = [
        run_config(
            C.bench_config(n),
            new_tokens=new_tokens,
            warmup=warmup,
            reps=reps,
            threads=threads,
            student_only=not a.quick,
            unrolled=a.unrolled_timing,
        )
        for n in names
    ]
    rows = [
        dict(config=r["config"], **{k: v for k, v in row.items() if k != "times_s"})
        for r in results
        for row in r["rows"].values()
    ]
    print(C.table(rows, ["config", "impl", "rollout_ms", "tokens_per_s", "ms_per_step"]))
    for r in results:
        print(
            f"{r['config']}: "
            + ", ".join(f"{k} {v:.2f}x" if isinstance(v, float) else f"({v})" for k, v in r["ratios"].items())
            + f"; log-prob checks {r['logprob_check_max_abs']}; our compile {r['ours_compile_s']}"
        )
    machine = C.machine()
    machine["loadavg_1m_before"] = load_before
    C.write_result(
        "rollout",
        dict(
            name="rollout",
            quick=a.quick,
            command=" ".join(sys.argv),
            machine=machine,
            torch_threads=threads,
            warmup=warmup,
            reps=reps,
            configs=results,
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
