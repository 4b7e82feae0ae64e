"""A JSON HTTP service over an `Answerer`, with a page to try it: `create_app(answerer)` (FastAPI; run it with
uvicorn, as `scripts/serve.py` does).

- `POST /answer` takes one `{"question", "context"[, "id"]}` object or a list of them (`?top_k=N` for candidates)
  and returns what `scripts/predict.py` prints, an object or a list to match.
- `GET /health` names the model, its backend, how it answers (SQuAD version, threshold, settings from
  `bertqa.json` or defaults), whether its QA head looks untrained, and the bertqa version; `GET /` is the page.

Questions that arrive together are answered together: `Batcher` waits a few milliseconds for more requests, up to a
number of questions, runs them as one batch on one worker thread (the event loop stays free for health checks,
timeouts and new requests) and hands each request its own answers. Every limit is checked before any work, and
refused with a 4xx JSON `{"error": ...}` that names the problem and the record (a body over its limit is read and
dropped, to a bound, before its 413, so that the client can read the reply); a request that waits longer than its
timeout gets a 504 while the server goes on. FastAPI and uvicorn are the optional extra `serve`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`request: Request`) at run
# time, from names that are imported inside `create_app`.
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import difflib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bertqa.deploy.serving import Answer

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import Response

    from bertqa.deploy.serving import Answerer

__all__ = ["Batcher", "RequestError", "ServiceLimits", "create_app", "parse_questions"]

logger = logging.getLogger("bertqa")
FIELDS = ("question", "context", "id")
EXTRA = 'pip install -e ".[serve]" (fastapi, uvicorn)'


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may hold, how long it may take, and how questions are batched."""

    max_body_bytes: int = 1 << 20
    max_discard_bytes: int = 64 << 20  # of a body over max_body_bytes, read past it and dropped before the 413
    max_questions: int = 64  # records in one request
    max_context_chars: int = 20_000  # about 4,000 words: a long article, tens of windows
    max_question_chars: int = 1_000
    max_request_chars: int = 100_000  # all passages and questions of one request: bounds the work one request holds
    max_top_k: int = 20
    timeout_s: float = 30.0  # from arrival to answer, waiting included
    max_batch: int = 32  # questions answered together
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_pending: int = 1_000  # questions waiting or running; beyond this, requests are refused (503)


