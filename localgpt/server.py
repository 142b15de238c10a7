"""``localgpt serve``: an OpenAI-compatible HTTP API over the same library the CLI calls.

``/v1/chat/completions`` answers from a collection with ``QAChain.stream`` (streaming as SSE or
not), ``/v1/embeddings`` embeds with the collection's embedder, ``/v1/models`` lists collections,
and ``/v1/collections/...`` uploads (``save_upload`` + ``ingest_folder``), lists and removes
documents (``localgpt.library``). Retrieval runs concurrently; generation takes turns in one
queue per loaded model (``GenerationQueue``), except with the fast engine, whose ``BatchEngine`` decodes
concurrent requests together (``BatchedGenerator``); a client that disconnects stops its answer.
Never calls out: no telemetry, and no docs page (FastAPI's would load scripts from a CDN).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from localgpt.config import Settings
from localgpt.errors import (
    ConfigError, EmbedderMismatch, LocalGPTError, ModelNotFound, NativeCrash, StoreError,
)
from localgpt.generation.queue import (
    BatchedGenerator, BatchLine, Cancelled, GenerationQueue, QueuedGenerator, generator_key,
)
from localgpt.library import UploadRefused, collection_summary, remove_sources, save_upload, supported_formats, upload_folder
from localgpt.metrics import ServerMetrics, prometheus_text

log = logging.getLogger("localgpt.server")

MODEL_PREFIX = "localgpt/"
MAX_FILES_PER_UPLOAD = 100
KEEP_JOBS = 1000  # finished upload jobs remembered for GET /v1/jobs/{id} (in memory and in <data_dir>/jobs/)
JOB_SAVE_EVERY_S = 0.25  # a running job's progress is written to its file at most this often


class ServeRefused(LocalGPTError):
    """``localgpt serve`` was asked for something unsafe (a public address without an API key)."""


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key: anyone who can reach the port
    could read every document."""
    if not api_key and not is_loopback(host):
        raise ServeRefused(
            f"refusing to listen on {host} without an API key: anyone who can reach this port could read "
            "your documents; set --api-key or LOCALGPT_API_KEY, or keep the default --host 127.0.0.1"
        )


# ============================================================================ request bodies
class Options(BaseModel):
    """What localgpt adds to OpenAI's chat body, in its ``localgpt`` field."""

    model_config = ConfigDict(extra="forbid")
    collection: str | None = None
    k: int | None = None
    mode: Literal["hybrid", "dense", "keyword", "mmr"] | None = None
    file: str | None = None
    folder: str | None = None
    type: str | None = None
    extractive: bool = False
    answer_check: Literal["auto", "on", "off"] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    # Accepted and unused: seed, presence_penalty, frequency_penalty, logit_bias, user, store… (they
    # change nothing a client relies on). What would change the reply's shape is refused (unsupported()).
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    localgpt: Options | None = None

    def unsupported(self) -> str | None:
        """Why this request cannot be answered as asked (an OpenAI parameter localgpt cannot honour), or None."""
        if self.n not in (None, 1):
            return f"n={self.n} is not supported: localgpt gives one answer (choice) per request; send n=1 or leave it out"
        if self.tools or self.functions:
            return ("tools and function calling are not supported: localgpt answers from the collection's documents "
                    "and calls no tools; leave out 'tools'/'functions'")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return (f"response_format {self.response_format.get('type')!r} is not supported: answers are text with [n] "
                    "markers (the sources are in the 'localgpt' field as JSON)")
        if self.logprobs:
            return "logprobs are not supported: leave out 'logprobs'"
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop takes at most 4 sequences"
        return None

    def stops(self) -> list[str]:
        return [x for x in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if x]

    def instructions(self) -> str:
        """The system (or developer) messages: extra instructions, given to the generator after
        localgpt's own (answer from the passages, cite them), which still apply."""
        return "\n\n".join(m.text().strip() for m in self.messages if m.role in ("system", "developer") and m.text().strip())


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "passage"] = "query"  # e5 encodes questions and passages differently


# ============================================================================ state
def _embedder_spec(recorded: str | None, default: str) -> str:
    """The embedder setting that gives the embedder a collection recorded (``embedder_name``'s inverse)."""
    from localgpt.embeddings import embedder_name

    if recorded is None:
        return default
    for spec in (default, "e5-small", "minilm"):
        if embedder_name(spec) == recorded:
            return spec
    return recorded[3:] if recorded.startswith("st:") else default


