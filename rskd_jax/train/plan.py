"""Ahead-of-time memory / FLOPs plan of one training step for a target slice, on a machine without it.

`plan(config, "v5p-64")` builds the teacher and student abstractly (`nnx.eval_shape`: nothing is allocated),
makes the SAME step the trainer runs (`rskd_jax.distill.step.make_train_step` with the logical-axis sharding
rules) on a mesh over the target's devices, lowers it from `jax.ShapeDtypeStruct` inputs and compiles it:

* TPU targets use libtpu's compiler with no TPU attached (`jax.experimental.topologies.get_topology_desc`;
  `pip install -e .[plan]`). Run the process with JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1 (launch/plan.py
  does it).
* Without libtpu (and for GPU targets) it compiles for N fake CPU devices
  (`--xla_force_host_platform_device_count=N`). That is a PESSIMISTIC estimate: XLA:CPU upcasts bf16 dots to
  f32, keeps f32 copies of bf16 weights and full f32 attention scores (about +36% temporaries for the 13B->7B
  step, ../shared/reference/aot-plan.md), and models no TPU collectives.

Reported per device (XLA's `memory_analysis()` fields are per device): argument, output, alias, temporary and
generated-code bytes, total = arg + out - alias + temp + code (MaxText's convention) against the chip's HBM
with a margin, `peak_memory_in_bytes` (meaningful on TPU only; XLA:CPU repeats the argument size), FLOPs per
step computed analytically (`step_flops`; XLA's cost analysis counts a while/scan body once, so it is printed
for reference only) and the step time at 100% / 40% MFU from the chip's peak bf16 FLOP/s.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import resource
import time
from collections.abc import Callable

GIB = 1024**3


# ----------------------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Topology:
    """A target slice. `devices` = JAX devices (chips; megacore TPUs show one device per chip)."""

    name: str
    chip: str
    devices: int
    hbm_bytes: int  # per device
    peak_flops: float  # dense bf16 FLOP/s per device
    platform: str = "tpu"  # 'tpu' (libtpu deviceless compile) or 'gpu' (always fake CPU devices here)
    topology_name: str | None = None  # libtpu name, e.g. 'v5:2x4x4'
    chip_config: str = "default"  # 'megacore' for v4 / v5p
    host_bounds: tuple = (2, 2, 1)
    wrap: tuple = (False, False, False)


_V5P, _V4, _V5E = (95 * GIB, 459e12), (32 * GIB, 275e12), (16 * GIB, 197e12)
# Slice names count TensorCores for v4 / v5p (v5p-64 = 32 chips) and chips for v5e (MaxText's
# accelerator_to_spec_map: v5p-64 -> 'v5:2x4x4', megacore, 32 devices).
_TPU = {
    "v5p-8": ("v5p", "v5:2x2x1", 4, _V5P), "v5p-16": ("v5p", "v5:2x2x2", 8, _V5P),
    "v5p-32": ("v5p", "v5:2x2x4", 16, _V5P), "v5p-64": ("v5p", "v5:2x4x4", 32, _V5P),
    "v5p-128": ("v5p", "v5:4x4x4", 64, _V5P),
    "v4-8": ("v4", "v4:2x2x1", 4, _V4), "v4-16": ("v4", "v4:2x2x2", 8, _V4), "v4-32": ("v4", "v4:2x2x4", 16, _V4),
    "v4-64": ("v4", "v4:2x4x4", 32, _V4),
    "v5e-16": ("v5e", "v5e:4x4", 16, _V5E), "v5e-32": ("v5e", "v5e:4x8", 32, _V5E),
    "v5e-64": ("v5e", "v5e:8x8", 64, _V5E), "v5e-128": ("v5e", "v5e:8x16", 128, _V5E),
    "v5e-256": ("v5e", "v5e:16x16", 256, _V5E),
}
TOPOLOGIES: dict[str, Topology] = {
    name: Topology(name, chip, n, hbm, peak, "tpu", topo, "default" if chip == "v5e" else "megacore",
                   (2, 2, 1), (True, True, True) if n >= 64 and chip != "v5e" else
                   (True, True, False) if chip == "v5e" and n >= 256 else (False, False, False))
    for name, (chip, topo, n, (hbm, peak)) in _TPU.items()
}
TOPOLOGIES["8xH100"] = Topology("8xH100", "H100", 8, 80 * 10**9, 989e12, "gpu")


def get_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise KeyError(f"--topology {name!r} is unknown; known: {', '.join(TOPOLOGIES)} "
                       "(v4 / v5p names count TensorCores: v5p-64 = 32 chips)")
    return TOPOLOGIES[name]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def backend_for(topo: Topology, backend: str = "auto") -> str:
    """'tpu' (libtpu deviceless compile) or 'cpu' (fake CPU devices, pessimistic). `backend`: auto | tpu | cpu."""
    if backend not in ("auto", "tpu", "cpu"):
        raise ValueError(f"backend={backend!r}: expected auto, tpu or cpu")
    if backend == "tpu" and (topo.platform != "tpu" or not libtpu_available()):
        raise RuntimeError(f"backend 'tpu' for {topo.name}: " + (
            "libtpu not installed (pip install -e .[plan])" if topo.platform == "tpu" else "not a TPU target"))
    if backend == "cpu":
        return "cpu"
    return "tpu" if topo.platform == "tpu" and libtpu_available() else "cpu"


def target_devices(topo: Topology, backend: str) -> list:
    import jax  # noqa: PLC0415
    if backend == "tpu":
        from jax.experimental import topologies  # noqa: PLC0415
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                            chip_config_name=topo.chip_config, chips_per_host_bounds=topo.host_bounds,
                                            num_slices=1, wrap=topo.wrap)
        devs = list(desc.devices)
    else:
        devs = jax.devices("cpu")
    if len(devs) != topo.devices:
        raise RuntimeError(
            f"{topo.name} needs {topo.devices} devices, this process has {len(devs)} {backend} devices; start it "
            f"with XLA_FLAGS=--xla_force_host_platform_device_count={topo.devices} (launch/plan.py re-executes "
            "itself with it)")
    return devs


# ----------------------------------------------------------------------------------------------- models
# Defaults the plan applies to a config preset when the config leaves the field unset (flags override both).
# geochat13b_to_7b: bf16 compute, bf16 frozen teacher, fp32 student master weights, per-layer full remat.
PRESET_DEFAULTS = {
    "geochat13b_to_7b": dict(compute_dtype="bfloat16", teacher_param_dtype="bfloat16", student_param_dtype=None,
                             remat="full"),
}


def model_config(config, section, *, dtype=None, param_dtype=None, remat=None):
    """The LlavaConfig a config section names, without a tokenizer (cf. rskd_jax.train.run.model_config).

    Vocabulary: the 'tiny' preset gets `data.vocab_size` (the size the demo trains its tokenizer to); real
    presets keep theirs (Vicuna's 32000). A converted checkpoint's own config is not read.
    """
    from rskd_jax.models import get_preset  # noqa: PLC0415
    base = get_preset(section.preset)
    vision = dataclasses.replace(base.vision, image_size=config.data.image_size, **dict(section.vision))
    text_kw = dict(section.text)
    if section.preset == "tiny":
        text_kw.setdefault("vocab_size", int(config.data.vocab_size))
    text = dataclasses.replace(base.text, **text_kw)
    over = dict(section.overrides)
    for key, value in (("dtype", dtype), ("param_dtype", param_dtype), ("remat_policy", remat)):
        if value is not None:
            over[key] = value
    return base.replace(vision=vision, text=text, **over)


def resolve_settings(config, *, compute_dtype=None, teacher_param_dtype=None, student_param_dtype=None,
                     remat=None) -> dict:
    """Flags > the config's model overrides > PRESET_DEFAULTS > the model defaults. Returns the chosen values and
    where each came from."""
    preset = PRESET_DEFAULTS.get(config.get("preset", ""), {})
    out = {}
    for key, flag, section, field in (
            ("compute_dtype", compute_dtype, None, "dtype"),
            ("teacher_param_dtype", teacher_param_dtype, "teacher", "param_dtype"),
            ("student_param_dtype", student_param_dtype, "student", "param_dtype"),
            ("remat", remat, "student", "remat_policy")):
        sections = [section] if section else ["student", "teacher"]
        in_cfg = [config[s].overrides.get(field) for s in sections if field in config[s].overrides]
        if flag is not None:
            out[key] = (flag, "flag")
        elif in_cfg:
            out[key] = (None, "config")
        elif preset.get(key) is not None:
            out[key] = (preset[key], f"plan default for {config.preset}")
        else:
            out[key] = (None, "model default")
    return out


def model_configs(config, settings: dict):
    """(student_cfg, teacher_cfg) with the resolved dtype / remat settings applied."""
    dt = settings["compute_dtype"][0]
    s_cfg = model_config(config, config.student, dtype=dt, param_dtype=settings["student_param_dtype"][0],
                         remat=settings["remat"][0])
    t_cfg = model_config(config, config.teacher, dtype=dt, param_dtype=settings["teacher_param_dtype"][0])
    return s_cfg, t_cfg


def build_abstract(config, s_cfg, t_cfg, spec):
    """Abstract (eval_shape) DistillStudent (LoRA + feature maps as the distill stage adds them) and teacher."""
    from flax import nnx  # noqa: PLC0415

    from rskd_jax.distill import step as S  # noqa: PLC0415
    from rskd_jax.models import LlavaModel, LoRAConfig, apply_lora  # noqa: PLC0415

    def make_student():
        model = LlavaModel(s_cfg, rngs=nnx.Rngs(0))
        if config.trainable == "lora":
            lo = config.lora
            apply_lora(model, LoRAConfig(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets)),
                       rngs=nnx.Rngs(1))
        feat = spec.w("feat_image") + spec.w("feat_text") > 0
        maps = S.feature_maps_for(spec.feature_layers if feat else (), s_cfg, t_cfg, nnx.Rngs(2),
                                  with_proj=spec.w("feat_proj") > 0)
        return S.DistillStudent(model, maps)

    student = nnx.eval_shape(make_student)
    teacher = nnx.eval_shape(lambda: LlavaModel(t_cfg, rngs=nnx.Rngs(0)))
    return student, teacher


def abstract_batch(config, batch_size: int, sharding) -> dict:
    """ShapeDtypeStructs of one global batch in the data pipeline's contract (rskd_jax.data.transforms)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    d = config.data
    sds = lambda shape, dt: jax.ShapeDtypeStruct((batch_size, *shape), dt, sharding=sharding)
    return dict(pixel_values=sds((d.image_size, d.image_size, 3), jnp.float32),
                input_ids=sds((d.seq_len,), jnp.int32), attention_mask=sds((d.seq_len,), jnp.int32),
                loss_mask=sds((d.seq_len,), jnp.int32), prompt_ids=sds((d.prompt_len,), jnp.int32),
                prompt_mask=sds((d.prompt_len,), jnp.int32))


def _with_shardings(tree, shardings):
    """`tree` (arrays / ShapeDtypeStructs, possibly inside nnx Variables) as ShapeDtypeStructs carrying the
    shardings of the matching leaves of `shardings` (a tree of the same leaf order)."""
    import jax  # noqa: PLC0415
    leaves, treedef = jax.tree.flatten(tree)
    sh = jax.tree.leaves(shardings)
    if len(sh) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(sh)} shardings")
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, sh)])


