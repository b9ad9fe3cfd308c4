"""bench/convert.py --quick runs end to end: fresh child processes, memory fields, identical round trip."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_convert_quick(tmp_path):
    out = tmp_path / "convert.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "convert.py"),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "quick" and r["roundtrip_identical"] is True
    src = tmp_path / "work" / "src"
    assert r["checkpoint"]["bytes"] == sum(
        f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in src.glob("*.safetensors")
    )
    for step in ("import", "export"):
        m = r[step]
        assert m["seconds"] > 0
        # A fresh process: the baseline is the interpreter + jax + tensorstore, the peak is at least that.
        assert 30e6 < m["baseline_rss_anon"] <= m["peak_rss_anon"] <= m["vm_hwm"]
        assert m["peak_rss_anon_over_checkpoint"] == round(m["peak_rss_anon"] / r["checkpoint"]["bytes"], 3)
    assert (tmp_path / "work" / "hf" / "config.json").is_file()