class Collection:
    """One collection as the server holds it: a store for reads (the retriever's), one for writes
    (ingest and removal, one at a time under ``lock``). Opening a store removes only what a dead
    writer left pending (see ``localgpt.store``), never an ingest running meanwhile, here or in
    another process."""

    def __init__(self, base: Settings, name: str, *, create: bool):
        from localgpt.embeddings import get_embedder
        from localgpt.retrieval import Retriever
        from localgpt.store import Store

        self.name = name
        self.lock = threading.Lock()
        self.manifest = Path(base.data_dir) / "collections" / f"{name}.sqlite"
        self.writer = Store.open(base.with_overrides(collection=name), name, create=create)
        self.identity = _file_identity(self.manifest)
        try:
            spec = _embedder_spec(self.writer.meta("embedder"), base.embedder)
            self.settings = base.with_overrides(collection=name, embedder=spec)
            self.reader = Store.open(self.settings, name, create=create)
            self.retriever = Retriever(self.reader, get_embedder(spec), self.settings)
        except BaseException:
            self.writer.close()
            raise

    def current(self) -> bool:
        """Whether the manifest opened is still the collection's: another process sharing the data
        folder may have dropped it (and an upload there made a new one) since."""
        return self.identity is not None and _file_identity(self.manifest) == self.identity

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class UploadJob:
    """An upload's ingest, for ``GET /v1/jobs/{id}``."""

    collection: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # 122 random bits: not guessable
    status: str = "running"  # running, done, failed
    total: int = 0
    done: int = 0
    chunks: int = 0
    saved: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)  # path -> status (and reason)
    report: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "id": self.id, "object": "ingest.job", "collection": self.collection, "status": self.status,
            "total": self.total, "done": self.done, "chunks": self.chunks, "saved": self.saved,
            "refused": self.refused, "files": [{"path": p, **v} for p, v in list(self.files.items())],
            "report": self.report, "error": self.error,
        }


class _JobProgress:
    """``ingest_folder``'s progress, written into an UploadJob (and now and then into its file)."""

    def __init__(self, job: UploadJob, board: "JobFiles | None" = None):
        self.job, self.board = job, board

    def start(self, total_files: int) -> None:
        self.job.total = total_files
        self._save()

    def file_done(self, path: str, status: str, chunks: int = 0, nbytes: int = 0) -> None:
        self.job.done += 1
        self.job.files[path] = {"status": status}
        self._save()

    def chunks_embedded(self, n: int) -> None:
        self.job.chunks += n
        self._save()

    def _save(self) -> None:
        if self.board is not None:
            self.board.save(self.job, every=JOB_SAVE_EVERY_S)


