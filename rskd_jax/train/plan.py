"""Ahead-of-time memory / FLOPs plan of one training step for a target slice, on a machine without it.

`plan(config, "v5p-64")` builds the teacher and student abstractly (`nnx.eval_shape`: nothing is allocated),
makes the SAME step the trainer runs (`rskd_jax.distill.step.make_train_step` with the logical-axis sharding
rules) on a mesh over the target's devices, lowers it from sharded `jax.ShapeDtypeStruct` inputs and compiles:

* TPU targets: libtpu's compiler with no TPU attached (`jax.experimental.topologies.get_topology_desc`;
  `pip install -e .[plan]`), in a process started with JAX_PLATFORMS=cpu (launch/plan.py sets the
  environment).
* Without libtpu, and for GPU targets: N fake CPU devices (`--xla_force_host_platform_device_count=N`). This
  is a PESSIMISTIC estimate: XLA:CPU upcasts bf16 dots to f32, keeps f32 copies of bf16 weights and full f32
  attention scores (+36% temporaries on a 13B->7B step, ../shared/reference/aot-plan.md) and models no TPU
  collectives.

Reported per device (`memory_analysis()` fields are per device): argument, output, alias, temporary and
generated-code bytes; total = argument + output - alias + temp + code (MaxText's convention) against the
chip's HBM minus a margin; `peak_memory_in_bytes` on TPU (XLA:CPU just repeats the argument size). FLOPs per
step are analytic (`step_flops`, convention in FLOPS_CONVENTION): XLA's `cost_analysis()` counts a while/scan
body once (layers, decode steps, loss chunks, micro-batches), so it is printed for reference only. Step
time = analytic FLOPs per device / (peak bf16 FLOP/s x MFU). jit drops unused arguments (e.g. CLIP's final
LayerNorm with vision_feature_layer=-2) from the executable, so they are not in the argument bytes.
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
    """A target slice. `devices` = JAX devices = chips (v4 / v5p megacore: one device per chip)."""

    name: str
    chip: str
    devices: int
    hbm_bytes: int  # per device
    peak_flops: float  # dense bf16 FLOP/s per device
    platform: str = "tpu"  # 'tpu': libtpu deviceless compile; 'gpu': fake CPU devices only
    topology_name: str | None = None  # libtpu name, e.g. 'v5:2x4x4'
    chip_config: str = "megacore"
    wrap: tuple = (False, False, False)


_CHIPS = {
    "v5p": (95 * GIB, 459e12, "megacore"),
    "v4": (32 * GIB, 275e12, "megacore"),
    "v5e": (16 * GIB, 197e12, "default"),
}
# Names, shapes and wrap-around from MaxText's accelerator_to_spec_map. v4 / v5p names count TensorCores
# (v5p-64 = 32 chips), v5e names count chips.
_NF, _T3, _TTF = (False,) * 3, (True,) * 3, (True, True, False)
_SLICES = {
    "v5p-8": ("v5:2x2x1", 4, _NF),
    "v5p-16": ("v5:2x2x2", 8, _NF),
    "v5p-32": ("v5:2x2x4", 16, _NF),
    "v5p-64": ("v5:2x4x4", 32, _NF),
    "v5p-128": ("v5:4x4x4", 64, _T3),
    "v4-8": ("v4:2x2x1", 4, _NF),
    "v4-16": ("v4:2x2x2", 8, _NF),
    "v4-32": ("v4:2x2x4", 16, _NF),
    "v4-64": ("v4:2x4x4", 32, _NF),
    "v4-128": ("v4:4x4x4", 64, _T3),
    "v5e-16": ("v5e:4x4", 16, _NF),
    "v5e-32": ("v5e:4x8", 32, _NF),
    "v5e-64": ("v5e:8x8", 64, _NF),
    "v5e-128": ("v5e:8x16", 128, (False, True, False)),
    "v5e-256": ("v5e:16x16", 256, _TTF),
}
TOPOLOGIES: dict[str, Topology] = {
    name: Topology(name, chip, n, _CHIPS[chip][0], _CHIPS[chip][1], "tpu", topo, _CHIPS[chip][2], wrap)
    for name, (topo, n, wrap) in _SLICES.items()
    for chip in [name.split("-")[0]]
}
TOPOLOGIES["8xH100"] = Topology("8xH100", "H100", 8, 80 * 10**9, 989e12, "gpu", chip_config="")
TOPOLOGIES["8xA100-40GB"] = Topology("8xA100-40GB", "A100-40GB", 8, 40 * 10**9, 312e12, "gpu", chip_config="")
TOPOLOGIES["1xH100"] = Topology("1xH100", "H100", 1, 80 * 10**9, 989e12, "gpu", chip_config="")


def get_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise KeyError(
            f"--topology {name!r} is unknown; known: {', '.join(TOPOLOGIES)} "
            "(v4 / v5p names count TensorCores: v5p-64 = 32 chips)"
        )
    return TOPOLOGIES[name]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def backend_for(topo: Topology, backend: str = "auto") -> str:
    """'tpu' (libtpu deviceless compile) or 'cpu' (fake CPU devices). `backend`: auto | tpu | cpu."""
    if backend not in ("auto", "tpu", "cpu"):
        raise ValueError(f"backend={backend!r}: expected auto, tpu or cpu")
    tpu_ok = topo.platform == "tpu" and libtpu_available()
    if backend == "tpu" and not tpu_ok:
        why = (
            "not a TPU target" if topo.platform != "tpu" else "libtpu not installed (pip install -e .[plan])"
        )
        raise RuntimeError(f"backend 'tpu' for {topo.name}: {why}")
    return "tpu" if tpu_ok and backend != "cpu" else "cpu"


def target_devices(topo: Topology, backend: str) -> list:
    """The target's devices: libtpu topology devices (nothing attached), or this process's CPU devices."""
    import jax  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    if backend == "tpu":
        from jax.experimental import topologies  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

        devs = list(
            topologies.get_topology_desc(
                platform="tpu",
                topology_name=topo.topology_name,
                chip_config_name=topo.chip_config,
                chips_per_host_bounds=(2, 2, 1),
                num_slices=1,
                wrap=topo.wrap,
            ).devices
        )
    else:
        devs = jax.devices("cpu")
    if len(devs) != topo.devices:
        raise RuntimeError(
            f"{topo.name} needs {topo.devices} devices, this process has {len(devs)} {backend} devices: "
            f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={topo.devices} "
            "(launch/plan.py does)"
        )
    return devs


# ----------------------------------------------------------------------------------------------- models
_SETTINGS = (  # name, config section(s) holding the LlavaConfig field, field
    ("compute_dtype", ("student", "teacher"), "dtype"),
    ("teacher_param_dtype", ("teacher",), "param_dtype"),
    ("student_param_dtype", ("student",), "param_dtype"),
    ("remat", ("student",), "remat_policy"),
)


def resolve_settings(config, **flags) -> dict:
    """{name: (value or None, source)} for compute_dtype, teacher_param_dtype, student_param_dtype, remat.

    Precedence: a flag (keyword, not None) > the config's `<section>.overrides` (what training uses too) > the
    model default (value None: nothing is changed). Without flags the plan compiles the step training runs.
    """
    unknown = set(flags) - {s[0] for s in _SETTINGS}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    out = {}
    for name, sections, field in _SETTINGS:
        if flags.get(name) is not None:
            out[name] = (flags[name], "flag")
        elif any(field in config[s].overrides for s in sections):
            vals = {config[s].overrides[field] for s in sections if field in config[s].overrides}
            out[name] = (None, f"config ({'/'.join(sorted(map(str, vals)))})")
        else:
            out[name] = (None, "model default")
    return out


def run_ids(config):
    """The special ids of the run's tokenizer when the config names one that exists (as training reads)."""
    tok_dir = config.data.get("tokenizer", "")
    if not tok_dir or not (pathlib.Path(tok_dir) / "tokenizer_config.json").is_file():
        return None
    from rskd_jax.data import load_tokenizer, special_ids  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    return special_ids(load_tokenizer(tok_dir))


