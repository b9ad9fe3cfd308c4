"""Which of the CPU benchmark's known costs exist on a TPU? Compiles the same programs for XLA:CPU and, with
libtpu's deviceless compiler (the `plan` extra), for one TPU v5p chip, and counts in the optimised HLO the
bytes that pure data-movement ops write (standalone dynamic-slice / slice / copy / transpose / convert
fusions, i.e. moves that are NOT fused into the matmul that reads them), weighted by loop trip counts. On
the TPU, what is staged into on-chip memory (memory space S(1)) for a matmul is counted apart (`to_vmem`).

Programs (bench/common.py's `tiny` pair, the models bench/step.py and bench/rollout.py time):
* `rollout`: the teacher-mixed sampling (alpha 0.2): moved bytes per generated token (the decode loop's body,
  layer loops included), next to the bytes of both models' weights that one token reads;
* `step`: the distillation step of bench/step.py (fixed response): moved bytes per step.

    python bench/hlo_costs.py [--configs tiny] [--targets cpu,tpu] [--dtypes fp32,recipe] [--dump DIR]
    (--quick: XLA:CPU and fp32 only, no libtpu needed)

No device is used: nothing runs, both compilers only compile. Results in bench/results/hlo_costs.json.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import sys
import time
from collections import Counter
from unittest import mock

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common as C  # noqa: E402
from rskd_jax.distill import rollout as R  # noqa: E402
from rskd_jax.models import LlavaModel  # noqa: E402

NEW_TOKENS = 32
_MOVE_OPS = {"dynamic-slice", "slice", "copy", "transpose", "convert", "bitcast", "reshape", "broadcast"}
_SHAPE = re.compile(r"(pred|s8|u8|s32|u32|f32|bf16|f16|s16|u16|f64|s64|u64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f64": 8, "s64": 8, "u64": 8}


# ----------------------------------------------------------------------------------------------- HLO text
def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed)."""
    total = 0
    for dt, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dt, 4)
    return total


def parse_instruction(line: str) -> tuple | None:
    """(name, shape, opcode, rest) of one HLO instruction line (tuple shapes may hold `/*index=5*/`)."""
    m = re.match(r"^\s*(?:ROOT )?(%\S+) = ", line)
    if not m:
        return None
    tail, end = line[m.end() :], 0
    if tail.startswith("("):
        depth = 0
        for i, ch in enumerate(tail):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                end = i + 1
                break
    else:
        end = tail.find(" ")
    op = re.match(r"\s*([a-z][\w-]*)\((.*)$", tail[end:])
    return (m.group(1), tail[:end], op.group(1), op.group(2)) if op else None


def computations(hlo: str) -> dict[str, list[tuple]]:
    """name -> [(instruction name, shape, opcode, rest of line)] for every computation of the module."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%\S+) .*\{\s*$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
            if line.startswith("ENTRY"):
                comps["ENTRY"] = current
            continue
        parsed = parse_instruction(line) if current is not None else None
        if parsed:
            current.append(parsed)
    return comps


def _called(rest: str, key: str) -> str | None:
    m = re.search(key + r"=(%[\w.\-]+)", rest)
    return m.group(1) if m else None


def is_move(comps: dict, op: str, rest: str) -> str | None:
    """The data-movement kind of a standalone instruction (None when it computes something)."""
    if op in ("copy", "transpose", "dynamic-slice", "slice", "convert"):
        return op
    if op != "fusion":
        return None
    inner = {o for _, _, o, _ in comps.get(_called(rest, "calls"), [])} - {"parameter", "constant"}
    if inner and inner <= _MOVE_OPS:
        for kind in ("dynamic-slice", "transpose", "convert", "copy", "slice"):
            if kind in inner:
                return kind
    return None


def trip_count(comps: dict, rest: str) -> int:
    """A while's trip count: the s32 bound its condition compares the counter with (lax.scan / fori loops
    and the decode loop count from 0), 1 when the condition holds none."""
    cond = comps.get(_called(rest, "condition"), [])
    bounds = [
        int(m.group(1))
        for _, shape, op, r in cond
        if op == "constant" and shape.startswith("s32[]")
        for m in [re.match(r"(-?\d+)\)", r)]
        if m
    ]
    return max(bounds, default=1)


def moved_bytes(comps: dict, name: str, weight: int = 1, out: Counter | None = None) -> Counter:
    """Bytes written by standalone data-movement ops under computation `name`, each while body weighted by
    its trip count, conditionals' branches counted once."""
    out = Counter() if out is None else out
    for _, shape, op, rest in comps.get(name, []):
        kind = is_move(comps, op, rest)
        if kind and "S(1)" in shape:  # TPU memory space 1 (on-chip VMEM): staging an operand, not HBM traffic
            out["to_vmem"] += weight * shape_bytes(shape)
        elif kind:
            out[kind] += weight * shape_bytes(shape)
        elif op == "while":
            moved_bytes(comps, _called(rest, "body"), weight * trip_count(comps, rest), out)
        elif op in ("call", "conditional"):
            for callee in re.findall(r"(%[\w.\-]+)", rest.split("calls=")[-1] if "calls=" in rest else rest):
                if callee in comps and callee != name and any(x[2] != "parameter" for x in comps[callee]):
                    moved_bytes(comps, callee, weight, out)
    return out


def decode_body(comps: dict) -> str | None:
    """The rollout's decode loop: the top-level while whose body holds the models' layer loops."""
    for _, _, op, rest in comps["ENTRY"]:
        body = _called(rest, "body") if op == "while" else None
        if body and any(x[2] == "while" for x in comps.get(body, [])):
            return body
    return None


