"""The localgpt web page (Streamlit): collections, the document library, upload and ingest with a
live progress bar, and a chat whose answers stream and cite numbered sources.

Thin: every action calls the core functions the CLI calls (``ingest_folder``, ``Store``,
``QAChain``). Models load once per process and are shared by every browser session; each
session has its own history, settings and store connection. Never shows a traceback: errors
become one line on the page. Start it with ``localgpt ui`` (``ui.launch``).
"""

from __future__ import annotations

import html
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from ingest.pipeline import Progress, ingest_folder
from ingest.report import IngestReport
from localgpt.config import Settings, load_settings
from localgpt.errors import LocalGPTError, StoreError
from localgpt.generation.queue import GenerationQueue, QueuedGenerator, generator_key
from localgpt.library import (  # noqa: F401 - the upload helpers are also ui.app's (tests import them here)
    UploadRefused, clean_upload_name, drop_collection, inside, remove_sources, save_upload, supported_formats, upload_folder,
)
from localgpt.store import Store, collection_names

log = logging.getLogger("localgpt.ui")

BACKENDS = ["auto", "extractive", "gguf", "llamacpp", "transformers", "openai"]
MODES = ["hybrid", "dense", "keyword", "mmr"]
QUANTIZATIONS = ["none", "8bit", "4bit"]
GUESS = "(guess from the model)"


# ============================================================================ ingest jobs
@dataclass
class IngestJob:
    """One ingest run in a background thread: it survives page reruns and closed tabs."""

    collection: str
    folder: str
    total: int = 0
    done: int = 0
    chunks: int = 0
    current: str = ""
    report: IngestReport | None = None
    error: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def finished(self) -> bool:
        return self.report is not None or self.error is not None

    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def status_line(self) -> str:
        text = f"{self.done}/{self.total} files · {self.chunks} chunks embedded"
        return text + (f" · {self.current}" if self.current else "")


class _JobProgress(Progress):
    def __init__(self, job: IngestJob):
        self.job = job

    def start(self, total_files: int) -> None:
        self.job.total = total_files

    def file_done(self, path: str, status: str, chunks: int = 0, nbytes: int = 0) -> None:
        self.job.done += 1
        self.job.current = f"{status} {Path(path).name}"

    def chunks_embedded(self, n: int) -> None:
        self.job.chunks += n


def run_ingest(job: IngestJob, settings: Settings) -> None:
    """Body of the ingest thread: the CLI's ``ingest_folder`` with a progress that the page reads."""
    try:
        job.report = ingest_folder(job.folder, settings, progress=_JobProgress(job))
    except BaseException as exc:  # noqa: BLE001 - the thread must always finish the job
        job.error = explain(exc)