def model_config(config, section, ids=None, **fields):
    """The LlavaConfig a config section names (rskd_jax.build.model_config, as training builds it), with
    `fields` (LlavaConfig field -> value; None = unchanged) applied on top. A checkpoint's own config is not
    read: the section's sizes describe it (training checks that they agree)."""
    from rskd_jax import build  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    return build.model_config(config, section, ids).replace(
        **{k: v for k, v in fields.items() if v is not None}
    )


def model_configs(config, settings: dict):
    """(student_cfg, teacher_cfg) with resolved settings (`resolve_settings`) applied."""
    v = {k: val for k, (val, _) in settings.items()}
    dt = v["compute_dtype"]
    ids = run_ids(config)
    s_cfg = model_config(
        config, config.student, ids, dtype=dt, param_dtype=v["student_param_dtype"], remat_policy=v["remat"]
    )
    t_cfg = model_config(config, config.teacher, ids, dtype=dt, param_dtype=v["teacher_param_dtype"])
    return s_cfg, t_cfg


def build_abstract(config, s_cfg, t_cfg, spec):
    """Abstract StudentWithMaps (with LoRA and feature maps, as the distill stage adds them) and teacher."""
    from flax import nnx  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    from rskd_jax.distill import step as S  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    from rskd_jax.models import LlavaModel, LoRAConfig, apply_lora  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    def make_student():
        model = LlavaModel(s_cfg, rngs=nnx.Rngs(0))
        if config.trainable == "lora":
            lo = config.lora
            apply_lora(
                model,
                LoRAConfig(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets)),
                rngs=nnx.Rngs(1),
            )
        feat = spec.w("feat_image") + spec.w("feat_text") > 0
        maps = S.feature_maps_for(
            spec.feature_layers if feat else (), s_cfg, t_cfg, nnx.Rngs(2), with_proj=spec.w("feat_proj") > 0
        )
        return S.StudentWithMaps(model, maps)

    return nnx.eval_shape(make_student), nnx.eval_shape(lambda: LlavaModel(t_cfg, rngs=nnx.Rngs(0)))


