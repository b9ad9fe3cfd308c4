"""`rskd-chat` against a tiny transformers Llava directory: the answer equals transformers' greedy `generate`
on the same directory (prompt written out from GeoChat's llava_v1 template and tokenized the GeoChat way,
pixels from transformers' CLIPImageProcessor), a two-turn interactive chat through stdin keeps the history,
boxes in an answer are drawn, bad inputs are one line and exit status 2."""

import io

import numpy as np
import pytest
import torch
import transformers
from test_data_testlib import tokenizer_image_token
from test_serve_testlib import tiny_hf_model, write_image

from rskd_jax.data.chat import LLAVA_V1
from rskd_jax.serve import chat_cli, draw

STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    hf, tok, cfg = tiny_hf_model(d)
    return dict(dir=d / "model", hf=hf, tok=tok, cfg=cfg, image=write_image(d / "scene.png", size=40))


def reference(tiny, prompt_ids: list[int]) -> tuple[str, list[int]]:
    """transformers' greedy answer (text, tokens without EOS) to `prompt_ids` about the test image."""
    cfg, tok = tiny["cfg"], tiny["tok"]
    size = cfg.vision.image_size
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    from PIL import Image

    px = proc(Image.open(tiny["image"]).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = tiny["hf"].generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            pixel_values=px,
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=0,
            suppress_tokens=[cfg.image_token_id],
        )
    new = [t for t in out[0, len(prompt_ids) :].tolist() if t != tok.eos_token_id]
    return tok.decode(new, skip_special_tokens=True).strip(), new


def prompt(tiny, question: str) -> list[int]:
    text = f"{LLAVA_V1.system} USER: <image>\n{question} ASSISTANT:"
    return tokenizer_image_token(text, tiny["tok"], tiny["cfg"].image_seq_length)


def run_chat(tiny, *args, stdin: str = ""):
    out = io.StringIO()
    argv = ["--model", str(tiny["dir"]), "--image", str(tiny["image"]), "--max-new-tokens", str(STEPS), *args]
    rc = chat_cli.main(argv, io.StringIO(stdin), out)
    return rc, out.getvalue()


def test_one_question_equals_transformers_generate(tiny, tmp_path):
    question = "What is in this image?"
    ref, ref_tokens = reference(tiny, prompt(tiny, question))
    assert len(ref_tokens) >= 3 and ref  # a real answer, not an immediate EOS
    rc, out = run_chat(tiny, question, "--verbose", "--boxes-dir", str(tmp_path))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == ref  # the streamed text is the whole answer
    assert "compiled" in lines[-1] and f"{len(ref_tokens)} tokens" in lines[-1]


def test_sampling_with_tiny_top_p_is_greedy(tiny, tmp_path):
    """temperature 1 with top-p ~0 keeps only the most likely token: the sampled answer is the greedy one."""
    question = "What is in this image?"
    ref, _ = reference(tiny, prompt(tiny, question))
    rc, out = run_chat(tiny, question, "--temperature", "1", "--top-p", "1e-6", "--seed", "3")
    assert rc == 0 and out.splitlines()[0] == ref


def test_interactive_two_turns_keep_history(tiny, tmp_path):
    q1, q2 = "What is in this image?", "Where is the road?"
    a1, _ = reference(tiny, prompt(tiny, q1))
    tok = tiny["tok"]
    # GeoChat's training tokenization of the history: rounds split at </s>, each tokenized on its own.
    second = (
        prompt(tiny, q1)
        + tok(a1, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok(f"USER: {q2} ASSISTANT:", add_special_tokens=False)["input_ids"]
    )
    a2, _ = reference(tiny, second)
    rc, out = run_chat(tiny, "--verbose", "--boxes-dir", str(tmp_path), stdin=f"{q1}\n{q2}\n")
    assert rc == 0
    answers = [ln.split("ASSISTANT: ", 1)[1] for ln in out.splitlines() if "ASSISTANT: " in ln]
    assert answers == [a1, a2]
    assert a2 != reference(tiny, prompt(tiny, q2))[0]  # the history changed the second answer
    timings = [ln for ln in out.splitlines() if ln.startswith("[") and " s, " in ln]
    assert len(timings) == 2 and "compiled" in timings[0] and "compiled" not in timings[1]  # one compile


def test_task_prefix_and_boxes_drawn(tiny, tmp_path, monkeypatch):
    from rskd_jax.serve import session

    seen = []
    real = session.ChatModel.reply

    def fake_reply(self, pixels, messages, on_text=None):  # the model is random: give it a boxed answer
        seen.append(messages[-1])
        r = real(self, pixels, messages, on_text)
        r.text = "<p>plane</p>{<10><20><40><50>|<30>}"
        r.boxes = draw.labelled_boxes(r.text)
        return r

    monkeypatch.setattr(session.ChatModel, "reply", fake_reply)
    rc, out = run_chat(tiny, "--task", "grounding", "--boxes-dir", str(tmp_path), "where is the plane?")
    assert rc == 0 and seen == ["[grounding]where is the plane?"]
    png = tmp_path / "scene_turn1.png"
    assert f"1 box(es) drawn: {png}" in out and png.is_file()


def test_draw_rotated_box_pixels(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    plain = np.asarray(draw.draw_boxes(img, "{<10><20><30><60>|<0>}"))
    red = plain[..., 0] > 200
    ys, xs = np.nonzero(red)  # axis-aligned: the outline spans x 20..60 px, y 20..60 px
    assert abs(xs.min() - 20) <= 2 and abs(xs.max() - 60) <= 2 and abs(ys.min() - 20) <= 2
    rotated = np.asarray(draw.draw_boxes(img, "{<10><20><30><60>|<45>}"))[..., 0] > 200
    assert not np.array_equal(red, rotated) and rotated[40, 40] == 0  # centre stays empty
    assert draw.draw_boxes(img, "no boxes here") is None


def test_bad_inputs_one_line_exit_2(tiny, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    rc = chat_cli.main(["--model", str(tiny["dir"]), "--image", str(bad), "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "broken.png" in err[0] and "cannot decode" in err[0]
    rc = chat_cli.main(["--model", str(tmp_path / "nope"), "--image", str(tiny["image"]), "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"rskd-chat: error: --model {tmp_path / 'nope'}: not found"]
