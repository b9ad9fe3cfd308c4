"""The web demo (`launch/serve.py`): pick or upload an image, chat about it, see the boxes drawn.

A FastAPI app served by uvicorn (Gradio is not used: its releases pin Pillow < 13, below this project's pin).
One `ChatModel` is loaded once and shared by every browser session; generation runs on one worker thread, so
requests queue in arrival order and two users never generate at once on the device (each waiting request is
told its place in the queue). Answers stream to the page as they are generated (newline-delimited JSON).

    GET  /               the page (static/index.html)
    GET  /samples        [{name, url}] sample images: UC Merced (RSKD_SHARED_DATA or ../shared/data), else rs-synth
    GET  /samples/{k}    a sample image (PNG)
    POST /session        {sample: k} or {image: data URL} -> {session, image (data URL)}
    POST /ask            {session, question, task} -> stream of {"queue": n} / {"text": piece} lines, then
                         {"done": true, "answer", "boxes": n, "boxed": PNG data URL or null, "seconds"}
    POST /reset          {session}: forget the history
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import json
import os
import pathlib
import queue
import threading
import uuid

import numpy as np
from PIL import Image

from rskd_jax.data import SynthSource
from rskd_jax.data.errors import DataError
from rskd_jax.data.transforms import decode_image
from rskd_jax.serve.draw import draw_boxes
from rskd_jax.serve.session import TASKS, ChatModel, Conversation

PAGE = pathlib.Path(__file__).with_name("static") / "index.html"
MAX_UPLOAD = 20 << 20  # bytes of an uploaded image
MAX_SESSIONS = 64  # conversations kept (oldest dropped)
SAMPLE_CLASSES = ("airplane", "storagetanks", "harbor", "baseballdiamond", "tenniscourt", "parkinglot")


def png_data_url(image: np.ndarray | Image.Image) -> str:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def default_samples(repo_root: pathlib.Path | None = None) -> list[tuple[str, object]]:
    """(name, image) pairs: one UC Merced image per class of SAMPLE_CLASSES when the shared data is there
    (RSKD_SHARED_DATA, else ../shared/data next to the repository), else rs-synth images."""
    roots = [os.environ.get("RSKD_SHARED_DATA", "")]
    root = repo_root or pathlib.Path(__file__).resolve().parents[2]
    roots.append(str(root.parent / "shared" / "data"))
    for r in filter(None, roots):
        images = pathlib.Path(r, "UCMerced_LandUse", "Images")
        if images.is_dir():
            out = []
            for c in SAMPLE_CLASSES:
                files = sorted((images / c).glob("*.tif")) + sorted((images / c).glob("*.png"))
                files += sorted((images / c).glob("*.jpg"))
                if files:
                    out.append((f"UC Merced {c}/{files[0].name}", str(files[0])))
            if out:
                return out

    src = SynthSource(len(SAMPLE_CLASSES), image_size=256, seed=0, split="test")
    return [(f"rs-synth {src[k]['id']}", src[k]["image"]) for k in range(len(src))]


class Demo:
    """Sessions and the generation queue around one shared ChatModel."""

    def __init__(self, model: ChatModel, samples: list[tuple[str, object]], boxed_size: int = 512):
        self.model, self.boxed_size = model, boxed_size
        self.samples = [(name, decode_image(img)) for name, img in samples]
        self.sessions: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.waiting = 0  # requests queued or generating
        self.count_lock = threading.Lock()

    def open(self, image) -> tuple[str, Conversation]:
        conv = Conversation(self.model, image)
        sid = uuid.uuid4().hex
        self.sessions[sid] = conv
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return sid, conv

    def ask(self, sid: str, question: str, task: str):
        """Yields the stream's JSON lines; generation itself runs on the single worker thread."""
        conv = self.sessions.get(sid)
        if conv is None:
            yield json.dumps({"error": "unknown or expired session: pick the image again"}) + "\n"
            return
        pieces: queue.Queue = queue.Queue()
        with self.count_lock:
            ahead = self.waiting
            self.waiting += 1

        def finished(_):
            with self.count_lock:
                self.waiting -= 1
            pieces.put(None)

        future = self.worker.submit(conv.ask, question, task, on_text=pieces.put)
        future.add_done_callback(finished)
        if ahead:
            yield json.dumps({"queue": ahead}) + "\n"
        while (piece := pieces.get()) is not None:
            yield json.dumps({"text": piece}) + "\n"
        try:
            r = future.result()
        except (ValueError, DataError) as e:
            yield json.dumps({"error": str(e)}) + "\n"
            return
        boxed = draw_boxes(conv.image, r.text, scale=self.boxed_size) if r.boxes else None
        yield (
            json.dumps(
                {
                    "done": True,
                    "answer": r.text,
                    "boxes": len(r.boxes),
                    "boxed": png_data_url(boxed) if boxed is not None else None,
                    "seconds": round(r.seconds, 3),
                }
            )
            + "\n"
        )


def decode_data_url(url: str) -> bytes:
    if not isinstance(url, str) or "," not in url:
        raise DataError("image: expected a data URL (data:image/...;base64,...)")
    data = base64.b64decode(url.split(",", 1)[1], validate=False)
    if len(data) > MAX_UPLOAD:
        raise DataError(f"image: {len(data)} bytes, more than the {MAX_UPLOAD} allowed")
    return data


def make_app(demo: Demo):
    from fastapi import FastAPI, HTTPException  # noqa: PLC0415 (optional web extra)
    from fastapi.responses import HTMLResponse, Response, StreamingResponse  # noqa: PLC0415 (optional web extra)

    app = FastAPI(title="rskd-jax demo", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8").replace("__TASKS__", json.dumps(list(TASKS)))

    @app.get("/samples")
    def samples():
        return [{"name": n, "url": f"/samples/{k}"} for k, (n, _) in enumerate(demo.samples)]

    @app.get("/samples/{k}")
    def sample(k: int):
        if not 0 <= k < len(demo.samples):
            raise HTTPException(404, f"no sample {k}")
        buf = io.BytesIO()
        Image.fromarray(demo.samples[k][1]).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.post("/session")
    def session(body: dict):
        try:
            if "sample" in body:
                k = int(body["sample"])
                if not 0 <= k < len(demo.samples):
                    raise DataError(f"no sample {k}")
                image = demo.samples[k][1]
            else:
                image = decode_data_url(body.get("image"))
            sid, conv = demo.open(image)
        except (DataError, ValueError, TypeError) as e:
            raise HTTPException(400, str(e)) from None
        return {"session": sid, "image": png_data_url(conv.image)}

    @app.post("/ask")
    def ask(body: dict):
        question, task = str(body.get("question", "")).strip(), body.get("task") or "plain"
        if not question or task not in TASKS:
            raise HTTPException(400, f"need a question and a task in {list(TASKS)}")
        stream = demo.ask(str(body.get("session")), question, task)
        return StreamingResponse(stream, media_type="application/x-ndjson")

    @app.post("/reset")
    def reset(body: dict):
        conv = demo.sessions.get(str(body.get("session")))
        if conv is not None:
            conv.reset()
        return {"ok": conv is not None}

    return app


def serve(demo: Demo, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn  # noqa: PLC0415 (optional web extra)

    print(f"rskd-jax demo on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.run(make_app(demo), host=host, port=port, log_level="warning")