def abstract_batch(config, batch_size: int, sharding) -> dict:
    """ShapeDtypeStructs of one global batch in the data pipeline's contract (rskd_jax.data.transforms)."""
    import jax  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    import jax.numpy as jnp  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    d = config.data
    sds = lambda shape, dt: jax.ShapeDtypeStruct((batch_size, *shape), dt, sharding=sharding)
    return dict(
        pixel_values=sds((d.image_size, d.image_size, 3), jnp.float32),
        input_ids=sds((d.seq_len,), jnp.int32),
        attention_mask=sds((d.seq_len,), jnp.int32),
        loss_mask=sds((d.seq_len,), jnp.int32),
        prompt_ids=sds((d.prompt_len,), jnp.int32),
        prompt_mask=sds((d.prompt_len,), jnp.int32),
    )


def _with_shardings(tree, shardings):
    """`tree`'s leaves (in nnx Variables too) as ShapeDtypeStructs with the matching leaves of `shardings`."""
    import jax  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    leaves, treedef = jax.tree.flatten(tree)
    sh = jax.tree.leaves(shardings)
    if len(sh) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(sh)} shardings")
    return jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, sh)]
    )


@dataclasses.dataclass
class Lowered:
    """What `lower_step` built: the jitted step, its abstract arguments, spec, model configs, the lowering."""

    step: Callable
    args: tuple  # (state, frozen student, teacher, batch) as sharded ShapeDtypeStructs
    spec: object
    student_cfg: object
    teacher_cfg: object
    trainable_paths: list  # '/'-joined paths of the trainable parameters
    mesh: object
    lowered: object


def lower_step(config, devices, *, batch_size: int | None = None, settings: dict | None = None) -> Lowered:
    """The trainer's step on a mesh over `devices`, lowered from abstract inputs (nothing is allocated)."""
    import jax  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    from flax import nnx  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    from jax.sharding import NamedSharding  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    from rskd_jax.distill import step as S  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)
    from rskd_jax.parallel import mesh as mesh_lib  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    s_cfg, t_cfg = model_configs(config, settings if settings is not None else resolve_settings(config))
    spec = S.spec_from_config(config, s_cfg)
    m = config.mesh
    mesh = mesh_lib.make_mesh((m.data, m.fsdp, m.tensor), devices=devices)
    b = int(batch_size or config.data.batch_size)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % spec.grad_accum or b % n_batch:
        raise ValueError(
            f"global batch {b} (config data.batch_size / --batch_size) must be divisible by "
            f"optim.grad_accum={spec.grad_accum} and by data*fsdp={n_batch}"
        )
    student, teacher = build_abstract(config, s_cfg, t_cfg, spec)
    tx = S.make_optimizer(config.optim)
    with jax.set_mesh(mesh):  # as in training: activation sharding constraints need the mesh
        init, step, parts = S.make_train_step(student, teacher, spec, tx, config.trainable, mesh=mesh)
        sh = parts["shardings"]
        params = _with_shardings(parts["params"], sh["params"])
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        key = jax.ShapeDtypeStruct((), key_dtype, sharding=sh["replicated"])
        state = _with_shardings(jax.eval_shape(init, params, key), sh["state"])
        frozen = _with_shardings(parts["frozen"], sh["frozen"])
        t_state = _with_shardings(parts["teacher"], sh["teacher"])
        batch = abstract_batch(config, b, NamedSharding(mesh, P(("data", "fsdp"))))
        args = (state, frozen, t_state, batch)
        lowered = step.lower(*args)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(parts["params"])]
    return Lowered(step, args, spec, s_cfg, t_cfg, paths, mesh, lowered)


