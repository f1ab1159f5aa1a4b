"""Serve a trained model over HTTP: ``rnnmath serve DIR`` (Starlette on uvicorn; ``pip install rnnmath[serve]``).

Endpoints (every answer, errors included, is a JSON object)::

    POST /predict  {"texts": ["...", ...]}  ->  {"predictions": [{"label": ..., "probabilities": {label: p}}]}
    GET  /health   -> {"status": "ok"}       (the model is loaded before the server listens)
    GET  /info     -> task, labels, cell, config, test metrics of the model directory, the server's limits

The probabilities are those of ``rnnmath predict --json`` for the same texts: the same tokenizer, encoding,
model and float32 arithmetic; one forward pass may hold the texts of several requests (see below), which
changes only the batch the matrix products run over (tests/test_serve.py compares them with predict).

**Dynamic batching.** Requests wait in a queue; one worker takes the oldest and adds the next ones until the
forward pass would hold more than ``max_batch`` texts or the oldest has waited ``max_delay`` seconds, then
runs them as one batch in a worker thread (the event loop keeps accepting requests meanwhile) and answers
each request with its own rows. Padding never changes a result: the classifier reads each sentence's state at
its true last word and pools only over its true words. ``max_batch=1`` turns batching off (one request per
forward pass; a request of several texts is still one pass).

**Bad requests** get a 4xx answer ``{"error": "<one sentence>"}`` and the server keeps serving: a body that
is not UTF-8 JSON (400), larger than ``max_body_bytes`` (413), not an object with a list ``texts`` of
strings (422), with more than ``max_texts`` texts (413), an unknown path (404) or method (405). A fault of
the server itself is a 500 with a JSON error, never a traceback.

**Timeouts.** A client has ``request_timeout`` seconds (``--request-timeout``) to send a request's headers
(from opening the connection or from its previous answer), and as long again for its body; then it gets 408
and the connection is closed (an idle connection with nothing sent is closed without an answer). A client
that sends half a request therefore holds nothing for longer than that.

**Shutdown.** SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight, and
:func:`serve` returns normally (``rnnmath serve`` exits with 0); requests still running after
``shutdown_timeout`` seconds (``--shutdown-timeout``) are cancelled, so the server always stops.

A task is served by a :class:`Service`: the routes it adds and what ``/info`` says about it. A language
model (:class:`LanguageModelService`) serves instead::

    POST /generate {"prompt": "...", "length": N, "temperature": T, "top_k": K, "seed": S}  (all optional)
                   -> the object ``rnnmath generate DIR --json`` prints for the same arguments: its "text" is
                      exactly the CLI's (the same model, prompt, sampler and seeded CPU generator)

Its requests are not joined: each generation is a loop of one-token steps with its own prompt, length and
random generator, so the batcher runs one request per pass (in the worker thread, in arrival order).
``/predict`` on a language model and ``/generate`` on a classifier answer 404 with a sentence naming the
right endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import UserError


@dataclass(frozen=True)
class Limits:
    """What one request may hold; larger requests get a 413 before any work is done."""

    max_body_bytes: int = 1 << 20  # 1 MiB
    max_texts: int = 1000  # texts in one request (POST /predict)
    max_length: int = 2000  # tokens to sample in one request (POST /generate)
    max_prompt_tokens: int = 10_000  # tokens of one prompt (POST /generate)
    request_timeout: float = 30.0  # seconds to send a request's headers, and again its body; then 408 and close


class BadRequest(Exception):
    """A client's mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# -- reading a request -------------------------------------------------------------------------------------
