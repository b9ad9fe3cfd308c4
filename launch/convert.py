r"""Weight conversion CLI (console script `rskd-convert`); all logic lives in rskd_jax.convert.

    python launch/convert.py import SRC DST [--format auto|hf-llava|llava|geochat|parts] [--vision-tower DIR]
        [--mm-projector FILE] [--image-size N] [--lora DIR] [--lora-mode merge|keep]
        [--dtype float32|bfloat16|float16] [--no-scan] [--tokenizer DIR] [--overwrite]
    python launch/convert.py export SRC DST [--dtype ...] [--max-shard-size 5GB] [--model-config FILE]
        [--lora-alpha A]
    python launch/convert.py export WORKDIR DST [--stage distill]   (a training workdir: its student, LoRA
        merged, rebuilt from the run's config.json and newest checkpoint; works for LoRA runs)
    python launch/convert.py inspect PATH

A bad input exits with status 2 and one error line (no traceback); DST is never left half-written.
See docs/convert.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rskd-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a source checkpoint -> our checkpoint directory")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--format", default="auto", choices=("auto", "hf-llava", "llava", "geochat", "parts"))
    imp.add_argument("--vision-tower", help="CLIP vision directory (replaces the checkpoint's tower)")
    imp.add_argument("--mm-projector", help="mm_projector.bin (or its directory) for --format parts")
    imp.add_argument(
        "--image-size", type=int, help="input resolution (default: 504 for geochat, else native)"
    )
    imp.add_argument("--lora", help="PEFT LoRA adapter directory")
    imp.add_argument("--lora-mode", default="merge", choices=("merge", "keep"))
    imp.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the source's)")
    imp.add_argument("--no-scan", action="store_true", help="per-layer params instead of stacked (scan) ones")
    imp.add_argument("--tokenizer", help="tokenizer directory (default: SRC)")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="our checkpoint -> HF LlavaForConditionalGeneration directory")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--dtype", choices=DTYPES)
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--model-config", help="our config.json, for a training checkpoint (step dir) as SRC")
    exp.add_argument("--lora-alpha", type=float, help="LoRA alpha of a training checkpoint's adapters")
    exp.add_argument(
        "--stage",
        default="distill",
        help="with a training workdir as SRC: the stage whose newest checkpoint is exported (distill, or sft)",
    )
    exp.add_argument("--tokenizer", help="tokenizer directory (default: SRC)")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--no-progress", action="store_true")
    ins = sub.add_parser("inspect", help="format, config, parameter counts and dtypes of a checkpoint")
    ins.add_argument("path")
    return p


def _is_workdir(path: str) -> bool:
    from rskd_jax.train.export import is_workdir  # noqa: PLC0415

    return is_workdir(path)


def tune_malloc() -> None:
    """glibc: serve buffers >= 1 MiB with mmap (returned to the OS on free) and cap the number of malloc
    arenas, so the chunk buffers that tensorstore's threads free do not pile up in per-thread arenas
    (measured in bench/convert.py: peak anonymous memory of an import drops by ~40%). No-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    args = parser().parse_args([a for a in argv if a != "--verbose"])
    tune_malloc()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from rskd_jax import convert  # noqa: PLC0415 (after argument parsing: jax start-up)

    try:
        if args.command == "import":
            out = convert.import_checkpoint(
                args.src,
                args.dst,
                fmt=args.format,
                vision_tower=args.vision_tower,
                mm_projector=args.mm_projector,
                image_size=args.image_size,
                lora=args.lora,
                lora_mode=args.lora_mode,
                dtype=args.dtype,
                scan_layers=not args.no_scan,
                tokenizer=args.tokenizer,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            print(f"wrote {out}")
        elif args.command == "export" and _is_workdir(args.src):
            from rskd_jax.train.export import export_run  # noqa: PLC0415 - loads jax/flax only for this path

            out = export_run(args.src, args.dst, stage=args.stage, overwrite=args.overwrite, dtype=args.dtype)
            print(f"wrote {out}")
        elif args.command == "export":
            out = convert.export_checkpoint(
                args.src,
                args.dst,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                model_config=args.model_config,
                lora_alpha=args.lora_alpha,
                tokenizer_dir=args.tokenizer,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            print(f"wrote {out}")
        else:
            print(json.dumps(convert.inspect_path(args.path), indent=2, default=str))
    except convert.ConversionError as e:
        print(f"rskd-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - other input errors (unreadable file ...): one line, see rskd_jax.cli
        from rskd_jax.cli import report  # noqa: PLC0415

        code = report(f"rskd-convert {args.command}", e, verbose)
        if code is None:
            raise
        return code
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
