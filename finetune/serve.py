"""``finetune serve``: a finished run behind an HTTP API (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/chat/completions`` and ``POST /v1/completions`` (generation runs): OpenAI's request and
  response shapes, streamed as server-sent events with ``"stream": true``; ``max_tokens``,
  ``temperature``, ``top_p``, ``stop`` and usage counts. Chat messages are formatted as in training (the
  chat template or prompt template, with the run's system prompt); a completion continues its prompt as
  it is. Sampling settings a request leaves out are the run's own (``eval.do_sample``,
  ``eval.temperature``, ``eval.top_p``, ``eval.max_new_tokens``), so a bare request answers like
  ``finetune predict``; ``temperature: 0`` is greedy.
- ``POST /v1/predict`` (every task): one input as the task's fields (``{"text": ...}``,
  ``{"question": ..., "context": ...}``), answered with the row ``finetune predict`` prints, or several as
  ``{"inputs": [...]}``, answered with ``{"predictions": [...]}``.
- ``GET /v1/models``, ``GET /health``.

One worker thread owns the model and the tokenizer: neither is safe to share between threads (DESIGN.md,
trap 14). Request handlers on the event loop only check and enqueue. The worker takes the oldest request
and then the ones that arrive within ``batch_window_ms`` of it (up to ``max_batch_size`` inputs or
sequences), and runs them together: prediction inputs in one ``task.predict`` call, generation requests
with the same sampling settings in one left-padded ``generate`` call whose stopping criterion ends each
sequence at its own ``max_tokens``, EOS or stop string and streams its text. The queue is bounded (503
when full) and so is every input: body size, inputs per request, ``max_tokens``, prompt plus new tokens
within the model's context. Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``; with an API key set, every request needs ``Authorization: Bearer KEY`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from finetune.errors import ConfigError, DataError, FinetuneError
from finetune.tasks.decoding import eos_token_ids, pad_rows
from finetune.trained_run import TrainedRun

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError:
    raise FinetuneError("finetune serve needs fastapi and uvicorn: pip install 'finetune[serve]'") from None

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # as OpenAI's API


@dataclass(frozen=True)
class ServeSettings:
    """How ``finetune serve`` listens, batches and bounds its inputs (the command's flags)."""

    host: str = "127.0.0.1"
    """Loopback unless told otherwise: the API has no other protection than the optional key."""
    port: int = 8000
    """0: any free port (the one bound is printed at startup)."""
    api_key: str | None = None
    """When set, every request needs ``Authorization: Bearer <api_key>``."""
    name: str | None = None
    """The model id in ``/v1/models`` and responses (default: the run's name)."""
    batch_window_ms: float = 2.0
    """How long the oldest waiting request waits for others to share its batch."""
    max_batch_size: int = 16
    """Inputs (``/v1/predict``) or sequences (completions) per batch; one request is never split."""
    max_queue: int = 256
    """Requests waiting for the worker at most; more are refused with 503."""
    max_tokens: int = 1024
    """The largest ``max_tokens`` a request may ask for."""
    max_inputs: int = 64
    """Inputs per ``/v1/predict`` request (and prompts per completion request) at most."""
    max_request_bytes: int = 1_000_000
    """Request bodies larger than this are refused with 413."""
    request_timeout_s: float = 600.0
    """A request still waiting for its answer after this long gets 504 (and its generation stops)."""
    threads: int | None = None
    """Torch's intra-op threads for the model (default: torch's choice, one per core)."""

    def validate(self) -> None:
        """One-line errors naming the flag."""
        bounds = {"port": (self.port, 0, 65535), "max-batch-size": (self.max_batch_size, 1, None),
                  "max-queue": (self.max_queue, 1, None), "max-tokens": (self.max_tokens, 1, None),
                  "max-inputs": (self.max_inputs, 1, None), "max-request-bytes": (self.max_request_bytes, 1, None),
                  "threads": (self.threads or 1, 1, None)}
        for flag, (value, low, high) in bounds.items():
            if value < low or (high is not None and value > high):
                expected = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ConfigError(f"--{flag} must be {expected}; got {value}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ConfigError(f"--batch-window-ms must be between 0 and 1000; got {self.batch_window_ms}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request timeout must be positive; got {self.request_timeout_s}")


# --- errors --------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the server refuses, answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --- requests ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict types (``"5"`` is not a number); fields this server does not know are ignored, as OpenAI's
    clients send many optional ones."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def turn(self) -> dict[str, str]:
        """The ``{role, content}`` turn chat templates take (``developer`` is the newer name of ``system``)."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    # Accepted only at their neutral values: this server does not implement them, and ignoring them would
    # answer another question than the one asked.
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a setting this server cannot honour, or None."""
        if self.n != 1:
            return "n", "only n=1 is served (send one request per choice)"
        if self.logprobs:
            return "logprobs", "log probabilities are not served"
        if self.presence_penalty or self.frequency_penalty:
            return ("presence_penalty" if self.presence_penalty else "frequency_penalty"), "penalties are not served"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not served"
        if self.tools:
            return "tools", "tool calls are not served"
        return None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise ApiError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings; got {self.stop!r}",
                           param="stop")
        return stops


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name of ``max_tokens`` for chat."""


class CompletionBody(_SamplingBody):
    prompt: str | list[str]
    echo: bool = False


# Field names of the request bodies: what an error's ``param`` may name (pydantic's error locations also
# hold the names of union members, e.g. ``str``).
_FIELDS = {name for model in (ChatBody, CompletionBody, ChatMessage, TextPart, StreamOptions)
           for name in model.model_fields}


def _validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    path: list[str] = []
    for part in first["loc"]:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif part in _FIELDS:
            path.append(("." if path else "") + part)
        else:
            break
    param = "".join(path) or None
    problems = [e["msg"] for e in error.errors() if e["loc"][:1] == first["loc"][:1]]
    return ApiError(400, f"'{param}': {'; or '.join(dict.fromkeys(problems))}" if param else problems[0],
                    param=param)


@dataclass(frozen=True)
class Sampling:
    """The settings one ``generate`` call shares: requests batch together only when these are equal."""

    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0


# --- jobs: what the handlers hand to the worker ----------------------------------------------------------
def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if not future.done():  # the handler may have given up (timeout)
        future.set_exception(error) if error is not None else future.set_result(value)


class Job:
    """One request waiting for the worker. ``future`` resolves on the event loop when the handler can
    answer: the result, or for a stream, once its prompts are accepted."""

    size: int = 1

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.enqueued = time.monotonic()
        self.cancelled = False
        """Set by the handler when its client is gone or its time ran out: the worker skips or stops it."""

    def resolve(self, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value, None)

    def reject(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, None, error)

    def group(self) -> tuple:
        """Jobs of one group run as one batch."""
        raise NotImplementedError


class PredictJob(Job):
    def __init__(self, loop: asyncio.AbstractEventLoop, inputs: list[dict[str, Any]]):
        super().__init__(loop)
        self.inputs = inputs
        self.size = len(inputs)

    def group(self) -> tuple:
        # Tasks read optional fields batch-wide (classification uses text_pair only when every input has
        # one): inputs with other fields go to another batch.
        return ("predict", tuple(sorted({key for item in self.inputs for key in item})))


@dataclass
class Choice:
    """One sequence being generated for a job: one prompt, one choice of the response."""

    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    """The decoded new tokens, cut before a stop string."""
    sent: str = ""
    """What was streamed so far (a prefix of ``text``)."""
    finish: str | None = None
    """``stop`` (EOS or a stop string), ``length`` or ``cancelled``."""
    generated: int = 0
    """New tokens generated, EOS included (usage counts)."""


class GenerateJob(Job):
    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[str | list[dict[str, str]]], chat: bool,
                 max_tokens: int | None, sampling: Sampling, stops: list[str], stream: bool):
        super().__init__(loop)
        self.prompts, self.chat, self.max_tokens = prompts, chat, max_tokens
        self.sampling, self.stops, self.stream = sampling, stops, stream
        self.size = len(prompts)
        self.choices: list[Choice] = []
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None
        """Streams: ("delta", index, text), ("finish", index, reason), then ("end", usage) or ("error", ApiError)."""

    def group(self) -> tuple:
        return ("generate", self.sampling)

    def emit(self, *event: Any) -> None:
        assert self.events is not None
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt_ids) for s in self.choices)
        completion = sum(s.generated for s in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def _streamable(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` that is safe to send now: not an unfinished UTF-8 character (decoded as
    U+FFFD), and not a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)
    return text[:len(text) - held]


class _SequenceTracker(StoppingCriteria):
    """Runs after every generation step: appends each sequence's new token, decodes it, streams the new
    text, and ends a sequence at EOS, at a stop string, at its own ``max_tokens`` or when its client is
    gone. ``generate`` pads ended rows and stops when every row has ended."""

    def __init__(self, rows: list[tuple[GenerateJob, Choice]], tokenizer: Any, eos_ids: Sequence[int]):
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, set(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for (job, seq), token in zip(self.rows, input_ids[:, -1].tolist()):
            if seq.finish is None:
                self._step(job, seq, token)
        return torch.tensor([seq.finish is not None for _, seq in self.rows], device=input_ids.device)

    def _step(self, job: GenerateJob, seq: Choice, token: int) -> None:
        if job.cancelled:
            seq.finish = "cancelled"
            return
        seq.generated += 1
        if token in self.eos_ids:
            seq.finish = "stop"
        else:
            seq.tokens.append(token)
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            cut = _first_stop(text, job.stops)
            seq.text = text if cut is None else text[:cut]
            if cut is not None:
                seq.finish = "stop"
            elif len(seq.tokens) >= seq.max_new_tokens:
                seq.finish = "length"
        self.flush(job, seq)

    def flush(self, job: GenerateJob, seq: Choice) -> None:
        """Stream what is new in a sequence's text (all of it once the sequence has ended)."""
        if not job.stream or seq.finish == "cancelled":
            return
        visible = seq.text if seq.finish else _streamable(seq.text, job.stops)
        if len(visible) > len(seq.sent) and visible.startswith(seq.sent):
            job.emit("delta", seq.index, visible[len(seq.sent):])
            seq.sent = visible
        if seq.finish:
            job.emit("finish", seq.index, seq.finish)


# --- the worker ----------------------------------------------------------------------------------------
class ModelWorker:
    """The one thread that uses the model and the tokenizer. Handlers ``submit`` jobs to a bounded queue;
    the worker gathers a batch (the oldest job plus those that arrive within the window), groups it and
    runs each group as one batch."""

    def __init__(self, run: TrainedRun, settings: ServeSettings):
        self.run, self.settings = run, settings
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._carried: Job | None = None  # taken from the queue but over the batch bound: first of the next batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="finetune-serve-model", daemon=True)
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        """Jobs in the largest batch so far (``/health``)."""
        base = run.model.get_base_model() if hasattr(run.model, "peft_config") else run.model
        self.context = getattr(getattr(base, "config", None), "max_position_embeddings", None)
        """Tokens the model attends to at most (prompt + new tokens); None when it does not say."""

    def start(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {self.settings.max_queue} requests are waiting (--max-queue); "
                                "retry later", type="server_error", code="overloaded") from None

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self.batches += 1
                self.requests += len(batch)
                self.largest_batch = max(self.largest_batch, len(batch))
                self._run(batch)

    def _collect(self) -> list[Job]:
        """The oldest job, then jobs arriving until ``batch_window_ms`` after it was queued, while the batch
        holds fewer than ``max_batch_size`` inputs. A job that waited longer than the window already (the
        worker was busy) takes only what is queued with it."""
        first, self._carried = self._carried, None
        if first is None:
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                return []
        batch, size = [first], first.size
        deadline = first.enqueued + self.settings.batch_window_ms / 1000
        while size < self.settings.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if size + job.size > self.settings.max_batch_size:
                self._carried = job
                break
            batch.append(job)
            size += job.size
        return batch

    def _run(self, batch: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in batch:
            if not job.cancelled:
                groups.setdefault(job.group(), []).append(job)
        for jobs in groups.values():
            try:
                with torch.inference_mode():
                    if isinstance(jobs[0], PredictJob):
                        self._predict(jobs)  # type: ignore[arg-type]
                    else:
                        self._generate(jobs)  # type: ignore[arg-type]
            except Exception as exc:  # the worker must outlive a failed batch
                logger.exception("batch of %d requests failed", len(jobs))
                error = ApiError(500, f"the model failed on this batch: {type(exc).__name__}: {exc}",
                                 type="server_error")
                for job in jobs:
                    job.reject(error)
                    if isinstance(job, GenerateJob) and job.stream:
                        job.emit("error", error)

    # --- prediction --------------------------------------------------------------------------------
    def _predict(self, jobs: list[PredictJob]) -> None:
        """All inputs in one ``task.predict`` call. A bad input fails the call: the jobs then run one by
        one, so that only the request holding it gets the error (with its own input numbers)."""
        inputs = [item for job in jobs for item in job.inputs]
        try:
            rows = self.run.task.predict(self.run.model, inputs)
        except DataError as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._predict([job])
                return
            jobs[0].reject(ApiError(400, str(exc), param="inputs"))
            return
        start = 0
        for job in jobs:
            job.resolve(rows[start:start + job.size])
            start += job.size

    # --- generation --------------------------------------------------------------------------------
    def _generate(self, jobs: list[GenerateJob]) -> None:
        rows: list[tuple[GenerateJob, Choice]] = []
        for job in jobs:
            try:
                job.choices = self._choices(job)
            except (ApiError, DataError) as exc:
                job.reject(exc if isinstance(exc, ApiError) else ApiError(400, str(exc), param="messages"))
                continue
            if job.stream:
                job.resolve()  # accepted: the handler starts the event stream
            rows += [(job, seq) for seq in job.choices]
        if not rows:
            return
        tokenizer, model = self.run.tokenizer, self.run.model
        eos_ids = eos_token_ids(tokenizer, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        prompts = [seq.prompt_ids for _, seq in rows]
        input_ids = pad_rows(prompts, pad_id, "left")  # left: every row's new tokens start in one column
        attention_mask = pad_rows([[1] * len(p) for p in prompts], 0, "left")
        tracker = _SequenceTracker(rows, tokenizer, eos_ids)
        sampling = jobs[0].sampling
        options: dict[str, Any] = {"do_sample": sampling.do_sample}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p)
        device = next(model.parameters()).device
        model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       max_new_tokens=max(seq.max_new_tokens for _, seq in rows), pad_token_id=pad_id,
                       eos_token_id=eos_ids, stopping_criteria=StoppingCriteriaList([tracker]), **options)
        for job, seq in rows:
            if seq.finish is None:  # generate stopped on its own limit (the context)
                seq.finish = "length"
                tracker.flush(job, seq)
        for job in jobs:
            if job.choices and job.stream:
                job.emit("end", job.usage())
            elif job.choices:
                job.resolve(job)

    def _choices(self, job: GenerateJob) -> list[Choice]:
        """Tokenize a job's prompts (here: the tokenizer belongs to this thread) and check them against the
        model's context; the default ``max_tokens`` is the run's ``eval.max_new_tokens``."""
        task, tokenizer = self.run.task, self.run.tokenizer
        sequences = []
        for index, prompt in enumerate(job.prompts):
            param = "messages" if job.chat else "prompt"
            try:
                ids = task.prompt_ids(prompt) if job.chat else tokenizer(prompt)["input_ids"]
            except Exception as exc:  # e.g. a chat template that raises on an order of roles it does not take
                raise ApiError(400, f"cannot format '{param}': {exc}", param=param) from None
            if not ids:
                raise ApiError(400, f"'{param}' is empty", param=param)
            wanted = job.max_tokens
            if self.context is not None:
                room = self.context - len(ids)
                if room < 1 or (wanted is not None and wanted > room):
                    asked = f" and max_tokens asks for {wanted} more" if wanted is not None else ""
                    raise ApiError(400, f"this model's context is {self.context} tokens; the prompt has {len(ids)}"
                                        f"{asked}", param=param, code="context_length_exceeded")
            if wanted is None:
                wanted = min(getattr(task.eval, "max_new_tokens", 64), self.settings.max_tokens,
                             self.context - len(ids) if self.context is not None else self.settings.max_tokens)
            sequences.append(Choice(index, list(ids), wanted))
        return sequences


# --- the app -------------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """Every request must carry ``Authorization: Bearer <key>`` (compared in constant time)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                problem = "missing" if not header else "wrong"
                error = ApiError(401, f"{problem} API key: send 'Authorization: Bearer <key>' with the key the "
                                      "server was started with", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read up to ``limit`` bytes (413 beyond, 400 if it is not JSON)."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _parse(model: type[_Body], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def create_app(run: TrainedRun, name: str, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``run`` as model ``name``; its lifespan starts and stops the model worker."""
    settings.validate()
    worker = ModelWorker(run, settings)
    generates = hasattr(run.task, "prompt_ids")  # the generation task: completions endpoints
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title=f"finetune serve: {name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    async def answer(job: Job) -> Any:
        worker.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), settings.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(504, f"no answer within {settings.request_timeout_s:g} s", type="server_error",
                           code="timeout") from None

    def model_entry() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "finetune",
                "task": run.task.name}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "task": run.task.name, "queued": worker.jobs.qsize(),
                "requests": worker.requests, "batches": worker.batches, "largest_batch": worker.largest_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, name)
        return model_entry()

    @app.post("/v1/predict")
    async def predict(request: Request) -> Any:
        data = await _read_json(request, settings.max_request_bytes)
        if not isinstance(data, dict):
            raise ApiError(400, 'expected a JSON object: one input\'s fields, or {"inputs": [{...}, ...]}')
        single = "inputs" not in data
        inputs = [data] if single else data["inputs"]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, dict) for x in inputs):
            raise ApiError(400, "'inputs' must be a non-empty list of JSON objects (one per input)", param="inputs")
        if len(inputs) > settings.max_inputs:
            raise ApiError(400, f"{len(inputs)} inputs in one request; at most {settings.max_inputs} "
                                "(--max-inputs)", param="inputs")
        rows = await answer(PredictJob(asyncio.get_running_loop(), inputs))
        # A JSONResponse as it is: FastAPI would first walk the rows through its jsonable_encoder.
        return JSONResponse(rows[0] if single else {"predictions": rows})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatBody = _parse(ChatBody, await _read_json(request, settings.max_request_bytes))
        _require_generation(run, generates)
        if getattr(run.task.learned, "shape", None) == "text":
            raise ApiError(400, "this run is a plain-text language model (data.shape=text): use /v1/completions")
        turns = [message.turn() for message in body.messages]
        job = _generate_job(run, body, [turns], chat=True, name=name, settings=settings,
                            max_tokens=body.max_completion_tokens or body.max_tokens)
        return await _respond(job, answer, chat=True, name=name, body=body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionBody = _parse(CompletionBody, await _read_json(request, settings.max_request_bytes))
        _require_generation(run, generates)
        if body.echo:
            raise ApiError(400, "echo is not served", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) > settings.max_inputs:
            raise ApiError(400, f"'prompt' must be a string or a list of 1 to {settings.max_inputs} strings "
                                "(--max-inputs)", param="prompt")
        job = _generate_job(run, body, prompts, chat=False, name=name, settings=settings, max_tokens=body.max_tokens)
        return await _respond(job, answer, chat=False, name=name, body=body)

    return app


def _check_model(requested: str | None, name: str) -> None:
    if requested is not None and requested != name:
        raise ApiError(404, f"model {requested!r} is not served here; this server serves {name!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def _require_generation(run: TrainedRun, generates: bool) -> None:
    if not generates:
        raise ApiError(400, f"this is a {run.task.name} run: completions are served for generation runs; "
                            "use POST /v1/predict", code="unsupported_endpoint")


def _generate_job(run: TrainedRun, body: _SamplingBody, prompts: list, *, chat: bool, name: str,
                  settings: ServeSettings, max_tokens: int | None) -> GenerateJob:
    """Check a completion request (all but its token counts, which the worker checks) and make its job."""
    _check_model(body.model, name)
    problem = body.unsupported()
    if problem:
        raise ApiError(400, f"'{problem[0]}': {problem[1]}", param=problem[0])
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; this server allows at most {settings.max_tokens} "
                            "(--max-tokens)", param="max_tokens")
    return GenerateJob(asyncio.get_running_loop(), prompts, chat, max_tokens, _sampling(run, body), body.stops(),
                       body.stream)


def _sampling(run: TrainedRun, body: _SamplingBody) -> Sampling:
    """A request's sampling: greedy at temperature 0; the run's own settings when it gives neither
    temperature nor top_p; else sampling with OpenAI's defaults (1.0) for what it leaves out."""
    if body.temperature is None and body.top_p is None:
        e = run.task.eval
        if getattr(e, "do_sample", False):
            return Sampling(True, float(e.temperature), float(e.top_p))
        return Sampling(False)
    if body.temperature == 0:
        return Sampling(False)
    return Sampling(True, 1.0 if body.temperature is None else body.temperature,
                    1.0 if body.top_p is None else body.top_p)


async def _respond(job: GenerateJob, answer: Any, *, chat: bool, name: str, body: _SamplingBody) -> Any:
    """The OpenAI response of a finished job, or its event stream."""
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not job.stream:
        await answer(job)
        choices = [_choice(chat, seq.index, seq.text, seq.finish) for seq in job.choices]
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": name, "choices": choices, "usage": job.usage()})
    await answer(job)  # accepted: prompts tokenized and within the limits
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {"id": ident, "object": chunk_object, "created": created, "model": name,
                                "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if chat:  # OpenAI's first chunk of each choice announces the role
                yield chunk([_delta(True, seq.index, None, None, role=True) for seq in job.choices])
            assert job.events is not None
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    yield chunk([_delta(chat, event[1], event[2], None)])
                elif event[0] == "finish":
                    yield chunk([_delta(chat, event[1], None, event[2])])
                elif event[0] == "error":
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                    return
                else:  # end
                    if include_usage:
                        yield chunk([], event[1])
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled = True  # a client that left mid-stream frees its row at the next step

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _choice(chat: bool, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _delta(chat: bool, index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


# --- running it ----------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening before uvicorn starts: port 0 can be reported, and a client
    that connects as soon as the address is printed waits in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # they are TCP; with Nagle on, a response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)  # uvicorn's backlog
    return sock


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def default_name(run: TrainedRun, ref: str | Path) -> str:
    """The model id: the run's name, or the Hub id it was pulled by."""
    return (run.config.run.name if Path(ref).expanduser().exists() else None) or str(ref)


def serve(run: TrainedRun, ref: str | Path, settings: ServeSettings) -> None:
    """Serve ``run`` until interrupted (Ctrl-C / SIGTERM shut it down gracefully)."""
    settings.validate()
    name = settings.name or default_name(run, ref)
    app = create_app(run, name, settings)
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    endpoints = ("/v1/chat/completions, /v1/completions, /v1/predict" if hasattr(run.task, "prompt_ids")
                 else "/v1/predict")
    print(f"serving {name} ({run.task.name}) at {url}: {endpoints}, /v1/models, /health; OpenAI base_url {url}/v1",
          flush=True)
    if not _is_loopback(host) and not settings.api_key:
        print(f"warning: listening on {host} without an API key: anyone who reaches this port can use the model "
              "(set --api-key or FINETUNE_API_KEY)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