# ----------------------------------------------------------------------------------------------- FLOPs
FLOPS_CONVENTION = (
    "Matmul FLOPs (2*m*n*k, as rskd_jax.eval.flops) of the whole global step; per device = global / devices. "
    "Counted per sequence: rollout prefill of both models over the prompt (attending all P+R cache slots) and"
    " R decode steps of both (1 token x P+R slots; all R steps, no early EOS stop), each with a 1-position "
    "head; student (with grad) and teacher forwards over prompt+response and over the ground truth, no head "
    "(with loss.reuse_teacher_prefix the teacher runs only the ground-truth tokens after the prompt, against "
    "the rollout's cached prompt: seq_len - prompt_len queries x max(P+R, seq_len) slots, no image); "
    "the vision tower up to vision_feature_layer once per sequence if shared_vision, else in every call with "
    "pixels. Vocabulary heads run in remat'ed chunks (positions padded to the chunk): teacher x2 (forward + "
    "recompute), student x(3 + 1 if lm_head trains). Student grad passes: forward x(1 + recompute + dX + dW),"
    " with dX = 1 when anything upstream trains, dW = 1 for trained weights, for LoRA adapters and for "
    "attention scores (both operands), recompute = 1 for remat 'full' / 'nothing_saveable' / "
    "'save_attn_mlp_out' (attention only for 'dots_with_no_batch_dims_saveable'). Projector x(1 + dW), "
    "feature maps x3. Norms, softmax and elementwise ops are not counted."
)

# remat policy -> (dense, attention-score) matmuls recomputed in the backward pass
_RECOMPUTE = {
    "none": (0, 0),
    "everything_saveable": (0, 0),
    "dots_saveable": (0, 0),
    "dots_with_no_batch_dims_saveable": (0, 1),
    "full": (1, 1),
    "nothing_saveable": (1, 1),
    "save_attn_mlp_out": (1, 1),
}
_LORA_SHAPES = {
    "q_proj": ("d", "q"),
    "k_proj": ("d", "kv"),
    "v_proj": ("d", "kv"),
    "o_proj": ("q", "d"),
    "gate_proj": ("d", "i"),
    "up_proj": ("d", "i"),
    "down_proj": ("i", "d"),
}


def trainable_parts(paths) -> dict:
    """Which student components train, from the '/'-joined trainable parameter paths."""
    is_lora = lambda p: "lora_a" in p or "lora_b" in p
    has = lambda prefix, lora=False: any(p.startswith(prefix) and is_lora(p) == lora for p in paths)
    return dict(
        vision=has("model/vision/"),
        projector=has("model/projector/"),
        embed=has("model/llm/embed"),
        llm_dense=has("model/llm/layers/"),
        lora=has("model/llm/", lora=True),
        head=has("model/llm/lm_head"),
    )


def _lora_fwd(text, tokens: int, lora) -> int:
    """Forward FLOPs of the LoRA adapters (x@A then @B) of all decoder layers; 0 without LoRA."""
    if lora is None:
        return 0
    dims = dict(
        d=text.hidden_size,
        i=text.intermediate_size,
        q=text.num_heads * text.head_dim,
        kv=text.num_kv_heads * text.head_dim,
    )
    per_layer = sum(
        2 * tokens * lora.rank * (dims[a] + dims[b])
        for name, (a, b) in _LORA_SHAPES.items()
        if name in lora.targets
    )
    return text.num_layers * per_layer


def _decoder(text, queries: int, keys: int) -> tuple[int, int]:
    """(dense, attention-score) forward FLOPs of the decoder: `queries` tokens attending `keys` keys."""
    from rskd_jax.eval import flops as F  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    f = F.llm_flops(text, queries, logits_positions=0)
    attn = text.num_layers * 2 * 2 * queries * keys * text.num_heads * text.head_dim
    return f["layers"] - f["attention"], attn


def teacher_flops(parts, fwd, p: int, r: int, n: int) -> dict:
    """The frozen teacher's forwards after a rollout (`parts`: distill.parts.StepParts): {component: FLOPs per
    sequence}. `fwd(queries, keys, with_image)`. With `loss.reuse_teacher_prefix` the rollout's states replace
    the teacher's response view and its prompt, so only the n - p ground-truth tokens after the prompt run,
    against the cached prompt (all max(P + R, P + n - p) cache slots); without it, the packed or the two
    separate forwards. Without a rollout, only a ground-truth forward ("forward")."""
    out = {}
    if parts.teacher_response == "packed":
        out["teacher fwd (packed ground truth + response)"] = fwd(n + r, n + r, True)
    elif parts.teacher_response == "forward":
        out["teacher fwd (prompt+response)"] = fwd(p + r, p + r, True)
    if parts.teacher_gt == "prefix":
        s = n - p
        if s <= 0:  # no room after the prompt: the ground-truth forward runs in full
            out["teacher fwd (ground truth)"] = fwd(n, n, True)
        else:
            out["teacher fwd (answer after the cached prompt)"] = fwd(s, max(p + r, p + s), False)
    elif parts.teacher_gt == "forward":
        out["teacher fwd (ground truth)"] = fwd(n, n, True)
    return out