# ----------------------------------------------------------------------------------------------- programs
def target_device(target: str):
    if target == "cpu":
        return jax.devices("cpu")[0]
    from rskd_jax.train.plan import get_topology, target_devices  # noqa: PLC0415 (needs libtpu)

    return target_devices(get_topology("v5p-8"), "tpu")[0]


def abstract(tree, device):
    sh = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


def rollout_hlo(bc: C.BenchConfig, device) -> str:
    s_gd, s_st = nnx.split(nnx.eval_shape(lambda: LlavaModel(bc.student, rngs=nnx.Rngs(0))))
    t_gd, t_st = nnx.split(nnx.eval_shape(lambda: LlavaModel(bc.teacher, rngs=nnx.Rngs(0))))
    b = C.token_batch(bc)
    cfg = R.SamplingConfig(max_new_tokens=NEW_TOKENS, alpha=0.2)

    def run(s_st, t_st, ids, mask, pixels, key):
        s, t = nnx.merge(s_gd, s_st), nnx.merge(t_gd, t_st)
        return R.sample(s, t, ids, mask, key, cfg, eos_id=-1, pad_id=0, pixel_values=pixels)

    args = [s_st, t_st, b["prompt_ids"], b["prompt_mask"], b["pixel_values"], jnp.zeros((2,), jnp.uint32)]
    return jax.jit(run).lower(*abstract(args, device)).compile().as_text()


def step_hlo(bc: C.BenchConfig, device) -> str:
    from bench import step as S  # noqa: PLC0415 (imports torch)

    teacher = LlavaModel(bc.teacher, rngs=nnx.Rngs(1))
    student = LlavaModel(bc.student, rngs=nnx.Rngs(2))
    batch = C.token_batch(bc)
    built = S.make_jax_step(bc.teacher, bc.student, teacher, student, batch, compile=False)
    args = abstract((built["state"], built["frozen"], built["teacher"], built["inputs"]), device)
    with mock.patch.object(R, "sample", S.fixed_sampler(batch["response"])):  # as bench/step.py times it
        return built["step"].lower(*args).compile().as_text()


def weight_bytes(cfg) -> int:
    shapes = nnx.state(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def with_dtypes(bc: C.BenchConfig, dtypes: str) -> C.BenchConfig:
    """fp32: the bench's configs; recipe: the real preset's dtypes (bf16 compute, bf16 frozen teacher
    weights, fp32 student master weights)."""
    if dtypes == "fp32":
        return bc
    if dtypes != "recipe":
        raise ValueError(f"--dtypes {dtypes!r}: expected fp32 or recipe")
    teacher = bc.teacher.replace(dtype="bfloat16", param_dtype="bfloat16")
    return dataclasses.replace(bc, teacher=teacher, student=bc.student.replace(dtype="bfloat16"))


def measure(bc: C.BenchConfig, target: str, dump: pathlib.Path | None, dtypes: str) -> list[dict]:
    device = target_device(target)
    bc = with_dtypes(bc, dtypes)
    rows = []
    for program, build in (("rollout", rollout_hlo), ("step", step_hlo)):
        per = 1
        t0 = time.perf_counter()
        hlo = build(bc, device)
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{program}_{bc.name}_{dtypes}_{target}.hlo.txt").write_text(hlo)
        comps = computations(hlo)
        moved = moved_bytes(comps, "ENTRY")
        if program == "rollout":  # one decode token: the decode loop's body (its layer loops included)
            moved = moved_bytes(comps, decode_body(comps))
            per = 1
        unit = "decode token" if program == "rollout" else "step"
        row = dict(config=bc.name, dtypes=dtypes, target=target, program=program, per=unit)
        row["compile_s"] = time.perf_counter() - t0
        row.update({f"{k}_MB": v / per / 1e6 for k, v in sorted(moved.items())})
        row["moved_MB"] = sum(v for k, v in moved.items() if k != "to_vmem") / per / 1e6
        if program == "rollout":
            row["weights_MB"] = (weight_bytes(bc.student) + weight_bytes(bc.teacher)) / 1e6
        rows.append(row)
        C.log(f"{bc.name} {dtypes} {target} {program}: {row['moved_MB']:.2f} MB moved per {unit}")
    return rows


def main():
    p = C.parser(__doc__)
    p.add_argument("--configs", default="tiny")
    p.add_argument("--targets", default="cpu,tpu")
    p.add_argument("--dtypes", default="fp32,recipe", help="fp32 (the bench configs) and/or recipe")
    p.add_argument("--dump", default=None, help="directory for the compiled HLO texts")
    a = p.parse_args()
    if a.quick:  # no libtpu needed
        a.targets, a.dtypes = "cpu", "fp32"
    rows = []
    for name in a.configs.split(","):
        for dtypes in a.dtypes.split(","):
            for target in a.targets.split(","):
                dump = pathlib.Path(a.dump) if a.dump else None
                rows += measure(C.bench_config(name), target, dump, dtypes)
    cols = [
        "config",
        "dtypes",
        "target",
        "program",
        "per",
        "moved_MB",
        "dynamic-slice_MB",
        "copy_MB",
        "transpose_MB",
    ]
    cols += ["convert_MB", "to_vmem_MB", "weights_MB"]
    print(C.table(rows, cols))
    C.write_result("hlo_costs", dict(rows=rows, quick=a.quick, machine=C.machine()), a.out)


if __name__ == "__main__":
    main()
