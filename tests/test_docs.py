"""The docs a new user follows: their commands parse (the quick ones run), their Python snippets run, their
links resolve, and the generated config reference is current.

Convention for the ```bash blocks of CHECKED_DOCS (each command may span lines with a trailing backslash):

* `# needs: tpu|gpu|weights|data|network` at the end of a command: it needs that; here it is only parsed.
* `# ~N s` / `# ~N min`: runs here as written in about that time on 2 CPU cores; those under a minute are run
  (from a sandbox that links the repository's top-level entries, so outputs land in its own `runs/`).
* no marker: runs here as written but takes long (e.g. the quickstart); parsed only.

"Parsed" means our entry point's own flag parser runs on the command's arguments and stops before any work:
absl flags for launch/train.py, eval.py and plan.py (config file, preset and every `--config.*` override
included: an unknown key or a value of the wrong type fails), argparse for the others. `pip install` lines:
local paths exist and the named extras are in setup.py. `pytest` lines: the named test paths exist.
A leading `srun --opt=value ...` (SLURM) and leading `VAR=value` assignments are looked through.
```python blocks run in order after the document's quick commands, unless their first line is
`# needs: ...`. Links (Markdown links and images in docs/*.md, README.md and the notebooks' Markdown
cells) must name existing files, and `#anchors` existing headings.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import nbformat
import pytest
from conftest import shared_data_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED_DOCS = (
    "README.md",
    "docs/architecture.md",
    "docs/data.md",
    "docs/distill.md",
    "docs/config_reference.md",
    "docs/reproduce.md",
    "docs/gpu.md",
)
LINKED_DOCS = sorted({"README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))})
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
NEEDS = {"tpu", "gpu", "weights", "data", "network"}
QUICK_S = 60  # commands marked faster than this are run

_FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.M | re.S)  # also indented (in lists)
_DURATION = re.compile(r"~\s*(\d+(?:\.\d+)?)\s*(s|min|h)\b")


# --- parsing docs
def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment) at the first unquoted `#` that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def doc_items(doc: str) -> list[dict]:
    """Commands of ```bash blocks and ```python snippets of `doc`, in order, with their markers."""
    text = (ROOT / doc).read_text()
    items = []
    for m in _FENCE.finditer(text):
        lang, body = m.group(2), textwrap.dedent(m.group(3))
        line_no = text[: m.start()].count("\n") + 1
        if lang == "python":
            first = body.lstrip().splitlines()[0] if body.strip() else ""
            needs = first.startswith("#") and "needs:" in first
            items.append(dict(kind="python", doc=doc, line=line_no, code=body, run=not needs))
        elif lang in ("bash", "sh", "shell"):
            joined = body.replace("\\\n", " ")
            for k, raw in enumerate(joined.splitlines()):
                cmd, comment = _split_comment(raw.strip())
                if not cmd:
                    continue
                where = f"{doc}:{line_no + 1 + k}"
                needs = comment.split("needs:", 1)[1] if "needs:" in comment else ""
                needs = {w.strip() for w in needs.split(",") if w.strip()}
                dur = _DURATION.search(comment)
                seconds = (
                    None
                    if dur is None
                    else float(dur.group(1)) * {"s": 1, "min": 60, "h": 3600}[dur.group(2)]
                )
                for part in cmd.split("&&"):
                    items.append(
                        dict(
                            kind="bash",
                            doc=doc,
                            where=where,
                            cmd=part.strip(),
                            needs=sorted(needs),
                            seconds=seconds,
                            comment=comment,
                        )
                    )
    return items


def _argv(cmd: str, env: dict) -> list[str]:
    return [os.path.expandvars(t) if "$" in t else t for t in shlex.split(cmd)]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    data = shared_data_dir()
    env["RSKD_SHARED_DATA"] = str(data) if data else "/nonexistent/RSKD_SHARED_DATA"
    return env


def entry_point(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """('path' | 'module', target, args) of a command that runs one of our Python entry points."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # `VAR=value python ...`: looked through
        argv = argv[1:]
    if argv[:1] == ["srun"]:  # SLURM launcher: `srun --opt=value ... python ...` runs the python command
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    if not argv or argv[0] not in ("python", "python3"):
        return None
    if len(argv) > 2 and argv[1] == "-m" and argv[2].startswith(("rskd_jax", "launch", "tools")):
        return "module", argv[2], argv[3:]
    if len(argv) > 1 and argv[1].endswith(".py"):
        return "path", argv[1], argv[2:]
    return None


