"""`rskd-chat` / `launch/chat.py`: ask a model about an image, once or as an interactive chat.

    python launch/chat.py --model DIR --image FILE "What is in this image?"     # answers once, exits
    python launch/chat.py --model DIR --image FILE [--task grounding]           # interactive (stdin)

Interactive commands: `/task plain|grounding|refer|identify`, `/image FILE` (new image, new conversation),
`/reset` (forget the history), `/quit` (or end of input). Answers stream as they are generated; when an answer
holds boxes they are drawn onto the image and the PNG path is printed. A bad model directory or image is one
error line and exit status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rskd-chat", description=__doc__.split("\n\n")[0])
    p.add_argument("question", nargs="?", help="ask this once and exit (default: interactive chat)")
    p.add_argument("--model", required=True, help="model directory (anything rskd_jax.load_pretrained reads)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: as stored)")
    p.add_argument("--task", default="plain", choices=("plain", "grounding", "refer", "identify"))
    p.add_argument(
        "--max-new-tokens", type=int, default=0, help="0 = 256, at most a quarter of the model's positions"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", type=int, default=256, help="prompt lengths are padded to multiples of this")
    p.add_argument("--boxes-dir", default="runs/chat", help="where images with drawn boxes are written")
    p.add_argument("--verbose", action="store_true", help="print each answer's wall time and token count")
    return p


class Chat:
    """The command's state: model, conversation, task, output streams (tests drive it directly)."""

    def __init__(self, args, out=sys.stdout):
        from rskd_jax.serve.session import ChatModel  # noqa: PLC0415 (after argument parsing: jax start-up)

        self.args, self.out = args, out
        self.model = ChatModel.load(
            args.model,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            bucket=args.bucket,
        )
        self.task, self.turn = args.task, 0
        self.open_image(args.image)

    def open_image(self, path: str) -> None:
        from rskd_jax.serve.session import Conversation  # noqa: PLC0415 (after argument parsing: jax start-up)

        self.conv, self.image_path = Conversation(self.model, path), pathlib.Path(path)

    def ask(self, question: str):
        self.turn += 1
        r = self.conv.ask(question, self.task, on_text=lambda s: (self.out.write(s), self.out.flush()))
        self.out.write("\n")
        if r.dropped_rounds:
            self.out.write(f"[the {r.dropped_rounds} oldest rounds were left out to fit the context]\n")
        if r.boxes:
            from rskd_jax.serve.draw import save_boxes  # noqa: PLC0415 (after argument parsing: jax start-up)

            png = pathlib.Path(self.args.boxes_dir) / f"{self.image_path.stem}_turn{self.turn}.png"
            save_boxes(self.conv.image, r.text, png)
            self.out.write(f"[{len(r.boxes)} box(es) drawn: {png}]\n")
        if self.args.verbose:
            self.out.write(
                f"[{r.seconds:.3f} s, {r.new_tokens} tokens{', compiled' if r.compiled else ''}]\n"
            )
        self.out.flush()
        return r

    def command(self, line: str) -> bool:
        """Handles a `/command`; False means quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.conv.reset()
            self.out.write("[history cleared]\n")
        elif name == "task" and arg in ("plain", "grounding", "refer", "identify"):
            self.task = arg
            self.out.write(f"[task: {arg}]\n")
        elif name == "image" and arg:
            from rskd_jax.data.errors import DataError  # noqa: PLC0415 (after argument parsing: jax start-up)

            try:
                self.open_image(arg)
                self.out.write(f"[new conversation about {arg}]\n")
            except DataError as e:
                self.out.write(f"error: {e}\n")
        else:
            self.out.write("commands: /task plain|grounding|refer|identify, /image FILE, /reset, /quit\n")
        return True

    def interactive(self, inp=sys.stdin) -> None:
        self.out.write(
            f"chatting about {self.image_path} (task: {self.task}); /quit or end of input to stop\n"
        )
        while True:
            self.out.write("USER: ")
            self.out.flush()
            line = inp.readline()
            if not line:
                self.out.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.out.write("ASSISTANT: ")
            try:
                self.ask(line)
            except ValueError as e:  # e.g. a question too long for the model: the chat goes on
                self.out.write(f"\nerror: {e}\n")


def main(argv: list[str] | None = None, inp=sys.stdin, out=sys.stdout) -> int:
    args = parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.bucket < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        print(
            "rskd-chat: error: need --max-new-tokens >= 0, --bucket >= 1, --temperature >= 0, 0 < --top-p <= 1",
            file=sys.stderr,
        )
        return 2
    from rskd_jax.convert.errors import ConversionError  # noqa: PLC0415 (after argument parsing: jax start-up)
    from rskd_jax.data.errors import DataError  # noqa: PLC0415 (after argument parsing: jax start-up)

    try:
        for what, path in (("--model", args.model), ("--image", args.image)):
            if not pathlib.Path(path).exists():
                raise FileNotFoundError(f"{what} {path}: not found")
        from rskd_jax.data.transforms import decode_image  # noqa: PLC0415 (after argument parsing: jax start-up)

        decode_image(args.image)  # a bad image fails before the model is loaded
        session = Chat(args, out)
        if args.question:
            session.ask(args.question)
        else:
            session.interactive(inp)
    except (ConversionError, DataError, FileNotFoundError, ValueError) as e:
        print(f"rskd-chat: error: {e}", file=sys.stderr)
        return 2
    return 0
