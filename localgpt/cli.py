"""The ``localgpt`` command line: parses flags, calls the library, prints. No logic of its own.

Every error a person can cause ends as one red line naming the file or setting, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from localgpt.config import Settings, load_settings
from localgpt.errors import LocalGPTError

app = typer.Typer(
    name="localgpt",
    help="Private, fully offline question answering over your own documents.\n\n"
    "Typical use: `localgpt ingest` (reads ./source_documents), then `localgpt ask \"your question\"`.\n"
    "Settings: defaults < localgpt.toml < LOCALGPT_* environment < flags.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
sources_app = typer.Typer(help="What a collection holds, and removing files from it.", invoke_without_command=True)
collections_app = typer.Typer(help="List and drop collections.", invoke_without_command=True)
app.add_typer(sources_app, name="sources")
app.add_typer(collections_app, name="collections")

console = Console()
err_console = Console(stderr=True)

# Shared flag definitions (one place, every command uses them the same way).
CollectionOpt = typer.Option(None, "--collection", "-c", help="Collection name (default: 'default').")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder holding the store (default: ./local_data).")
ChromaUrlOpt = typer.Option(None, "--chroma-url", help="Use a Chroma server (chroma run) at this URL.")
EmbedderOpt = typer.Option(None, "--embedder", help="e5-small (default, multilingual), minilm, or a model folder.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of tables.")


def _settings(**flags) -> Settings:
    return load_settings(**flags)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _display(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def run_safely(fn):
    """Turn typed errors into one line; Ctrl-C into exit 130 without a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LocalGPTError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130)

    return wrapper