class JobFiles:
    """Upload jobs on disk, ``<data_dir>/jobs/<id>.json``, so that every ``serve`` process on this
    data folder answers ``GET /v1/jobs/{id}`` the same (behind a load balancer the poll may reach
    any of them). Each file holds the job as the endpoint returns it and its owner: the writer name
    of the process running it (``localgpt.store``'s lock on ``collections/.writers/<name>``, held
    while that process lives), its pid and host. A job still "running" whose owner's lock is free
    is reported failed: that process died (killed, crashed, stopped) before the ingest finished.
    Files are written aside and renamed over, so a reader sees a whole one; at most KEEP_JOBS stay
    (the oldest finished ones go, as in memory)."""

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir).resolve()
        self.folder = self.data_dir / "jobs"
        self._saved: dict[str, float] = {}  # job id -> when its file was last written (running jobs)
        self._lock = threading.Lock()

    def path(self, job_id: str) -> Path | None:
        return self.folder / f"{job_id}.json" if _JOB_ID.fullmatch(job_id) else None

    def _owner(self) -> dict:
        from localgpt.store import _writer_token

        return {"owner": _writer_token(self.data_dir), "pid": os.getpid(), "host": os.uname().nodename}

    def save(self, job: UploadJob, every: float = 0.0) -> None:
        """Write the job's state (a running job's at most once per ``every`` seconds). A failure is
        logged, never raised: this process still answers from memory."""
        from fastapi.encoders import jsonable_encoder

        now = time.monotonic()
        with self._lock:
            if job.status == "running" and every and now - self._saved.get(job.id, float("-inf")) < every:
                return
            if job.status == "running":
                self._saved[job.id] = now
            else:
                self._saved.pop(job.id, None)
        target = self.folder / f"{job.id}.json"
        tmp = self.folder / f".{job.id}.{uuid.uuid4().hex[:8]}.tmp"  # hidden, and never a job file
        try:
            record = {"job": jsonable_encoder(job.as_dict()), **self._owner(), "saved": time.time()}
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
            os.replace(tmp, target)  # atomic: readers see the old file or the new one
        except Exception as exc:  # noqa: BLE001 - the upload and its ingest go on regardless
            log.warning("cannot write %s (%s): other serve processes on this data folder will not see this job",
                        target, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load(self, job_id: str) -> dict | None:
        """The job as ``GET /v1/jobs/{id}`` returns it, from its file; None if there is none."""
        path = self.path(job_id)
        record = _read_job_file(path) if path is not None else None
        if record is None:
            return None
        job = record["job"]
        if job.get("status") == "running" and not _owner_alive(self.data_dir, record):
            again = _read_job_file(path)  # it may have finished just before its process ended
            if again is None or again["job"].get("status") != "running":
                return again["job"] if again else None
            job = {**job, "status": "failed", "error": (
                f"the serve process that ran this upload (pid {record.get('pid')} on {record.get('host')}) stopped "
                f"before its ingest finished; the files saved are in the collection's upload folder and the next "
                f"upload to '{job.get('collection')}' ingests them (or upload them again)")}
        return job

    def prune(self, keep: int = KEEP_JOBS) -> None:
        """Past ``keep`` job files, the oldest finished ones go (running ones of a live process stay),
        and temporary files a killed writer left."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        jobs, now = [], time.time()
        for entry in entries:
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            if entry.name.endswith(".json") and _JOB_ID.fullmatch(entry.name[:-5]):
                jobs.append((mtime, entry.name[:-5]))
            elif entry.name.startswith(".") and entry.name.endswith(".tmp") and now - mtime > 3600:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        excess = len(jobs) - keep
        for _, job_id in sorted(jobs):
            if excess <= 0:
                break
            job = self.load(job_id)
            if job is not None and job.get("status") == "running":
                continue
            with contextlib.suppress(OSError):
                os.unlink(self.folder / f"{job_id}.json")
            excess -= 1


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _read_job_file(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None  # none, or not a job file
    return record if isinstance(record, dict) and isinstance(record.get("job"), dict) else None


def _owner_alive(data_dir: Path, record: dict) -> bool:
    """Whether the process that wrote a running job still runs: it holds the lock on its writer file
    (see ``localgpt.store``). Where the file system refused locks (no writer name), a process on
    this host is looked up by pid; one on another host cannot be told, and counts as alive."""
    from localgpt.store import _writer_alive, _writers_folder

    owner = record.get("owner")
    if owner and isinstance(owner, str):
        return _writer_alive(_writers_folder(data_dir), owner)
    if record.get("host") != os.uname().nodename:
        return True
    try:
        os.kill(int(record.get("pid")), 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError):
        return True
    return True


class Service:
    """What the endpoints share: settings, the open collections, the generation queues, metrics, jobs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.max_upload_bytes = int((settings.max_upload_mb or settings.max_file_mb) * 1024 * 1024)
        self.metrics = ServerMetrics()
        self.queues: dict[str, GenerationQueue] = {}
        self.jobs: dict[str, UploadJob] = {}  # this process's, the newest KEEP_JOBS; others' are read from job_files
        self.job_files = JobFiles(settings.data_dir)
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def keep_job(self, job: UploadJob) -> None:
        """Remember an upload job for ``/v1/jobs/{id}``, here and in its file for the other processes
        on this data folder; past KEEP_JOBS, the oldest finished ones go (a server taking uploads for
        months must not grow without end)."""
        with self._lock:
            self.jobs[job.id] = job
            for old in [j for j in self.jobs.values() if j.status != "running"][: max(0, len(self.jobs) - KEEP_JOBS)]:
                del self.jobs[old.id]
        self.job_files.save(job)
        self.job_files.prune()

    def job(self, job_id: str) -> dict | None:
        """An upload job as ``/v1/jobs/{id}`` returns it: this process's own, or one from its file."""
        job = self.jobs.get(job_id)
        return job.as_dict() if job is not None else self.job_files.load(job_id)

    # -------------------------------------------------------------- collections
    def collection(self, name: str, *, create: bool = False) -> Collection:
        from localgpt.store import collection_names

        self.valid_name(name)
        with self._lock:
            handle = self._collections.get(name)
            if handle is not None and not handle.current():
                # Dropped (and perhaps made again) by another process on this data folder: the
                # handle would answer from a deleted manifest. Requests using it finish with it.
                del self._collections[name]
                handle = None
            if handle is None:
                if not create and name not in collection_names(self.settings):
                    raise ApiError(404, f"no collection named '{name}' (GET /v1/collections lists them)", "collection_not_found")
                handle = self._collections[name] = Collection(self.settings, name, create=create)
            return handle

    def names(self) -> list[str]:
        from localgpt.store import collection_names

        return collection_names(self.settings)

    def forget(self, name: str) -> None:
        with self._lock:
            handle = self._collections.pop(name, None)
        if handle is not None:
            handle.close()

    @staticmethod
    def valid_name(name: str) -> None:
        try:
            Settings.model_validate({"collection": name})
        except ValidationError:
            raise ApiError(400, f"'{name}' is not a collection name: 3-63 letters, digits, '.', '_' or '-', "
                           "starting and ending with a letter or digit", "invalid_collection") from None

    def collection_for_model(self, model: str | None, options: Options | None) -> str:
        if options is not None and options.collection:
            return options.collection
        if not model or model == "localgpt":
            return self.settings.collection
        if model.startswith(MODEL_PREFIX):
            return model[len(MODEL_PREFIX):]
        raise ApiError(404, f"model '{model}' is not served here: GET /v1/models lists the models "
                       f"(one per collection, e.g. {MODEL_PREFIX}{self.settings.collection})", "model_not_found")

    # -------------------------------------------------------------- generation
    def generator_name(self) -> str:
        s = self.settings
        if s.backend == "extractive":
            return "extractive"
        if s.openai_url:
            return f"{s.openai_model} at {s.openai_url}"
        if s.model:
            return Path(s.model).name
        from localgpt.generation.gguf import EMBEDDED_FILE

        return EMBEDDED_FILE

    def generator(self, settings: Settings, cancelled: threading.Event):
        """This request's view of the shared model, in the model's queue; None when extractive."""
        if settings.backend == "extractive":
            return None
        from localgpt.generation import get_generator, resolve_backend

        generator = get_generator(settings)  # loaded once per process; own sampling settings and stats
        if resolve_backend(settings) == "openai":
            return generator  # an OpenAI-compatible server batches concurrent requests by itself
        key = generator_key(settings)
        slots = self.batch_slots(generator)
        if slots:
            # The fast engine batches: concurrent requests share its BatchEngine (one per loaded model) instead
            # of taking turns. Greedy answers equal the ones each request gets alone.
            batch = generator.start_batching(slots, share_prefill=self.settings.batch_share_prefill)
            with self._lock:
                line = self.queues.get(key)
                if not isinstance(line, BatchLine) or line.batch is not batch:
                    line = self.queues[key] = BatchLine(self.generator_name(), batch)
            return BatchedGenerator(generator, line, cancelled)
        with self._lock:
            queue = self.queues.setdefault(key, GenerationQueue(self.generator_name()))
        return QueuedGenerator(generator, queue, cancelled)

    def batch_slots(self, generator) -> int:
        """Slots the generator batches with: 0 for all but the fast engine (and when batch_slots is 0)."""
        if not hasattr(generator, "start_batching"):
            return 0
        if self.settings.batch_slots is not None:
            return self.settings.batch_slots
        return 16 if getattr(generator, "device", "") == "cuda" else 4

    def queue_stats(self) -> dict:
        with self._lock:
            queues = list(self.queues.values())
        stats = {}
        for q in queues:
            stats[q.name] = {"waiting": q.waiting, "busy": q.busy, "served": q.served}
            if isinstance(q, BatchLine):
                stats[q.name].update(slots=q.slots, slots_busy=q.active, cancelled=q.cancelled,
                                     share_prefill=q.batch.share_prefill)
        return stats


# ============================================================================ the app
def create_app(settings: Settings, *, api_key: str | None = None, watch: list[tuple[Path, str]] = ()) -> FastAPI:
    """The FastAPI application: ``uvicorn.run(create_app(settings))``. ``watch``: (folder, collection)
    pairs kept ingested while the server runs."""
    service = Service(settings)
    stop_watching = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for folder, name in watch:
            threading.Thread(target=_watch, args=(service, folder, name, stop_watching), name=f"watch-{name}", daemon=True).start()
        yield
        stop_watching.set()

    app = FastAPI(title="localgpt", version="1", docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  lifespan=lifespan)
    app.state.service = service

    def authorized(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key")

    guarded = [Depends(authorized)]
    _install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=service.metrics)
    if not api_key:
        app.openapi_url = "/openapi.json"
    else:  # the schema is behind the key like everything else but /health
        app.openapi_url = None

        @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
        async def openapi_json():
            return JSONResponse(app.openapi())

    # ------------------------------------------------------------------ health and metrics
    @app.get("/health")
    async def health():
        return {"status": "ok", "generator": service.generator_name(), "queues": service.queue_stats()}

    @app.get("/metrics", dependencies=guarded)
    async def metrics(format: Literal["json", "prometheus"] = "json"):
        snap = service.metrics.snapshot(service.queue_stats())
        if format == "prometheus":
            return PlainTextResponse(prometheus_text(snap))
        return snap

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models", dependencies=guarded)
    async def models():
        rows = await anyio.to_thread.run_sync(_summaries, service)
        return {"object": "list", "data": [
            {"id": MODEL_PREFIX + r["name"], "object": "model", "created": int(service.metrics.started),
             "owned_by": "localgpt", "localgpt": {**r, "generator": service.generator_name()}}
            for r in rows
        ]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        return await _chat(service, body, request)

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest):
        name = service.collection_for_model(body.model, None)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "input is empty: give a string or a list of strings")

        def run():
            handle = service.collection(name)
            embedder = handle.retriever.embedder
            vectors = embedder.embed(texts, query=body.input_type == "query")
            return vectors, sum(embedder.count_tokens(t) for t in texts)

        vectors, tokens = await anyio.to_thread.run_sync(run)
        data = []
        for i, vec in enumerate(np.asarray(vectors, dtype=np.float32)):
            value = base64.b64encode(vec.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": MODEL_PREFIX + name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ------------------------------------------------------------------ documents
    @app.get("/v1/collections", dependencies=guarded)
    async def list_collections():
        return {"object": "list", "data": await anyio.to_thread.run_sync(_summaries, service)}

    @app.get("/v1/collections/{name}/sources", dependencies=guarded)
    async def list_sources(name: str):
        def run():
            return [f.__dict__ for f in service.collection(name).reader.files()]

        return {"object": "list", "collection": name, "data": await anyio.to_thread.run_sync(run)}

    @app.delete("/v1/collections/{name}/sources/{path:path}", dependencies=guarded)
    async def delete_source(name: str, path: str):
        def run():
            handle = service.collection(name)
            uploads = upload_folder(service.settings, name)
            target = path if Path(path).is_absolute() else str(uploads / path)  # an upload by its name
            with handle.lock:
                return remove_sources(handle.writer, target, uploads)

        removed = await anyio.to_thread.run_sync(run)
        if not removed:
            raise ApiError(404, f"{path} is not in collection '{name}' (GET /v1/collections/{name}/sources lists it)", "source_not_found")
        return {"collection": name, "removed": removed}

    @app.delete("/v1/collections/{name}", dependencies=guarded)
    async def delete_collection(name: str):
        from localgpt.library import drop_collection

        def run():
            handle = service.collection(name)
            with handle.lock:
                service.forget(name)
                drop_collection(service.settings, name)

        await anyio.to_thread.run_sync(run)
        return {"collection": name, "deleted": True}

    @app.post("/v1/collections/{name}/documents", dependencies=guarded)
    async def upload_documents(name: str, request: Request, wait: bool = True):
        return await _upload(service, name, request, wait)

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def job_status(job_id: str):
        job = await anyio.to_thread.run_sync(service.job, job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}", "job_not_found")
        return job

    return app


def _summaries(service: Service) -> list[dict]:
    return [collection_summary(service.collection(name).reader, name) for name in service.names()]


# ============================================================================ chat
_END = object()


def _history(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """The question (the last user message) and the (question, answer) pairs before it."""
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
        raise ApiError(400, "the last message must be the user's question")
    history, pending = [], None
    for m in turns[:-1]:
        if m.role == "user":
            pending = m.text()
        elif pending is not None:
            history.append((pending, m.text()))
            pending = None
    return turns[-1].text(), history


def _chat_settings(service: Service, handle: Collection, body: ChatRequest) -> Settings:
    opts = body.localgpt or Options()
    try:
        return handle.settings.with_overrides(
            k=opts.k, retrieval_mode=opts.mode, answer_check=opts.answer_check,
            max_new_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
            top_p=body.top_p, backend="extractive" if opts.extractive else None,
        )
    except ValidationError as exc:
        raise ApiError(400, "invalid options: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _answer_fields(answer, collection: str) -> dict:
    """localgpt's extra top-level field: the numbered sources, the supporting sentences, abstention and
    how sure the answer is (confidence high/low with the doubts)."""
    sources = []
    for c in answer.citations:
        d = c.as_dict()
        d["snippet"] = " ".join(c.ref.text.split())[:300]
        sources.append(d)
    return {
        "collection": collection, "abstained": answer.abstained, "abstain_reason": answer.abstain_reason,
        "confidence": answer.confidence, "doubts": answer.doubts, "verifier": answer.verifier,
        "answerability": answer.answerability, "standalone_question": answer.standalone_question,
        "sources": sources, "support": [s.__dict__ for s in answer.support], "timings": answer.timings,
    }


def _usage(answer) -> dict:
    stats = answer.generator_stats or {}
    prompt, completion = int(stats.get("prompt_tokens") or 0), int(stats.get("new_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _StopAlso:
    """A generator that also stops at the request's ``stop`` sequences (besides its prompt family's)."""

    def __init__(self, generator: Any, stops: list[str]):
        self._generator = generator
        self._stops = stops
        if hasattr(generator, "yes_probability"):  # the chain asks hasattr() whether a backend can judge
            self.yes_probability = generator.yes_probability

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def stream(self, prompt, *, stop: list[str] | None = None, **kwargs):
        if stop is None:
            family = getattr(self._generator, "family", None)
            stop = list(getattr(family, "stop", None) or [])
        return self._generator.stream(prompt, stop=list(stop) + self._stops, **kwargs)


_CHAIN_CLASS = None


def _instructed_chain(settings: Settings, retriever, generator, *, extractive: bool, instructions: str):
    """``QAChain`` whose answer prompt carries the client's system messages after its own rules."""
    global _CHAIN_CLASS
    from localgpt.chain import QAChain

    if not instructions:
        return QAChain(settings, retriever, generator, extractive=extractive)
    if _CHAIN_CLASS is None:
        class InstructedChain(QAChain):
            instructions = ""

            def messages(self, question, context, history=()):
                msgs = super().messages(question, context, history)
                if msgs and msgs[0].get("role") == "system":
                    msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\nThe application using these answers adds "
                               "(the rules above still apply):\n" + self.instructions}
                return msgs

        _CHAIN_CLASS = InstructedChain
    chain = _CHAIN_CLASS(settings, retriever, generator, extractive=extractive)
    chain.instructions = instructions
    return chain


def _pump(chain, question, history, filters, cancelled: threading.Event, emit) -> None:
    """Runs in its own thread: the chain's events go to ``emit`` until done or the client left."""
    events = chain.stream(question, history, filters=filters)
    try:
        for event in events:
            emit(event)
            if cancelled.is_set():
                break
    except Cancelled:
        pass
    except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it
        emit(exc)
    finally:
        events.close()  # a stream left early stops its generation here
        emit(_END)


async def _chat(service: Service, body: ChatRequest, request: Request):
    from localgpt.retrieval import Filters

    started = time.perf_counter()
    refused = body.unsupported()
    if refused:
        raise ApiError(400, refused, "unsupported_parameter")
    question, history = _history(body.messages)
    name = service.collection_for_model(body.model, body.localgpt)
    handle = await anyio.to_thread.run_sync(lambda: service.collection(name))
    settings = _chat_settings(service, handle, body)
    opts = body.localgpt or Options()
    filters = Filters(file=opts.file, folder=opts.folder, ext=opts.type)
    cancelled = threading.Event()
    generator = await anyio.to_thread.run_sync(service.generator, settings, cancelled)
    if generator is not None and body.stops():
        generator = _StopAlso(generator, body.stops())
    retriever = handle.retriever
    if (settings.k, settings.retrieval_mode) != (handle.settings.k, handle.settings.retrieval_mode):
        from localgpt.retrieval import Retriever  # the retriever reads k and mode from its settings

        retriever = Retriever(handle.reader, handle.retriever.embedder, settings)
    chain = _instructed_chain(settings, retriever, generator, extractive=settings.backend == "extractive",
                              instructions=body.instructions())

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    emit = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
    threading.Thread(target=_pump, args=(chain, question, history, filters if filters.active() else None, cancelled, emit),
                     name="answer", daemon=True).start()

    first = await events.get()  # the sources, or the error that came before them
    if isinstance(first, BaseException):
        await events.get()
        raise first
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    model = MODEL_PREFIX + name
    created = int(time.time())
    timing = {"first_token": None}

    def finished(answer) -> None:
        service.metrics.answer(time.perf_counter() - started, timing["first_token"], answer.generator_stats)

    if not body.stream:
        pieces, answer = [], None
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    cancelled.set()
                    service.metrics.disconnected += 1
                    raise ApiError(499, "the client disconnected", "client_closed_request")
                item = getter.result()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.kind == "token":
                    timing["first_token"] = timing["first_token"] or time.perf_counter() - started
                    pieces.append(item.text)
                elif item.kind == "done":
                    answer = item.answer
        finally:
            watcher.cancel()
        finished(answer)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": "stop"}],
            "usage": _usage(answer), "localgpt": _answer_fields(answer, name),
        }

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        import json

        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"

    async def sse():
        import json

        ended = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                item = await events.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    error = _error_body(item)[1]
                    yield "data: " + json.dumps(error, ensure_ascii=False) + "\n\n"
                    continue
                if item.kind == "token":
                    timing["first_token"] = timing["first_token"] or time.perf_counter() - started
                    yield chunk({"content": item.text})
                elif item.kind == "done":
                    answer = item.answer
                    finished(answer)
                    yield chunk({}, "stop", localgpt=_answer_fields(answer, name))
                    if include_usage:
                        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": [], "usage": _usage(answer)}
                        yield "data: " + json.dumps(payload) + "\n\n"
            yield "data: [DONE]\n\n"
            ended = True
        finally:
            if not ended:
                cancelled.set()

    return _DisconnectAwareStream(sse(), cancelled, service.metrics, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _DisconnectAwareStream(StreamingResponse):
    """A stream that notices its client leaving even between tokens (while the answer waits for its
    turn, say) and then sets ``cancelled``, whatever the ASGI server's version of the spec."""

    def __init__(self, content, cancelled: threading.Event, metrics: ServerMetrics, **kwargs):
        super().__init__(content, **kwargs)
        self.cancelled = cancelled
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        completed = False
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                nonlocal completed
                try:
                    await self.stream_response(send)
                    completed = True
                except OSError:
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        if not completed:
            self.cancelled.set()
            self.metrics.disconnected += 1


# ============================================================================ uploads
class _TooLarge(Exception):
    pass


async def _upload(service: Service, name: str, request: Request, wait: bool):
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    service.valid_name(name)
    limit = service.max_upload_bytes
    too_large = ApiError(413, f"the upload is over the {limit / 1024 / 1024:.3g} MB limit (max_upload_mb): nothing was stored",
                         "upload_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:  # multipart framing on top of the files
        raise too_large
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the files as multipart/form-data, in fields named 'files'")

    async def limited():
        seen = 0
        async for piece in request.stream():
            seen += len(piece)
            if seen > limit + 64 * 1024:
                raise _TooLarge()
            yield piece

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=MAX_FILES_PER_UPLOAD, max_fields=10).parse()
    except _TooLarge:
        raise too_large from None
    except HTTPException as exc:
        raise ApiError(400, f"cannot read the upload: {exc.detail}") from None
    uploads = [v for key in ("files", "file") for v in form.getlist(key) if isinstance(v, UploadFile)]
    if not uploads:
        raise ApiError(400, "no files in the upload: send them as multipart/form-data fields named 'files'")
    formats = supported_formats()
    blobs = [(u.filename or "", await u.read()) for u in uploads]
    await form.close()

    job = UploadJob(name)
    folder = upload_folder(service.settings, name)

    def save_all() -> None:
        for filename, data in blobs:
            try:
                path, note = save_upload(folder, filename, data, allowed=formats, max_bytes=limit)
            except UploadRefused as exc:
                job.refused.append({"name": filename, "reason": str(exc)})
                continue
            except OSError as exc:
                job.refused.append({"name": filename, "reason": f"'{filename}' could not be saved: {exc.strerror or exc}"})
                continue
            job.saved.append({"name": filename, "path": str(path), "note": note})

    await anyio.to_thread.run_sync(save_all)
    if not job.saved:
        status = 413 if all("limit" in r["reason"] for r in job.refused) else 400
        raise ApiError(status, "; ".join(r["reason"] for r in job.refused) + ": nothing was stored"
                       + (" (the limit is the max_upload_mb setting)" if status == 413 else ""),
                       "upload_refused", {"refused": job.refused})
    handle = await anyio.to_thread.run_sync(lambda: service.collection(name, create=True))
    await anyio.to_thread.run_sync(service.keep_job, job)
    if wait:
        await anyio.to_thread.run_sync(_ingest_job, service, handle, job, folder)
        if job.status == "failed":
            raise ApiError(500, job.error or "ingest failed", "ingest_failed", {"job": job.as_dict()})
        return job.as_dict()
    threading.Thread(target=_ingest_job, args=(service, handle, job, folder), name=f"ingest-{name}", daemon=True).start()
    return JSONResponse(job.as_dict(), status_code=202)


def _ingest_job(service: Service, handle: Collection, job: UploadJob, folder: Path) -> None:
    """The collection's upload folder ingested with the CLI's pipeline; per-file results for the uploads."""
    from ingest.pipeline import ingest_folder

    try:
        with handle.lock:
            report = ingest_folder(folder, handle.settings, progress=_JobProgress(job, service.job_files), store=handle.writer)
        reasons = {p.path: p.reason for p in report.skipped}
        for item in job.saved:
            path = item["path"]
            entry = job.files.setdefault(path, {"status": "skipped" if path in reasons else "unchanged"})
            if path in reasons:
                entry.update(status="skipped", reason=reasons[path])
        job.files = {p: v for p, v in job.files.items() if p in {s["path"] for s in job.saved}}
        outcome = {"report": report.as_dict(), "status": "done"}
    except BaseException as exc:  # noqa: BLE001 - the job must always finish
        log.exception("ingest of an upload failed")
        outcome = {"error": _error_body(exc)[1]["error"]["message"], "status": "failed"}
    # Its file first: once this process says the job finished, every process on the data folder does.
    service.job_files.save(dataclasses.replace(job, **outcome))
    for key, value in outcome.items():  # the status last
        setattr(job, key, value)


# ============================================================================ watch
def _watch(service: Service, folder: Path, name: str, stop: threading.Event) -> None:
    from ingest.pipeline import ingest_folder
    from localgpt.watch import watch_folder

    try:
        handle = service.collection(name, create=True)

        def ingest():
            with handle.lock:
                return ingest_folder(folder, handle.settings, store=handle.writer)

        watch_folder(folder, ingest, on_report=lambda report, changes: log.warning(_watch_line(report, name)), stop=stop,
                     debounce_ms=handle.settings.watch_debounce_ms)
    except BaseException:  # noqa: BLE001 - a watcher failing must not take the server down
        log.exception("watching %s stopped", folder)


def _watch_line(report, name: str) -> str:
    line = (f"watch {report.folder} -> '{name}': {report.new} new, {report.changed} changed, {report.removed} removed, "
            f"{len(report.skipped)} skipped")
    return line + "".join(f"\n  skipped {p.path}: {p.reason}" for p in report.skipped)


# ============================================================================ errors and counting
_STATUS = {StoreError: 404, ConfigError: 400, UploadRefused: 400, EmbedderMismatch: 409, ModelNotFound: 503, NativeCrash: 503}


def _error_body(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, ApiError):
        return exc.status, {"error": {"message": exc.message, "type": "invalid_request_error" if exc.status < 500 else "server_error",
                                      "code": exc.code}, **exc.extra}
    if isinstance(exc, LocalGPTError):
        status = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 400)
        if isinstance(exc, StoreError) and "does not exist" not in str(exc):
            status = 500
        return status, {"error": {"message": str(exc), "type": "invalid_request_error" if status < 500 else "server_error",
                                  "code": type(exc).__name__}}
    log.error("unexpected error", exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return 500, {"error": {"message": f"unexpected error ({type(exc).__name__}{': ' + first if first else ''}); "
                                      "the server log has the details", "type": "server_error", "code": "internal_error"}}


def _install_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, exc: Exception):
        status, body = _error_body(exc)
        return JSONResponse(body, status_code=status)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": str(exc.status_code)}},
                            status_code=exc.status_code)

    async def invalid(request: Request, exc: RequestValidationError):
        lines = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": {"message": "invalid request: " + "; ".join(lines), "type": "invalid_request_error",
                                       "code": "invalid_request"}}, status_code=400)

    app.add_exception_handler(ApiError, answer)
    app.add_exception_handler(LocalGPTError, answer)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, answer)


class _CountRequests:
    """Counts requests by route and status, and those in flight, for /metrics (plain ASGI: it never
    buffers a streamed answer)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.metrics.request_finished(getattr(route, "path", None) or "(unrouted)", status)


# ============================================================================ running
def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          watch: list[tuple[Path, str]] = (), log_level: str = "info") -> None:
    """Run the server until Ctrl-C (uvicorn, one process)."""
    import uvicorn

    from localgpt.offline import enforce_offline

    check_bind(host, api_key)
    enforce_offline()
    app = create_app(settings, api_key=api_key, watch=list(watch))
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, timeout_graceful_shutdown=5)


def parse_watch(spec: str, default_collection: str) -> tuple[Path, str]:
    """``FOLDER[:COLLECTION]`` as ``serve --watch`` takes it."""
    folder, sep, name = spec.rpartition(":")
    if not sep or not folder or "/" in name or not name:
        folder, name = spec, default_collection
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"--watch {spec}: {path} does not exist")
    return path.resolve(), name