async def read_json_body(request: Request, limits: Limits) -> Any:
    """The request's body parsed as UTF-8 JSON, read no further than ``limits.max_body_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(413, f"the body has {int(declared)} bytes, more than the {limits.max_body_bytes} allowed")
    chunks = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():  # also bounds a chunked body, which declares no length
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise BadRequest(413, f"the body has more than the {limits.max_body_bytes} bytes allowed")
            chunks.append(chunk)

    try:
        # a client that sends less than it declared would hold this request (and a graceful shutdown) forever
        await asyncio.wait_for(read(), limits.request_timeout)
    except ClientDisconnect:  # nobody is left to answer; not the server's fault
        raise BadRequest(400, "the client closed the connection before sending the whole body") from None
    except asyncio.TimeoutError:
        raise BadRequest(408, f"the body did not arrive within {limits.request_timeout:g} s (--request-timeout)",
                         {"Connection": "close"}) from None
    body = b"".join(chunks)
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"the body is not UTF-8 (byte {e.start}); expected a JSON object") from None
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"the body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BadRequest(400, "the body is JSON nested too deeply to read") from None
    except Exception as e:  # any other failure to parse is the body's fault too, e.g. an integer of 5000 digits
        raise BadRequest(400, f"the body is not valid JSON ({' '.join(str(e).split())[:200]})") from None


def texts_of(document: Any, limits: Limits) -> list[str]:
    """The list ``texts`` of a request ``{"texts": [...]}``, checked: strings only, at most ``max_texts``."""
    if not isinstance(document, dict):
        raise BadRequest(422, f"expected a JSON object {{\"texts\": [...]}}, got a JSON {_json_kind(document)}")
    if "texts" not in document:
        raise BadRequest(422, "the JSON object has no \"texts\"; expected {\"texts\": [\"a sentence\", ...]}")
    texts = document["texts"]
    if not isinstance(texts, list):
        raise BadRequest(422, f"\"texts\" must be a list of strings, got a JSON {_json_kind(texts)}")
    if len(texts) > limits.max_texts:
        raise BadRequest(413, f"\"texts\" holds {len(texts)} texts, more than the {limits.max_texts} allowed "
                         "in one request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(422, f"texts[{i}] must be a string, got a JSON {_json_kind(text)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate is no character
            raise BadRequest(422, f"texts[{i}] holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return texts


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# -- dynamic batching --------------------------------------------------------------------------------------
@dataclass
class _Waiting:
    items: list
    future: asyncio.Future
    arrived: float


class Batcher:
    """Joins concurrent requests into one call of ``run`` (see the module docstring).

    ``run(items) -> results`` takes the items of several requests concatenated and returns one result per
    item, in order; it runs in one worker thread. ``await submit(items)`` returns the results of ``items``.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int, max_delay: float) -> None:
        if max_batch < 1 or max_delay < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay >= 0, got {max_batch} and {max_delay}")
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay
        self._queue: deque[_Waiting] = deque()
        self._queued = 0  # items in the queue
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnmath-forward")
        self._task: asyncio.Task | None = None
        self.passes = 0  # forward passes run, and the items they held: for /info and the load test
        self.running = 0  # items in the pass that runs now
        self.items = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        """Items waiting for a forward pass (not counting the pass that runs)."""
        return self._queued

    async def submit(self, items: list) -> list:
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(items, future, time.monotonic()))
        self._queued += len(items)
        self._wakeup.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._queue[0].arrived + self.max_delay
            while self._queued < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [self._queue.popleft()]  # the oldest always goes, even when larger than max_batch
            size = len(batch[0].items)
            while self._queue and size + len(self._queue[0].items) <= self.max_batch:  # then in arrival order
                size += len(self._queue[0].items)
                batch.append(self._queue.popleft())
            items = [item for w in batch for item in w.items]
            self._queued -= len(items)
            self.running = len(items)
            try:
                results = await loop.run_in_executor(self._executor, self.run, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(items)} inputs")
            except Exception as e:  # a fault of the server: each waiting request answers 500
                self.running = 0
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            self.running = 0
            self.passes += 1
            self.items += len(items)
            start = 0
            for w in batch:
                if not w.future.done():  # a client that went away has cancelled its future
                    w.future.set_result(results[start : start + len(w.items)])
                start += len(w.items)


# -- services: what each task serves -----------------------------------------------------------------------
class Service:
    """One task's endpoints. ``routes`` are added to the app; ``info`` is merged into GET /info;
    ``batchers`` are started and stopped with the server."""

    task = "unknown"
    limit_names: tuple[str, ...] = ("max_body_bytes",)  # the fields of Limits that apply, shown by /info

    def routes(self, limits: Limits) -> list[Route]:
        raise NotImplementedError

    def info(self) -> dict:
        return {}

    @property
    def batchers(self) -> list[Batcher]:
        return []