# --------------------------------------------------------------------------------- ingest
class _RichProgress:
    """Files bar with chunk count and throughput."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.chunks = 0

    def start(self, total_files: int) -> None:
        self.task = self.progress.add_task("ingesting", total=total_files, chunks=0)

    def file_done(self, path: str, status: str, chunks: int = 0, nbytes: int = 0) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=1, description=f"{status:>9} {_short(_display(path))}")

    def chunks_embedded(self, n: int) -> None:
        self.chunks += n
        if self.task is not None:
            self.progress.update(self.task, chunks=self.chunks)


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


class _ThroughputColumn(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        elapsed = task.elapsed or 0.0
        chunks = task.fields.get("chunks", 0)
        files_rate = task.completed / elapsed if elapsed > 0 else 0.0
        chunk_rate = chunks / elapsed if elapsed > 0 else 0.0
        from rich.text import Text

        return Text(f"{chunks} chunks · {files_rate:.1f} files/s · {chunk_rate:.0f} chunks/s", style="cyan")


@app.command()
@run_safely
def ingest(
    folder: Optional[Path] = typer.Argument(None, help="Folder (or file) to ingest; default ./source_documents."),
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    embedder: Optional[str] = EmbedderOpt,
    chunk_size: Optional[int] = typer.Option(None, help="Chunk size in embedding-model tokens (default 200)."),
    chunk_overlap: Optional[int] = typer.Option(None, help="Overlap between chunks in tokens (default 32)."),
    workers: Optional[int] = typer.Option(None, help="Parser processes (default: CPU cores, at most 4)."),
    ocr: Optional[bool] = typer.Option(None, "--ocr/--no-ocr", help="OCR scanned PDF pages with tesseract."),
    max_file_mb: Optional[float] = typer.Option(
        None, "--max-file-mb", help="Skip files larger than this many MB, listing them with the reason (default 500)."
    ),
    parse_timeout: Optional[float] = typer.Option(
        None, "--parse-timeout",
        help="Seconds a parser may spend on one file before it is stopped and the file skipped with the reason "
        "(default 600; waits for a CPU core or for OCR do not count).",
    ),
    rebuild: bool = typer.Option(False, "--rebuild", help="Drop the collection first and ingest from scratch."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero when any file was skipped."),
    watch: bool = typer.Option(
        False, "--watch", help="Keep watching the folder after the first run: what changes is ingested within "
        "seconds, a deleted file loses its chunks (one summary, or one --json line, per run); Ctrl-C stops.",
    ),
    json_out: bool = JsonOpt,
):
    """Split and embed the documents of a folder into a collection, incrementally.

    Unchanged files cost a stat; changed files replace their chunks; deleted files lose
    theirs; a renamed or copied file is linked, not embedded again. Bad files are listed
    with the reason at the end and never stop the run, and so are files over --max-file-mb
    and files whose parsing takes longer than --parse-timeout.
    """
    from ingest.pipeline import ingest_folder
    from localgpt.store import Store

    settings = _settings(
        collection=collection, data_dir=data_dir, chroma_url=chroma_url, embedder=embedder,
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, workers=workers, ocr=ocr,
        max_file_mb=max_file_mb, parse_timeout=parse_timeout,
    )
    folder = folder or settings.source_dir
    if not folder.exists():
        _fail(f"{folder} does not exist: give a folder of documents, e.g. `localgpt ingest ~/Documents/papers`")
    if rebuild:
        Store.open(settings).drop()
    if watch:
        _watch_ingest(folder, settings, json_out)
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        _ThroughputColumn(), TimeElapsedColumn(), console=err_console, disable=json_out, transient=False,
    ) as bar:
        report = ingest_folder(folder, settings, progress=_RichProgress(bar))
    if json_out:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    else:
        _print_ingest_summary(report)
    if report.interrupted:
        raise typer.Exit(130)
    if strict and report.skipped:
        raise typer.Exit(1)


def _watch_ingest(folder: Path, settings: Settings, json_out: bool) -> None:
    from ingest.pipeline import ingest_folder
    from localgpt.watch import watch_folder

    def run():
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      _ThroughputColumn(), console=err_console, disable=json_out, transient=True) as bar:
            return ingest_folder(folder, settings, progress=_RichProgress(bar))

    def show(report, changes) -> None:
        if json_out:
            print(json.dumps(report.as_dict(), ensure_ascii=False), flush=True)
        else:
            _print_ingest_summary(report)
        if report.interrupted:
            raise typer.Exit(130)
        if not json_out:
            err_console.print(f"[dim]watching {_display(str(folder))} for changes (Ctrl-C stops)[/]")

    try:
        watch_folder(folder, run, on_report=show, debounce_ms=settings.watch_debounce_ms)
    except KeyboardInterrupt:  # between runs: the normal way to stop watching
        err_console.print("[dim]stopped watching[/]")


def _print_ingest_summary(report) -> None:
    table = Table(title=f"ingested {_display(report.folder)} into '{report.collection}' in {report.seconds:.1f}s",
                  show_header=True,
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("new", "changed", "unchanged", "linked", "removed", "skipped", "chunks+", "chunks-"):
        table.add_column(col, justify="right", min_width=len(col), no_wrap=True)
    table.add_row(
        str(report.new), str(report.changed), str(report.unchanged), str(report.renamed_or_copied),
        str(report.removed), str(len(report.skipped)), str(report.chunks_added), str(report.chunks_removed),
    )
    console.print(table)
    if report.skipped:
        skipped = Table(title="skipped files", show_header=True, title_style="yellow")
        skipped.add_column("file")
        skipped.add_column("reason")
        for p in report.skipped:
            skipped.add_row(_display(p.path), p.reason)
        console.print(skipped)
    for note in report.notes:
        console.print(f"[dim]note:[/] {_display(note.path)}: {note.reason}")
    if report.interrupted:
        console.print("[yellow]interrupted: files not finished were left out; run ingest again to continue.[/]")


# --------------------------------------------------------------------------------- formats
@app.command()
def formats():
    """List the file types ingest reads."""
    from ingest.load import SUPPORTED_FORMATS

    table = Table(show_header=True)
    table.add_column("extension")
    table.add_column("how it is read")
    for ext, desc in sorted(SUPPORTED_FORMATS.items()):
        table.add_row(ext, desc)
    console.print(table)


# --------------------------------------------------------------------------------- sources
@sources_app.callback()
@run_safely
def sources(
    ctx: typer.Context,
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    json_out: bool = JsonOpt,
):
    """List the files a collection holds: chunks, pages and when each was ingested."""
    ctx.obj = dict(collection=collection, data_dir=data_dir, chroma_url=chroma_url)
    if ctx.invoked_subcommand is not None:
        return
    from datetime import datetime

    from localgpt.store import Store

    settings = _settings(**ctx.obj)
    with Store.open(settings, create=False) as store:
        files = store.files()
    if json_out:
        print(json.dumps([f.__dict__ for f in files], ensure_ascii=False, indent=2))
        return
    table = Table(title=f"collection '{settings.collection}': {len(files)} files", show_header=True)
    for col in ("file", "chunks", "pages", "ingested at"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for f in files:
        table.add_row(
            _display(f.path), str(f.chunks), "" if f.pages is None else str(f.pages),
            datetime.fromtimestamp(f.ingested_at).strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@sources_app.command("remove")
@run_safely
def sources_remove(ctx: typer.Context, path: Path = typer.Argument(..., help="File to remove from the collection.")):
    """Remove one file (or every file under a folder) and its chunks from the collection."""
    from localgpt.library import remove_sources, upload_folder
    from localgpt.store import Store

    settings = _settings(**(ctx.obj or {}))
    with Store.open(settings, create=False) as store:
        removed = remove_sources(store, str(path), upload_folder(settings))
    if not removed:
        _fail(f"{path} is not in collection '{settings.collection}' (see `localgpt sources`)")
    for removed_path in removed:
        console.print(f"removed {_display(removed_path)}")


# --------------------------------------------------------------------------------- collections
@collections_app.callback()
@run_safely
def collections(
    ctx: typer.Context,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    json_out: bool = JsonOpt,
):
    """List collections with their file and chunk counts."""
    ctx.obj = dict(data_dir=data_dir, chroma_url=chroma_url)
    if ctx.invoked_subcommand is not None:
        return
    from localgpt.library import collection_summaries

    rows = collection_summaries(_settings(**ctx.obj))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(show_header=True)
    for col in ("collection", "files", "chunks", "embedder"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["files"]), str(r["chunks"]), r["embedder"] or "")
    console.print(table)


@collections_app.command("drop")
@run_safely
def collections_drop(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Collection to delete."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete a collection: its vectors, manifest and keyword index, and the copies uploaded into it
    through the web page or the API (your own files are not touched)."""
    from localgpt.library import drop_collection
    from localgpt.store import collection_names

    settings = _settings(**(ctx.obj or {}), collection=name)
    if name not in collection_names(settings):
        _fail(f"no collection named '{name}' (see `localgpt collections`)")
    if not yes and not typer.confirm(f"Delete collection '{name}'?", default=False):
        raise typer.Exit(1)
    drop_collection(settings, name)
    console.print(f"dropped collection '{name}'")


