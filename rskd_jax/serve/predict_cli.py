"""`rskd-predict` / `launch/predict.py`: batched greedy answers for many images into a JSONL file.

    python launch/predict.py --model DIR --input FOLDER --question "What is in this image?" --out answers.jsonl
    python launch/predict.py --model DIR --input UCMerced_LandUse/Images --out ucm.jsonl   # scene prompt
    python launch/predict.py --model DIR --input rows.jsonl --out answers.jsonl    # {image, question} rows
    python launch/predict.py --model DIR --input referring.jsonl --image-root IMAGES --out ref.jsonl  # Bench

A rerun skips the rows already answered in --out and retries the failed ones; a missing or corrupt image
is a row with an `error` field (counted, the others go on). Score the output with
`python launch/eval.py --config.predictions=ucm.jsonl`. Logic: rskd_jax.eval.predict.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rskd-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (anything rskd_jax.load_pretrained reads)")
    p.add_argument("--input", required=True, help="folder of images, {image, question} JSONL or Bench file")
    p.add_argument("--out", required=True, help="output JSONL (appended; a rerun resumes)")
    p.add_argument("--question", help="the question for every image of a folder (or rows without one)")
    p.add_argument("--image-root", help="images of a JSONL input (default: the file's folder)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as stored")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=0, help="0 = image tokens + 256")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_prompt_len < 0:
        print("rskd-predict: error: --batch-size and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    from rskd_jax.convert.errors import ConversionError  # noqa: PLC0415 (after argument parsing: jax start-up)
    from rskd_jax.data.errors import DataError  # noqa: PLC0415 (after argument parsing: jax start-up)
    from rskd_jax.eval import predict  # noqa: PLC0415 (after argument parsing: jax start-up)

    try:
        records = predict.read_input(args.input, args.question, args.image_root)
        if not pathlib.Path(args.model).exists():
            raise FileNotFoundError(f"--model {args.model}: not found")
        from rskd_jax.pretrained import load_pretrained  # noqa: PLC0415 (after argument parsing: jax start-up)

        model, _ = load_pretrained(args.model, dtype=args.dtype)
        counts = predict.predict(
            model,
            args.tokenizer or args.model,
            records,
            args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_prompt_len=args.max_prompt_len or None,
            progress=not args.no_progress,
        )
    except (ConversionError, DataError, FileNotFoundError) as e:
        print(f"rskd-predict: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {counts['answered']} answered, {counts['skipped']} already done, "
        f"{counts['failed']} failed (rows with an 'error' field) of {counts['total']}"
    )
    return 0