class ClassifierService(Service):
    """POST /predict for a sentence classifier (a model directory written by ``rnnmath train``)."""

    task = "classifier"
    limit_names = ("max_body_bytes", "max_texts")

    def __init__(self, directory: str | Path, max_batch: int = 64, max_delay: float = 0.005,
                 device: str = "cpu") -> None:
        from .model import HISTORY, load_model, read_json

        self.directory = Path(directory)
        self.trained = load_model(self.directory, device=device)
        self.history = read_json(self.directory / HISTORY, "history") if (self.directory / HISTORY).is_file() else {}
        self.batcher = Batcher(self.predict_texts, max_batch, max_delay)

    def predict_texts(self, texts: Sequence[str]) -> list[dict]:
        """``{"label", "probabilities"}`` per text: the numbers ``rnnmath predict --json`` prints."""
        labels = self.trained.labels
        out = []
        for p in self.trained.predict(list(texts)).tolist():
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": labels[best], "probabilities": dict(zip(labels, p))})
        return out

    async def predict(self, request: Request, limits: Limits) -> JSONResponse:
        texts = texts_of(await read_json_body(request, limits), limits)
        return JSONResponse({"predictions": await self.batcher.submit(texts)})

    def routes(self, limits: Limits) -> list[Route]:
        async def predict(request: Request) -> JSONResponse:
            return await self.predict(request, limits)

        async def generate(request: Request) -> JSONResponse:
            raise BadRequest(404, f"{self.directory} is a classifier: POST /predict; /generate is a language "
                             "model's")

        return [Route("/predict", predict, methods=["POST"]), Route("/generate", generate, methods=["POST"])]

    def info(self) -> dict:
        config = self.trained.config
        return {"model": str(self.directory), "labels": self.trained.labels, "cell": config.cell,
                "config": dataclasses.asdict(config), "vocabulary_size": len(self.trained.vocab),
                "test": self.history.get("test"), "best_epoch": self.history.get("best_epoch"),
                "best_val_accuracy": self.history.get("best_val_accuracy"),
                "device": str(next(self.trained.model.parameters()).device)}

    @property
    def batchers(self) -> list[Batcher]:
        return [self.batcher]


