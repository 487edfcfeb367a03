"""memvp-serve on loopback: a real uvicorn server (one per session, in this process so the tests can compare
with the model itself), the official openai client, raw HTTP for bad input, a subprocess for SIGTERM and a
headless Chromium for the page."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from memvp_ds.data.prompts import build_segments, encode_segments
from memvp_ds.serve.prompting import chat_prompt
from tests.conftest import TINY_VIT, tiny_model, write_tiny_export
from tests.helpers import REPO, free_port

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key"
QUESTIONS = ["What colour is the circle at the top?\n(A) red (B) blue", "What colour is the square?",
             "What is shown? (A) red (B) blue (C) circle", "What colour is the triangle at the left of the square?",
             "Which?", "What colour is the circle at the right? (A) red (B) blue",
             "Question: What colour is the square at the left?\nContext: N/A\nOptions: (A) red (B) blue", "What colour?"]


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


IMAGES = [_png(np.random.default_rng(i).integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)) for i in range(8)]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tokenizer_dir) -> str:
    return write_tiny_export(tmp_path_factory.mktemp("serve") / "trainable.safetensors", tokenizer_dir)


@pytest.fixture(scope="session")
def server(tiny_export):
    """(service, base URL) of a server on 127.0.0.1 in a thread of this process."""
    from memvp_ds.serve.cli import build_service
    from memvp_ds.serve.limits import ServeLimits

    limits = ServeLimits(max_rows=8, max_queue=8, max_request_bytes=400_000, max_image_bytes=100_000,
                         max_image_pixels=256 * 256, max_total_tokens=200)
    service = build_service(tiny_export, limits=limits, api_key=API_KEY)
    with _running(service) as base:
        yield service, base


@contextlib.contextmanager
def _running(service):
    """The base URL of ``service`` served on 127.0.0.1 in a thread of this process, until the block ends."""
    from memvp_ds.serve.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _content(question: str, image: bytes = None) -> list:
    parts = [{"type": "text", "text": question}]
    return parts + ([{"type": "image_url", "image_url": {"url": _data_url(image)}}] if image is not None else [])


def _reference(service, question: str, image: bytes, max_tokens: int) -> list:
    """``model.generate`` alone on the prompt and features memvp-predict would build (independently)."""
    from memvp_ds.vision.clip_features import FeatureRecipe, ClipFeatureExtractor, image_transform, load_clip_visual

    fields = chat_prompt([{"role": "user", "content": question}], "qcm_a").segments
    ids = torch.tensor([encode_segments(service.tokenizer, fields, 1 << 30).input_ids])
    visual = {}
    if image is not None:
        recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
        pixels = image_transform(recipe)(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        visual["image_features"] = ClipFeatureExtractor(load_clip_visual(recipe), recipe)(pixels).half().float()
    with service.engine.hold():  # the engine thread shares the strategy's per-forward state
        tokens = service.engine.model.generate(ids, **visual, max_new_tokens=max_tokens,
                                               eos_token_id=service.tokenizer.eos_token_id)
    return [t for t in tokens[0].tolist() if t != service.tokenizer.eos_token_id]


def test_several_images_go_where_their_parts_are_and_answer_as_generate(tokenizer_dir, tmp_path):
    """A LaVIN export trained on up to two images per sample (each image's tokens at its tag): requests with
    two, one and no images, sent together by the openai client, answer what ``model.generate`` gives each
    alone on the prompt the training encoders build from the same conversation (an <image> tag where each
    image part is) and each image's features; a third image is refused naming its part."""
    from memvp_ds.data.collate import SampleEncoder, collate
    from memvp_ds.serve.cli import build_service
    from memvp_ds.serve.limits import ServeLimits
    from memvp_ds.vision.clip_features import FeatureRecipe, ClipFeatureExtractor, image_transform, load_clip_visual

    weights = write_tiny_export(tmp_path / "lavin.safetensors", tokenizer_dir, "lavin",
                                "data.prompt_format=conversation", "data.max_images=2")
    service = build_service(weights, limits=ServeLimits(max_rows=4, max_total_tokens=200))
    recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
    extractor = ClipFeatureExtractor(load_clip_visual(recipe), recipe)
    cases = [(["Left:", IMAGES[0], "Right:", IMAGES[1], "Which is red?"], "Left: <image>\nRight: <image>\nWhich is red?"),
             (["What colour?", IMAGES[2]], "What colour?"),  # one image goes in front, as training put it
             (["What is red?"], "What is red?")]

    def reference(text, images):
        raw = {"__key__": "x", "json": json.dumps({"conversations": [{"from": "human", "value": text}],
                                                   "has_image": bool(images), "image_count": len(images)}).encode()}
        with torch.no_grad():
            for i, image in enumerate(images):
                pixels = image_transform(recipe)(Image.open(io.BytesIO(image)).convert("RGB"))[None]
                raw["npy" if i == 0 else f"{i}.npy"] = _npy(extractor(pixels)[0].half().numpy())
        encoder = SampleEncoder(service.tokenizer, "conversation", 128, 16, 32, with_target=False, max_images=2,
                                visual_positions=16)
        batch = collate([encoder(raw)], service.tokenizer.pad_token_id, (16, 32), left_pad=True, max_images=2)
        with service.engine.hold():
            tokens = service.engine.model.generate(batch["input_ids"], batch["attention_mask"],
                                                   batch["image_features"].float(), batch["has_image"],
                                                   max_new_tokens=6, eos_token_id=service.tokenizer.eos_token_id)
        return service.tokenizer.decode([t for t in tokens[0].tolist() if t != service.tokenizer.eos_token_id],
                                        skip_special_tokens=True)

    def part(item):
        if isinstance(item, bytes):
            return {"type": "image_url", "image_url": {"url": _data_url(item)}}
        return {"type": "text", "text": item}

    with _running(service) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        ask = lambda parts: client.chat.completions.create(  # noqa: E731
            model="memvp_ds-lavin", max_tokens=6, messages=[{"role": "user", "content": [part(p) for p in parts]}])
        with ThreadPoolExecutor(len(cases)) as pool:  # decoded together, as continuous batching joins them
            replies = list(pool.map(ask, [parts for parts, _ in cases]))
        for (parts, text), reply in zip(cases, replies):
            images = [p for p in parts if isinstance(p, bytes)]
            assert reply.choices[0].message.content == reference(text, images), text
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[3\].image_url.url: at most 2 "
                                                         r"images per request"):
            ask(["Three:", IMAGES[0], IMAGES[1], IMAGES[2]])


