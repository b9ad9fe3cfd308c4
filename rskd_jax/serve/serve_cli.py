"""`rskd-serve` / `launch/serve.py`: the web demo (rskd_jax.serve.web) for one model.

    python launch/serve.py --model DIR [--port 7860] [--host 127.0.0.1]

Binds to 127.0.0.1 unless --host says otherwise (the demo has no authentication).
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rskd-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (anything rskd_jax.load_pretrained reads)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as stored")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = 256, at most 1/4 of the positions")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", nargs="*", help="sample images (default: UC Merced, else rs-synth)")
    return p


def build(args):
    """The Demo object (model loaded once) for parsed arguments."""
    from rskd_jax.serve import web  # noqa: PLC0415 (after argument parsing: jax start-up)
    from rskd_jax.serve.session import ChatModel  # noqa: PLC0415 (after argument parsing: jax start-up)

    model = ChatModel.load(
        args.model,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    samples = [(pathlib.Path(s).name, s) for s in args.samples] if args.samples else web.default_samples()
    return web.Demo(model, samples)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rskd_jax.convert.errors import ConversionError  # noqa: PLC0415 (after argument parsing: jax start-up)
    from rskd_jax.data.errors import DataError  # noqa: PLC0415 (after argument parsing: jax start-up)

    try:
        if not pathlib.Path(args.model).exists():
            raise FileNotFoundError(f"--model {args.model}: not found")
        demo = build(args)
    except (ConversionError, DataError, FileNotFoundError, ValueError) as e:
        print(f"rskd-serve: error: {e}", file=sys.stderr)
        return 2
    from rskd_jax.serve.web import serve  # noqa: PLC0415 (after argument parsing: jax start-up)

    serve(demo, args.host, args.port)
    return 0
