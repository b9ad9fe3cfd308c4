"""The whole distillation step, rollout included: what a user pays per step, against the PyTorch peer doing
the same work (MiniLLM-style: the teacher-mixed sampling loop with KV caches, then the two-view losses).

* ours           rskd_jax.distill.step.make_train_step (bench/step.py's StepSpec: weights {rkl, feat_image,
                 feat_text}, final hidden states aligned) running its own teacher-mixed rollout: R = 32 new
                 tokens (the config's loss tokens) at alpha 0.2, temperature 1, no EOS stop; then the packed
                 student forward + backward, the losses and the AdamW update. Teacher prefix reuse on (the
                 default, `loss.reuse_teacher_prefix`): the teacher's prompt and response states come from the
                 rollout, so after it the teacher only runs the ground-truth answer against its cached prompt;
* ours_no_reuse  the same step with the reuse off (the teacher's packed forward over [GT | response]);
* torch / torch_lean  torch_ref.mixed_sample (MiniLLM's loop: each model with its own KV cache, the
                 probabilities mixed per step, Python per token) for the same R tokens, then
                 torch_ref.TorchDistillStep on the sampled response (teacher + student forwards over prompt +
                 response and over the GT conversation, reverse KL, feature alignment, AdamW); the LM head at
                 every position (torch) or only at the response positions (torch_lean); 2 threads and 1.

The samples differ between the sides (different random streams), the work does not (fixed length). Checked:
ours and ours_no_reuse give the same losses from the same state and key (`reuse_check`), and the peer's loss
terms are finite. Timing as bench/step.py (`time_interleaved`: bursts, alternating rounds); ratios = the
fastest torch variant's time / ours.

    python bench/full_step.py [--configs tiny,small] [--quick] [--reps 5]
"""

from __future__ import annotations

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import torch  # noqa: E402

from bench import common as C  # noqa: E402
from bench import torch_ref  # noqa: E402
from bench.step import (  # noqa: E402
    LR,
    OursRunner,
    build_ours,
    time_interleaved,
    torch_feature_map,
    twin_models_and_batch,
    with_threads,
)

ALPHA = 0.2


def _first_losses(built: dict) -> dict:
    """Loss terms of one step from the built initial state (the state is not advanced)."""
    b = built
    state = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, b["state"])
    _, m = b["compiled"](state, b["frozen"], b["teacher"], b["inputs"])
    return {k: float(v) for k, v in m.items() if k.startswith(("loss/", "rollout/length"))}


def run_config(bc: C.BenchConfig, *, warmup: int, reps: int, threads: list[int], lean: bool) -> dict:
    hf_t, hf_s, batch, tb = twin_models_and_batch(bc)
    r = bc.loss_tokens
    C.log(f"{bc.name}: building and compiling our whole step (with and without teacher prefix reuse)")
    ours = build_ours(bc, hf_s, hf_t, batch, scan=True, sampled=True, reuse=True)
    no_reuse = build_ours(
        bc, hf_s, hf_t, batch, scan=True, sampled=True, reuse=False, maps_from=ours["map_kernel"]
    )
    reuse_check = dict(ours=_first_losses(ours), ours_no_reuse=_first_losses(no_reuse))
    a, b = reuse_check["ours"], reuse_check["ours_no_reuse"]
    reuse_check["max_rel_diff"] = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in b)

    fmap = torch_feature_map(bc, ours["map_kernel"])
    kinds = ("all", "answer") if lean else ("all",)
    img = bc.student.image_token_id
    gen = torch.Generator().manual_seed(0)
    prompt = (tb["prompt_ids"], tb["prompt_mask"], tb["pixel_values"])

    def peer_step(peer):
        ro = torch_ref.mixed_sample(
            hf_s, hf_t, *prompt, max_new_tokens=r, alpha=ALPHA, image_token_id=img, generator=gen
        )
        return peer(dict(tb, response=ro["tokens"]))

    fns = {"ours": OursRunner(ours), "ours_no_reuse": OursRunner(no_reuse)}
    peer_terms = {}
    for kind in kinds:
        peer = torch_ref.TorchDistillStep(hf_s, hf_t, fmap, lr=LR, logits=kind, image_token_id=img)
        name = "torch" if kind == "all" else "torch_lean"
        peer_terms[name] = peer_step(peer)
        for n in threads:
            fns[f"{name}_{n}t"] = with_threads(lambda p=peer: peer_step(p), n)
    finite = all(math.isfinite(v) for t in peer_terms.values() for v in t.values())

    C.log(f"{bc.name}: timing {list(fns)}, {warmup} warm-up + {reps} runs each")
    times = time_interleaved(fns, warmup=warmup, reps=reps)
    tokens = bc.batch * bc.seq_len
    rows = {
        k: dict(
            impl=k, step_ms=1e3 * t["median_s"], tokens_per_s=tokens / t["median_s"], times_s=t["times_s"]
        )
        for k, t in times.items()
    }
    best = min((v for k, v in rows.items() if k.startswith("torch")), key=lambda v: v["step_ms"])
    return dict(
        config=bc.name,
        batch=bc.batch,
        seq_len=bc.seq_len,
        prompt_len=bc.prompt_len,
        new_tokens=r,
        alpha=ALPHA,
        rows=rows,
        ratio=best["step_ms"] / rows["ours"]["step_ms"],
        ratio_no_reuse=best["step_ms"] / rows["ours_no_reuse"]["step_ms"],
        ratio_vs=best["impl"],
        reuse_speedup=rows["ours_no_reuse"]["step_ms"] / rows["ours"]["step_ms"],
        ratios={k: v["step_ms"] / rows["ours"]["step_ms"] for k, v in rows.items() if k != "ours"},
        reuse_check=reuse_check,
        peer_terms=peer_terms,
        peer_finite=finite,
        ours_compile=dict(ours["times"]),
    )


def main():
    p = C.parser(__doc__)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--torch_threads", default="", help="comma list; default: all cores (= XLA's pool) and 1")
    a = p.parse_args()
    C.BURST_S = a.burst_s
    names = ["tiny"] if a.quick else a.configs.split(",")
    warmup, reps = (0, 1) if a.quick else (a.warmup, a.reps)
    cores = C.set_torch_threads()
    threads = (
        [int(t) for t in a.torch_threads.split(",")]
        if a.torch_threads
        else ([1] if a.quick or cores == 1 else [cores, 1])
    )
    load_before = C.machine()["loadavg_1m"]
    results = [
        run_config(C.bench_config(c), warmup=warmup, reps=reps, threads=threads, lean=not a.quick)
        for c in names
    ]
    rows = [
        dict(config=r["config"], **{k: v for k, v in row.items() if k != "times_s"})
        for r in results
        for row in r["rows"].values()
    ]
    print(C.table(rows, ["config", "impl", "step_ms", "tokens_per_s"]))
    for r in results:
        print(
            f"{r['config']}: ours is {r['ratio']:.2f}x the fastest torch variant ({r['ratio_vs']}), "
            f"{r['ratio_no_reuse']:.2f}x without teacher prefix reuse (reuse: {r['reuse_speedup']:.2f}x); "
            f"reuse loss check max rel diff {r['reuse_check']['max_rel_diff']:.1e}"
        )
    machine = C.machine()
    machine["loadavg_1m_before"] = load_before
    C.write_result(
        "full_step",
        dict(
            name="full_step",
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