def test_a_chat_template_model_is_served_with_its_template(tmp_path):
    """An export trained with data.prompt_format=chat_template (the instruct recipes): a two-turn chat is
    rendered by the tokenizer's template, as training and memvp-eval render it, and answers what
    ``model.generate`` gives that prompt."""
    from memvp_ds.data.collate import SampleEncoder, collate
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.serve.cli import build_service
    from memvp_ds.serve.limits import ServeLimits
    from tests.chat_tokenizers import chat_tokenizer

    tokenizer_dir = chat_tokenizer(str(tmp_path / "tok"), "llama3")
    weights = write_tiny_export(tmp_path / "chat.safetensors", tokenizer_dir, "memvp",
                                "data.prompt_format=chat_template")
    service = build_service(weights, limits=ServeLimits(max_rows=2, max_total_tokens=200))
    turns = [("user", "What colour is the circle on the left?"), ("assistant", "It is red."),
             ("user", "And the square on the right?")]
    tokenizer = load_tokenizer(tokenizer_dir)
    raw = {"__key__": "x", "json": json.dumps({"conversations": [{"from": {"user": "human"}.get(r, "gpt"), "value": t}
                                                                  for r, t in turns]}).encode()}
    encoded = SampleEncoder(tokenizer, "chat_template", 128, 16, 32, with_target=False)(raw)
    assert encoded.input_ids[0] == tokenizer.bos_token_id and tokenizer.decode(encoded.input_ids).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")  # the template's generation prompt
    batch = collate([encoded], tokenizer.pad_token_id, (16, 32), left_pad=True)
    tokens = service.engine.model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5,
                                           eos_token_id=tokenizer.eos_token_id)[0].tolist()
    expected = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)
    with _running(service) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="memvp_ds-memvp", max_tokens=5,
                                               messages=[{"role": r, "content": t} for r, t in turns])
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(encoded.input_ids)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _http(base: str, path: str, body=None, key: str = API_KEY, raw: bytes = None):
    """(status, headers, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, headers, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        status, headers, text = err.code, err.headers, err.read().decode()
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def test_typed_multiple_choice_question_gets_the_official_prompt():
    official = build_segments({"question": "Which shape is at the top?", "choices": ["circle", "square"],
                               "hint": "A drawing.", "answer": 0}, "qcm_a", with_target=False)
    typed = ["Which shape is at the top? (A) circle (B) square\nContext: A drawing.",
             "Question: Which shape is at the top?\nContext: A drawing.\nOptions: (A) circle (B) square\nResponse:"]
    for text in typed:
        assert chat_prompt([{"role": "user", "content": text}], "qcm_a").segments == official
    free = chat_prompt([{"role": "user", "content": "What is shown?"}], "qcm_a").segments
    assert free == build_segments({"question": "What is shown?", "choices": []}, "qa", with_target=False)
    turns = [{"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "What is it?"}]
    assert chat_prompt(turns, "conversation").segments == build_segments(
        {"conversations": turns}, "conversation", with_target=False)


def test_models_health_metrics(server, client):
    service, base = server
    assert [m.id for m in client.models.list().data] == [service.model_name]
    status, _, body = _http(base, "/health", key=None)
    assert status == 200 and body["status"] == "ok"
    status, _, text = _http(base, "/metrics")
    assert status == 200 and "memvp_queue_depth" in text and "memvp_time_to_first_token_seconds" in text


def test_greedy_answers_equal_generate_alone_batched_and_streamed(server, client):
    service, base = server
    lengths = [24 + 5 * i for i in range(8)]
    cases = [(q, IMAGES[i] if i % 3 != 2 else None, lengths[i]) for i, q in enumerate(QUESTIONS)]
    references = [_reference(service, q, image, n) for q, image, n in cases]

    def ask(case):
        question, image, n = case
        reply = client.chat.completions.create(model=service.model_name, max_tokens=n, temperature=0,
                                               messages=[{"role": "user", "content": _content(question, image)}])
        return reply.choices[0]

    alone = ask(cases[0])
    assert alone.model_extra["token_ids"] == references[0]
    assert alone.message.content == service.tokenizer.decode(references[0], skip_special_tokens=True)
    steps_before = _batched_steps(base)
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(ask, cases))
    for choice, reference in zip(batched, references):
        assert choice.model_extra["token_ids"] == reference
    assert _batched_steps(base) > steps_before, "the concurrent requests were decoded in one batch"
    longest = max(range(8), key=lambda i: len(batched[i].message.content))
    stream = client.chat.completions.create(model=service.model_name, max_tokens=lengths[longest], stream=True,
                                            messages=[{"role": "user", "content": _content(*cases[longest][:2])}])
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices[0].delta.content]
    assert "".join(deltas) == batched[longest].message.content and len(deltas) > 1
    assert chunks[-1].choices[0].finish_reason == batched[longest].finish_reason


def _batched_steps(base: str) -> float:
    """Decode steps that ran more than one row, from /metrics."""
    text = _http(base, "/metrics")[2]
    one = float(re.search(r'memvp_batch_size_bucket\{le="1.0"\} (\S+)', text).group(1))
    return float(re.search(r"memvp_batch_size_count (\S+)", text).group(1)) - one


def test_sampling_with_a_seed_repeats(server, client):
    service, _ = server
    ask = lambda seed: client.chat.completions.create(
        model=service.model_name, max_tokens=12, temperature=1.5, seed=seed,
        messages=[{"role": "user", "content": "What colour?"}]).choices[0].model_extra["token_ids"]
    assert ask(7) == ask(7)


def _bad_requests(model: str):
    good = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": _content("What?", IMAGES[0])}]}
    with_url = lambda url: {**good, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    bomb = _png(np.zeros((300, 300, 3), dtype=np.uint8))  # 90,000 pixels compress to a few hundred bytes
    huge = _data_url(np.random.default_rng(0).integers(0, 255, 120_000, dtype=np.uint8).tobytes())
    return [
        ("bad base64", with_url("data:image/png;base64,@@@notbase64"), None, 400, "not valid base64"),
        ("not an image", with_url(_data_url(b"hello, not an image")), None, 400, "not a PNG, JPEG or WebP"),
        ("huge image", with_url(huge), None, 413, "byte limit"),
        ("decompression bomb", with_url(_data_url(bomb)), None, 413, "300x300 pixels exceed"),
        ("remote url", with_url("http://example.com/cat.png"), None, 400, "remote URLs are refused"),
        ("local file without --image-root", with_url("/etc/passwd"), None, 400, "only data: URLs"),
        ("too many tokens", {**good, "max_tokens": 500}, None, 400, "exceed the limit of 200 tokens"),
        ("unknown model", {**good, "model": "gpt-4"}, None, 404, "unknown model 'gpt-4'"),
        ("bad temperature", {**good, "temperature": 9}, None, 400, "temperature: must be"),
        ("two images", {**good, "messages": [{"role": "user", "content": _content("a", IMAGES[0]) + _content("b", IMAGES[1])}]},
         None, 400, "one image per request"),
        ("no messages", {**good, "messages": []}, None, 400, "messages: must be a non-empty list"),
        ("missing key", good, "", 401, "missing API key"),
        ("wrong key", good, "nope", 401, "wrong API key"),
        ("body too large", {**good, "padding": "x" * 500_000}, None, 413, "request body exceeds"),
    ]


def test_bad_requests_get_one_error_each_and_the_server_goes_on(server, client):
    service, base = server
    for name, body, key, status, message in _bad_requests(service.model_name):
        got, _, reply = _http(base, "/v1/chat/completions", body, key=API_KEY if key is None else key)
        assert got == status, (name, reply)
        assert message in reply["error"]["message"], (name, reply)
    got, _, reply = _http(base, "/v1/chat/completions", raw=b"{not json")
    assert got == 400 and "not valid JSON" in reply["error"]["message"]
    assert _http(base, "/metrics", key=None)[0] == 401
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "What?"}])
    reply = client.chat.completions.create(model=service.model_name, max_tokens=3,
                                           messages=[{"role": "user", "content": _content("What?", IMAGES[1])}])
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert 'memvp_errors_total{kind="image_too_large"} 2.0' in _http(base, "/metrics")[2]


def test_full_queue_answers_429_with_retry_after_and_queued_requests_finish(server, client):
    service, base = server
    body = {"model": service.model_name, "max_tokens": 3, "messages": [{"role": "user", "content": "What colour?"}]}
    with ThreadPoolExecutor(8) as pool:
        with service.engine.hold():  # no request is admitted: they stay queued
            queued = [pool.submit(_http, base, "/v1/chat/completions", body) for _ in range(8)]
            deadline = time.monotonic() + 60
            while service.engine.queue_depth < 8:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            status, headers, reply = _http(base, "/v1/chat/completions", body)
            assert status == 429 and headers["Retry-After"] == "1" and reply["error"]["code"] == "queue_full"
        assert [f.result()[0] for f in queued] == [200] * 8
    assert _http(base, "/v1/chat/completions", body)[0] == 200


def test_help_explains_the_server():
    from memvp_ds.serve.cli import build_parser

    text = build_parser().format_help()
    for words in ("/v1/chat/completions", "--max-rows", "--api-key", "decompression bombs", "SIGTERM"):
        assert words in text, words


def test_sigterm_during_a_stream_finishes_it_and_exits_0(tiny_export, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "memvp_ds.serve.cli", "--weights", tiny_export, "--port",
                             str(port), "--max-rows", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if _http(base, "/health", key=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        stream = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="memvp_ds-memvp", max_tokens=600, stream=True,
            messages=[{"role": "user", "content": _content("What colour?", IMAGES[2])}])
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        assert "Waiting for connections to close" in proc.stdout.read(), "the signal came while streaming"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
def test_page_in_headless_chromium_streams_the_answer(server, client, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    service, base = server
    image = tmp_path / "question.png"
    image.write_bytes(IMAGES[3])
    question = "What colour is the circle at the top? (A) red (B) blue"
    expected = client.chat.completions.create(
        model=service.model_name, max_tokens=16,
        messages=[{"role": "user", "content": _content(question, IMAGES[3])}]).choices[0].message.content
    assert len(expected) > 3
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "image").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").get_attribute("src"))
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "key").send_keys(API_KEY)
        max_tokens = browser.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("16")
        browser.find_element(By.ID, "submit").click()
        status = WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "status").text if b.find_element(By.ID, "status").text.startswith(
                ("done", "error")) else None)
        assert status.startswith("done"), status
        assert browser.find_element(By.ID, "answer").get_attribute("textContent") == expected
    finally:
        browser.quit()


STRATEGY_VARIANTS = {"memvp": ("memvp", []), "input_prefix": ("input_prefix", []), "apt": ("apt", []),
                     "apt_prompt_rows": ("apt", ["model.apt.visual=prompt_rows"]), "dvp": ("dvp", ["model.dvp.layer=1"]),
                     "dvp_residual": ("dvp", ["model.dvp.layer=1", "model.dvp.insert=residual"]),
                     "dvp_lavin": ("dvp", ["model.dvp.layer=1", "model.dvp.base=lavin"]),
                     "lavin": ("lavin", []), "lavin_das": ("lavin", ["model.skip.layers=[0]"]),
                     "llava_lora": ("llava_lora", []),
                     "memvp_das": ("memvp", ["model.skip.layers=[0]"]),
                     "memvp_online_clip": ("memvp", ["model.vision.online=true", f"model.vision.recipe.model={TINY_VIT}",
                                                     "model.vision.recipe.pretrained=random",
                                                     "model.vision.recipe.image_size=64"])}


@pytest.fixture(scope="module")
def tiny_encoder():
    from memvp_ds.serve.images import ImageEncoder

    return ImageEncoder({"model": TINY_VIT, "pretrained": "random", "image_size": 64}, online=False)


@pytest.mark.parametrize("variant", sorted(STRATEGY_VARIANTS))
def test_rows_joining_a_running_batch_decode_what_generate_gives_them_alone(variant, tokenizer_dir, tiny_encoder):
    """Every strategy under continuous batching: one request decodes, then 3 more (images or not, other
    lengths) join it mid-way; each gets exactly the tokens of ``model.generate`` on its own (with the inputs
    of an evaluation batch row: features, or pixels for an online-CLIP model, and has_image)."""
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.serve.engine import Engine, Request, Sampling
    from memvp_ds.serve.images import ImageEncoder
    from memvp_ds.serve.limits import ServeLimits

    strategy, overrides = STRATEGY_VARIANTS[variant]
    model = tiny_model(strategy, *overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: fresh MemVP values, APT up-projections etc. are zero
        for param in model.trainable_parameters().values():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    tokenizer = load_tokenizer(tokenizer_dir)
    online = model.vision is not None  # the model runs its own CLIP (with adapters) on the pixels
    encoder = ImageEncoder(tiny_encoder.recipe.to_dict(), online=True) if online else tiny_encoder
    engine = Engine(model, tokenizer, encoder, ServeLimits(max_rows=8))
    requests, references, done = [], [], []
    for i, question in enumerate(QUESTIONS[:4]):
        ids = encode_segments(tokenizer, chat_prompt([{"role": "user", "content": question}], "qcm_a").segments,
                              1 << 30).input_ids
        pixels = [encoder.pixels(Image.open(io.BytesIO(IMAGES[i])).convert("RGB"))] if i % 3 != 2 else []
        visual = encoder.encode([pixels])
        max_tokens = 24 if i == 0 else 4 + 3 * i
        tokens = model.generate(torch.tensor([ids]), **visual, max_new_tokens=max_tokens,
                                eos_token_id=tokenizer.eos_token_id)
        references.append([t for t in tokens[0].tolist() if t != tokenizer.eos_token_id])
        finished = threading.Event()
        done.append(finished)
        requests.append(Request(ids, pixels, Sampling(max_tokens=max_tokens),
                                lambda kind, payload, finished=finished: kind == "done" and finished.set(),
                                time.monotonic() + 300))
    engine.start()
    try:
        engine.submit(requests[0])
        deadline = time.monotonic() + 60
        while len(requests[0].tokens) < 3:  # the first request is decoding from its cache
            assert time.monotonic() < deadline
            time.sleep(0.001)
        for request in requests[1:]:
            engine.submit(request)
        assert all(finished.wait(120) for finished in done)
        for request, reference in zip(requests, references):
            assert request.tokens == reference
    finally:
        engine.stop(30)


def test_a_failed_step_fails_its_requests_the_loop_goes_on_and_timeouts_end_requests(tokenizer_dir, tiny_encoder, monkeypatch):
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.serve.engine import Engine, Request, Sampling
    from memvp_ds.serve.limits import ServeLimits

    model = tiny_model("memvp")
    engine = Engine(model, load_tokenizer(tokenizer_dir), tiny_encoder, ServeLimits(max_rows=2))
    original, calls = model.prefill, []

    def prefill_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "prefill", prefill_failing_once)
    events = [[], []]
    finished = [threading.Event(), threading.Event()]

    def request(i, deadline_s=60):
        def emit(kind, payload):
            events[i].append((kind, payload))
            if kind in ("done", "error"):
                finished[i].set()
        return Request([0, 5, 6, 7], [], Sampling(max_tokens=3), emit, time.monotonic() + deadline_s)

    engine.start()
    try:
        engine.submit(request(0))
        assert finished[0].wait(60)
        engine.submit(request(1))
        assert finished[1].wait(60)
        events.append([])
        finished.append(threading.Event())
        engine.submit(request(2, deadline_s=-1))  # past its timeout: it ends after its first token
        assert finished[2].wait(60)
    finally:
        engine.stop(30)
    assert events[0] == [("error", "RuntimeError: out of memory (simulated)")]
    assert events[1][-1][0] == "done" and len(events[1][-1][1]["token_ids"]) == 3
    assert events[2][-1][1]["finish_reason"] == "length" and len(events[2][-1][1]["token_ids"]) == 1
