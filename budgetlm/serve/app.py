"""The HTTP server: FastAPI routes in the OpenAI wire format over the batching scheduler.

    POST /v1/completions        prompt(s) -> text; stream=true sends server-sent events
    POST /v1/chat/completions   messages -> the assistant's reply, through a plain chat template
    POST /v1/embeddings         texts -> unit vectors (pooled final hidden states), any model
    POST /v1/classify           texts -> label and probabilities (fine-tuned classifiers)
    POST /v1/tag                texts -> words, tags and BIO spans (fine-tuned taggers)
    GET  /v1/models, /health, /metrics (Prometheus), / (the playground page)

Every error is a JSON body `{"error": {...}}` with a 4xx status the client can act on: 400
malformed JSON, 401 no valid key, 404 unknown route, 413 body or prompt too large, 422 a field
out of bounds or unknown, 429 rate limited, 503 queue full (with Retry-After). A bug answers 500
with a JSON body too, never a traceback.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime, and
the request models are imported inside `create_app` (the serve extra is optional).
"""

import asyncio
import base64
import logging
import struct
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources

from budgetlm.errors import UserError

log = logging.getLogger("budgetlm.serve")

PUBLIC_PATHS = ("/", "/health", "/metrics", "/favicon.ico")  # everything else needs a key when keys are set


@dataclass
class ServeOptions:
    max_batch: int = 32
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_tokens: int = 1024  # the most a request may ask to generate
    default_chat_tokens: int = 256
    max_n: int = 8
    max_inputs: int = 64  # prompts per completion request, texts per classify/tag/embeddings request
    rate_limit: float = 0.0  # requests a minute per key; 0 = none
    rate_burst: int | None = None