class LanguageModelService(Service):
    """POST /generate for a language model (a model directory written by ``rnnmath train --task lm``)."""

    task = "lm"
    limit_names = ("max_body_bytes", "max_length", "max_prompt_tokens")
    defaults = {"prompt": "", "length": 500, "temperature": 1.0, "top_k": 0, "seed": 0}  # as rnnmath generate's

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        from .language_model import load_lm
        from .model import HISTORY, read_json

        self.directory = Path(directory)
        self.trained = load_lm(self.directory, device)
        self.history = read_json(self.directory / HISTORY, "history") if (self.directory / HISTORY).is_file() else {}
        self.batcher = Batcher(self.generate_each, max_batch=1, max_delay=0.0)  # one generation per pass

    def generate_each(self, requests: Sequence[dict]) -> list[dict]:
        """For each checked request, the object ``rnnmath generate --json`` prints for the same arguments."""
        from .language_model import generate

        out = []
        for r in requests:
            _, unknown = self.trained.vocab.encode(r["prompt"])
            text = "".join(generate(self.trained.model, self.trained.vocab, r["prompt"], r["length"],
                                    r["temperature"], r["top_k"], r["seed"]))
            out.append({"prompt": r["prompt"], "text": text, "tokens": r["length"], "seed": r["seed"],
                        "temperature": r["temperature"], "top_k": r["top_k"], "unknown_in_prompt": unknown})
        return out

    def arguments_of(self, document: Any, limits: Limits) -> dict:
        """The request's arguments with the CLI's defaults filled in, checked as ``rnnmath generate`` checks
        its flags (plus ``limits``); a BadRequest (422, 413 over a limit) naming the field otherwise."""
        if not isinstance(document, dict):
            raise BadRequest(422, "expected a JSON object {\"prompt\": ..., \"length\": ..., ...}, got a JSON "
                             f"{_json_kind(document)}")
        unknown = sorted(set(document) - set(self.defaults))
        if unknown:
            raise BadRequest(422, f"unknown field {unknown[0]!r}; POST /generate takes "
                             f"{', '.join(self.defaults)}")
        r = {**self.defaults, **document}
        if not isinstance(r["prompt"], str):
            raise BadRequest(422, f"\"prompt\" must be a string, got a JSON {_json_kind(r['prompt'])}")
        try:
            r["prompt"].encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(422, "\"prompt\" holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
        for name, high in (("length", limits.max_length), ("top_k", 10_000_000), ("seed", 2**63 - 1)):
            value = r[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(422, f"\"{name}\" must be a whole number, got a JSON {_json_kind(value)} "
                                 f"{json.dumps(value)[:40]}")
            if value < 0:
                raise BadRequest(422, f"\"{name}\" must be 0 or more, got {value}")
            if value > high:
                status = 413 if name == "length" else 422
                raise BadRequest(status, f"\"{name}\" is {value}, more than the {high} allowed")
        t = r["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise BadRequest(422, f"\"temperature\" must be a number, got a JSON {_json_kind(t)}")
        if not (0 <= t <= 100):  # also NaN; Python's JSON reader takes NaN and Infinity
            raise BadRequest(422, f"\"temperature\" must be between 0 (the most probable token) and 100, got {t}")
        r["temperature"] = float(t)
        tokens = len(self.trained.vocab.encode(r["prompt"])[0])
        if tokens > limits.max_prompt_tokens:
            raise BadRequest(413, f"\"prompt\" holds {tokens} tokens, more than the {limits.max_prompt_tokens} "
                             "allowed")
        return r

    def routes(self, limits: Limits) -> list[Route]:
        async def generate(request: Request) -> JSONResponse:
            arguments = self.arguments_of(await read_json_body(request, limits), limits)
            return JSONResponse((await self.batcher.submit([arguments]))[0])

        async def predict(request: Request) -> JSONResponse:
            raise BadRequest(404, f"{self.directory} is a language model: POST /generate; /predict is a "
                             "classifier's")

        return [Route("/generate", generate, methods=["POST"]), Route("/predict", predict, methods=["POST"])]

    def info(self) -> dict:
        config = self.trained.config
        return {"model": str(self.directory), "level": config.level, "cell": config.cell,
                "config": dataclasses.asdict(config), "vocabulary_size": len(self.trained.vocab),
                "test": self.history.get("test"), "best_val_loss": self.history.get("best_val_loss"),
                "epochs_done": self.history.get("epochs_done"), "defaults": self.defaults,
                "device": str(next(self.trained.model.parameters()).device)}

    @property
    def batchers(self) -> list[Batcher]:
        return [self.batcher]


# -- the app -----------------------------------------------------------------------------------------------
def build_app(service: Service, limits: Limits = Limits()) -> Starlette:
    """The ASGI app: the service's routes, /health and /info, JSON errors for every failure."""
    started = time.time()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> JSONResponse:
        from . import __version__

        batching = [{"max_batch": b.max_batch, "max_delay_ms": b.max_delay * 1000, "forward_passes": b.passes,
                     "items": b.items, "queued": b.queued, "running": b.running} for b in service.batchers]
        return JSONResponse({"task": service.task, **service.info(), "rnnmath": __version__,
                             "limits": {name: getattr(limits, name) for name in service.limit_names},
                             "batching": batching,
                             "uptime_s": time.time() - started})

    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such path {request.url.path!r}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # a bug: the client gets one JSON object, the server's log the traceback (uvicorn logs it)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in service.batchers:
            b.start()
        yield
        for b in service.batchers:
            await b.stop()

    routes = [Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"]),
              *service.routes(limits)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={BadRequest: bad_request, HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False  # /predict/ is an unknown path (404), not a redirect built from Host
    return app


def timed_protocol(request_timeout: float) -> type:
    """uvicorn's h11 HTTP protocol with a deadline for a request's headers: a connection that has not sent a
    whole request head within ``request_timeout`` seconds of opening (or of its previous response) is
    answered 408 and closed. uvicorn itself waits for a head forever (its keep-alive timer stops at the
    first byte). The body has its own deadline in :func:`read_json_body`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()

        def connection_lost(self, exc) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
            super().connection_lost(exc)

        def arm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
            self.read_timer = self.loop.call_later(request_timeout, self.timed_out)

        def timed_out(self) -> None:
            self.read_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered; its body's deadline is the app's
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                # nothing of a next request arrived: close quietly, as uvicorn's keep-alive timeout does
                self.transport.close()
                return
            body = json.dumps({"error": f"the request's headers did not arrive within {request_timeout:g} s "
                                        "(--request-timeout)"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)
            self.transport.close()

    return TimedH11Protocol


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port, chosen by the system); a UserError if the
    address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          announce: Callable[[str], None] | None = None, log_level: str = "warning",
          shutdown_timeout: float = 30.0) -> None:
    """Run the HTTP server until SIGTERM or SIGINT; in-flight requests are answered before it returns, for at
    most ``shutdown_timeout`` seconds: the requests still running then are cancelled (their clients get no
    answer) and it returns all the same.

    ``announce`` receives the URL once the server listens (with ``port=0``, the port the system chose).
    Raises UserError when host:port cannot be had.
    """
    import uvicorn

    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(service, limits), log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=shutdown_timeout,
                            http=timed_protocol(limits.request_timeout))
    server = uvicorn.Server(config)
    stopped: list[int] = []

    # uvicorn answers SIGTERM/SIGINT with a graceful shutdown, then re-raises the signal to the handler that
    # was installed before it: this one, which lets serve() return (exit 0) instead of dying by the signal
    def note(signum, frame) -> None:
        stopped.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if announce is not None:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            config_started = server.startup

            async def startup(sockets=None):  # announce only once uvicorn accepts connections
                await config_started(sockets=sockets)
                announce(f"http://{shown}:{bound_port}")

            server.startup = startup
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
