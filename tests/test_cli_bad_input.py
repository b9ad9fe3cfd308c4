"""Every launcher x every class of bad input: ONE line on stderr naming the thing, no traceback, exit status 2.

Each case runs the launcher as a subprocess, as a user would, and fails before any model is built or compiled
(small inputs, seconds each). To cover a new launcher (issue 16: launch/chat.py, predict.py, serve.py), add its
script to LAUNCHERS and its rows to CASES; `NOT_APPLICABLE` lists the classes a launcher has no input for.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import pytest
from xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "train": "launch/train.py",
    "eval": "launch/eval.py",
    "plan": "launch/plan.py",
    "convert": "launch/convert.py",
    "compare": "launch/compare.py",
}
KINDS = ("missing file", "unreadable file", "wrong key", "wrong shape", "wrong type", "empty dataset")
NOT_APPLICABLE = {
    ("plan", "empty dataset"): "plan compiles from shapes: it reads no data",
}
DISTILL = "configs/distill.py:tiny"
COMPARE = "configs/compare.py:tiny"


class Case(NamedTuple):
    args: tuple  # str, or callables of the inputs fixture (a dict of paths)
    names: tuple  # what the error line must mention


def P(key):  # an argument that is a path of the `inputs` fixture
    return lambda inp: str(inp[key])


def flag(prefix, key):
    return lambda inp: f"{prefix}{inp[key]}"


CASES = {
    # ---------------------------------------------------------------------------------------------- train
    ("train", "missing file"): Case(
        ("--config", DISTILL, "--config.data.tokenizer=/nonexistent/tokenizer"), ("/nonexistent/tokenizer",)
    ),
    ("train", "unreadable file"): Case(("--config", P("garbage.py")), ("garbage.py",)),
    ("train", "wrong key"): Case(("--config", DISTILL, "--config.steps=20"), ("'steps'", "total_steps")),
    ("train", "wrong shape"): Case(("--config", DISTILL, "--config.mesh.tensor=3"), ("mesh",)),
    ("train", "wrong type"): Case(("--config", DISTILL, "--config.total_steps=twenty"), ("total_steps",)),
    ("train", "empty dataset"): Case(
        (
            "--config",
            DISTILL,
            "--config.data.name=geochat_instruct",
            flag("--config.data.instruct_json=", "empty.json"),
            flag("--config.data.tokenizer=", "tokenizer"),
            flag("--workdir=", "workdir"),
        ),
        ("empty.json",),
    ),
    # -------------------------------------------------------------------------------------------- compare
    ("compare", "missing file"): Case(
        ("--config", COMPARE, "--config.compare.start=/nonexistent/demo"),
        ("compare.start", "/nonexistent/demo"),
    ),
    ("compare", "unreadable file"): Case(("--config", P("garbage.py")), ("garbage.py",)),
    ("compare", "wrong key"): Case(
        ("--config", COMPARE, "--config.compare.methods=('full','kd2')"), ("compare.methods", "kd2")
    ),
    ("compare", "wrong shape"): Case(("--config", COMPARE, "--config.mesh.tensor=3"), ("mesh",)),
    ("compare", "wrong type"): Case(
        ("--config", COMPARE, "--config.compare.seeds=three"), ("compare.seeds",)
    ),
    ("compare", "empty dataset"): Case(
        (
            "--config",
            COMPARE,
            "--config.data.name=geochat_instruct",
            flag("--config.data.instruct_json=", "empty.json"),
            flag("--config.data.tokenizer=", "tokenizer"),
            flag("--workdir=", "workdir"),
        ),
        ("empty.json",),
    ),
    # ----------------------------------------------------------------------------------------------- eval
    ("eval", "missing file"): Case(
        (
            "--config",
            "configs/eval.py:scene",
            "--config.checkpoint=/nonexistent/ckpt",
            "--config.data_dir=/nonexistent/ucm",
        ),
        ("/nonexistent/",),
    ),
    ("eval", "unreadable file"): Case(
        (
            "--config",
            "configs/eval.py:grounding",
            flag("--config.data_dir=", "garbage.jsonl"),
            "--config.checkpoint=/x",
        ),
        ("garbage.jsonl",),
    ),
    ("eval", "wrong key"): Case(
        ("--config", "configs/eval.py:scene", "--config.limt=3"), ("'limt'", "limit")
    ),
    ("eval", "wrong shape"): Case(("--config", "configs/eval.py:synth", "--config.tasks=3"), ("tasks",)),
    ("eval", "wrong type"): Case(("--config", "configs/eval.py:scene", "--config.limit=all"), ("limit",)),
    ("eval", "empty dataset"): Case(
        (
            "--config",
            "configs/eval.py:caption",
            flag("--config.data_dir=", "empty.jsonl"),
            "--config.checkpoint=/x",
        ),
        ("empty.jsonl",),
    ),
    # ----------------------------------------------------------------------------------------------- plan
    ("plan", "missing file"): Case(("--config", "configs/nope.py"), ("configs/nope.py",)),
    ("plan", "unreadable file"): Case(("--config", P("garbage.py")), ("garbage.py",)),
    ("plan", "wrong key"): Case(("--config", DISTILL, "--config.stps=3"), ("'stps'", "total_steps")),
    ("plan", "wrong shape"): Case(("--config", DISTILL, "--topology=v5p-7"), ("v5p-7",)),
    ("plan", "wrong type"): Case(("--config", DISTILL, "--batch_size=big"), ("batch_size",)),
    # -------------------------------------------------------------------------------------------- convert
    ("convert", "missing file"): Case(("import", "/nonexistent/src", P("dst")), ("/nonexistent/src",)),
    ("convert", "unreadable file"): Case(("inspect", P("garbage_ckpt")), ("garbage_ckpt",)),
    ("convert", "wrong key"): Case(("import", P("src"), P("dst"), "--format=llava2"), ("--format", "llava2")),
    ("convert", "wrong shape"): Case(
        ("import", P("wrong_shape_ckpt"), P("dst")), ("expected (96, 64), found (80, 64)",)
    ),
    ("convert", "wrong type"): Case(
        ("import", P("src"), P("dst"), "--image-size=large"), ("--image-size", "large")
    ),
    ("convert", "empty dataset"): Case(("import", P("empty_dir"), P("dst")), ("empty_dir",)),
}


def test_matrix_is_complete():
    missing = [
        (name, kind)
        for name in LAUNCHERS
        for kind in KINDS
        if (name, kind) not in CASES and (name, kind) not in NOT_APPLICABLE
    ]
    assert not missing, f"bad-input cases missing for {missing}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "garbage.py").write_bytes(b"\x00\xff\xfe garbage (\n")
    (d / "garbage.jsonl").write_bytes(b'{"id": 1, "image": \x00\xff\n')
    (d / "empty.json").write_text("[]")
    (d / "empty.jsonl").write_text("")
    (d / "empty_dir").mkdir()
    (d / "workdir").mkdir()
    (d / "src").mkdir()
    (d / "garbage_ckpt").mkdir()
    (d / "garbage_ckpt" / "config.json").write_bytes(b"{\x00 not json")
    (d / "garbage_ckpt" / "model.safetensors").write_bytes(b"\x00" * 100)
    from rskd_jax.data.synth import train_synth_tokenizer  # noqa: PLC0415

    train_synth_tokenizer(d / "tokenizer", vocab_size=300, num_records=200)
    _wrong_shape_checkpoint(d / "wrong_shape_ckpt")
    return {p.name: p for p in d.iterdir()} | {"dst": d / "dst"}


def _wrong_shape_checkpoint(path):
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415
    from test_convert_testlib import state_dict, tiny_llava  # noqa: PLC0415

    model = tiny_llava(seed=5)
    sd = state_dict(model)
    sd["model.language_model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 64)  # config says 96 x 64
    path.mkdir()
    save_file(sd, path / "model.safetensors")
    model.config.save_pretrained(path)


@pytest.mark.parametrize(
    "launcher,kind", sorted(CASES), ids=[f"{a}-{b}".replace(" ", "_") for a, b in sorted(CASES)]
)
def test_bad_input_gives_one_clear_line(launcher, kind, inputs, tmp_path):
    case = CASES[launcher, kind]
    args = [a(inputs) if callable(a) else a for a in case.args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags(1))
    out = subprocess.run(
        [sys.executable, LAUNCHERS[launcher], *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    err = out.stderr
    assert "Traceback" not in err, err[-3000:]
    assert out.returncode == 2, (out.returncode, err[-3000:])
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-3000:]
    for name in case.names:
        assert name in lines[0], (name, lines[0])
    assert not (tmp_path / "dst").exists() and not inputs["dst"].exists()  # nothing written for a bad input


def test_verbose_shows_the_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, LAUNCHERS["train"], "--config", DISTILL, "--config.steps=20", "--verbose"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr, out.stderr[-2000:]
    assert "unknown config key 'steps'" in out.stderr.splitlines()[-1]