class RequestError(Exception):
    """A request refused: an HTTP status and a message that names the problem; `close`: the connection is closed
    after the reply (the client may still be sending a body this server will not read)."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def parse_questions(body: bytes, limits: ServiceLimits) -> tuple[list[dict[str, Any]], bool]:
    """The records of a request body and whether it was a list. Each record keeps its id as given, else gets its
    position in the request, so answers batched with other requests' still carry the ids this request expects."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            413, f"the body has {len(body):,} bytes; this service takes at most {limits.max_body_bytes:,}"
        )
    if not body.strip():
        raise RequestError(400, 'empty body: send {"question": ..., "context": ...} or a list of such objects')
    try:
        data = json.loads(body, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    many = isinstance(data, list)
    records = data if many else [data]
    if not isinstance(data, (list, dict)):
        raise RequestError(422, f'expected an object {{"question", "context"}} or a list of them, got {_kind(data)}')
    if not records:
        raise RequestError(422, "an empty list: send at least one question")
    if len(records) > limits.max_questions:
        raise RequestError(
            422, f"{len(records)} questions; this service takes at most {limits.max_questions} a request"
        )
    parsed = [_record(i, r, many, limits) for i, r in enumerate(records)]
    total = sum(len(r["question"]) + len(r["context"]) for r in parsed)
    if total > limits.max_request_chars:
        raise RequestError(
            422,
            f"the request's questions and passages have {total:,} characters; this service takes at most "
            f"{limits.max_request_chars:,} a request (send fewer questions at a time)",
        )
    return parsed, many


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"the field {key!r} is given twice in one object")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _record(i: int, record: Any, many: bool, limits: ServiceLimits) -> dict[str, Any]:
    where = f"item {i}" if many else "the request"
    if not isinstance(record, dict):
        raise RequestError(422, f'{where}: expected an object {{"question", "context"}}, got {_kind(record)}')
    if "id" in record:
        where += f" (id {record['id']!r})"
    for key in record:
        if key not in FIELDS:
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RequestError(422, f"{where}: unknown field {key!r}{hint}; the fields are question, context, id")
    rid = record.get("id", i)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RequestError(422, f"{where}: 'id' must be a string or a whole number, got {_kind(rid)}")
    for key, most in (("question", limits.max_question_chars), ("context", limits.max_context_chars)):
        value = record.get(key)
        if key not in record:
            raise RequestError(422, f"{where}: {key!r} is missing")
        if not isinstance(value, str):
            raise RequestError(422, f"{where}: {key!r} must be text, got {_kind(value)}")
        if not value.strip():
            raise RequestError(422, f"{where}: {key!r} is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no tokenizer or reply can carry it
            raise RequestError(422, f"{where}: {key!r} is not valid Unicode text (a lone surrogate)") from None
        if len(value) > most:
            raise RequestError(
                422, f"{where}: {key!r} has {len(value):,} characters; this service takes at most {most:,}"
            )
    return {"id": rid, "question": record["question"], "context": record["context"]}


@dataclass
class _Job:
    records: list[dict[str, Any]]
    top_k: int
    future: asyncio.Future


class Batcher:
    """Answers requests' questions in shared batches: `await batcher.answer(records, top_k)`.

    `answer_fn(records, top_k)` answers a list of records in order (an `Answerer`'s `__call__`); it runs on one
    worker thread, at most `max_batch` questions at a time (a larger request runs alone). If a batch fails on one
    record's content (ValueError), each request in it is run alone, so only the bad one gets the error.
    """

    def __init__(
        self,
        answer_fn: Callable[[list[dict[str, Any]], int], list[Answer]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_pending: int,
    ) -> None:
        self.answer_fn = answer_fn
        self.max_batch, self.max_wait_s, self.max_pending = max_batch, max_wait_s, max_pending
        self.pending = 0
        self.batches = 0  # batches run, for /health and tests
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: _Job | None = None  # a job that did not fit in the last batch: it starts the next one
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bertqa-answer")

    async def answer(self, records: list[dict[str, Any]], top_k: int) -> list[Answer]:
        if self._queue is None:
            raise RuntimeError("the batcher is not running: start `run()` first (create_app does)")
        if self.pending + len(records) > self.max_pending:
            raise RequestError(503, f"busy: {self.pending} questions are waiting; try again shortly")
        job = _Job(records, top_k, asyncio.get_running_loop().create_future())
        self.pending += len(records)
        try:
            await self._queue.put(job)
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:  # timed out: a job not yet started is dropped from its batch
            job.future.cancel()
            raise
        finally:
            self.pending -= len(records)

    async def run(self) -> None:
        """Collect and answer batches until cancelled."""
        self._queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            jobs = [job for job in await self._collect() if not job.future.done()]  # done: timed out and cancelled
            if jobs:
                results = await loop.run_in_executor(self._worker, self._run_jobs, jobs)
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        (job.future.set_exception if isinstance(result, BaseException) else job.future.set_result)(
                            result
                        )

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        first = self._held or await self._queue.get()
        self._held = None
        jobs, count = [first], len(first.records)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                job = await asyncio.wait_for(self._queue.get(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                break
            if count + len(job.records) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            count += len(job.records)
        return jobs

    def _run_jobs(self, jobs: Sequence[_Job]) -> list[list[Answer] | BaseException]:
        """On the worker thread: one batch for all jobs, or each alone when the batch fails on a record."""
        self.batches += 1
        try:
            answers = self.answer_fn([r for job in jobs for r in job.records], max(job.top_k for job in jobs))
        except ValueError as err:  # a record the model cannot take (say, a question of no tokens)
            if len(jobs) == 1:
                return [RequestError(422, str(err))]
            return [self._run_jobs([job])[0] for job in jobs]
        except Exception as err:  # a fault of ours: each request gets a 500, the server goes on
            logger.exception("answering a batch failed")
            return [err for _ in jobs]
        out: list[list[Answer] | BaseException] = []
        for job in jobs:
            mine, answers = answers[: len(job.records)], answers[len(job.records) :]
            out.append([dataclasses.replace(a, top_k=a.top_k[: job.top_k]) for a in mine])
        return out

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def create_app(answerer: "Answerer", limits: ServiceLimits | None = None) -> "FastAPI":
    """The FastAPI application serving `answerer` within `limits`."""
    import importlib.resources

    try:
        from fastapi import FastAPI
    except ImportError as err:
        raise ImportError(f"serving needs FastAPI and uvicorn: {EXTRA}") from err
    from bertqa import __version__

    limits = limits or ServiceLimits()
    batcher = Batcher(
        lambda records, top_k: answerer(records, top_k=top_k),
        max_batch=limits.max_batch,
        max_wait_s=limits.max_wait_ms / 1000,
        max_pending=limits.max_pending,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:  # FastAPI is imported by now
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()

    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this service must work offline.
    # The API's description is at /openapi.json.
    app = FastAPI(title="bertqa", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    page = importlib.resources.files("bertqa.deploy").joinpath("page.html").read_text(encoding="utf-8")
    _add_routes(app, answerer, batcher, limits, page=page)
    return app


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> "Response":
    from fastapi.responses import Response

    from bertqa.training.reporting import dumps

    return Response(dumps(obj, ensure_ascii=False), status, headers, media_type="application/json")


def _add_error_handlers(app: "FastAPI") -> None:
    """Every error as JSON of one shape, `{"error": message}`: refused requests, 404/405, and faults of ours."""
    from fastapi import Request
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> "Response":
        return _json({"error": err.message}, err.status, {"Connection": "close"} if err.close else None)

    @app.exception_handler(Exception)
    async def fault(request: Request, err: Exception) -> "Response":  # a bug of ours: still JSON, and logged
        logger.exception("%s %s failed", request.method, request.url.path)
        return _json({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> "Response":  # 404, 405: the same shape of error
        message = f"{err.detail}: {request.method} {request.url.path}"
        return _json({"error": message}, err.status_code)


def _add_routes(app: "FastAPI", answerer: "Answerer", batcher: Batcher, limits: ServiceLimits, *, page: str) -> None:
    """The page (/), the health check (/health, GET and HEAD) and the questions' endpoint (/answer)."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, Response
    from starlette.requests import ClientDisconnect

    from bertqa import __version__

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Response:
        described = {"model": answerer.model_dir, "backend": answerer.backend, "v2": answerer.v2}
        return _json(
            {
                "status": "ok",
                **described,
                "no_answer_threshold": answerer.threshold,
                "settings": answerer.settings_from,  # bertqa.json, or defaults for a model bertqa did not train
                "untrained_head": answerer.untrained_head,  # why its QA head looks never trained; null if it does not
                "calibration": answerer.calibration.to_settings(),
                "version": __version__,
                "batches": batcher.batches,
                "pending": batcher.pending,
                "limits": dataclasses.asdict(limits),
            }
        )

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # for uptime checks

    @app.post("/answer")
    async def answer(request: Request) -> Response:
        started = time.monotonic()
        top_k = _top_k(request.query_params, limits.max_top_k)
        try:  # a body that trickles in counts against the timeout too
            body = await asyncio.wait_for(_body(request, limits.max_body_bytes), limits.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the body did not arrive within {limits.timeout_s:g} s") from None
        except ClientDisconnect:  # nobody is left to answer
            return Response(status_code=400)
        except _TooLarge as err:  # the rest read and dropped first, so that the client reads the 413
            size = await _discard(request, err, limits, deadline=started + limits.timeout_s)
            most = limits.max_body_bytes
            raise RequestError(413, f"the body has {size}; this service takes at most {most:,}", close=True) from None
        records, many = parse_questions(body, limits)
        remaining = limits.timeout_s - (time.monotonic() - started)
        try:
            answers = await asyncio.wait_for(batcher.answer(records, top_k), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than {limits.timeout_s:g} s and was cut off") from None
        except RequestError:
            raise
        except Exception as err:
            raise RequestError(500, f"internal error: {type(err).__name__}: {err}") from None
        out = [{"question": r["question"], **a.to_dict()} for r, a in zip(records, answers)]
        return _json(out if many else out[0])


def _top_k(params: Mapping[str, str], most: int) -> int:
    text = params.get("top_k", "0")
    if not (text.isascii() and text.isdigit()) or int(text) > most:
        raise RequestError(422, f"top_k must be a whole number from 0 to {most}, got {text!r}")
    return int(text)


class _TooLarge(Exception):
    """A body over the limit: `read` bytes of it have been read (and dropped), `chunks` yields the rest."""

    def __init__(self, read: int, chunks: AsyncIterator[bytes]) -> None:
        super().__init__(read)
        self.read, self.chunks = read, chunks


def _declared_size(request: Any) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def _body(request: Any, most: int) -> bytes:
    """The body, read no further than `most` bytes: a larger one raises `_TooLarge` without being held in memory."""
    declared = _declared_size(request)
    chunks = request.stream()  # one iterator: the request's stream cannot be started again once it has ended
    if declared is not None and declared > most:
        raise _TooLarge(0, chunks)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > most:
            raise _TooLarge(len(body), chunks)
    return bytes(body)


async def _discard(request: Any, big: _TooLarge, limits: ServiceLimits, *, deadline: float) -> str:
    """Read and drop the rest of a body over the limit, holding none of it; its size as far as it is known, for the
    413 (which closes the connection).

    A server that closes a connection with bytes unread makes the kernel reset it, and a client that sends its whole
    body before it reads (Python's urllib, requests) then sees "connection reset" instead of the 413. So the rest is
    read, until `deadline` (`time.monotonic()`) and no more than `max_discard_bytes` past the limit. That costs
    bandwidth and time, not memory: the default 64 MiB takes under a second on a local network and about 5 s at
    100 Mbit/s, well within the 30 s timeout, and covers the usual mistake (a file posted whole instead of a
    passage). The byte bound, not the timeout alone, caps the bandwidth one request can waste on a fast link. A body
    declared larger than the bound is not read at all (its client would be reset anyway, after a wasted upload), nor
    one whose client waits for a go-ahead (`Expect: 100-continue`): reading would invite the body, and refused at
    once, it is never sent.
    """
    declared = _declared_size(request)
    bound = limits.max_body_bytes + limits.max_discard_bytes
    waiting = request.headers.get("expect", "").lower() == "100-continue"
    if declared is not None and (declared > bound or waiting):
        return f"{declared:,} bytes"

    read = big.read

    async def drain() -> None:
        nonlocal read
        async for chunk in big.chunks:  # goes on from where `_body` stopped
            read += len(chunk)
            if read > bound:
                return

    from starlette.requests import ClientDisconnect

    ended = False
    with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect):  # refused all the same
        await asyncio.wait_for(drain(), max(deadline - time.monotonic(), 0))
        ended = read <= bound
    if declared is not None:
        return f"{declared:,} bytes"
    return f"{read:,} bytes" if ended else f"more than {read:,} bytes"