def teacher_states_bytes(config, t_cfg, spec, devices: int, batch_size: int | None = None) -> dict:
    """Bytes per device of what prefix reuse keeps live from the rollout to the losses, per micro-batch: the
    teacher's KV cache (both phases) and its prompt / response hidden states (the batch over the devices)."""
    import numpy as np  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    if not (spec.reuse_teacher_prefix and spec.needs_rollout):
        return dict(cache=0, hidden=0, total=0)
    d, text = config.data, t_cfg.text
    micro = int(batch_size or d.batch_size) // spec.grad_accum
    p, r, n = int(d.prompt_len), int(spec.sampling.max_new_tokens), int(d.seq_len)
    item = np.dtype(t_cfg.dtype).itemsize
    slots = max(p + r, p + max(n - p, 0))
    cache = 2 * text.num_layers * micro * text.num_kv_heads * slots * text.head_dim * item
    kept = {i % (text.num_layers + 1) for _, i in spec.feature_layers} - {text.num_layers}
    hidden = micro * text.hidden_size * item * (p * (1 + len(kept)) + r + 1)
    if not spec.needs_teacher_gt:
        cache, hidden = 0, micro * text.hidden_size * item * (r + 1)
    per = lambda x: x // devices
    return dict(cache=per(cache), hidden=per(hidden), total=per(cache + hidden))