# --- parse checker
# Runs in one child process (cwd = the sandbox): for each command, the entry point runs as __main__ with
# argparse's parse_args and absl's app.run replaced by "parse, then stop"; flags a script defined are
# removed afterwards so the next script can define its own.
CHECKER = r"""
import argparse, contextlib, io, json, runpy, sys, traceback
from absl import app, flags

class Parsed(BaseException):
    pass

_parse_args = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    _parse_args(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_args

def run(main, argv=None, **kw):
    flags.FLAGS(argv or sys.argv)
    for name in list(flags.FLAGS):  # config files are loaded (and overrides applied) on first access
        getattr(flags.FLAGS, name)
    raise Parsed()
app.run = run

for item in json.loads(sys.stdin.read()):
    before = set(flags.FLAGS)
    sys.argv = [item["target"]] + item["args"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if item["how"] == "module":
                runpy.run_module(item["target"], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(item["target"], run_name="__main__")
        result = dict(ok=False, error="the command ran to the end instead of stopping after parsing")
    except Parsed:
        result = dict(ok=True)
    except SystemExit as e:
        result = dict(ok=False, error=f"exited with {e.code!r} while parsing: {err.getvalue()[-1500:]}")
    except BaseException as e:  # report anything, keep checking the others
        result = dict(ok=False, error="".join(traceback.format_exception_only(type(e), e)).strip())
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    print("RESULT " + json.dumps(dict(result, id=item["id"])), flush=True)
"""


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> pathlib.Path:
    """A directory that looks like the repository root (symlinks) but keeps its own runs/ and outputs."""
    box = tmp_path_factory.mktemp("docs_sandbox")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "runs") and not entry.name.startswith(".pytest"):
            (box / entry.name).symlink_to(entry)
    return box


@pytest.fixture(scope="session")
def parse_results(sandbox) -> dict:
    env = _env()
    todo = []
    for doc in CHECKED_DOCS:
        for item in doc_items(doc):
            ep = entry_point(_argv(item["cmd"], env)) if item["kind"] == "bash" else None
            if ep:
                todo.append(dict(id=f"{item['where']} {item['cmd']}", how=ep[0], target=ep[1], args=ep[2]))
    out = subprocess.run(
        [sys.executable, "-c", CHECKER],
        input=json.dumps(todo),
        capture_output=True,
        text=True,
        cwd=sandbox,
        env=env,
        timeout=600,
    )
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            results[r.pop("id")] = r
    missing = [t["id"] for t in todo if t["id"] not in results]
    assert not missing, (
        f"parse checker stopped early (rc {out.returncode}):\n{out.stderr[-3000:]}\nmissing {missing}"
    )
    return results


def _setup_extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXTRAS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py: no EXTRAS dict")


def static_problem(item: dict, env: dict) -> str | None:
    """Checks of commands that are not our entry points; None if fine."""
    argv = _argv(item["cmd"], env)
    if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
        for arg in argv[2:]:
            m = re.fullmatch(r"(\.[^\[]*)(?:\[([\w,\s-]+)\])?", arg)
            if m is None:
                continue  # an option or a package from the index
            if not (ROOT / m.group(1)).exists():
                return f"{item['where']}: pip install path {m.group(1)!r} does not exist"
            extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()} - _setup_extras()
            if extras:
                return f"{item['where']}: extras {sorted(extras)} are not in setup.py"
        return None
    if argv[0] == "pytest" or argv[:3] == ["python", "-m", "pytest"]:
        gone = [
            a for a in argv[1:] if ("/" in a or a.endswith(".py")) and not (ROOT / a.split("::")[0]).exists()
        ]
        return f"{item['where']}: test paths {gone} do not exist" if gone else None
    if item["needs"]:
        return None  # e.g. gcloud, hf download, unzip: needs what it says; not checked here
    return (
        f"{item['where']}: {item['cmd']!r} is neither one of our entry points nor marked `# needs: ...`; "
        "mark it, or teach tests/test_docs.py to check it"
    )


