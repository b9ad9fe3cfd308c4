"""Bad inputs: one clear error naming the file / keys, exit status 2 from the CLI, and no DST left behind."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_convert_testlib import save_sharded, state_dict, tiny_llava, to_4x_layout

from launch.convert import main
from rskd_jax.convert import ConversionError, ckpt, import_checkpoint


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=5)


def leftovers(root):
    """Everything in `root` besides the source directory (DST, temporary directories)."""
    return sorted(p.name for p in root.iterdir() if p.name != "src")


def convert_fails(tmp_path, match, **kw):
    with pytest.raises(ConversionError, match=match) as e:
        import_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False, **kw)
    assert leftovers(tmp_path) == []
    return str(e.value)


def test_missing_shard(tmp_path, model):
    save_sharded(to_4x_layout(state_dict(model)), tmp_path / "src", per_shard=30)
    model.config.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model-00002-of-00003.safetensors").unlink()
    msg = convert_fails(tmp_path, "shard files listed in model.safetensors.index.json are missing")
    assert "model-00002-of-00003.safetensors (30 tensors)" in msg


def test_truncated_safetensors(tmp_path, model):
    model.save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = convert_fails(tmp_path, "truncated safetensors file")
    assert str(f) in msg


def test_truncated_bin(tmp_path, model):
    save_sharded(state_dict(model), tmp_path / "src", "bin", per_shard=50)
    model.config.save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "pytorch_model-00002-of-00002.bin"
    f.write_bytes(f.read_bytes()[:-5000])
    assert str(f) in convert_fails(tmp_path, "cannot read this torch checkpoint")


def test_wrong_shapes_missing_and_unexpected_keys(tmp_path, model):
    sd = state_dict(model)
    sd["model.language_model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 64)  # config says 96 x 64
    del sd["model.multi_modal_projector.linear_2.bias"]
    sd["model.language_model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    (tmp_path / "src").mkdir()
    save_file(sd, tmp_path / "src" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "src")
    msg = convert_fails(tmp_path, "does not match the model config")
    assert "model.language_model.layers.1.mlp.up_proj.weight: expected (96, 64), found (80, 64)" in msg
    assert "missing keys" in msg and "model.multi_modal_projector.linear_2.bias (64,)" in msg
    assert "unexpected keys" in msg and "layers.0.self_attn.extra.weight" in msg


def test_unknown_format(tmp_path):
    (tmp_path / "src").mkdir()
    save_file({"bert.encoder.weight": torch.zeros(2, 2)}, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    convert_fails(tmp_path, "unknown checkpoint format .*model_type='bert'.*bert.encoder.weight")


def test_failure_while_writing_leaves_nothing(tmp_path, model, monkeypatch):
    model.save_pretrained(tmp_path / "src")
    calls = []

    def boom(self, *a):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")

    monkeypatch.setattr(ckpt.CheckpointWriter, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        import_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    assert leftovers(tmp_path) == []


def test_cli_one_line_error_and_overwrite(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x10\x00")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rskd-convert import: error:") and "not a valid safetensors file" in err
    assert "\n" not in err and leftovers(tmp_path) == []

    model.save_pretrained(tmp_path / "src")
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"]) == 0
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "import",
                str(tmp_path / "src"),
                str(tmp_path / "dst"),
                "--no-progress",
                "--overwrite",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["param_dtype"] == "bfloat16"
    assert leftovers(tmp_path) == ["dst"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "dst")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "rskd-jax checkpoint"
