"""Package foundation: import, pinned stack, console scripts, config parsing."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_call():
    tree = ast.parse((ROOT / "setup.py").read_text())
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return consts


def test_import():
    import rskd_jax  # noqa: F401


def test_torch_is_pinned_everywhere():
    consts = _setup_call()
    reqs = list(consts["INSTALL_REQUIRES"]) + [r for v in consts["EXTRAS"].values() for r in v]
    torch_reqs = [r for r in reqs if r.split("=")[0].split("[")[0].strip() == "torch"]
    assert torch_reqs and all(r == "torch==2.13.0" for r in torch_reqs), torch_reqs
    pinned = {r.split("==")[0]: r.split("==")[1] for r in consts["INSTALL_REQUIRES"] if "==" in r}
    for name, version in {
        "jax": "0.10.2",
        "jaxlib": "0.10.2",
        "flax": "0.12.8",
        "optax": "0.2.8",
        "orbax-checkpoint": "0.12.8",
        "grain": "0.2.18",
        "tensorflow-datasets": "4.9.10",
        "ml-collections": "1.1.0",
        "clu": "0.0.12",
        "transformers": "5.24.0",
    }.items():
        assert pinned.get(name) == version, (name, pinned.get(name))


def test_installed_versions_match_pins():
    from importlib.metadata import version

    consts = _setup_call()
    for req in consts["INSTALL_REQUIRES"]:
        if "==" in req:
            name, want = req.split("==")
            assert version(name) == want, f"{name}: installed {version(name)}, setup.py pins {want}"


@pytest.mark.parametrize("script", ["train", "convert", "eval", "plan"])
def test_cli_help(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--" in out.stdout


def test_console_scripts_declared():
    text = (ROOT / "setup.py").read_text()
    for name in ("rskd-train", "rskd-convert", "rskd-eval", "rskd-plan"):
        assert f'"{name}=launch.' in text


def test_readme_quickstart_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install -e ".[test,eval]" && pytest'
    assert test_cmd in readme
    assert test_cmd.replace("pip install -e", "pip install -q -e") in ci
    assert "pip install -e . && python launch/train.py --config configs/distill.py" in readme


def test_config_arg_parsing():
    from configs import distill

    c = distill.get_config("tiny,steps=9")
    assert c.total_steps == 9 and c.optim.total_steps == 9
    with pytest.raises(KeyError, match="unknown"):
        distill.get_config("demo,not_a_key=1")
    with pytest.raises(KeyError, match="unknown preset"):
        distill.get_config("nope")
