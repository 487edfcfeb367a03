"""The HTTP API: OpenAI's chat completions (plain and streamed as server-sent events), models, health,
Prometheus metrics and the web page; every refusal is one OpenAI-style JSON error naming the field."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memvp_ds.data.collate import with_visual_positions
from memvp_ds.data.prompts import prompt_format
from memvp_ds.serve.engine import Engine, QueueFull, Request, Sampling
from memvp_ds.serve.images import ImageEncoder, read_image
from memvp_ds.serve.limits import ServeLimits
from memvp_ds.serve.metrics import CONTENT_TYPE, ServeMetrics
from memvp_ds.serve.prompting import RequestError, chat_prompt

PAGE = Path(__file__).with_name("page.html")
RETRY_AFTER_S = 1
_NO_TRUNCATION = 1 << 30


@dataclass
class Service:
    """What the routes need: the engine and how requests become its inputs."""

    engine: Engine
    tokenizer: Any
    encoder: ImageEncoder
    metrics: ServeMetrics
    limits: ServeLimits
    model_name: str
    prompt_format: str
    max_total_tokens: int
    api_key: Optional[str] = None
    image_root: Optional[str] = None
    positions_per_image: int = 0
    """Positions each image takes in the prompt's text (the strategy's ``prefix_positions`` for a model that
    takes several images per sample; 0: the strategy places its one image itself)."""


def error_response(err: RequestError, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    body = {"error": {"message": str(err), "type": kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=headers)


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(f"{key}: must be {what} in [{low}, {high}], got {value!r}", key)
    return value


def _sampling(body: dict, limits: ServeLimits) -> Sampling:
    if body.get("n", 1) != 1:
        raise RequestError("n: only 1 choice per request is served", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, limits.default_max_tokens, 1, 1 << 20, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: a non-empty string or a list of at most 4 of them", "stop")
    return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),
                    top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
                    seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True), stop=stop)


async def _read_json(http: HttpRequest, limit: int) -> dict:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body exceeds the {limit}-byte limit", None, 413, "request_too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body exceeds the {limit}-byte limit", None, 413, "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise RequestError("the request body is not valid JSON", None) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    return body


def create_app(service: Service) -> FastAPI:
    limits, engine, metrics = service.limits, service.engine, service.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # uvicorn has stopped accepting and let in-flight responses finish (bounded by its graceful timeout).
        await run_in_threadpool(engine.stop, limits.drain_timeout_s)

    app = FastAPI(title="memvp-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authorize(http: HttpRequest, call_next):
        if service.api_key and http.url.path not in ("/health", "/"):
            given = http.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
                metrics.errors.labels(kind="invalid_api_key").inc()
                missing = "missing" if not given else "wrong"
                return error_response(RequestError(f"Authorization: {missing} API key (send 'Authorization: "
                                                   "Bearer <key>')", "Authorization", 401, "invalid_api_key"))
        return await call_next(http)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HttpRequest, err: StarletteHTTPException):
        return error_response(RequestError(f"{http.method} {http.url.path}: {err.detail}", None, err.status_code,
                                           "not_found" if err.status_code == 404 else "bad_request"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "memvp_ds"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        try:
            body = await _read_json(http, limits.max_request_bytes)
            request, prompt_tokens = await _prepare(body)
        except RequestError as err:
            metrics.errors.labels(kind=err.code).inc()
            return error_response(err)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request.emit = lambda kind, payload: loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        try:
            engine.submit(request)
        except QueueFull as err:
            metrics.errors.labels(kind="queue_full").inc()
            return error_response(RequestError(f"the server is busy ({err}); retry later", None, 429, "queue_full"),
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(request, queue, completion_id, created, prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "done":
                    break
                if kind == "error":
                    metrics.errors.labels(kind="server_error").inc()
                    return error_response(RequestError(f"generation failed: {payload}", None, 500, "server_error"))
        finally:
            request.cancelled = True  # a client that went away frees its row at the next step
        message = {"role": "assistant", "content": payload["text"]}
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": service.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": payload["finish_reason"],
                             "token_ids": payload["token_ids"]}],
                "usage": _usage(prompt_tokens, len(payload["token_ids"]))}

    async def _prepare(body: dict):
        if body.get("model") != service.model_name:
            raise RequestError(f"model: unknown model {body.get('model')!r}; this server serves "
                               f"{service.model_name!r}", "model", 404, "model_not_found")
        sampling = _sampling(body, limits)
        prompt = chat_prompt(body.get("messages"), service.prompt_format, service.encoder.max_images,
                             service.tokenizer)
        encoded = prompt_format(service.prompt_format).tokenize(service.tokenizer, prompt.segments, _NO_TRUNCATION)
        ids = encoded.input_ids
        if service.positions_per_image and prompt.images:
            before = encoded.image_positions or [0] * len(prompt.images)  # one image: in front, as in training
            if len(before) != len(prompt.images):
                raise RequestError(f"messages: {len(prompt.images)} images but {len(before)} in the prompt; with "
                                   f"data.prompt_format={service.prompt_format} images go in the last user "
                                   "message's question", "messages")
            ids = with_visual_positions(ids, before, service.positions_per_image)
        if len(ids) + sampling.max_tokens > service.max_total_tokens:
            raise RequestError(f"messages: {len(ids)} prompt tokens + max_tokens {sampling.max_tokens} exceed the "
                               f"limit of {service.max_total_tokens} tokens", "messages", 400,
                               "context_length_exceeded")
        pixels = []
        for field, url in prompt.images:
            image = await run_in_threadpool(read_image, url, field, limits, service.image_root)
            pixels.append(await run_in_threadpool(service.encoder.pixels, image))
        request = Request(prompt_ids=ids, pixels=pixels, sampling=sampling, emit=lambda kind, payload: None,
                          deadline=time.monotonic() + limits.request_timeout_s)
        return request, sum(token >= 0 for token in ids)  # text tokens: negative ids are images' positions

    async def _stream(request: Request, queue: asyncio.Queue, completion_id: str, created: int,
                      prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def event(**fields) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": service.model_name, **fields}
            return f"data: {json.dumps(data)}\n\n"

        def chunk(delta: dict, finish_reason=None) -> str:
            return event(choices=[{"index": 0, "delta": delta, "finish_reason": finish_reason}])

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, payload = await queue.get()
                if kind == "delta":
                    yield chunk({"content": payload})
                    continue
                if kind == "error":  # as OpenAI reports an error mid-stream
                    metrics.errors.labels(kind="server_error").inc()
                    error = {"message": f"generation failed: {payload}", "type": "server_error", "param": None,
                             "code": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                yield chunk({}, payload["finish_reason"])
                if include_usage:
                    usage = _usage(prompt_tokens, len(payload["token_ids"]))
                    yield event(choices=[], usage=usage)
                yield "data: [DONE]\n\n"
                return
        finally:
            request.cancelled = True

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