# --------------------------------------------------------------------------------- ask / chat
ModelOpt = typer.Option(None, "--model", "-m", help="Model folder, GGUF file or HF cache id (default: embedded SmolLM2).")
FamilyOpt = typer.Option(None, "--family", help="llama2, falcon, falcon-mamba, mamba or smollm2 (guessed when unset).")
QuantOpt = typer.Option(None, "--quantization", "-q", help="none, 8bit or 4bit (bitsandbytes, CUDA).")
DeviceOpt = typer.Option(None, "--device", help="auto, cuda, cpu or mps.")
BackendOpt = typer.Option(None, "--backend", help="auto, transformers, gguf, llamacpp, openai or extractive.")
EngineOpt = typer.Option(None, "--engine", help="hf, or fast (the GPU decode engine).")
OpenAIOpt = typer.Option(None, "--openai-url", help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
KOpt = typer.Option(None, "--k", "-k", help="Chunks given to the model (default 4).")
ModeOpt = typer.Option(None, "--mode", help="Retrieval: hybrid (default), dense, keyword or mmr.")
ExtractiveOpt = typer.Option(False, "--extractive", help="Answer with the supporting sentences alone, no generator.")
AnswerCheckOpt = typer.Option(
    None, "--answer-check",
    help="Ask the generator whether the passages state the answer, and abstain when it says no: "
    "auto (default: generators of 1B+ parameters), on or off.",
)


def _qa_settings(**flags) -> Settings:
    flags["retrieval_mode"] = flags.pop("mode", None)
    if flags.pop("extractive", False):
        flags["backend"] = "extractive"
    return _settings(**flags)


def _print_sources(answer, limit: int = 240) -> None:
    if answer.abstained and not answer.citations:
        return
    if answer.confidence == "low":
        why = "; ".join(answer.doubts)
        console.print(f"\n[bold yellow]low confidence[/]{': ' + why if why else ''} — check the supporting "
                      "sentences below", highlight=False)
    console.print("\n[bold]Sources[/]")
    for c in answer.citations:
        ref = c.ref
        where = _display(ref.source) + (f", page {ref.page}" if ref.page is not None else "")
        also = f" (also {', '.join(_display(p) for p in ref.sources[1:])})" if len(ref.sources) > 1 else ""
        mark = "*" if c.cited else " "
        snippet = " ".join(ref.text.split())
        snippet = snippet if len(snippet) <= limit else snippet[: limit - 1] + "…"
        console.print(f"{mark}[{c.number}] [cyan]{where}[/]{also}  [dim]similarity {ref.similarity:.2f}[/]", highlight=False)
        console.print(f"     [dim]{snippet}[/]", highlight=False)
    if answer.support:
        console.print("\n[bold]Supporting sentences[/]")
        for s in answer.support:
            console.print(f"  “{s.sentence}” [{s.number}]", highlight=False)


def _print_stats(answer) -> None:
    table = Table(title="generation stats", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    stats = dict(answer.generator_stats)
    for key in ("backend", "model", "device", "load_s", "prompt_tokens", "new_tokens", "ttft_s",
                "decode_tokens_per_s", "total_s", "peak_gpu_mib", "rss_mib"):
        value = stats.get(key)
        if value is None or value == "":
            continue
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    if answer.answer_check is not None:
        table.add_row("answer check P(yes)", f"{answer.answer_check:.3f}")
    if answer.verifier is not None:
        table.add_row("answer verifier P(states the answer)", f"{answer.verifier:.3f}")
    for key, value in answer.timings.items():
        table.add_row(f"time {key}", f"{value:.3f}s")
    console.print(table)


def _stream_answer(chain, question: str, history, *, json_out: bool = False, filters=None):
    answer = None
    for event in chain.stream(question, history, filters=filters):
        if event.kind == "token" and not json_out:
            console.out(event.text, end="", highlight=False)
        elif event.kind == "done":
            answer = event.answer
    if not json_out:
        console.out("")
    return answer


@app.command()
@run_safely
def ask(
    question: str = typer.Argument(..., help="Your question, in any language."),
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    embedder: Optional[str] = EmbedderOpt,
    model: Optional[str] = ModelOpt,
    family: Optional[str] = FamilyOpt,
    quantization: Optional[str] = QuantOpt,
    device: Optional[str] = DeviceOpt,
    backend: Optional[str] = BackendOpt,
    engine: Optional[str] = EngineOpt,
    openai_url: Optional[str] = OpenAIOpt,
    k: Optional[int] = KOpt,
    mode: Optional[str] = ModeOpt,
    max_new_tokens: Optional[int] = typer.Option(None, help="Most tokens in the answer (default 256)."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default)."),
    file: Optional[str] = typer.Option(None, "--file", help="Only search this file."),
    folder: Optional[str] = typer.Option(None, "--folder", help="Only search files under this folder."),
    type_: Optional[str] = typer.Option(None, "--type", help="Only search this file type, e.g. pdf."),
    extractive: bool = ExtractiveOpt,
    answer_check: Optional[str] = AnswerCheckOpt,
    json_out: bool = JsonOpt,
    stats: bool = typer.Option(False, "--stats", help="Print load time, time to first token, tokens/s and memory."),
):
    """Answer a question from your documents, streaming, with numbered sources and the supporting sentences."""
    from localgpt.chain import QAChain
    from localgpt.retrieval import Filters

    settings = _qa_settings(
        collection=collection, data_dir=data_dir, chroma_url=chroma_url, embedder=embedder, model=model,
        family=family, quantization=quantization, device=device, backend=backend, engine=engine,
        openai_url=openai_url, k=k, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
        extractive=extractive, answer_check=answer_check,
    )
    chain = QAChain(settings)
    filters = Filters(file=file, folder=folder, ext=type_)
    answer = _stream_answer(chain, question, [], json_out=json_out, filters=filters if filters.active() else None)
    if json_out:
        print(json.dumps(answer.as_dict(), ensure_ascii=False, indent=2))
        return
    _print_sources(answer)
    if stats:
        _print_stats(answer)


@app.command()
@run_safely
def chat(
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    embedder: Optional[str] = EmbedderOpt,
    model: Optional[str] = ModelOpt,
    family: Optional[str] = FamilyOpt,
    quantization: Optional[str] = QuantOpt,
    device: Optional[str] = DeviceOpt,
    backend: Optional[str] = BackendOpt,
    engine: Optional[str] = EngineOpt,
    openai_url: Optional[str] = OpenAIOpt,
    k: Optional[int] = KOpt,
    mode: Optional[str] = ModeOpt,
    extractive: bool = ExtractiveOpt,
    answer_check: Optional[str] = AnswerCheckOpt,
    save_qa: Optional[Path] = typer.Option(None, "--save-qa", help="Append each question, answer and sources to this JSONL file."),
):
    """Talk with your documents: follow-up questions use the history.

    Commands: /sources (sources of the last answer), /reset (forget the history), /exit.
    Ctrl-C stops the current answer; Ctrl-D or /exit leaves.
    """
    from localgpt.chain import QAChain

    settings = _qa_settings(
        collection=collection, data_dir=data_dir, chroma_url=chroma_url, embedder=embedder, model=model,
        family=family, quantization=quantization, device=device, backend=backend, engine=engine,
        openai_url=openai_url, k=k, mode=mode, extractive=extractive, answer_check=answer_check,
    )
    chain = QAChain(settings)
    history: list[tuple[str, str]] = []
    last = None
    console.print("[dim]Ask about your documents. /sources, /reset, /exit. Ctrl-C stops an answer.[/]")
    while True:
        try:
            question = console.input("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if not question:
            continue
        if question in ("/exit", "/quit"):
            break
        if question == "/reset":
            history, last = [], None
            console.print("[dim]history cleared[/]")
            continue
        if question == "/sources":
            if last is None:
                console.print("[dim]no answer yet[/]")
            else:
                _print_sources(last)
            continue
        console.print("[bold blue]localgpt>[/] ", end="")
        try:
            last = _stream_answer(chain, question, history)
        except KeyboardInterrupt:
            console.print("\n[yellow](answer stopped)[/]")
            continue
        history.append((question, last.text))
        if save_qa:
            with open(save_qa, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(last.as_dict(), ensure_ascii=False) + "\n")


@app.command()
@run_safely
def ui(
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default keeps the page on this machine."),
    port: int = typer.Option(8501, help="Port of the web page."),
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    embedder: Optional[str] = EmbedderOpt,
    model: Optional[str] = ModelOpt,
    backend: Optional[str] = BackendOpt,
):
    """Open the web page: upload documents, watch them ingest, chat with cited sources."""
    from ui.launch import launch

    settings = _settings(collection=collection, data_dir=data_dir, chroma_url=chroma_url, embedder=embedder,
                         model=model, backend=backend)
    raise typer.Exit(launch(settings, host=host, port=port))


@app.command()
@run_safely
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any other than loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port of the API."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LOCALGPT_API_KEY", show_envvar=True,
        help="Clients must send 'Authorization: Bearer KEY' (all but /health).",
    ),
    watch: Optional[list[str]] = typer.Option(
        None, "--watch", help="FOLDER[:COLLECTION] to keep ingested while serving (give several times).",
    ),
    max_upload_mb: Optional[float] = typer.Option(
        None, "--max-upload-mb", help="Most MB one upload request may carry (setting max_upload_mb; default: max_file_mb, 500).",
    ),
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    chroma_url: Optional[str] = ChromaUrlOpt,
    embedder: Optional[str] = EmbedderOpt,
    model: Optional[str] = ModelOpt,
    family: Optional[str] = FamilyOpt,
    backend: Optional[str] = BackendOpt,
    engine: Optional[str] = EngineOpt,
    device: Optional[str] = DeviceOpt,
    quantization: Optional[str] = QuantOpt,
    batch_slots: Optional[int] = typer.Option(
        None, "--batch-slots",
        help="--engine fast: requests decoded together (setting batch_slots; default 16 on CUDA, 4 on CPU; 0: one at a time).",
    ),
    batch_share_prefill: Optional[bool] = typer.Option(
        None, "--batch-share-prefill/--no-batch-share-prefill",
        help="--engine fast: prefill several waiting requests' prompts in one pass (setting batch_share_prefill; "
        "faster under load, greedy answers may differ from alone in bf16 ties).",
    ),
    openai_url: Optional[str] = OpenAIOpt,
    extractive: bool = typer.Option(False, "--extractive", help="Answer every request with the supporting sentences alone."),
):
    """Serve an OpenAI-compatible HTTP API: chat completions with cited sources, embeddings, and
    documents in and out (upload, list, remove), shared by many users and apps.

    Models are 'localgpt/COLLECTION'. Generation takes turns in one queue per model (with --engine
    fast, up to --batch-slots requests decode together), and /health and /metrics answer meanwhile.
    No docs page, and nothing is sent anywhere.
    """
    from localgpt.server import check_bind, parse_watch, serve as run_server

    settings = _qa_settings(collection=collection, data_dir=data_dir, chroma_url=chroma_url, embedder=embedder,
                            model=model, family=family, backend=backend, engine=engine, device=device,
                            quantization=quantization, batch_slots=batch_slots,
                            batch_share_prefill=batch_share_prefill, openai_url=openai_url,
                            extractive=extractive, max_upload_mb=max_upload_mb)
    check_bind(host, api_key)
    folders = [parse_watch(spec, settings.collection) for spec in watch or []]
    err_console.print(f"localgpt API on http://{host}:{port}/v1 (models: localgpt/COLLECTION); Ctrl-C stops")
    run_server(settings, host=host, port=port, api_key=api_key, watch=folders)


@app.command("eval")
@run_safely
def eval_(
    questions: Path = typer.Argument(..., help="Question file (JSONL: question, answer, aliases, source, page) or a BEIR folder."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Ingest this folder into the collection first."),
    collection: Optional[str] = CollectionOpt,
    data_dir: Optional[Path] = DataDirOpt,
    embedder: Optional[str] = EmbedderOpt,
    k: Optional[int] = KOpt,
    mode: Optional[str] = ModeOpt,
    model: Optional[str] = ModelOpt,
    backend: Optional[str] = BackendOpt,
    extractive: bool = ExtractiveOpt,
    answer_check: Optional[str] = AnswerCheckOpt,
    retrieval_only: bool = typer.Option(False, "--retrieval-only", help="Score retrieval (and abstention) only: fast, for tuning."),
    compare: Optional[list[str]] = typer.Option(
        None, "--compare",
        help="Two configurations to run side by side (give twice): TOML files, or the built-in "
        "'localgpt-baseline' (localGPT's 1000/200-character splitter, dense, k=4, no abstention) and 'defaults'.",
    ),
    split: str = typer.Option("all", "--split", help="Which questions: all, dev (for tuning) or test (held out, for reporting)."),
    per_question: bool = typer.Option(False, "--per-question", help="Also print a row per question."),
    json_out: bool = JsonOpt,
):
    """Measure retrieval and answer quality on a question set, or nDCG@10/recall@100 on a BEIR folder.

    Retrieval: hit@k, recall@k and MRR against the expected file (and page), answer-in-top-k.
    Answers: exact match, token F1, contains-answer, citation correctness, abstention on
    unanswerable and false abstention on answerable questions, latency per stage.
    """
    from localgpt import evaluation
    from localgpt.eval_runner import ensure_collection, load_config, run_beir, run_qa

    base = _qa_settings(collection=collection, data_dir=data_dir, embedder=embedder, k=k, mode=mode, model=model,
                        backend=backend, extractive=extractive, answer_check=answer_check)
    quiet = json_out
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, disable=quiet, transient=True)
    if questions.is_dir():
        dataset = evaluation.load_beir(questions)
        modes = [base.retrieval_mode] if mode else ["dense", "keyword", "hybrid"]
        with progress:
            task = progress.add_task("BEIR", total=len(dataset.qrels) * len(modes))
            scores = run_beir(questions, base, modes, tick=lambda: progress.advance(task))
        if json_out:
            print(json.dumps([s.to_dict() for s in scores], ensure_ascii=False, indent=2))
        else:
            evaluation.render_beir(scores, console, dataset=str(questions))
        return
    cases = evaluation.split_cases(evaluation.load_qa(questions), split)
    configs: list[tuple[str, Settings, str]] = []
    if compare:
        if len(compare) != 2:
            _fail("--compare takes exactly two configurations (give --compare A --compare B)")
        for spec in compare:
            values = load_config(spec)
            suffix = values.pop("collection_suffix")
            name = values.pop("name", suffix)
            splitter = values.pop("splitter", "tokens")
            if spec != "defaults":  # its own collection: its chunks may differ from the defaults'
                values.setdefault("collection", f"eval-{suffix}")
            configs.append((name, base.with_overrides(**values), splitter))
    else:
        configs.append((questions.stem, base, "tokens"))
    reports = []
    for name, settings, splitter in configs:
        ensure_collection(corpus, settings, splitter)
        with progress:
            task = progress.add_task(f"eval {name}", total=len(cases))
            reports.append(run_qa(cases, settings, retrieval_only=retrieval_only, name=name,
                                  tick=lambda: progress.advance(task)))
    for report in reports:
        report.config["split"] = split
    if json_out:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False, indent=2))
    elif len(reports) == 2:
        evaluation.render_comparison(reports[0], reports[1], console)
    else:
        evaluation.render_report(reports[0], console, per_question=per_question)


