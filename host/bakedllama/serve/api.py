"""The HTTP API (OpenAI's completions, its error objects and its streaming chunks), /health,
/metrics and the playground page, on Starlette."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bakedllama.serve.metrics import Metrics
from bakedllama.serve.scheduler import DeviceDown, Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOPS, MAX_STOP_CHARS = 4, 256
SEED_MAX = 0xFFFFFFFF  # the hardware sampler's seed is 32 bits
# the page and its assets come from this server only; nothing from elsewhere may load
CSP = "default-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"

DISCONNECTED = "client disconnected"
KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_k", "seed", "stop", "stream",
                "stream_options", "n", "echo", "logprobs", "best_of", "presence_penalty",
                "frequency_penalty", "logit_bias", "top_p", "user", "suffix"}


class APIError(Exception):
    """An OpenAI-style error object with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Completion:
    ids: list
    prompt_text: str
    max_tokens: int
    temperature: float
    seed: int
    top_k: int
    stops: tuple
    stream: bool
    include_usage: bool
    echo: bool


class Server:
    """Everything the routes share: model, tokenizer, backend, scheduler, metrics."""

    def __init__(self, model, tok, backend, *, model_id: str, max_queue: int = 16,
                 probe_s: float = 5.0, retry_s: float = 1.0, log=None):
        self.model, self.tok, self.backend, self.model_id = model, tok, backend, model_id
        self.metrics = Metrics()
        self.scheduler = Scheduler(backend, tok, self.metrics, max_queue=max_queue, probe_s=probe_s,
                                   retry_s=retry_s, log=log)
        self.created = int(time.time())

    # Parsing ---------------------------------------------------------------------------------
    def parse(self, body) -> Completion:
        c = self.model.cfg
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        for k in body:
            if k not in KNOWN_FIELDS:
                raise APIError(400, f"Unrecognized request argument supplied: {k}", k)
        if "model" not in body:
            raise APIError(400, "you must provide a model parameter", "model")
        if body["model"] != self.model_id:
            raise APIError(400, f"The model `{_short(body['model'])}` does not exist: this server "
                           f"serves `{self.model_id}` (GET /v1/models)", "model", "model_not_found")
        ids, prompt_text = self._prompt(body.get("prompt"))
        max_tokens = _int(body, "max_tokens", 16, 1, c.seq_len - 1)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        seed = body.get("seed")
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else _int(body, "seed", 0, 0, SEED_MAX)
        top_k = _int(body, "top_k", 0, 0, c.vocab_size)
        if top_k and self.backend.kind != "golden":
            raise APIError(400, "top_k runs on the golden model only: the hardware sampler has no "
                           "top-k (use 0)", "top_k", "unsupported_parameter")
        stops = _stops(body.get("stop"))
        stream = _bool(body, "stream", False)
        so = body.get("stream_options")
        include_usage = False
        if so is not None:
            if not stream:
                raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
            if not isinstance(so, dict) or set(so) - {"include_usage"}:
                raise APIError(400, "stream_options must be an object with include_usage", "stream_options")
            include_usage = _bool(so, "include_usage", False, "stream_options.include_usage")
        echo = _bool(body, "echo", False)
        for k, allowed, what in (("n", (1,), "one completion per request"),
                                 ("best_of", (1,), "one completion per request"),
                                 ("logprobs", (None,), "no logprobs"),
                                 ("suffix", (None, ""), "no suffix (insertion)"),
                                 ("top_p", (1, 1.0), "no nucleus sampling: use temperature and top_k"),
                                 ("presence_penalty", (0, 0.0), "no penalties (integer sampler)"),
                                 ("frequency_penalty", (0, 0.0), "no penalties (integer sampler)"),
                                 ("logit_bias", ({},), "no logit_bias")):
            v = body.get(k)
            if v is not None and (isinstance(v, bool) or v not in allowed):
                raise APIError(400, f"{k}={_short(v)} is not supported: this server gives {what}", k,
                               "unsupported_parameter")
        user = body.get("user")
        if user is not None and (not isinstance(user, str) or len(user) > 256):
            raise APIError(400, "user must be a string of at most 256 characters", "user")
        if len(ids) + max_tokens > c.seq_len:
            raise APIError(400, f"This model's maximum context length is {c.seq_len} tokens, however "
                           f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; "
                           f"{max_tokens} for the completion). Please reduce your prompt or "
                           f"max_tokens.", "prompt" if len(ids) >= c.seq_len else "max_tokens",
                           "context_length_exceeded")
        return Completion(ids, prompt_text, max_tokens, temperature, seed, top_k, stops, stream,
                          include_usage, echo)

    def _prompt(self, p):
        c = self.model.cfg
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p.strip():
                raise APIError(400, "the prompt is empty", "prompt")
            if len(p) > 64 * c.seq_len:  # longer cannot fit the context: do not tokenize it
                raise APIError(400, f"the prompt of {len(p)} characters exceeds the context of "
                               f"{c.seq_len} tokens", "prompt", "context_length_exceeded")
            return self.tok.encode(p, bos=True), p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < c.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in 0..{c.vocab_size - 1}", "prompt")
            if len(p) >= c.seq_len:
                raise APIError(400, f"the prompt of {len(p)} tokens leaves no room in the context of "
                               f"{c.seq_len}", "prompt", "context_length_exceeded")
            return list(p), self.tok.decode(p)
        if isinstance(p, list) and len(p) > 1:
            raise APIError(400, "one prompt per request (send the others as their own requests)", "prompt")
        raise APIError(400, "prompt must be a string, or a list of token ids", "prompt")

    def client_key(self, request: Request, body) -> str:
        if isinstance(body, dict) and isinstance(body.get("user"), str) and body["user"]:
            return "user:" + body["user"]
        auth = request.headers.get("authorization")
        if auth:
            return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:12]
        return "addr:" + (request.client.host if request.client else "?")

    # Responses -------------------------------------------------------------------------------
    def chunk(self, job: Job, created: int, text: str, *, token_ids=(), finish_reason=None, extra=None):
        d = {"id": job.id, "object": "text_completion", "created": created, "model": self.model_id,
             "system_fingerprint": self.fingerprint,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                          "token_ids": list(token_ids)}]}
        if extra:
            d["bakedllama"] = extra
        return d

    @property
    def fingerprint(self) -> str:
        return f"bakedllama-{self.model.identity():08x}"

    def figures(self, job: Job, seed: int) -> dict:
        s = job.stats
        now = job.t_end or time.monotonic()
        n = len(job.tokens)
        d = dict(device=self.backend.info.get("device"), board=self.backend.info.get("board"),
                 seed=seed, run_index=job.run_index,
                 queued_s=round((job.t_start or now) - job.t_submit, 4),
                 time_to_first_token_s=round(job.t_first - job.t_submit, 4) if job.t_first else None,
                 tokens_per_s=round(n / (now - job.t_submit), 2) if n and now > job.t_submit else None,
                 cycles_per_token=s.get("cycles_per_token"), chip_tokens_per_s=s.get("chip_tokens_per_s"),
                 sys_clk_freq=self.backend.info.get("sys_clk_freq"))
        return d

    def usage(self, req: Completion, job: Job) -> dict:
        return {"prompt_tokens": len(req.ids), "completion_tokens": len(job.tokens),
                "total_tokens": len(req.ids) + len(job.tokens)}