@dataclasses.dataclass
class Lowered:
    """Everything `lower_step` built: the jitted step, its abstract arguments, the step spec and model configs."""

    step: Callable
    args: tuple  # (state, frozen, teacher, batch) as sharded ShapeDtypeStructs
    spec: object
    student_cfg: object
    teacher_cfg: object
    trainable_paths: list
    mesh: object
    lowered: object = None


def lower_step(config, devices, *, batch_size: int | None = None, settings: dict | None = None) -> Lowered:
    """Builds the trainer's step on a mesh over `devices` and lowers it from abstract inputs (nothing allocated)."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from rskd_jax.distill import step as S  # noqa: PLC0415
    from rskd_jax.parallel import mesh as mesh_lib  # noqa: PLC0415

    settings = settings if settings is not None else resolve_settings(config)
    s_cfg, t_cfg = model_configs(config, settings)
    spec = S.spec_from_config(config, s_cfg)
    m = config.mesh
    mesh = mesh_lib.make_mesh((m.data, m.fsdp, m.tensor), devices=devices)
    b = int(batch_size or config.data.batch_size)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % spec.grad_accum or b % n_batch:
        raise ValueError(f"global batch {b} (config data.batch_size / --batch_size) must be divisible by "
                         f"optim.grad_accum={spec.grad_accum} and by data*fsdp={n_batch}")
    student, teacher = build_abstract(config, s_cfg, t_cfg, spec)
    tx = S.make_optimizer(config.optim)
    with jax.set_mesh(mesh):
        init, step, parts = S.make_train_step(student, teacher, spec, tx, config.trainable, mesh=mesh)
        sh = parts["shardings"]
        params = _with_shardings(parts["params"], sh["params"])
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sh["replicated"])
        state = _with_shardings(jax.eval_shape(init, params, key), sh["state"])
        frozen = _with_shardings(parts["frozen"], sh["frozen"])
        t_state = _with_shardings(parts["teacher"], sh["teacher"]) if teacher is not None else None
        batch = abstract_batch(config, b, NamedSharding(mesh, P(("data", "fsdp"))))
        args = (state, frozen, t_state, batch)
        lowered = step.lower(*args)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(parts["params"])[0]]
    return Lowered(step, args, spec, s_cfg, t_cfg, paths, mesh, lowered)


# ----------------------------------------------------------------------------------------------- FLOPs
FLOPS_CONVENTION = (
    "matmul FLOPs (2*m*n*k, rskd_jax.eval.flops) of the whole global step, then / devices. Forward passes: rollout "
    "prefill of both models (prompt attends to all P+R cache slots), R decode steps of both (1 token x P+R slots, "
    "next-token head), student (grad) + teacher forwards over prompt+response and over the ground-truth sequence "
    "(no head), vision once per sequence if shared_vision else in every call with pixels (layers up to "
    "vision_feature_layer). Vocabulary heads run in remat'ed sequence chunks (padded to the chunk size): teacher "
    "x2 (forward + recompute), student x(3 + dW). Student grad passes: forward x(1 + remat recompute + dX + dW), "
    "dX/dW = 1 when needed (attention scores and LoRA adapters count dW = 1), remat recompute = 1 for 'full' / "
    "'nothing_saveable' (attention only for 'dots_with_no_batch_dims_saveable'), else 0. Feature maps x3. Decode "
    "runs all R steps (early EOS stop not assumed). Norms, softmax, elementwise ops are not counted.")

_RECOMPUTE = {"none": (0, 0), "everything_saveable": (0, 0), "dots_saveable": (0, 0),
              "dots_with_no_batch_dims_saveable": (0, 1), "full": (1, 1), "nothing_saveable": (1, 1),
              "save_attn_mlp_out": (1, 1)}  # (dense, attention-score) matmuls recomputed in the backward pass


def trainable_parts(paths) -> dict:
    """Which student components have trainable weights, from the trainable parameter paths."""
    has = lambda pred: any(pred(p) for p in paths)
    is_lora = lambda p: "lora_a" in p or "lora_b" in p
    return dict(
        vision=has(lambda p: p.startswith("model/vision/")),
        projector=has(lambda p: p.startswith("model/projector/")),
        embed=has(lambda p: p.startswith("model/llm/embed_tokens")),
        llm_dense=has(lambda p: p.startswith("model/llm/layers/") and not is_lora(p)),
        lora=has(lambda p: p.startswith("model/llm/") and is_lora(p)),
        head=has(lambda p: p.startswith("model/llm/lm_head")),
    )


def _lora_fwd(cfg, tokens: int, lora) -> int:
    """Forward FLOPs of LoRA adapters x@A@B on the decoder's targeted projections, all layers."""
    if lora is None:
        return 0
    t = cfg.text
    d, i, q, kv = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = dict(q_proj=(d, q), k_proj=(d, kv), v_proj=(d, kv), o_proj=(q, d), gate_proj=(d, i), up_proj=(d, i),
                  down_proj=(i, d))
    return t.num_layers * sum(2 * tokens * lora.rank * (a + b) for n, (a, b) in shapes.items() if n in lora.targets)