@app.command()
@run_safely
def doctor(
    data_dir: Optional[Path] = DataDirOpt,
    embedder: Optional[str] = EmbedderOpt,
    model: Optional[str] = ModelOpt,
    backend: Optional[str] = BackendOpt,
    json_out: bool = JsonOpt,
):
    """Check what localgpt needs on this machine and say what to fix.

    Python, the torch build, the embedding model, the generator's files, and one generated token
    from the llama.cpp library, tried in a child process so that a build made for another CPU is
    reported in words instead of crashing. Exit code 1 when a check fails.
    """
    from localgpt.doctor import run_checks

    settings = _settings(data_dir=data_dir, embedder=embedder, model=model, backend=backend)
    with err_console.status("checking…", spinner="dots") if not json_out else _nullcontext():
        checks = run_checks(settings)
    failed = any(c.status == "fail" for c in checks)
    if json_out:
        import dataclasses

        print(json.dumps({"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks]}, ensure_ascii=False, indent=2))
    else:
        marks = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[bold red]✗[/]"}
        table = Table(box=box.SIMPLE, show_header=False)
        table.add_column(width=1)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for c in checks:
            table.add_row(marks[c.status], c.name, c.detail + (f"\n[cyan]fix:[/] {c.fix}" if c.fix else ""))
        console.print(table)
        console.print("[bold red]some checks failed[/]" if failed else "[green]localgpt is ready on this machine[/]")
    if failed:
        raise typer.Exit(1)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
