"""The web demo in a real headless browser (Debian's chromium driven by Selenium): the page loads with its
sample images, an uploaded image becomes the conversation's picture, a grounding question streams an answer
whose box is drawn onto the image, and a second user's request waits in the queue.

The model is a tiny one trained here to answer the grounding question with a box (a random model never writes
one), exported as a transformers Llava directory and loaded by the demo's own command-line path. The image is
a UC Merced airplane when RSKD_SHARED_DATA is set, otherwise a generated one. With RSKD_SERVE_SCREENSHOT=PATH
the test saves a screenshot of the answered page there (docs/img/serve.png is made that way).
"""

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from test_serve_testlib import memorizing_model, write_image

pytestmark = pytest.mark.slow  # trains a tiny model (~30 s) and starts a browser

QUESTION = "Where is the airplane in the image?"
ANSWER = "<p>airplane</p>{<26><40><56><70>|<-40>}"
CENTRE = (41, 55)  # of the box, % of the width / height


def _browser_or_skip():
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"needs a headless browser: {missing} not on PATH (apt-get install chromium chromium-driver)"
        )
    for mod in ("selenium", "fastapi", "uvicorn"):
        pytest.importorskip(mod, reason=f"needs {mod}: pip install -e '.[serve,test]'")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_or_skip()
    import uvicorn

    from rskd_jax.serve import serve_cli, web

    d = tmp_path_factory.mktemp("web")
    data = os.environ.get("RSKD_SHARED_DATA")
    ucm = os.path.join(data or "", "UCMerced_LandUse", "Images", "airplane", "airplane00.jpg")
    image = ucm if data and os.path.isfile(ucm) else str(write_image(d / "airplane.png", size=64, seed=3))
    model_dir, loss = memorizing_model(d, image, "[grounding]" + QUESTION, ANSWER)
    assert loss < 0.05, loss
    args = serve_cli.parser().parse_args(["--model", str(model_dir), "--max-new-tokens", "64"])
    demo = serve_cli.build(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(web.make_app(demo), host=args.host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    yield dict(url=f"http://127.0.0.1:{port}/", image=image, demo=demo)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1180,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()


def test_browser_upload_ground_and_boxes(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server["url"])
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#samples img")) >= 1)
    browser.find_element(By.ID, "upload").send_keys(server["image"])
    wait.until(lambda b: b.find_elements(By.ID, "image"))
    browser.find_element(By.ID, "task-grounding").click()
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".bot[data-done]"))
    bot = browser.find_element(By.CSS_SELECTOR, ".bot[data-done]")
    assert bot.text.splitlines()[0] == ANSWER and "1 box(es) drawn" in bot.text
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == f"[grounding] {QUESTION}"
    boxed = browser.find_element(By.ID, "boxed")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", boxed) >= 512
    src = boxed.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    # the first box colour (rskd_jax/serve/draw.py COLORS[0]) exactly: a random test image has almost no such pixel
    red = (np.abs(drawn.astype(int) - (255, 64, 64)) <= 3).all(-1)
    ys, xs = np.nonzero(red)  # the rotated box's outline, around its centre
    h, w = red.shape
    assert (
        red.sum() > 200
        and abs(100 * xs.mean() / w - CENTRE[0]) < 4
        and abs(100 * ys.mean() / h - CENTRE[1]) < 4
    )
    shot = os.environ.get("RSKD_SERVE_SCREENSHOT")
    if shot:  # a small PNG for the README: 256-colour palette
        browser.execute_script("window.scrollTo(0, 0)")
        png = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        png.quantize(256, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)


def test_requests_queue_one_generation_at_a_time(server):
    """Two users at once: the second request waits for the first and is told so."""
    demo = server["demo"]
    sid, _ = demo.open(server["image"])
    started, release = threading.Event(), threading.Event()
    real = demo.model.reply

    def slow_reply(*a, **k):
        started.set()
        release.wait(30)
        return real(*a, **k)

    demo.model.reply = slow_reply
    try:
        first = threading.Thread(target=lambda: list(demo.ask(sid, QUESTION, "grounding")))
        first.start()
        assert started.wait(30)
        body = json.dumps({"session": sid, "question": QUESTION, "task": "grounding"}).encode()
        req = urllib.request.Request(server["url"] + "ask", body, {"Content-Type": "application/json"})
        lines = []
        with urllib.request.urlopen(req, timeout=120) as resp:
            first_line = json.loads(resp.readline())
            release.set()
            lines = [first_line] + [json.loads(x) for x in resp.read().splitlines()]
        first.join(30)
    finally:
        release.set()
        demo.model.reply = real
    assert lines[0] == {"queue": 1} and lines[-1]["done"] and lines[-1]["answer"] == ANSWER
