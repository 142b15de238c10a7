"""The ingestion pipeline: discover → (hash, load, split in parser processes) → embed → commit.

Incremental: a file whose size and mtime match the manifest costs one stat; one whose
mtime moved costs a hash; content already stored under another name is linked, not
re-embedded. Crash-safe: see ``localgpt.store`` (nothing is visible before its commit).
Bad files are reported and skipped; the run goes on and stored data is never lost.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from localgpt.config import Settings
from localgpt.documents import Chunk
from localgpt.embeddings import embedder_name, get_embedder, token_counter
from localgpt.errors import BadFile, LocalGPTError, UnsupportedFile
from localgpt.store import Store

from ingest.discover import Found, Skipped, discover
from ingest.report import FileProblem, IngestReport
from ingest.split import split_document

HASH_BLOCK = 1 << 20
MB = 1024 * 1024  # max_file_mb counts these


class Progress:
    """Receives progress events; the CLI and UI subclass it. All methods are optional."""

    def start(self, total_files: int) -> None: ...
    def file_done(self, path: str, status: str, chunks: int = 0, nbytes: int = 0) -> None: ...
    def chunks_embedded(self, n: int) -> None: ...


@dataclass
class _Job:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    status: str  # "new" or "changed"


@dataclass
class _Parsed:
    job: _Job
    chunks: list[Chunk]
    pages: int | None
    notes: list[str]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def ingest_folder(
    folder: Path | str,
    settings: Settings,
    *,
    progress: Progress | None = None,
    store: Store | None = None,
) -> IngestReport:
    """Bring a collection up to date with a folder (or a single file). Returns what happened."""
    from ingest.load import SUPPORTED_FORMATS  # the loaders import their libraries lazily

    progress = progress or Progress()
    started = time.perf_counter()
    folder = Path(folder)
    if not folder.exists():
        raise LocalGPTError(f"{folder} does not exist")
    own_store = store is None
    store = store or Store.open(settings)
    report = IngestReport(collection=store.name, folder=str(folder))
    try:
        embedder = get_embedder(settings.embedder)
        store.check_embedder(embedder.name, embedder.dim)
        _check_chunking(store, settings)

        # 1. Discover, and sort out what is unchanged without reading it.
        found: list[Found] = []
        seen_paths: set[str] = set()
        for item in discover(folder):
            if isinstance(item, Skipped):
                report.skipped.append(FileProblem(item.path, item.reason))
                continue
            seen_paths.add(item.path)
            if Path(item.path).suffix.lower() not in SUPPORTED_FORMATS:
                report.skipped.append(FileProblem(item.path, f"unsupported file type '{Path(item.path).suffix or '(none)'}'"))
                continue
            found.append(item)
        progress.start(len(found))

        jobs: list[_Job] = []
        reader = _reader_id(settings)
        for item in found:
            record = store.file(item.path)
            if record and record.size == item.size and record.mtime_ns == item.mtime_ns:
                report.unchanged += 1
                progress.file_done(item.path, "unchanged")
                continue
            if item.size > settings.max_file_mb * MB:
                report.skipped.append(FileProblem(item.path, (
                    f"too large: {item.size / MB:.1f} MB is over max_file_mb = {settings.max_file_mb:g}; raise it "
                    f"with --max-file-mb or LOCALGPT_MAX_FILE_MB to ingest this file"
                )))
                progress.file_done(item.path, "skipped")
                continue
            try:
                sha = file_sha256(item.path)
            except OSError as exc:
                report.skipped.append(FileProblem(item.path, f"cannot read: {exc.strerror or exc}"))
                progress.file_done(item.path, "skipped")
                continue
            if record and record.sha256 == sha:
                store.touch_file(item.path, item.size, item.mtime_ns)  # touched, not changed
                report.unchanged += 1
                progress.file_done(item.path, "unchanged")
                continue
            reason = store.unreadable_reason(sha, reader)
            if reason is not None:
                report.skipped.append(FileProblem(item.path, reason))
                progress.file_done(item.path, "skipped")
                continue
            job = _Job(item.path, item.size, item.mtime_ns, sha, "changed" if record else "new")
            if store.has_content(sha):
                _link(store, job, report, progress)
                continue
            jobs.append(job)

        # 2. Parse in processes, embed and commit here, one file at a time visible.
        if jobs:
            store.warm_up()  # overlaps Chroma's start-up with parsing
            _run_jobs(jobs, settings, store, embedder, report, progress, reader)

        # 3. Files gone from the folder lose their chunks (unless the run was cut short).
        if not report.interrupted and folder.is_dir():
            root = os.path.abspath(folder)
            for record in store.files(under=root):
                if record.path not in seen_paths and not os.path.lexists(record.path):
                    report.chunks_removed += store.remove_file(record.path)
                    report.removed += 1
        if store.meta("embedder") is None:
            store.set_meta(
                embedder=embedder.name, dim=embedder.dim, chunk_size=settings.chunk_size,
                chunk_overlap=settings.chunk_overlap, schema="1",
            )
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.seconds = time.perf_counter() - started
        if own_store:
            store.close()
    return report


def _reader_id(settings: Settings) -> str:
    """What decides whether a file can be read: the loaders' version, whether OCR can run, and the
    time a parser is given (a file that ran out of it is read again once the budget changes)."""
    import shutil

    import localgpt

    ocr = "on" if settings.ocr and shutil.which("tesseract") else "off"
    return f"localgpt {localgpt.__version__}; ocr={ocr}; parse_timeout={settings.parse_timeout:g}"


def _check_chunking(store: Store, settings: Settings) -> None:
    size, overlap = store.meta("chunk_size"), store.meta("chunk_overlap")
    if size is not None and (int(size), int(overlap or 0)) != (settings.chunk_size, settings.chunk_overlap):
        raise LocalGPTError(
            f"collection '{store.name}' was split with chunk_size={size}, chunk_overlap={overlap}; "
            f"re-ingest with --rebuild to use chunk_size={settings.chunk_size}, chunk_overlap={settings.chunk_overlap}"
        )


def _run_jobs(jobs, settings: Settings, store: Store, embedder, report: IngestReport, progress: Progress, reader: str) -> None:
    workers = min(settings.parser_workers, len(jobs))
    args = (settings.embedder, settings.chunk_size, settings.chunk_overlap, settings.ocr)
    in_flight: dict[Future, _Job] = {}
    queue = list(reversed(jobs))
    suspects: list[_Job] = []  # in flight when a parser process died: retried one at a time
    alone: set[str] = set()  # suspects now running by themselves
    ready: list[_Parsed] = []
    budget = settings.parse_timeout
    # forkserver: the parent may hold threads (tokenizers, OpenMP) that fork would copy half-locked.
    ctx = multiprocessing.get_context("forkserver")
    alive_r, alive_w = ctx.Pipe(duplex=False)

    def new_pool() -> _Parsers:
        return _Parsers(ctx, workers, alive_r)

    def skip(job: _Job, reason: str, remember: bool = False) -> None:
        report.skipped.append(FileProblem(job.path, reason))
        progress.file_done(job.path, "skipped")
        if remember:  # the same bytes will fail the same way: do not parse them again
            store.remember_unreadable(job.sha256, reader, reason)

    pool = new_pool()
    try:
        while queue or in_flight or ready or suspects:
            # Keep the pool busy but bounded: memory stays flat however large the corpus.
            # After a parser crash, the files that were in flight run alone until the culprit is known.
            while (suspects or queue) and len(in_flight) < (1 if suspects or alone else workers * 2):
                from_suspects = bool(suspects)
                job = suspects.pop() if from_suspects else queue.pop()
                try:
                    fut = pool.executor.submit(_parse, job, *args)
                except BrokenProcessPool:  # a parser died since the last look: its futures tell which
                    (suspects if from_suspects else queue).append(job)
                    if not in_flight:  # nothing running to learn from: start afresh
                        pool.stop()
                        pool = new_pool()
                    break
                if from_suspects:
                    alone.add(job.path)
                in_flight[fut] = job
            done: set[Future] = set()
            if in_flight:
                # With files parsed and waiting, wait briefly for more so one embedding call serves
                # several files; with none, wait until a parser finishes or a second passes (to
                # look at the time budget). Never a busy loop.
                done, _ = wait(in_flight, timeout=min(1.0, budget / 4) if not ready else 0.05, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    job = in_flight.pop(fut)
                    pool.started.pop(job.path, None)
                    ran_alone = job.path in alone
                    alone.discard(job.path)
                    try:
                        parsed = fut.result()
                    except BrokenProcessPool:
                        # A parser died (a segfault in a PDF library, the OOM killer): the pool is gone.
                        if ran_alone:
                            skip(job, "the parser crashed on this file (it may be malformed)")
                        else:
                            suspects.append(job)
                        broken = True
                        continue
                    except (BadFile, UnsupportedFile) as exc:
                        skip(job, str(exc), remember=not getattr(exc, "transient", False))
                        continue
                    except Exception as exc:  # a loader bug must not stop the run
                        skip(job, f"could not be parsed: {type(exc).__name__}: {exc}")
                        continue
                    for note in parsed.notes:
                        report.notes.append(FileProblem(job.path, note))
                    ready.append(parsed)
                if broken:
                    suspects.extend(in_flight.values())
                    in_flight.clear()
                    pool.stop()
                    pool = new_pool()
                elif overdue := pool.overdue(in_flight, budget):
                    # Stop the parser with its process (a loop in C ignores anything gentler); that
                    # breaks the pool, so the files parsed beside it start again in a fresh one.
                    for fut, job in overdue:
                        pool.kill(job.path)
                        in_flight.pop(fut)
                        alone.discard(job.path)
                        skip(job, f"parsing took longer than {budget:g} s (parse_timeout); raise it with "
                             f"--parse-timeout or LOCALGPT_PARSE_TIMEOUT to give this file more time", remember=True)
                    for job in in_flight.values():
                        (suspects if job.path in alone else queue).append(job)
                    in_flight.clear()
                    alone.clear()
                    pool.stop()
                    pool = new_pool()
            if ready and (not done or not in_flight or sum(len(p.chunks) for p in ready) >= settings.embed_batch_size):
                _embed_and_commit(ready, store, embedder, report, progress, reader)
                ready = []
    except BaseException:
        # Ctrl-C or a crash here: stop the parsers now rather than wait for their files.
        pool.stop()
        raise
    else:
        pool.stop(wait=True)
    finally:
        alive_w.close()
        alive_r.close()


class _Parsers:
    """The pool of parser processes, and the time each has spent on the file it is on: a parser
    says through a pipe of this pool when it begins a file, so that one over the budget can be
    stopped by killing its process (a loop in C ignores anything gentler).

    The time counted is the parser's own: on Linux, the time it waits for a core (parsers run at a
    lower priority than the embedder) or for an OCR child (tesseract has its own limit per page)
    is left out, so a large file parsed beside a busy embedder is not cut short. Elsewhere it is
    the time since the file began."""

    def __init__(self, ctx, workers: int, parent_alive):
        self._starts_r, self._starts_w = ctx.Pipe(duplex=False)
        self.executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(parent_alive, self._starts_w)
        )
        self.started: dict[str, _ParseClock] = {}  # path -> the clock of the parser on it

    def overdue(self, in_flight: dict[Future, _Job], budget: float) -> list[tuple[Future, _Job]]:
        while self._starts_r.poll():  # one small write each: whole messages only, no lock needed
            path, pid, began = self._starts_r.recv()
            self.started[path] = _ParseClock(pid, seen=began, waited=_core_wait(pid))
        now = time.monotonic()
        late = []
        for fut, job in in_flight.items():
            clock = self.started.get(job.path)
            if clock is not None and not fut.done() and clock.advance(now) > budget:
                late.append((fut, job))
        return late

    def kill(self, path: str) -> None:
        proc = (getattr(self.executor, "_processes", None) or {}).get(self.started[path].pid)
        if proc is not None:
            proc.kill()

    def stop(self, wait: bool = False) -> None:
        manager = getattr(self.executor, "_executor_manager_thread", None)
        if not wait:  # Ctrl-C, a dead or overdue parser: the others' files are given up or re-run
            for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
                proc.terminate()
        self.executor.shutdown(wait=wait, cancel_futures=not wait)
        if manager is not None and not wait:
            # The pool's manager thread sees its parsers gone and closes its wake-up pipe; until it has, Python's
            # exit hook for process pools may write to that pipe as it closes (3.11: "OSError: Bad file
            # descriptor" printed after a Ctrl-C). It takes milliseconds once the parsers are terminated.
            manager.join(timeout=10)
        self._starts_r.close()
        self._starts_w.close()


@dataclass
class _ParseClock:
    pid: int
    seen: float  # time.monotonic() (one clock for every process) when last advanced; first, the file's start
    waited: float | None  # the parser's time waiting for a core until then, None where unknown
    spent: float = 0.0

    def advance(self, now: float) -> float:
        """Add the time since the last look, less waits for a core or an OCR child; the total."""
        waited = _core_wait(self.pid)
        step = now - self.seen
        if waited is not None and self.waited is not None:
            step -= waited - self.waited
        if _has_children(self.pid):
            step = 0.0
        self.spent += max(0.0, step)
        self.seen, self.waited = now, waited
        return self.spent


def _core_wait(pid: int) -> float | None:
    """Seconds the process has waited for a CPU core (Linux's schedstat), None where unknown."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _has_children(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return bool(fh.read().strip())
    except OSError:
        return False


def _link(store: Store, job: _Job, report: IngestReport, progress: Progress) -> None:
    """The content is stored already (a copy, a rename, or a revert): point the path at it."""
    old = store.link_file(job.path, job.size, job.mtime_ns, job.sha256)
    report.renamed_or_copied += 1
    report.chunks_removed += store.drop_content_if_unused(old)
    progress.file_done(job.path, "linked")


def _embed_and_commit(
    batch: list[_Parsed], store: Store, embedder, report: IngestReport, progress: Progress, reader: str
) -> None:
    """Embed the chunks of several files in one call (every engine busy), then commit file by file."""
    to_embed: list[_Parsed] = []
    copies: list[_Parsed] = []  # same content as another file of this batch: linked once that one commits
    for parsed in batch:
        job = parsed.job
        if store.has_content(job.sha256):
            _link(store, job, report, progress)
        elif any(p.job.sha256 == job.sha256 for p in to_embed):
            copies.append(parsed)
        elif not parsed.chunks:
            report.skipped.append(FileProblem(job.path, "no text found"))
            progress.file_done(job.path, "skipped")
            store.remember_unreadable(job.sha256, reader, "no text found")
        else:
            to_embed.append(parsed)
    if to_embed:
        for parsed in to_embed:  # the intent log first: a crash from here on is undone next run
            store.begin_content(parsed.job.sha256, [c.id for c in parsed.chunks])
        try:
            vectors = embedder.embed([c.text for p in to_embed for c in p.chunks], bulk=True)
            progress.chunks_embedded(len(vectors))
            # One upsert for the whole batch (Chroma costs ~50 ms a call whatever its size); the
            # intent log above covers every file in it until its own commit below.
            store.write_vectors(
                [c for p in to_embed for c in p.chunks],
                vectors,
                [Path(p.job.path).suffix.lower() for p in to_embed for _ in p.chunks],
            )
            for parsed in to_embed:
                job, n, ext = parsed.job, len(parsed.chunks), Path(parsed.job.path).suffix.lower()
                old = store.commit_content(job.path, job.size, job.mtime_ns, job.sha256, parsed.chunks, parsed.pages, ext)
                if old and old != job.sha256:
                    report.chunks_removed += store.drop_content_if_unused(old)
                report.chunks_added += n
                report.bytes_parsed += job.size
                if job.status == "new":
                    report.new += 1
                else:
                    report.changed += 1
                progress.file_done(job.path, job.status, n, job.size)
        except BaseException:
            for parsed in to_embed:
                store.abandon_content(parsed.job.sha256)  # a no-op for those already committed
            raise
    for parsed in copies:
        _link(store, parsed.job, report, progress)


_STARTS = None  # in a parser process: where it says which file it begins (see _Parsers)


def _worker_init(parent_alive, starts=None) -> None:
    global _STARTS
    _STARTS = starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    # Embedding (in the parent, on every core) is most of the work, and its threads wait for
    # one another: a parser taking a core from one of them stalls them all. At a lower
    # priority the parsers fill the gaps instead (and run at full speed when the parent waits).
    try:
        os.nice(10)
    except OSError:
        pass
    # A parser whose parent was killed (kill -9, OOM) would wait on its task queue forever.
    # The parent holds the only writing end of this pipe: when it dies, however it dies, the
    # read below ends (a pid check would not do: a killed parent stays a zombie until reaped).
    import threading

    def watch() -> None:
        try:
            parent_alive.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _parse(job: _Job, embedder_spec: str, chunk_size: int, chunk_overlap: int, ocr: bool) -> _Parsed:
    """Runs in a parser process: load, check the file did not change meanwhile, split."""
    from ingest.load import load_file

    count = token_counter(embedder_spec)  # once a process, before the file's time starts
    if _STARTS is not None:
        _STARTS.send((job.path, os.getpid(), time.monotonic()))
    before = os.stat(job.path)
    doc = load_file(Path(job.path), ocr=ocr)
    after = os.stat(job.path)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        (after.st_size, after.st_mtime_ns) != (job.size, job.mtime_ns) and file_sha256(job.path) != job.sha256
    ):
        raise BadFile("the file changed while it was being read; it will be ingested on the next run", transient=True)
    chunks = split_document(doc, job.sha256, count, chunk_size, chunk_overlap)
    return _Parsed(job, chunks, doc.pages, list(doc.notes))