# --- tests
@pytest.mark.parametrize("doc", CHECKED_DOCS)
def test_commands_parse(doc, parse_results):
    env = _env()
    problems = []
    for item in (i for i in doc_items(doc) if i["kind"] == "bash"):
        unknown = set(item["needs"]) - NEEDS
        if unknown:
            problems.append(f"{item['where']}: unknown `needs:` {sorted(unknown)} (known: {sorted(NEEDS)})")
        if entry_point(_argv(item["cmd"], env)):
            r = parse_results[f"{item['where']} {item['cmd']}"]
            if not r["ok"]:
                problems.append(f"{item['where']}: {item['cmd']}\n    {r['error']}")
        else:
            problems.append(static_problem(item, env))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "doc",
    [
        d
        for d in CHECKED_DOCS
        if any(
            (i["kind"] == "bash" and i["seconds"] is not None and i["seconds"] < QUICK_S and not i["needs"])
            or (i["kind"] == "python" and i["run"])
            for i in doc_items(d)
        )
    ],
)
def test_quick_commands_and_snippets_run(doc, sandbox):
    """The document's quick commands and its Python snippets, in document order, in the sandbox."""
    env = _env()
    items = [
        i
        for i in doc_items(doc)
        if (i["kind"] == "python" and i["run"])
        or (i["kind"] == "bash" and i["seconds"] is not None and i["seconds"] < QUICK_S and not i["needs"])
    ]
    uses_data = any("RSKD_SHARED_DATA" in (i.get("cmd") or i.get("code")) for i in items)
    if uses_data and shared_data_dir() is None:
        pytest.skip(f"{doc} runs commands on $RSKD_SHARED_DATA: set it to ../shared/data")
    for item in items:
        if item["kind"] == "bash":
            limit = max(120, 10 * item["seconds"])
            p = subprocess.run(
                ["bash", "-c", item["cmd"]],
                cwd=sandbox,
                env=env,
                capture_output=True,
                text=True,
                timeout=limit,
            )
            what = f"{item['where']}: {item['cmd']}"
        else:
            p = subprocess.run(
                [sys.executable, "-c", item["code"]],
                cwd=sandbox,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            what = f"{item['doc']}:{item['line']} (python snippet)"
        assert p.returncode == 0, f"{what}\nexit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def _strip_code(text: str) -> str:
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    out, seen = set(), {}
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def markdown_text(name: str) -> str:
    if name.endswith(".ipynb"):
        cells = nbformat.read(ROOT / name, as_version=4).cells
        return "\n\n".join(c.source for c in cells if c.cell_type == "markdown")
    return (ROOT / name).read_text()


@pytest.mark.parametrize("name", LINKED_DOCS + NOTEBOOKS)
def test_internal_links_resolve(name):
    base = (ROOT / name).parent
    bad = []
    for target in re.findall(
        r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _strip_code(markdown_text(name))
    ):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (base / path).resolve() if path else (ROOT / name)
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{name}:\n" + "\n".join(bad)


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "tools" / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    gen = _generator()
    assert gen.OUT.read_text() == gen.render(), (
        "docs/config_reference.md is stale: python tools/gen_config_reference.py"
    )
    assert not gen.stale_descriptions(), f"descriptions of keys no config has: {gen.stale_descriptions()}"


def test_config_reference_lists_every_key_of_every_preset():
    """Independent of the generator's own flattening: every leaf of every preset appears with its value."""
    text = (ROOT / "docs" / "config_reference.md").read_text()
    gen = _generator()
    for name in gen.CONFIGS:
        module = gen.load(name)
        presets, _ = gen.presets_and_args(module)
        section = text.split(f"## `configs/{name}.py`", 1)[1].split("\n## ", 1)[0]
        for preset in presets:
            cfg = module.get_config(preset).to_dict()
            stack = [("", cfg)]
            while stack:
                prefix, d = stack.pop()
                for k, v in d.items():
                    if isinstance(v, dict) and v:
                        stack.append((f"{prefix}{k}.", v))
                    else:
                        assert f"| `{prefix}{k}` |" in section, (
                            f"configs/{name}.py:{preset}: `{prefix}{k}` missing"
                        )
                        assert repr(v).replace("|", "\\|") in section, (
                            f"{name}:{preset} {prefix}{k}={v!r} missing"
                        )


# --- every `--config.KEY` a doc shows is a key of the config it names
_CONFIG_ARG = re.compile(r"--config[= ]([^\s\]]+\.py)(?::([\w-]+))?")
_CONFIG_KEY = re.compile(r"--config\.([a-z_][\w.]*[\w])")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _config_keys(name: str, preset: str | None) -> set[str]:
    """Every dotted key of configs/<name>.py (one preset, or the union of all of them)."""
    from rskd_jax.cli import config_keys  # noqa: PLC0415

    gen = _generator()
    module = gen.load(name)
    presets = [preset] if preset else gen.presets_and_args(module)[0]
    return {k for p in presets for k in config_keys(module.get_config(p))}


def config_flag_problems(doc: str, root: pathlib.Path = ROOT) -> list[str]:
    """`--config.KEY` flags of `doc` that name no key: in a command, of the config file and preset the command
    gives (`--config FILE[:PRESET]`, default: the launcher's); elsewhere (inline code), of any config."""
    from rskd_jax.cli import closest_keys  # noqa: PLC0415

    text = (root / doc).read_text()
    every = set().union(*(_config_keys(n, None) for n in _generator().CONFIGS))
    uses = []  # (where, key, config name or None, preset or None)
    for m in _FENCE.finditer(text):
        line_no = text[: m.start()].count("\n") + 1
        for cmd in textwrap.dedent(m.group(3)).replace("\\\n", " ").splitlines():
            arg = _CONFIG_ARG.search(cmd)
            name = pathlib.Path(arg.group(1)).stem if arg else ("eval" if "eval.py" in cmd else "distill")
            for key in _CONFIG_KEY.findall(cmd):
                uses.append((f"{doc}:{line_no} {cmd.strip()[:80]}", key, name, arg and arg.group(2)))
    prose = _FENCE.sub("", text)
    for code in _INLINE_CODE.findall(prose):
        uses += [(f"{doc}: `{code}`", key, None, None) for key in _CONFIG_KEY.findall(code)]
    problems = []
    for where, key, name, preset in uses:
        if name is not None and name not in _generator().CONFIGS:
            continue  # a config file of the user's own
        keys = every if name is None else _config_keys(name, preset)
        if key not in keys:
            near = closest_keys({k: None for k in keys}, key) if "." not in key else []
            problems.append(
                f"{where}: --config.{key} is not a key of {name or 'any config'} {preset or ''} {near}"
            )
    return problems


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_config_flags_in_docs_are_real_keys(doc):
    assert not config_flag_problems(doc), "\n".join(config_flag_problems(doc))


def test_config_flag_check_catches_a_wrong_key(tmp_path):
    """The check above fails on what docs/tpu.md used to say (`--config.steps`; the key is total_steps)."""
    bad = tmp_path / "bad.md"
    bad.write_text(
        "```bash\npython launch/tpu_pod.py run $POD --config configs/distill.py:geochat13b_to_7b \\\n"
        "    --workdir gs://B/run1 [-- --config.steps=20000 ...]\n```\nand `--config.total_stepz=3`\n"
    )
    problems = config_flag_problems("bad.md", tmp_path)
    assert len(problems) == 2 and "--config.steps is not a key of distill geochat13b_to_7b" in problems[0]
    assert "total_steps" in problems[0] and "--config.total_stepz" in problems[1], problems