def _llm_parts(t, tokens: int, keys: int) -> tuple[int, int]:
    """(dense, attention-score) forward FLOPs of the decoder layers: `tokens` queries attending `keys` keys."""
    from rskd_jax.eval import flops as F  # noqa: PLC0415
    f = F.llm_flops(t, tokens, logits_positions=0)
    attn = t.num_layers * 2 * 2 * tokens * keys * t.num_heads * t.head_dim
    return f["layers"] - f["attention"], attn


def step_flops(config, s_cfg, t_cfg, spec, trainable_paths, batch_size: int | None = None) -> dict:
    """Analytic FLOPs of one global training step (FLOPS_CONVENTION), by component, and the total."""
    from rskd_jax.eval import flops as F  # noqa: PLC0415
    d = config.data
    b = int(batch_size or d.batch_size)
    tr = trainable_parts(trainable_paths)
    lora = config.lora if tr["lora"] else None
    rho_dense, rho_attn = _RECOMPUTE[s_cfg.remat_policy]
    upstream = tr["vision"] or tr["projector"] or tr["embed"] or tr["llm_dense"] or tr["lora"]
    dx = 1 if upstream else 0
    n_img = F.image_tokens(s_cfg)
    ds, dt_ = s_cfg.text.hidden_size, t_cfg.text.hidden_size

    def vision(cfg):
        return F.vision_flops(cfg.vision, F._vision_layers(cfg, "used"))["total"]

    def fwd_pass(cfg, tokens, keys, own_vision, lora_cfg=None):  # frozen forward (teacher / rollout)
        dense, attn = _llm_parts(cfg.text, tokens, keys)
        return dense + attn + F.projector_flops(cfg, n_img) * bool(own_vision is not None) + \
            (vision(cfg) if own_vision else 0) + _lora_fwd(cfg, tokens, lora_cfg)

    def grad_pass(tokens, own_vision):  # student forward + backward over `tokens` (no head)
        dense, attn = _llm_parts(s_cfg.text, tokens, tokens)
        out = dense * (1 + rho_dense + dx + tr["llm_dense"]) + attn * (1 + rho_attn + dx + 1)
        out += _lora_fwd(s_cfg, tokens, lora) * (1 + rho_dense + dx + 1)
        vis_dx = tr["vision"] and own_vision
        if own_vision is not None:
            out += F.projector_flops(s_cfg, n_img) * (1 + tr["projector"] + vis_dx)
        if own_vision:
            out += vision(s_cfg) * (1 + 2 * tr["vision"])
        return out

    def head(cfg, positions):
        return 2 * positions * cfg.text.hidden_size * cfg.text.vocab_size

    def padded(n):
        c = min(spec.chunk_size, n)
        return -(-n // c) * c

    has_img = True  # the trainer's batches always carry pixel_values
    shared = spec.shared_vision and has_img
    own = None if not has_img else (not shared)  # None: no image; False: projector only; True: vision + projector
    parts = {}
    if shared:
        parts["vision (shared teacher tower)"] = vision(t_cfg)
    if spec.needs_rollout:
        p, r = int(d.prompt_len), int(spec.sampling.max_new_tokens)
        total = p + r
        parts["rollout prefill"] = (fwd_pass(s_cfg, p, total, own, lora) + head(s_cfg, 1) +
                                    fwd_pass(t_cfg, p, total, own) + head(t_cfg, 1))
        parts["rollout decode"] = r * (fwd_pass(s_cfg, 1, total, None, lora) + head(s_cfg, 1) +
                                       fwd_pass(t_cfg, 1, total, None) + head(t_cfg, 1))
        parts["student fwd+bwd (prompt+response)"] = grad_pass(total, own)
        parts["teacher fwd (prompt+response)"] = fwd_pass(t_cfg, total, total, own)
        parts["heads (response chunks)"] = (head(s_cfg, padded(r)) * (3 + tr["head"]) +
                                            head(t_cfg, padded(r)) * 2)
    gt = [k for k in ("sft", "fkl", "feat_image", "feat_text", "feat_proj") if spec.w(k) > 0]
    if gt:
        n = int(d.seq_len)
        parts["student fwd+bwd (ground truth)"] = grad_pass(n, own)
        if spec.needs_teacher_gt:
            parts["teacher fwd (ground truth)"] = fwd_pass(t_cfg, n, n, own)
        use_fkl = spec.w("fkl") > 0
        if spec.w("sft") > 0 or use_fkl:
            parts["heads (ground-truth chunks)"] = (head(s_cfg, padded(n)) * (3 + tr["head"]) +
                                                    head(t_cfg, padded(n)) * 2 * use_fkl)
        maps = 0
        if spec.w("feat_image") + spec.w("feat_text") > 0:
            maps += len(spec.feature_layers) * 2 * n * ds * dt_ * 3
        if spec.w("feat_proj") > 0:
            maps += 2 * n_img * ds * dt_ * 3
        if maps:
            parts["feature maps"] = maps
    per_seq = sum(parts.values())
    return dict(per_sequence=per_seq, total=b * per_seq, batch_size=b,
                components={k: b * v for k, v in parts.items()}, convention=FLOPS_CONVENTION)


# ----------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class PlanResult:
    topology: str
    chip: str
    backend: str  # 'tpu' (libtpu) or 'cpu' (fake devices, pessimistic)
    devices: int
    mesh: dict
    batch_size: int
    grad_accum: int
    settings: dict  # name -> [value, source]
    memory: dict  # per device, bytes: argument, output, alias, temp, code, total, peak (None when meaningless)
    hbm_bytes: int
    margin: float
    fits: bool
    flops: dict  # analytic: total (global), per_device, components, convention
    xla_flops_per_device: float | None
    step_time_s: dict  # {"100%": s, "40%": s}
    timings: dict  # seconds: build, lower, compile; host peak RSS GiB
    label: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def memory_stats(compiled, backend: str) -> dict:
    """Per-device bytes from `compiled.memory_analysis()`; total = arg + out - alias + temp + code."""
    ma = compiled.memory_analysis()
    m = dict(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
             alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes),
             code=int(ma.generated_code_size_in_bytes))
    m["total"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
    peak = getattr(ma, "peak_memory_in_bytes", None)
    m["peak"] = int(peak) if backend == "tpu" and peak is not None else None
    return m


def plan(config, topology: str | Topology, *, batch_size: int | None = None, remat: str | None = None,
         compute_dtype: str | None = None, teacher_param_dtype: str | None = None,
         student_param_dtype: str | None = None, hbm_bytes: int | None = None, margin: float = 0.10,
         dump_hlo: str | os.PathLike | None = None, backend: str = "auto",
         log: Callable[[str], None] = print) -> PlanResult:
    """Compiles one training step of `config` for `topology` ahead of time and sizes it (module docstring)."""
    import jax  # noqa: PLC0415
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    backend = backend_for(topo, backend)
    label = ("libtpu deviceless compile for " + topo.topology_name if backend == "tpu" else
             f"PESSIMISTIC XLA:CPU estimate ({topo.devices} fake CPU devices standing in for {topo.chip}"
             f"{'' if topo.platform != 'tpu' else '; libtpu not installed: pip install -e .[plan]' if not libtpu_available() else '; --backend cpu'})")
    t0 = time.perf_counter()
    log(f"[plan] {topo.name}: {topo.devices} x {topo.chip}, {label}")
    devices = target_devices(topo, backend)
    settings = resolve_settings(config, compute_dtype=compute_dtype, teacher_param_dtype=teacher_param_dtype,
                                student_param_dtype=student_param_dtype, remat=remat)
    log("[plan] building abstract teacher / student and the train step, lowering ...")
    lo = lower_step(config, devices, batch_size=batch_size, settings=settings)
    t_lower = time.perf_counter() - t0
    log(f"[plan] lowered in {t_lower:.1f} s; compiling ({'libtpu: about 1-3 min' if backend == 'tpu' else 'XLA:CPU'})"
        " ...")
    t1 = time.perf_counter()
    compiled = lo.lowered.compile()
    t_compile = time.perf_counter() - t1
    log(f"[plan] compiled in {t_compile:.1f} s (host peak RSS {_rss_gib():.2f} GiB)")
    if dump_hlo:
        out = pathlib.Path(dump_hlo)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{topo.name}.hlo.txt").write_text(compiled.as_text())
        log(f"[plan] wrote {out / f'step_{topo.name}.hlo.txt'}")
    mem = memory_stats(compiled, backend)
    hbm = int(hbm_bytes if hbm_bytes is not None else topo.hbm_bytes)
    b = int(batch_size or config.data.batch_size)
    fl = step_flops(config, lo.student_cfg, lo.teacher_cfg, lo.spec, lo.trainable_paths, b)
    fl["per_device"] = fl["total"] / topo.devices
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
    times = {f"{int(u * 100)}%": fl["per_device"] / (topo.peak_flops * u) for u in (1.0, 0.4)}
    settings_out = {k: [v if v is not None else _actual(k, lo), src] for k, (v, src) in settings.items()}
    del jax
    return PlanResult(
        topology=topo.name, chip=topo.chip, backend=backend, devices=topo.devices, mesh=dict(lo.mesh.shape),
        batch_size=b, grad_accum=lo.spec.grad_accum, settings=settings_out, memory=mem, hbm_bytes=hbm,
        margin=margin, fits=mem["total"] <= (1 - margin) * hbm, flops=fl, xla_flops_per_device=xla_flops,
        step_time_s=times, timings=dict(lower_s=t_lower, compile_s=t_compile, total_s=time.perf_counter() - t0,
                                        host_peak_rss_gib=_rss_gib()), label=label)


def _actual(key: str, lo: Lowered):
    return dict(compute_dtype=lo.student_cfg.dtype, teacher_param_dtype=lo.teacher_cfg.param_dtype,
                student_param_dtype=lo.student_cfg.param_dtype, remat=lo.student_cfg.remat_policy)[key]


def format_table(r: PlanResult) -> str:
    """Human-readable report (Markdown table + notes)."""
    g = lambda x: "n/a" if x is None else f"{x / GIB:.2f}"
    m = r.memory
    budget = (1 - r.margin) * r.hbm_bytes
    lines = [
        f"## plan: {r.topology} ({r.devices} x {r.chip}), mesh {r.mesh}, global batch {r.batch_size} "
        f"(grad_accum {r.grad_accum})",
        f"{r.label}",
        "settings: " + ", ".join(f"{k}={v} ({src})" for k, (v, src) in r.settings.items()),
        "",
        "| per device (GiB) | argument | output | alias | temp | code | **total** | HBM | budget (-{:.0%}) | peak |"
        .format(r.margin),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.topology} | {g(m['argument'])} | {g(m['output'])} | {g(m['alias'])} | {g(m['temp'])} | "
        f"{g(m['code'])} | **{g(m['total'])}** | {g(r.hbm_bytes)} | {g(budget)} | {g(m['peak'])} |",
        "",
        f"total = argument + output - alias + temp + code = {m['total']:,} bytes per device "
        f"({100 * m['total'] / r.hbm_bytes:.1f}% of HBM)",
        f"peak_memory_in_bytes: {g(m['peak']) + ' GiB' if m['peak'] is not None else 'n/a (XLA:CPU repeats the argument size)'}",
        f"FLOPs per step (analytic): {r.flops['total']:.3e} global, {r.flops['per_device']:.3e} per device",
    ]
    for k, v in r.flops["components"].items():
        lines.append(f"    {k:<36s} {v:.3e}")
    xf = "n/a" if r.xla_flops_per_device is None else f"{r.xla_flops_per_device:.3e}"
    lines += [
        f"XLA cost_analysis flops per device: {xf} (counts each while/scan body ONCE: layers, decode steps, "
        "chunks and micro-batches are not multiplied; not used)",
        f"step time per device at 100% MFU: {r.step_time_s['100%']:.3f} s, at 40% MFU: {r.step_time_s['40%']:.3f} s "
        f"(peak {_peak(r):.0f} TFLOP/s bf16)",
        f"compile {r.timings['compile_s']:.1f} s, lower {r.timings['lower_s']:.1f} s, host peak RSS "
        f"{r.timings['host_peak_rss_gib']:.2f} GiB",
        f"verdict: {'FITS' if r.fits else 'DOES NOT FIT'} ({g(m['total'])} GiB vs {g(budget)} GiB budget = "
        f"{g(r.hbm_bytes)} GiB HBM - {r.margin:.0%} margin)",
    ]
    return "\n".join(lines)


def _peak(r: PlanResult) -> float:
    return r.flops["per_device"] / r.step_time_s["100%"] / 1e12 if r.step_time_s["100%"] else 0.0


def write_json(r: PlanResult, path) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(r.to_json(), indent=2, default=str))