# ============================================================================ answers
def explain(exc: BaseException) -> str:
    """One line for a person: typed errors say what to do; anything else names itself, never a traceback."""
    if isinstance(exc, LocalGPTError):
        return str(exc)
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
        return ("out of memory: choose a smaller model, set quantization to 4bit (CUDA), "
                "or give fewer chunks to the model (k)")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    log.error("unexpected error in the page", exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"unexpected error ({type(exc).__name__}{': ' + first if first else ''}); the server log has the details"


def answer_record(answer) -> dict:
    """What the page keeps of an answer: plain data, so a session's history is its own."""
    highlights: dict[int, list[str]] = {}
    for s in answer.support:
        highlights.setdefault(s.number, []).append(s.sentence)
    citations = []
    for c in answer.citations:
        d = c.as_dict()
        d["highlights"] = highlights.get(c.number, [])
        citations.append(d)
    return {
        "question": answer.question, "text": answer.text, "abstained": answer.abstained,
        "confidence": answer.confidence, "doubts": list(answer.doubts),
        "citations": citations, "stats": stats_line(answer), "error": None,
    }


def stats_line(answer) -> str:
    s, t = answer.generator_stats or {}, answer.timings or {}
    parts = []
    if s.get("ttft_s") is not None:
        parts.append(f"first token {s['ttft_s']:.2f} s")
    if s.get("decode_tokens_per_s"):
        parts.append(f"{s['decode_tokens_per_s']:.1f} tokens/s")
    if s.get("new_tokens"):
        parts.append(f"{s['new_tokens']} tokens")
    memory = []
    from localgpt.generation.base import process_rss_mib

    rss = s.get("rss_mib") or process_rss_mib()
    memory.append(f"{rss:,.0f} MiB RSS")
    if s.get("peak_gpu_mib"):
        memory.append(f"{s['peak_gpu_mib']:,.0f} MiB GPU")
    parts.append("peak memory " + " + ".join(memory))
    if t.get("total") is not None:
        parts.append(f"total {t['total']:.2f} s")
    if s.get("model"):
        parts.append(str(s["model"]).rsplit("/", 1)[-1])
    return " · ".join(parts)


def highlighted_html(text: str, sentences: Iterable[str]) -> str:
    """The chunk text, escaped, with the supporting sentences marked; one line of HTML."""
    spans: list[tuple[int, int]] = []
    for sentence in sentences:
        start = text.find(sentence)
        if start >= 0:
            spans.append((start, start + len(sentence)))
    def plain(piece: str) -> str:
        return html.escape(piece).replace("\n", "<br>")

    def marked(piece: str) -> str:  # one <mark> per line: a mark across <br> renders oddly
        return "<br>".join(f"<mark>{html.escape(line)}</mark>" if line.strip() else "" for line in piece.split("\n"))

    out, pos = [], 0
    for start, end in sorted(spans):
        if start < pos:
            continue
        out += [plain(text[pos:start]), marked(text[start:end])]
        pos = end
    out.append(plain(text[pos:]))
    body = "".join(out)
    return f'<div class="lg-chunk" style="font-size:0.9em;line-height:1.45">{body}</div>'


def md_text(text: str) -> str:
    """Text shown as Markdown without surprises: no LaTeX from dollar signs."""
    return text.replace("$", "\\$")


def place(ref: dict) -> str:
    where = Path(ref["source"]).name
    return where + (f", page {ref['page']}" if ref.get("page") is not None else "")


# ============================================================================ the page
def main() -> None:  # pragma: no cover - exercised through AppTest and the browser tests
    import streamlit as st

    st.set_page_config(page_title="localgpt", page_icon="📚", layout="wide")
    st.markdown("<style>mark{background:#ffe58f;padding:0 .1em;border-radius:2px}</style>", unsafe_allow_html=True)
    try:
        base = load_settings()
    except LocalGPTError as exc:
        st.error(f"Settings: {exc}")
        st.stop()

    shared = _shared(st)
    ss = st.session_state
    ss.setdefault("collection", base.collection)
    if "_switch_to" in ss:  # set by create/drop in the previous run, before the picker exists
        ss.collection = ss.pop("_switch_to")
    ss.setdefault("chats", {})
    ss.setdefault("uploader", 0)

    with st.sidebar:
        st.title("localgpt")
        _collection_picker(st, base)
        settings = _model_settings(st, base.with_overrides(collection=ss.collection))
        _upload_box(st, settings, shared)
        _library(st, settings, shared)

    _main_area(st, settings, shared)


def _shared(st):
    """Process-wide state shared by every session: ingest jobs and per-model locks."""

    @st.cache_resource
    def registry() -> dict:
        return {"jobs": {}, "lock": threading.Lock()}

    return registry()


def _collection_picker(st, base: Settings) -> None:
    ss = st.session_state
    names = collection_names(base)
    options = sorted(set(names) | {ss.collection, base.collection})
    st.selectbox("Collection", options, key="collection", help="Each collection has its own documents and index.")
    with st.popover("New collection", width="stretch"):
        new = st.text_input("Name", key="new_collection", placeholder="e.g. papers-2024")
        if st.button("Create", key="create_collection", disabled=not new):
            try:
                settings = base.with_overrides(collection=new.strip())
                Store.open(settings, settings.collection, create=True).close()
            except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError names the rule
                st.error(_validation_message(exc))
            else:
                ss["_switch_to"] = settings.collection
                st.rerun()
    if ss.collection in names:
        with st.popover(f"Drop '{ss.collection}'…", width="stretch"):
            st.warning(
                f"This deletes collection '{ss.collection}': its index and the files uploaded into it "
                f"({upload_folder(base, ss.collection)}). Files ingested from your own folders are not touched."
            )
            sure = st.checkbox(f"Yes, delete '{ss.collection}'", key="confirm_drop")
            if st.button("Delete for good", key="drop_collection", type="primary", disabled=not sure):
                _drop_collection(st, base, ss.collection)


def _validation_message(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"Value error, (.*?)(?: \[type=|$)", text, re.S)
    return "Collection name: " + (m.group(1).strip() if m else text.splitlines()[0])


def _drop_collection(st, base: Settings, name: str) -> None:
    ss = st.session_state
    job = _shared(st)["jobs"].get((str(base.data_dir), name))
    if job is not None and not job.finished:
        st.error(f"'{name}' is being ingested right now; drop it when that has finished")
        return
    try:
        drop_collection(base, name)
    except Exception as exc:  # noqa: BLE001
        st.error(explain(exc))
        return
    ss.chats.pop(name, None)
    ss.pop("_chain", None)
    ss["_flash"] = f"Dropped collection '{name}'."
    ss["_switch_to"] = base.collection if base.collection != name else "default"
    st.rerun()


def _model_settings(st, settings: Settings) -> Settings:
    """Model and retrieval choices of this session, applied to the next question without a restart."""
    from localgpt.models import FAMILIES

    with st.expander("Model & retrieval"):
        backend = st.selectbox(
            "Generator", BACKENDS, index=BACKENDS.index(settings.backend), key="backend",
            help="extractive answers with the supporting sentences alone (no model); auto picks from the model path.",
        )
        model = st.text_input("Model", value=settings.model or "", key="model",
                              placeholder="embedded SmolLM2", help="A model folder, a .gguf file or a Hugging Face cache id.")
        families = [GUESS, *FAMILIES]
        family = st.selectbox("Prompt family", families, index=families.index(settings.family) if settings.family in families else 0, key="family")
        quantization = st.selectbox("Quantization (CUDA)", QUANTIZATIONS, index=QUANTIZATIONS.index(settings.quantization), key="quantization")
        k = st.slider("Chunks given to the model (k)", 1, 20, min(settings.k, 20), key="k")
        mode = st.selectbox("Retrieval", MODES, index=MODES.index(settings.retrieval_mode), key="mode")
        temperature = st.slider("Temperature", 0.0, 2.0, float(settings.temperature), 0.05, key="temperature")
        st.checkbox("Show speed and memory under answers", value=True, key="show_stats")
    return settings.with_overrides(
        backend=backend, model=model.strip() or None, family=None if family == GUESS else family,
        quantization=quantization, k=k, retrieval_mode=mode, temperature=temperature,
    )


def _upload_box(st, settings: Settings, shared: dict) -> None:
    ss = st.session_state
    try:
        formats = supported_formats()
    except Exception as exc:  # noqa: BLE001
        st.error(f"Upload is unavailable: {explain(exc)}")
        return
    max_mb = settings.max_file_mb
    st.subheader("Add documents")
    files = st.file_uploader(
        f"Files up to {max_mb:g} MB: {' '.join(sorted(formats))}", accept_multiple_files=True,
        key=f"uploads-{ss.uploader}",
    )
    key = (str(settings.data_dir), settings.collection)
    running = shared["jobs"].get(key)
    busy = running is not None and not running.finished
    if st.button(f"Ingest into '{settings.collection}'", key="ingest", type="primary", disabled=not files or busy,
                 help="Wait for the running ingest to finish" if busy else None, width="stretch"):
        folder = upload_folder(settings)
        saved, messages = 0, []
        for f in files:
            try:
                _, note = save_upload(folder, f.name, f.getvalue(), allowed=formats, max_bytes=int(max_mb * 1024 * 1024))
            except UploadRefused as exc:
                messages.append(("error", str(exc)))
                continue
            except OSError as exc:
                messages.append(("error", f"'{f.name}' could not be saved: {exc.strerror or exc}"))
                continue
            saved += 1
            if note:
                messages.append(("info", note))
        ss["upload_messages"] = messages
        ss.uploader += 1  # a fresh, empty uploader
        if saved:
            with shared["lock"]:
                running = shared["jobs"].get(key)
                if running is None or running.finished:
                    job = IngestJob(settings.collection, str(folder))
                    shared["jobs"][key] = job
                    threading.Thread(target=run_ingest, args=(job, settings), name=f"ingest-{settings.collection}", daemon=True).start()
                    ss["my_job"] = job
        st.rerun()


def _library(st, settings: Settings, shared: dict) -> None:
    ss = st.session_state
    with st.expander("Library", expanded=True):
        if settings.collection not in collection_names(settings):
            st.caption("Nothing here yet: add documents above.")
            return
        job = shared["jobs"].get((str(settings.data_dir), settings.collection))
        if job is not None and not job.finished:
            # Opening the manifest while the ingest opens it can fail with "database is locked"
            # (a new manifest's switch to WAL ignores the busy timeout); the list updates at the end.
            st.caption("Ingesting: the list updates when it has finished.")
            return
        try:
            with Store.open(settings, create=False) as store:
                files = store.files()
                chunks = store.count_chunks()
        except Exception as exc:  # noqa: BLE001
            st.error(explain(exc))
            return
        st.caption(f"{len(files)} files · {chunks} chunks")
        if not files:
            return
        uploads = upload_folder(settings)
        rows = [
            {
                "file": _shown_path(f.path, uploads), "chunks": f.chunks, "pages": f.pages,
                "ingested at": datetime.fromtimestamp(f.ingested_at).strftime("%Y-%m-%d %H:%M"),
            }
            for f in files
        ]
        st.dataframe(rows, hide_index=True, width="stretch", column_config={
            "chunks": st.column_config.NumberColumn(width="small"),
            "pages": st.column_config.NumberColumn(width="small"),
        })
        by_name = {_shown_path(f.path, uploads): f.path for f in files}
        target = st.selectbox("Remove a file", list(by_name), index=None, key="remove_pick", placeholder="choose a file")
        if st.button("Remove from collection", key="remove_file", disabled=target is None):
            path = by_name[target]
            try:
                with Store.open(settings, create=False) as store:
                    remove_sources(store, path, uploads)  # an uploaded copy goes too; else the next ingest re-adds it
            except Exception as exc:  # noqa: BLE001
                st.error(explain(exc))
                return
            ss["_flash"] = f"Removed {target} from '{settings.collection}'."
            st.rerun()


def _shown_path(path: str, uploads: Path) -> str:
    """Uploaded files by their name; others as the CLI shows them (relative to here when inside)."""
    if inside(path, uploads):
        return os.path.relpath(path, uploads)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _main_area(st, settings: Settings, shared: dict) -> None:
    ss = st.session_state
    st.header(f"Ask your documents · {settings.collection}")
    if flash := ss.pop("_flash", None):
        st.success(flash)
    for kind, text in ss.pop("upload_messages", []):
        (st.error if kind == "error" else st.info)(text)

    key = (str(settings.data_dir), settings.collection)
    job = shared["jobs"].get(key)
    if job is not None and not job.finished:
        _ingest_progress(st, shared, key)
    mine = ss.get("my_job")
    if mine is not None and mine.finished and mine.collection == settings.collection:
        _ingest_summary(st, mine)

    history = ss.chats.setdefault(settings.collection, [])
    if not history and job is None and settings.collection not in collection_names(settings):
        st.info("Start by adding documents in the sidebar (drag and drop works); then ask about them here. "
                "Answers cite the file and page they come from.", icon=":material/upload_file:")
    for i, turn in enumerate(history):
        with st.chat_message("user"):
            st.markdown(md_text(turn["question"]))
        with st.chat_message("assistant"):
            _render_answer(st, turn, i)

    question = st.chat_input(f"Ask about the documents in '{settings.collection}'")
    if question:
        with st.chat_message("user"):
            st.markdown(md_text(question))
        with st.chat_message("assistant"):
            turn = _answer(st, settings, question, history)
            _render_answer(st, turn, len(history))
        history.append(turn)


def _ingest_progress(st, shared: dict, key: tuple) -> None:
    @st.fragment(run_every=0.5)
    def progress() -> None:
        job = shared["jobs"].get(key)
        if job is None or job.finished:
            st.rerun()  # the whole page: the library and the summary change
        st.progress(job.fraction(), text=f"Ingesting into '{job.collection}': {job.status_line()}")

    progress()


def _ingest_summary(st, job: IngestJob) -> None:
    if job.error:
        st.error(f"Ingest into '{job.collection}' failed: {job.error}")
    else:
        r = job.report
        shown = Path(job.folder)
        message = (f"Ingested into '{r.collection}': {r.new} new, {r.changed} changed, {r.unchanged} unchanged, "
                   f"{len(r.skipped)} skipped, {r.chunks_added} chunks added in {r.seconds:.1f} s.")
        (st.warning if r.skipped or r.interrupted else st.success)(message)
        with st.container(border=True):
            # The same table as `localgpt ingest` prints at the end of a run.
            st.table([{
                "new": r.new, "changed": r.changed, "unchanged": r.unchanged, "linked": r.renamed_or_copied,
                "removed": r.removed, "skipped": len(r.skipped), "chunks +": r.chunks_added,
                "chunks -": r.chunks_removed, "time": f"{r.seconds:.1f}s",
            }])
            if r.skipped:
                st.markdown("**Skipped files**")
                st.table([{"file": _shown_path(p.path, shown), "reason": p.reason} for p in r.skipped])
            for note in r.notes:
                st.caption(f"note: {_shown_path(note.path, shown)}: {note.reason}")
            if r.interrupted:
                st.warning("Interrupted: files not finished were left out; ingest again to continue.")
    if st.button("Dismiss", key=f"dismiss-{job.id}"):
        st.session_state.pop("my_job", None)
        st.rerun()


def _session_chain(st, settings: Settings):
    """This session's QAChain: its own store connection, the process's shared models."""
    from localgpt.chain import QAChain
    from localgpt.retrieval import Retriever

    ss = st.session_state
    manifest = Path(settings.data_dir) / "collections" / f"{settings.collection}.sqlite"
    try:
        inode = manifest.stat().st_ino  # a collection dropped and made again is a new file
    except OSError:
        inode = None
    key = (settings.model_dump_json(), inode)
    cached = ss.get("_chain")
    if cached is not None and cached[0] == key:
        return cached[1]
    if cached is not None:
        cached[1].retriever.store.close()
    embedder = _shared_embedder(st, settings.embedder)
    store = Store.open(settings, create=False)
    try:
        retriever = Retriever(store, embedder, settings)
    except BaseException:
        store.close()
        raise
    generator = None
    if settings.backend != "extractive":
        from localgpt.generation import get_generator

        lock = _shared_model(st, settings)  # the model's queue: sessions generate in turn
        generator = get_generator(settings)  # this session's view: own sampling settings and stats
        if lock is not None:
            generator = QueuedGenerator(generator, lock)
    chain = QAChain(settings, retriever, generator, extractive=settings.backend == "extractive")
    ss["_chain"] = (key, chain)
    return chain


def _shared_embedder(st, spec: str):
    @st.cache_resource(show_spinner="Loading the embedding model…")
    def load(spec: str):
        from localgpt.embeddings import get_embedder

        return get_embedder(spec)

    return load(spec)


def _shared_model(st, settings: Settings):
    """Load the generator once per process; return the queue its sessions take turns in (None: no queue)."""

    @st.cache_resource(show_spinner="Loading the model (once for all sessions)…")
    def load(key: str, _settings: Settings):
        from localgpt.generation import get_generator, resolve_backend

        get_generator(_settings)
        return None if resolve_backend(_settings) == "openai" else GenerationQueue(key)  # a server batches by itself

    return load(generator_key(settings), settings)


def _answer(st, settings: Settings, question: str, history: list[dict]) -> dict:
    """Stream one answer into the page; return what the history keeps of it."""
    failed = {"question": question, "text": "", "abstained": False, "citations": [], "stats": "", "error": None}
    names = collection_names(settings)
    try:
        if settings.collection not in names:
            raise StoreError(f"collection '{settings.collection}' has no documents yet: add some with 'Add documents' in the sidebar")
        with Store.open(settings, create=False) as store:
            if store.count_chunks() == 0:
                raise StoreError(f"collection '{settings.collection}' has no documents yet: add some with 'Add documents' in the sidebar")
        chain = _session_chain(st, settings)
        past = [(t["question"], t["text"]) for t in history if not t["error"]]
        placeholder = st.empty()
        text, answer = "", None
        with st.spinner("Searching your documents…"):
            events = chain.stream(question, past)
            first = next(events)
        for event in _chain_from(first, events):
            if event.kind == "token":
                text += event.text
                placeholder.markdown(md_text(text) + "▌")
            elif event.kind == "done":
                answer = event.answer
        placeholder.empty()
        return answer_record(answer)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line on the page
        failed["error"] = explain(exc)
        return failed


def _chain_from(first, rest):
    yield first
    yield from rest


def _render_answer(st, turn: dict, index: int) -> None:
    if turn["error"]:
        st.error(turn["error"], icon=":material/error:")
        return
    if turn["abstained"]:
        st.warning(md_text(turn["text"]), icon=":material/help:")
    else:
        st.markdown(md_text(turn["text"]))
    low = turn.get("confidence") == "low"
    if low:
        why = "; ".join(turn.get("doubts") or [])
        st.warning(f"Low confidence{': ' + md_text(why) if why else ''}. Check the highlighted sentences in the sources.",
                   icon=":material/gpp_maybe:")
    citations = turn["citations"]
    if citations:
        labels = [f"**[{c['number']}]** {md_text(place(c))}" if c["cited"] else f"[{c['number']}] {md_text(place(c))}"
                  for c in citations]
        st.markdown("Sources: " + " · ".join(labels))
        with st.expander("Sources", expanded=low):
            for c in citations:
                st.markdown(
                    f"**[{c['number']}] {md_text(Path(c['source']).name)}**"
                    + (f" — page {c['page']}" if c.get("page") is not None else "")
                    + (f" — {md_text(c['heading'])}" if c.get("heading") else "")
                    + f" · similarity {c['similarity']:.2f} · rank score {c['score']:.3f}"
                )
                if len(c["sources"]) > 1:
                    st.caption("same content also in: " + ", ".join(Path(p).name for p in c["sources"][1:]))
                st.markdown(highlighted_html(c["text"], c["highlights"]), unsafe_allow_html=True)
                path = Path(c["source"])
                if path.is_file():
                    st.download_button(
                        f"Download {path.name}", data=lambda p=path: p.read_bytes(), file_name=path.name,
                        key=f"download-{index}-{c['number']}",
                    )
                else:
                    st.caption(f"{path.name} is no longer on disk")
    if turn["stats"] and st.session_state.get("show_stats", True):
        st.caption(turn["stats"])


if __name__ == "__main__":
    main()