@dataclasses.dataclass(frozen=True)
class _Costs:
    """Forward / backward FLOPs per sequence of the step's model calls (FLOPS_CONVENTION)."""

    s_cfg: object
    t_cfg: object
    tr: dict  # trainable_parts
    lora: object  # the LoRA config when adapters train, else None
    shared: bool  # shared vision: the teacher's tower runs once per sequence, no model runs its own
    chunk: int  # loss.chunk_size

    def vision(self, cfg):
        from rskd_jax.eval import flops as F  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

        return F.vision_flops(cfg.vision, F._vision_layers(cfg, "used"))["total"]

    def image(self, cfg, with_image: bool):
        """Vision tower (own) + projector of one call, 0 for text-only calls."""
        from rskd_jax.eval import flops as F  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

        n_img = F.image_tokens(self.s_cfg)
        return (F.projector_flops(cfg, n_img) + (0 if self.shared else self.vision(cfg))) if with_image else 0

    def frozen_fwd(self, cfg, queries, keys, with_image, lora=None):
        dense, attn = _decoder(cfg.text, queries, keys)
        return dense + attn + self.image(cfg, with_image) + _lora_fwd(cfg.text, queries, lora)

    def student_grad(self, tokens):
        """Student forward + backward over `tokens` tokens (with the image)."""
        from rskd_jax.eval import flops as F  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

        s_cfg, tr, shared = self.s_cfg, self.tr, self.shared
        rc_dense, rc_attn = _RECOMPUTE[s_cfg.remat_policy]
        dx = int(any(tr[k] for k in ("vision", "projector", "embed", "llm_dense", "lora")))
        dense, attn = _decoder(s_cfg.text, tokens, tokens)
        out = dense * (1 + rc_dense + dx + tr["llm_dense"]) + attn * (2 + rc_attn + dx)
        out += _lora_fwd(s_cfg.text, tokens, self.lora) * (2 + rc_dense + dx)
        out += F.projector_flops(s_cfg, F.image_tokens(s_cfg)) * (
            1 + tr["projector"] + (tr["vision"] and not shared)
        )
        return out + (0 if shared else self.vision(s_cfg) * (1 + 2 * tr["vision"]))

    def heads(self, positions: int, teacher: bool) -> int:
        """The vocabulary heads over `positions` (padded to the chunk): student x(3 + dW), teacher x2."""
        n = -(-positions // min(self.chunk, positions)) * min(self.chunk, positions)
        head = lambda cfg: 2 * n * cfg.text.hidden_size * cfg.text.vocab_size
        return head(self.s_cfg) * (3 + self.tr["head"]) + head(self.t_cfg) * 2 * teacher

    def teacher_fwd(self, queries, keys, with_image):
        return self.frozen_fwd(self.t_cfg, queries, keys, with_image)


def rollout_flops(c: _Costs, p: int, r: int) -> dict:
    """Rollout: prefill of both models over the prompt and r decode steps, each with a 1-position head."""
    head1 = lambda cfg: 2 * cfg.text.hidden_size * cfg.text.vocab_size

    def both(queries, with_image):
        return (
            c.frozen_fwd(c.s_cfg, queries, p + r, with_image, c.lora)
            + head1(c.s_cfg)
            + c.frozen_fwd(c.t_cfg, queries, p + r, with_image)
            + head1(c.t_cfg)
        )

    return {"rollout prefill": both(p, True), "rollout decode": r * both(1, False)}


def response_view_flops(c: _Costs, parts, p: int, r: int, n: int) -> dict:
    """The response view: the student's forward + backward (packed with the ground truth or over prompt +
    response), the teacher's forwards after the rollout, and the response-chunk heads (rkl, pg)."""
    out = {}
    if parts.packed:
        out["student fwd+bwd (packed ground truth + response)"] = c.student_grad(n + r)
    else:
        out["student fwd+bwd (prompt+response)"] = c.student_grad(p + r)
    out.update(teacher_flops(parts, c.teacher_fwd, p, r, n))
    out["heads (response chunks)"] = c.heads(r, teacher=True)
    return out


def gt_view_flops(c: _Costs, parts, p: int, n: int) -> dict:
    """The ground-truth view: the student's own forward + backward (unless packed), the teacher's ground-truth
    forward when no rollout ran, and the answer-chunk heads (sft; fkl with the teacher's head)."""
    out = {}
    if not parts.packed:
        out["student fwd+bwd (ground truth)"] = c.student_grad(n)
    if not parts.rollout:
        out.update(teacher_flops(parts, c.teacher_fwd, p, 0, n))
    if parts.token_terms:
        out["heads (ground-truth chunks)"] = c.heads(n, teacher="fkl" in parts.token_terms)
    return out


def feature_flops(c: _Costs, parts, n: int) -> int:
    """The student->teacher feature maps (x3: forward, dX, dW) on every aligned layer's n positions and on the
    projected image tokens."""
    from rskd_jax.eval import flops as F  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    ds, dt = c.s_cfg.text.hidden_size, c.t_cfg.text.hidden_size
    return 3 * 2 * ds * dt * (n * len(parts.feature_layers) + F.image_tokens(c.s_cfg) * parts.feat_proj)


def step_flops(config, s_cfg, t_cfg, spec, trainable_paths, batch_size: int | None = None) -> dict:
    """Analytic FLOPs of one global training step (FLOPS_CONVENTION): total and by component, one component
    group per part of the step (`rskd_jax.distill.parts.step_parts`)."""
    from rskd_jax.distill.parts import step_parts  # noqa: PLC0415 (no jax before launch/plan.py sets XLA_FLAGS)

    d = config.data
    b = int(batch_size or d.batch_size)
    tr = trainable_parts(trainable_paths)
    parts = step_parts(spec)
    c = _Costs(s_cfg, t_cfg, tr, config.lora if tr["lora"] else None, parts.shared_vision, spec.chunk_size)
    p, n = int(d.prompt_len), int(d.seq_len)
    out = {}
    if parts.shared_vision:
        out["vision (shared teacher tower)"] = c.vision(t_cfg)
    if parts.rollout:
        r = int(spec.sampling.max_new_tokens)
        out.update(rollout_flops(c, p, r))
        out.update(response_view_flops(c, parts, p, r, n))
    if parts.gt:
        out.update(gt_view_flops(c, parts, p, n))
        maps = feature_flops(c, parts, n)
        if maps:
            out["feature maps"] = maps
    per_seq = sum(out.values())
    return dict(
        total=b * per_seq,
        per_sequence=per_seq,
        batch_size=b,
        components={k: b * v for k, v in out.items()},
        convention=FLOPS_CONVENTION,
    )


# ----------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class PlanResult:
    topology: str
    chip: str
    backend: str  # 'tpu' (libtpu) or 'cpu' (fake devices, pessimistic)
    label: str
    devices: int
    mesh: dict
    batch_size: int
    grad_accum: int
    settings: dict  # name -> [value, source]
    memory: dict  # bytes per device: argument, output, alias, temp, code, total, peak (None off TPU)
    error: str | None  # the compiler's out-of-memory message when it refused the program (then fits=False)
    hbm_bytes: int
    margin: float
    fits: bool
    flops: dict  # analytic: total (global), per_device, per_sequence, components, convention
    xla_flops_per_device: float | None  # cost_analysis (scan / while bodies counted once)
    step_time_s: dict  # {"100%": s, "40%": s} per step at that MFU
    timings: dict  # lower_s, compile_s, total_s, host_peak_rss_gib
    # teacher prefix reuse: on (bool), flops_on / flops_off (global, analytic), kept_bytes (per device:
    # cache, hidden, total live from the rollout to the losses when on)
    reuse: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def memory_stats(compiled, backend: str) -> dict:
    """Per-device bytes from `compiled.memory_analysis()`; total = arg + out - alias + temp + code."""
    if compiled is None:  # the compiler refused the program
        return dict.fromkeys(("argument", "output", "alias", "temp", "code", "total", "peak"))
    ma = compiled.memory_analysis()
    m = dict(
        argument=int(ma.argument_size_in_bytes),
        output=int(ma.output_size_in_bytes),
        alias=int(ma.alias_size_in_bytes),
        temp=int(ma.temp_size_in_bytes),
        code=int(ma.generated_code_size_in_bytes),
    )
    m["total"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
    peak = getattr(ma, "peak_memory_in_bytes", None)
    m["peak"] = int(peak) if backend == "tpu" and peak is not None else None
    return m


def _label(topo: Topology, backend: str) -> str:
    """What the figures come from: libtpu's deviceless compile, or the pessimistic XLA:CPU estimate."""
    if backend == "tpu":
        return f"libtpu deviceless compile for {topo.topology_name}"
    why = (
        ""
        if topo.platform != "tpu"
        else "; --backend cpu"
        if libtpu_available()
        else "; libtpu not installed: pip install -e .[plan]"
    )
    return f"PESSIMISTIC XLA:CPU estimate ({topo.devices} fake CPU devices in place of {topo.chip}{why})"


def _compile(lo: Lowered, log) -> tuple:
    """(compiled or None, compiler error or None, seconds). libtpu checks HBM at compile time: its
    RESOURCE_EXHAUSTED is a "does not fit" answer, not a failure."""
    t1 = time.perf_counter()
    try:
        compiled, error = lo.lowered.compile(), None
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, error = None, str(e).strip().splitlines()[0]
        log(f"[plan] the compiler refused the program: {error}")
    t_compile = time.perf_counter() - t1
    log(f"[plan] compile took {t_compile:.1f} s (host peak RSS {_rss_gib():.2f} GiB)")
    return compiled, error, t_compile


def _dump_hlo(compiled, dump_hlo, topo: Topology, log) -> None:
    if dump_hlo and compiled is not None:
        path = pathlib.Path(dump_hlo) / f"step_{topo.name}.hlo.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compiled.as_text())
        log(f"[plan] wrote {path}")


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis() if compiled is not None else None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def plan(
    config,
    topology: str | Topology,
    *,
    batch_size: int | None = None,
    remat: str | None = None,
    compute_dtype: str | None = None,
    teacher_param_dtype: str | None = None,
    student_param_dtype: str | None = None,
    hbm_bytes: int | None = None,
    margin: float = 0.10,
    dump_hlo: str | os.PathLike | None = None,
    backend: str = "auto",
    log: Callable[[str], None] = print,
) -> PlanResult:
    """Compiles one training step of `config` for `topology` ahead of time and sizes it (module docstring)."""
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    backend = backend_for(topo, backend)
    label = _label(topo, backend)
    t0 = time.perf_counter()
    log(f"[plan] {topo.name}: {topo.devices} x {topo.chip}, {label}")
    devices = target_devices(topo, backend)
    settings = resolve_settings(
        config,
        compute_dtype=compute_dtype,
        teacher_param_dtype=teacher_param_dtype,
        student_param_dtype=student_param_dtype,
        remat=remat,
    )
    log("[plan] building the abstract teacher / student and the train step, lowering ...")
    lo = lower_step(config, devices, batch_size=batch_size, settings=settings)
    t_lower = time.perf_counter() - t0
    log(
        f"[plan] lowered in {t_lower:.1f} s; compiling with "
        f"{'libtpu (13B->7B: 3-4 CPU-minutes)' if backend == 'tpu' else 'XLA:CPU'} ..."
    )
    compiled, error, t_compile = _compile(lo, log)
    _dump_hlo(compiled, dump_hlo, topo, log)
    mem = memory_stats(compiled, backend)
    hbm = int(hbm_bytes if hbm_bytes is not None else topo.hbm_bytes)
    b = int(batch_size or config.data.batch_size)
    fl = step_flops(config, lo.student_cfg, lo.teacher_cfg, lo.spec, lo.trainable_paths, b)
    fl["per_device"] = fl["total"] / topo.devices
    actual = dict(
        compute_dtype=lo.student_cfg.dtype,
        teacher_param_dtype=lo.teacher_cfg.param_dtype,
        student_param_dtype=lo.student_cfg.param_dtype,
        remat=lo.student_cfg.remat_policy,
    )
    return PlanResult(
        topology=topo.name,
        chip=topo.chip,
        backend=backend,
        label=label,
        devices=topo.devices,
        mesh=dict(lo.mesh.shape),
        batch_size=b,
        grad_accum=lo.spec.grad_accum,
        settings={k: [actual[k], src] for k, (_, src) in settings.items()},
        memory=mem,
        error=error,
        hbm_bytes=hbm,
        margin=margin,
        fits=error is None and mem["total"] <= (1 - margin) * hbm,
        flops=fl,
        xla_flops_per_device=_xla_flops(compiled),
        step_time_s={f"{round(u * 100)}%": fl["per_device"] / (topo.peak_flops * u) for u in (1.0, 0.4)},
        timings=dict(
            lower_s=t_lower,
            compile_s=t_compile,
            total_s=time.perf_counter() - t0,
            host_peak_rss_gib=_rss_gib(),
        ),
        reuse=reuse_report(config, lo, b, topo.devices),
    )


def reuse_report(config, lo: Lowered, batch_size: int, devices: int) -> dict:
    """Teacher prefix reuse in the plan: analytic FLOPs with and without it, and the bytes per device it
    keeps live from the rollout to the losses (in the compiled temp figure when it is on)."""
    on = lo.spec.reuse_teacher_prefix
    flops = {}
    for flag in (True, False):
        spec = dataclasses.replace(lo.spec, reuse_teacher_prefix=flag)
        fl = step_flops(config, lo.student_cfg, lo.teacher_cfg, spec, lo.trainable_paths, batch_size)
        flops[flag] = fl["total"]
    spec_on = dataclasses.replace(lo.spec, reuse_teacher_prefix=True)
    kept = teacher_states_bytes(config, lo.teacher_cfg, spec_on, devices, batch_size)
    return dict(on=on, flops_on=flops[True], flops_off=flops[False], kept_bytes=kept)


def format_table(r: PlanResult) -> str:
    """The human-readable report: a Markdown table of per-device memory, then FLOPs, step time and verdict."""
    g = lambda x: "n/a" if x is None else f"{x / GIB:.2f}"
    m, budget = r.memory, (1 - r.margin) * r.hbm_bytes
    peak_tflops = r.flops["per_device"] / r.step_time_s["100%"] / 1e12 if r.step_time_s["100%"] else 0.0
    peak = (
        f"{g(m['peak'])} GiB"
        if m["peak"] is not None
        else "n/a"
        if r.backend == "tpu"
        else "n/a (XLA:CPU repeats the argument size)"
    )
    lines = [
        f"## plan: {r.topology} ({r.devices} x {r.chip}), mesh {r.mesh}, global batch {r.batch_size} "
        f"(grad_accum {r.grad_accum})",
        r.label,
        "settings: " + ", ".join(f"{k}={v} ({src})" for k, (v, src) in r.settings.items()),
        "",
        "| per device (GiB) | argument | output | alias | temp | code | **total** | HBM "
        f"| budget (-{r.margin:.0%}) | peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.topology} | {g(m['argument'])} | {g(m['output'])} | {g(m['alias'])} | {g(m['temp'])} | "
        f"{g(m['code'])} | **{g(m['total'])}** | {g(r.hbm_bytes)} | {g(budget)} | {g(m['peak'])} |",
        "",
        (
            f"total = argument + output - alias + temp + code = {m['total']:,} bytes per device "
            f"({100 * m['total'] / r.hbm_bytes:.1f}% of HBM)"
            if r.error is None
            else f"compiler: {r.error}"
        ),
        f"peak_memory_in_bytes: {peak}",
        f"FLOPs per step (analytic): {r.flops['total']:.3e} global, {r.flops['per_device']:.3e} per device",
        *[f"    {k:<36s} {v:.3e}" for k, v in r.flops["components"].items()],
        f"XLA cost_analysis flops per device: "
        f"{'n/a' if r.xla_flops_per_device is None else f'{r.xla_flops_per_device:.3e}'} (counts each "
        "while/scan body ONCE - layers, decode steps, loss chunks, micro-batches - so it is not used)",
        *_reuse_lines(r.reuse),
        f"step time at 100% MFU: {r.step_time_s['100%']:.4g} s, at 40% MFU: {r.step_time_s['40%']:.4g} s "
        f"(peak {peak_tflops:.0f} TFLOP/s bf16 per device)",
        f"lower {r.timings['lower_s']:.1f} s, compile {r.timings['compile_s']:.1f} s, host peak RSS "
        f"{r.timings['host_peak_rss_gib']:.2f} GiB",
        f"verdict: {'FITS' if r.fits else 'DOES NOT FIT'} ("
        + (f"{g(m['total'])} GiB" if r.error is None else "the compiler's HBM check failed")
        + f" vs {g(budget)} GiB budget = {g(r.hbm_bytes)} GiB HBM - {r.margin:.0%} margin)",
    ]
    return "\n".join(lines)


def _reuse_lines(reuse: dict) -> list[str]:
    if not reuse:
        return []
    on, off, kept = reuse["flops_on"], reuse["flops_off"], reuse["kept_bytes"]
    saved = 1 - on / off if off else 0.0
    live = (
        f"keeps {kept['total'] / GIB:.2f} GiB per device live from the rollout to the losses (teacher KV "
        f"cache {kept['cache'] / GIB:.2f} + hidden states {kept['hidden'] / GIB:.2f}, per micro-batch)"
    )
    return [
        f"teacher prefix reuse (loss.reuse_teacher_prefix): {'ON' if reuse['on'] else 'OFF'}; FLOPs per step "
        f"{on:.3e} with it, {off:.3e} without ({100 * saved:.1f}% fewer with it)",
        f"    reuse {live}" + ("; included in temp above" if reuse["on"] else "; not in the figures above"),
    ]


def write_json(r: PlanResult, path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r.to_json(), indent=2, default=str))