class Mailbox:
    """Events from the scheduler thread to the requests' queues on one event loop, handed over once a
    decode step has produced them all: one wake-up of the loop per step, instead of a
    `call_soon_threadsafe` (a write to the loop's wake-up pipe, and a switch of threads) per token per
    stream. With the batched sampler this cut the server's CPU time per streamed token by 1.7x
    (bench/results/serve_load.md)."""

    def __init__(self, loop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list = []

    def put(self, queue, item) -> None:  # on the scheduler thread, during a step
        with self.lock:
            self.pending.append((queue, item))

    def wake(self) -> None:  # on the scheduler thread, after a step
        if self.pending:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # on the event loop
        with self.lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def create_app(engine, options: ServeOptions | None = None, keys: list[str] | None = None):
    """The FastAPI application serving `engine` (a `budgetlm.serve.engine.Engine`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from budgetlm.serve import wire
    from budgetlm.serve.metrics import CONTENT_TYPE, Metrics
    from budgetlm.serve.scheduler import QueueFull, SamplingParams, Scheduler, Sequence
    from budgetlm.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, TextsRequest
    from budgetlm.serve.security import KeyChecker, RateLimiter

    options = options or ServeOptions()
    metrics = Metrics()
    checker = KeyChecker(keys)
    limiter = RateLimiter(options.rate_limit, options.rate_burst)
    max_prompt = min(options.max_prompt_tokens or engine.seq_len, engine.seq_len)
    scheduler = None
    mailboxes: dict = {}  # event loop -> its Mailbox (one loop under uvicorn; tests may run several)
    if engine.generates:
        scheduler = Scheduler(
            engine.body, engine.tokenizer, max_batch=options.max_batch, max_queue=options.max_queue, eos_id=engine.eos_id, metrics=metrics,
            after_step=lambda: [m.wake() for m in list(mailboxes.values())],
        )  # fmt: skip

    async def lifespan(app):
        if scheduler is not None:
            scheduler.start()
        yield
        if scheduler is not None:  # uvicorn has already waited for in-flight responses; this ends the thread
            await run_in_threadpool(scheduler.stop, 30)

    app = FastAPI(title="budgetlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.metrics, app.state.options = engine, scheduler, metrics, options

    def error(status: int, message: str, kind: str = "invalid_request_error", param=None, headers=None) -> JSONResponse:
        return JSONResponse(wire.error_body(message, kind, param), status_code=status, headers=headers)

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error(400, "the body is not valid JSON", param=None)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # drop the leading "body"
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {where!r}"
        elif first.get("type") == "missing":
            message = f"{where!r} is required"
        else:
            message = f"{where}: {message}" if where else message
        return error(422, message, param=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error(500, "internal server error", "server_error")

    # -- middleware: body size, keys, rate limits, latency and status metrics ----------------------

    routes_known = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/tag"}

    async def send_error(send, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        import json

        body = json.dumps(wire.error_body(message, kind)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    def guard(asgi):
        async def middleware(scope, receive, send):
            if scope["type"] != "http":
                return await asgi(scope, receive, send)
            path = scope["path"]
            route = path if path in routes_known else ("/v1/models" if path.startswith("/v1/models/") else "other")
            start = time.perf_counter()
            status_seen = {}

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    status_seen["status"] = message["status"]
                    if message["status"] >= 400:
                        metrics.errors.labels(str(message["status"])).inc()
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    metrics.latency.labels(route).observe(time.perf_counter() - start)
                await send(message)

            metrics.active_requests.inc()
            try:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                if path not in PUBLIC_PATHS:
                    key = checker.check(headers.get("authorization"))
                    if key is None:
                        return await send_error(send_counted, 401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                                                {"WWW-Authenticate": "Bearer"})  # fmt: skip
                    wait = limiter.take(key)
                    if wait > 0:
                        return await send_error(send_counted, 429, f"rate limit reached: retry in {wait:.1f} s", "rate_limit_error",
                                                {"Retry-After": str(max(1, round(wait + 0.5)))})  # fmt: skip
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    length = headers.get("content-length")
                    if length is not None and (not length.isdigit() or int(length) > options.max_body_bytes):
                        return await send_error(send_counted, 413, f"the body is larger than {options.max_body_bytes} bytes", "invalid_request_error")
                    # read the whole body here (bounded), then hand it to the app; later reads see the client's disconnect
                    chunks, size = [], 0
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return None
                        chunks.append(message.get("body", b""))
                        size += len(chunks[-1])
                        if size > options.max_body_bytes:
                            return await send_error(
                                send_counted, 413, f"the body is larger than {options.max_body_bytes} bytes", "invalid_request_error"
                            )
                        if not message.get("more_body"):
                            break
                    body, replayed = b"".join(chunks), False

                    async def replay():
                        nonlocal replayed
                        if not replayed:
                            replayed = True
                            return {"type": "http.request", "body": body, "more_body": False}
                        return await receive()

                    return await asgi(scope, replay, send_counted)
                return await asgi(scope, receive, send_counted)
            finally:
                metrics.active_requests.dec()

        return middleware

    app.add_middleware(lambda asgi: guard(asgi))

    # -- generation ------------------------------------------------------------------------------

    def need_generator():
        if scheduler is None:
            route = "/v1/tag" if engine.kind == "tag" else "/v1/classify" if engine.task_model is not None else "/v1/embeddings"
            raise ApiError(400, f"model {engine.model_id} is a {engine.kind} model, it does not generate text; use {route}")

    def sampling(req, max_tokens: int, stops: list[str], logprobs: int | None) -> SamplingParams:
        if max_tokens > options.max_tokens:
            raise ApiError(422, f"max_tokens: {max_tokens} is more than this server allows ({options.max_tokens})", param="max_tokens")
        if req.n > options.max_n:
            raise ApiError(422, f"n: {req.n} is more than this server allows ({options.max_n})", param="n")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(0, req.top_k),
            stop=stops,
            seed=req.seed,
            logprobs=logprobs,
        )

    def encode_prompt(text: str, param: str) -> list[int]:
        ids = engine.encode_prompt(text)
        if len(ids) > max_prompt:
            raise ApiError(413, f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt}", param=param)
        if not ids:
            raise ApiError(422, "the prompt is empty and the tokenizer has no end-of-text token to start from", param=param)
        return ids

    def submit(prompts: list[list[int]], params: SamplingParams, n: int):
        """One sequence per (prompt, choice); events arrive on the returned queue as (choice index, Event)."""
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(loop) or mailboxes.setdefault(loop, Mailbox(loop))
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    choice = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + j})
                    deliver = lambda event, index=index: mailbox.put(queue, (index, event))
                    seq = Sequence(ids, choice, engine.tokenizer, deliver)
                    scheduler.submit(seq)
                    seqs.append(seq)
                    metrics.prompt_tokens.inc(len(ids))
        except QueueFull as e:
            for seq in seqs:
                scheduler.cancel(seq)
            raise ApiError(503, f"the server is busy ({e}); retry shortly", "server_busy", headers={"Retry-After": "1"}) from None
        return queue, seqs

    async def events(request: Request, queue: asyncio.Queue, seqs: list, started: float):
        """(index, Event) until every sequence finished; cancels them all if the client goes away."""
        remaining = len(seqs)
        first = True
        try:
            while remaining:
                try:
                    index, event = queue.get_nowait()  # usually there: a decode step delivers to every stream at once
                except asyncio.QueueEmpty:
                    try:
                        index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                if first and event.token_id is not None:
                    metrics.ttft.observe(time.perf_counter() - started)
                    first = False
                if event.finish_reason is not None:
                    remaining -= 1
                yield index, event
        finally:
            for seq in seqs:
                if not seq.finished:
                    scheduler.cancel(seq)

    async def gather(request: Request, queue: asyncio.Queue, seqs: list, started: float, texts: list[str], on_logprob) -> tuple | None:
        """A non-streamed answer: each sequence's text appended to texts[i], `on_logprob(i, logprob)` for
        each token's (when given); (finish reasons, completion tokens), or None if the client went away."""
        finish = [None] * len(seqs)
        completion_tokens = 0
        async for index, ev in events(request, queue, seqs, started):
            if ev.error:
                raise ApiError(500, ev.error, "server_error")
            texts[index] += ev.text
            if on_logprob is not None and ev.logprob is not None:
                on_logprob(index, ev.logprob)
            if ev.finish_reason is not None:
                finish[index] = ev.finish_reason
                completion_tokens += ev.completion_tokens
        return None if any(f is None for f in finish) else (finish, completion_tokens)

    def check_inputs(count: int) -> None:
        if count > options.max_inputs:
            raise ApiError(422, f"{count} inputs; this server accepts at most {options.max_inputs} per request", param="input")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        started = time.perf_counter()
        need_generator()
        texts = req.prompts()
        check_inputs(len(texts))
        params = sampling(req, req.max_tokens or 16, req.stops(), req.logprobs)
        prompts = [encode_prompt(t, "prompt") for t in texts]
        queue, seqs = submit(prompts, params, req.n)
        rid, created = wire.new_id("cmpl"), int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(seqs))]

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                done_tokens = 0
                sent_echo = [False] * len(seqs)
                async for index, ev in events(request, queue, seqs, started):
                    if ev.error:
                        yield wire.sse(wire.error_body(ev.error, "server_error"))
                        continue
                    text = ev.text
                    if not sent_echo[index]:
                        text, sent_echo[index] = echo[index] + text, True
                    lp = None
                    if ev.logprob is not None:
                        builder = wire.CompletionLogprobs()
                        builder.add(ev.logprob)
                        lp = builder.to_json()
                    if ev.finish_reason is not None:
                        done_tokens += ev.completion_tokens
                    if text or lp or ev.finish_reason:
                        yield wire.sse(wire.completion_chunk(rid, engine.model_id, created, index, text, ev.finish_reason, lp))
                if include_usage:
                    yield wire.sse(wire.usage_chunk(rid, "text_completion", engine.model_id, created, prompt_tokens * req.n, done_tokens))
                yield wire.sse("[DONE]")

            return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts_out = list(echo)
        lps = [wire.CompletionLogprobs() for _ in seqs] if req.logprobs is not None else None
        done = await gather(request, queue, seqs, started, texts_out, (lambda i, lp: lps[i].add(lp)) if lps is not None else None)
        if done is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        finish, completion_tokens = done
        choices = [
            {"index": i, "text": texts_out[i], "logprobs": lps[i].to_json() if lps is not None else None, "finish_reason": finish[i]}
            for i in range(len(seqs))
        ]
        return wire.completion_body(rid, engine.model_id, choices, prompt_tokens * req.n, completion_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        started = time.perf_counter()
        need_generator()
        prompt = encode_prompt(engine.chat.render(req.messages), "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or options.default_chat_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, req.stops() + list(engine.chat.stops), top)
        queue, seqs = submit([prompt], params, req.n)
        rid, created = wire.new_id("chatcmpl"), int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                for i in range(len(seqs)):  # OpenAI's first chunk of each choice carries the role
                    yield wire.sse(wire.chat_chunk(rid, engine.model_id, created, i, {"role": "assistant", "content": ""}))
                done_tokens = 0
                async for index, ev in events(request, queue, seqs, started):
                    if ev.error:
                        yield wire.sse(wire.error_body(ev.error, "server_error"))
                        continue
                    lp = {"content": [wire.chat_logprob(ev.logprob)]} if ev.logprob is not None else None
                    if ev.text or lp:
                        yield wire.sse(wire.chat_chunk(rid, engine.model_id, created, index, {"content": ev.text}, None, lp))
                    if ev.finish_reason is not None:
                        done_tokens += ev.completion_tokens
                        yield wire.sse(wire.chat_chunk(rid, engine.model_id, created, index, {}, ev.finish_reason))
                if include_usage:
                    yield wire.sse(wire.usage_chunk(rid, "chat.completion.chunk", engine.model_id, created, len(prompt) * req.n, done_tokens))
                yield wire.sse("[DONE]")

            return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts_out = [""] * len(seqs)
        lps = [[] for _ in seqs]
        done = await gather(request, queue, seqs, started, texts_out, lambda i, lp: lps[i].append(wire.chat_logprob(lp)))
        if done is None:
            return Response(status_code=499)
        finish, completion_tokens = done
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts_out[i].strip()},
                "logprobs": {"content": lps[i]} if req.logprobs else None,
                "finish_reason": finish[i],
            }
            for i in range(len(seqs))
        ]
        return wire.chat_body(rid, engine.model_id, choices, len(prompt) * req.n, completion_tokens)

    # -- the other tasks -------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        texts = req.texts()
        check_inputs(len(texts))
        vectors, tokens = await run_in_threadpool(engine.embed, texts)
        data = []
        for i, vec in enumerate(vectors):
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if req.encoding_format == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": engine.model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def need_task(tasks: tuple[str, ...], route: str):
        if engine.kind not in tasks:
            raise ApiError(400, f"{route} needs a model fine-tuned for {' or '.join(tasks)}; {engine.model_id} is a {engine.kind} model")

    @app.post("/v1/classify")
    async def classify(req: TextsRequest):
        need_task(("classify", "pair", "regress"), "/v1/classify")
        texts = req.texts()
        check_inputs(len(texts))
        results = await run_in_threadpool(engine.classify, texts)
        return {"object": "list", "model": engine.model_id, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/tag")
    async def tag(req: TextsRequest):
        need_task(("tag",), "/v1/tag")
        texts = req.texts()
        check_inputs(len(texts))
        results = await run_in_threadpool(engine.tag, texts)
        return {"object": "list", "model": engine.model_id, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    # -- about the server ------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [engine.describe()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise ApiError(404, f"no model {model_id!r} here (this server serves {engine.model_id!r})", "not_found_error", "model")
        return engine.describe()

    @app.get("/health")
    async def health():
        active, waiting = scheduler.load() if scheduler is not None else (0, 0)
        return {"status": "ok", "model": engine.model_id, "kind": engine.kind, "active": active, "waiting": waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    page = resources.files("budgetlm.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    return app


# ---------------------------------------------------------------------------------------------
# the CLI verb


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args) -> int:
    import signal
    import socket

    try:
        import uvicorn
    except ImportError:
        raise UserError('budgetlm serve needs FastAPI and uvicorn: pip install "budgetlm[serve]"') from None
    from budgetlm.config import ServeConfig
    from budgetlm.flags import print_config, settings_from_args
    from budgetlm.run import resolve_device
    from budgetlm.serve.engine import Engine
    from budgetlm.serve.security import read_keys_file

    cfg = settings_from_args(ServeConfig, args)
    if args.print_config:
        print_config(cfg)
        return 0
    if args.api_key and cfg.api_keys_file:
        raise UserError("give --api-key or --api-keys-file, not both")
    keys = [args.api_key] if args.api_key else read_keys_file(cfg.api_keys_file) if cfg.api_keys_file else None
    for name in ("max_batch", "max_queue", "max_tokens", "max_n", "max_body_bytes"):
        if getattr(cfg, name) < (0 if name == "max_queue" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not is_loopback(cfg.host) and not keys:
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach this address can use the model", file=sys.stderr)
    options = ServeOptions(
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        max_body_bytes=cfg.max_body_bytes,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_tokens=cfg.max_tokens,
        max_n=cfg.max_n,
        rate_limit=cfg.rate_limit,
    )
    engine = Engine(args.model, resolve_device(cfg.device))
    app = create_app(engine, options, keys)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {engine.model_id} ({engine.kind}) on http://{shown}:{port} (keys: {'on' if keys else 'off'})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.log_level == "debug", timeout_graceful_shutdown=cfg.drain_timeout)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler it found; a
    # handler that does nothing makes a drained shutdown exit 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