def _short(v, n: int = 40) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= n else s[:n] + "..."


def _int(body, k, default, lo, hi):
    v = body.get(k)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise APIError(400, f"{k} must be an integer, not {_short(v)}", k, "invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"{k} must be in {lo}..{hi}, not {v}", k, "out_of_range")
    return v


def _number(body, k, default, lo, hi):
    v = body.get(k)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise APIError(400, f"{k} must be a number, not {_short(v)}", k, "invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"{k} must be in {lo:g}..{hi:g}, not {v:g}", k, "out_of_range")
    return float(v)


def _bool(body, k, default, name=None):
    v = body.get(k)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{name or k} must be true or false, not {_short(v)}", name or k, "invalid_type")
    return v


def _stops(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in v):
        raise APIError(400, f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters",
                       "stop", "out_of_range")
    return tuple(s for s in v if s)


async def _read_body(request: Request):
    n = request.headers.get("content-length")
    if n is not None and (not n.isdigit() or int(n) > MAX_BODY):
        raise APIError(413, f"the request body exceeds {MAX_BODY} bytes")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY:
            raise APIError(413, f"the request body exceeds {MAX_BODY} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it must be a JSON "
                       "object (see the OpenAI completions API)") from None


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class _JobStream(StreamingResponse):
    """A stream whose job is cancelled however it ends (client gone mid-write, or while queued)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(server: Server, on_ready=None) -> Starlette:
    """The ASGI app; on_ready() is called once the scheduler runs."""
    sched = server.scheduler

    async def completions(request: Request):
        try:
            body = await _read_body(request)
            req = server.parse(body)
        except APIError as e:
            server.metrics.count("invalid")
            return e.response()
        job = Job(req.ids, req.max_tokens, req.temperature, req.seed, req.top_k, req.stops,
                  client=server.client_key(request, body))
        try:
            sched.submit(job)
        except QueueFull as e:
            return APIError(503, str(e), None, "queue_full", "server_busy", {"Retry-After": "1"}).response()
        except DeviceDown as e:
            return APIError(503, f"the device is unavailable ({e}); the server reconnects when it comes "
                            f"back", None, "device_unavailable", "server_error",
                            {"Retry-After": "2"}).response()
        created = int(time.time())
        head = req.prompt_text if req.echo else ""
        if req.stream:
            return _JobStream(_stream(server, req, job, created, head),
                              lambda: sched.cancel(job, DISCONNECTED),
                              media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.create_task(_wait_disconnect(request))
        watch.add_done_callback(lambda t: t.cancelled() or sched.cancel(job, DISCONNECTED))
        try:
            text = [head]
            while True:
                item = await job.events.get()
                if item[0] == "token":
                    text.append(item[2])
                    continue
                if item[0] == "error":
                    _, status, msg, code = item
                    return APIError(status, msg, None, code).response()
                if item[0] == "aborted":
                    if item[1] != DISCONNECTED:  # the server stops
                        return APIError(503, item[1], None, "server_shutdown").response()
                    return Response(status_code=499)  # nobody is there to read it
                _, reason, tail = item
                text.append(tail)
                d = server.chunk(job, created, "".join(text), token_ids=job.tokens, finish_reason=reason,
                                 extra=server.figures(job, req.seed))
                d["usage"] = server.usage(req, job)
                return JSONResponse(d)
        finally:
            watch.cancel()
            sched.cancel(job, DISCONNECTED)  # no-op once done

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    async def model(request: Request):
        if request.path_params["name"] != server.model_id:
            return APIError(404, f"The model `{_short(request.path_params['name'])}` does not exist",
                            "model", "model_not_found").response()
        return JSONResponse(_model_card(server))

    async def health(request: Request):
        info = server.backend.info
        d = dict(status="ok" if sched.up else "down", model=server.model_id,
                 identity=f"{server.model.identity():08x}", device=info.get("device"),
                 board=info.get("board"), sys_clk_freq=info.get("sys_clk_freq"),
                 queue=len(sched.queue), max_queue=sched.max_queue, running=sched.running is not None,
                 seq_len=server.model.cfg.seq_len)
        if not sched.up:
            d["error"] = sched.down_error
        return JSONResponse(d, status_code=200 if sched.up else 503)

    async def metrics(request: Request):
        return PlainTextResponse(server.metrics.render(queue_depth=len(sched.queue),
                                                       queue_capacity=sched.max_queue,
                                                       running=int(sched.running is not None),
                                                       device_up=sched.up),
                                 media_type="text/plain; version=0.0.4")

    async def chat(request: Request):
        return APIError(404, f"`{server.model_id}` is a base model: this server has /v1/completions, "
                        f"not chat completions", None, "unknown_url").response()

    async def page(request: Request):
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                        "unknown_url" if exc.status_code == 404 else None).response()

    async def internal_error(request: Request, exc: Exception):
        return APIError(500, f"internal error ({type(exc).__name__})", None, "internal_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await sched.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await sched.stop()

    app = Starlette(routes=[
        Route("/", page),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/health", health),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan,
        middleware=[Middleware(_SecurityHeaders)])

    return app


class _SecurityHeaders:
    """Pure ASGI (a streaming response passes through untouched): the page may load nothing from
    elsewhere (CSP), and no response is sniffed into another type."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + self.HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _model_card(server: Server) -> dict:
    c = server.model.cfg
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "bakedllama",
            "bakedllama": {"identity": f"{server.model.identity():08x}", "sha256": server.model.sha256,
                           "context": c.seq_len, "vocab_size": c.vocab_size, "dim": c.dim,
                           "n_layers": c.n_layers, "device": server.backend.info.get("device"),
                           "board": server.backend.info.get("board")}}


async def _stream(server: Server, req: Completion, job: Job, created: int, head: str):
    if head:
        yield sse(server.chunk(job, created, head))
    while True:
        item = await job.events.get()
        kind = item[0]
        if kind == "token":
            _, t, delta, cycles = item
            yield sse(server.chunk(job, created, delta, token_ids=[t],
                                   extra={"cycles": cycles} if cycles is not None else None))
        elif kind == "end":
            _, reason, tail = item
            yield sse(server.chunk(job, created, tail, finish_reason=reason,
                                   extra=server.figures(job, req.seed)))
            if req.include_usage:
                yield sse({"id": job.id, "object": "text_completion", "created": created,
                           "model": server.model_id, "choices": [], "usage": server.usage(req, job)})
            yield sse(b"[DONE]")
            return
        elif kind == "error":
            _, status, msg, code = item
            yield sse(APIError(status, msg, None, code).body())
            return
        else:  # aborted: the client is gone, or the server stops
            if item[1] != DISCONNECTED:
                yield sse(APIError(503, item[1], None, "server_shutdown").body())
            return
