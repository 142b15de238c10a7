"""A collection: vectors in Chroma, and beside them a SQLite manifest that is the source of truth.

The manifest holds which files were ingested (path, size, mtime, sha256), the text and
citation metadata of every committed chunk, and an FTS5 keyword index over those chunks.
A chunk is visible to queries only once its file's content is committed in the manifest,
which happens in one SQLite transaction after its vectors are in Chroma; a ``pending``
table is the intent log that lets the next run remove vectors a crash left behind.

Several processes may write one collection at once (``localgpt ingest`` while ``localgpt serve``
takes uploads, two ``serve`` processes on one data folder). Each pending row names its writer, and
each writer holds a lock on its own file under ``<data_dir>/collections/.writers/`` for as long as
it lives (``fcntl``: the kernel lets go when the process dies, however it dies). Opening a store
removes only what a writer whose lock is free left pending; a live writer's vectors are never touched.
Never touches the network except a Chroma server the user configured.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from localgpt.config import Settings
from localgpt.documents import Chunk, SourceRef
from localgpt.errors import EmbedderMismatch, StoreError
from localgpt.offline import enforce_offline
from localgpt.text import keyword_terms

SCHEMA_VERSION = "1"
CHROMA_BATCH = 1000
# Collections up to this many chunks are searched exactly in memory (20k x 384 floats = 30 MB);
# larger ones through Chroma's approximate HNSW index. See Store.dense_search.
EXACT_SEARCH_MAX = 20_000

log = logging.getLogger("localgpt.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, ingested_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS contents (
    sha256 TEXT PRIMARY KEY, n_chunks INTEGER NOT NULL, pages INTEGER, ext TEXT,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL,
    text TEXT NOT NULL, page INTEGER, heading TEXT, kind TEXT, tokens INTEGER);
CREATE INDEX IF NOT EXISTS chunks_sha ON chunks(sha256);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(terms, tokenize = 'unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS pending (
    sha256 TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', chunk_ids TEXT NOT NULL, started REAL NOT NULL,
    PRIMARY KEY (sha256, owner));
CREATE TABLE IF NOT EXISTS unreadable (
    sha256 TEXT NOT NULL, reader TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (sha256, reader));
"""


@dataclass
class FileRecord:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    ingested_at: float
    chunks: int = 0
    pages: int | None = None


def collection_names(settings: Settings) -> list[str]:
    """Collections that have a manifest under the data folder."""
    folder = Path(settings.data_dir) / "collections"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.sqlite"))


class _Rows:
    """A statement's result, read to the end: its rows, and the cursor's lastrowid / rowcount."""

    __slots__ = ("rows", "lastrowid", "rowcount")

    def __init__(self, rows: list, lastrowid: int | None, rowcount: int):
        self.rows, self.lastrowid, self.rowcount = rows, lastrowid, rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return self.rows

    def __iter__(self):
        return iter(self.rows)


class _Serialized:
    """The manifest's one SQLite connection as the store's threads share it (the server answers many requests at
    once): each statement runs and is read to the end under the store's lock. Unserialised, 16 concurrent
    retrievals on a 16-core machine got ``fetchone() is None`` from ``SELECT COUNT(*)`` there (its SQLite is built
    serialised, so the interleaving was in Python's sqlite3 statements and cursors, not found exactly); with the
    lock no two statements of one connection interleave, and a read never sees another thread's transaction half
    done (``_tx`` holds the same lock)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._conn, self._lock = db, lock

    def execute(self, sql: str, args: Sequence | dict = ()) -> _Rows:
        with self._lock:
            cur = self._conn.execute(sql, args)
            return _Rows(cur.fetchall(), cur.lastrowid, cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Store:
    """One collection. Open it with ``Store.open(settings)``; close it (or use ``with``)."""

    def __init__(self, settings: Settings, name: str, db: sqlite3.Connection, chroma_client, create: bool):
        self.settings = settings
        self.name = name
        self._client = chroma_client
        self._collection = None
        self._lock = threading.RLock()
        self._db = _Serialized(db, self._lock)
        self._create = create
        self._writes = 0  # commits through this connection (PRAGMA data_version counts the others')
        self._exact: tuple[tuple[int, int], list[str], np.ndarray] | None = None  # (stamp, ids, vectors)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, settings: Settings, name: str | None = None, *, create: bool = True) -> "Store":
        enforce_offline()
        name = name or settings.collection
        data_dir = Path(settings.data_dir)
        manifest = data_dir / "collections" / f"{name}.sqlite"
        if not create and not manifest.exists():
            raise StoreError(
                f"collection '{name}' does not exist in {data_dir}: run `localgpt ingest` first"
            )
        try:
            manifest.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(manifest), timeout=30, check_same_thread=False, isolation_level=None)
            _enable_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            _migrate_pending(db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the manifest {manifest}: {exc}") from exc
        # A local Chroma opens on first use (importing and opening it is most of a
        # nothing-changed re-ingest); a server is contacted now, so a wrong URL fails early.
        client = _chroma_client(settings) if settings.chroma_url else None
        store = cls(settings, name, db, client, create)
        store._recover()
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def client(self):
        if self._client is None:
            self._client = _chroma_client(self.settings)
        return self._client

    @property
    def collection(self):
        with self._lock:  # may be opened ahead by a warming thread (see warm_up)
            return self._open_collection()

    def warm_up(self) -> threading.Thread:
        """Open Chroma in the background (its import and open take about a second), so that a
        small re-ingest has it ready by the time the first vectors are. Errors surface on use."""

        def run() -> None:
            try:
                self.collection
            except Exception:
                pass

        thread = threading.Thread(target=run, name="chroma-warm-up", daemon=True)
        thread.start()
        return thread

    def _open_collection(self):
        if self._collection is None:
            try:
                self._collection = self.client.get_or_create_collection(
                    _chroma_name(self.name),
                    embedding_function=None,
                    configuration={"hnsw": {"space": "cosine"}},
                )
            except Exception as exc:  # chromadb raises many types; name the store
                raise StoreError(f"cannot open Chroma collection '{self.name}': {exc}") from exc
        return self._collection

    # ------------------------------------------------------------------ meta
    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: object) -> None:
        with self._tx() as db:
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, str(value)))

    def check_embedder(self, embedder_name: str, dim: int | None = None) -> None:
        """Refuse to mix embedders: vectors of two models are not comparable."""
        recorded = self.meta("embedder")
        if recorded is None:
            return
        if recorded != embedder_name:
            raise EmbedderMismatch(
                f"collection '{self.name}' was built with the embedder '{recorded}', but '{embedder_name}' is "
                f"configured: use the same --embedder, another --collection, or re-ingest with --rebuild"
            )
        if dim is not None and self.meta("dim") not in (None, str(dim)):
            raise EmbedderMismatch(f"collection '{self.name}' holds {self.meta('dim')}-dimensional vectors, not {dim}")

    # ------------------------------------------------------------------ reading
    def files(self, under: str | None = None) -> list[FileRecord]:
        sql = (
            "SELECT f.path, f.size, f.mtime_ns, f.sha256, f.ingested_at, c.n_chunks, c.pages "
            "FROM files f LEFT JOIN contents c ON c.sha256 = f.sha256"
        )
        args: tuple = ()
        if under is not None:
            sql += " WHERE f.path = ? OR f.path LIKE ? ESCAPE '\\'"
            prefix = under.rstrip(os.sep) + os.sep
            args = (under, _like_escape(prefix) + "%")
        rows = self._db.execute(sql + " ORDER BY f.path", args).fetchall()
        return [FileRecord(r[0], r[1], r[2], r[3], r[4], r[5] or 0, r[6]) for r in rows]

    def file(self, path: str) -> FileRecord | None:
        row = self._db.execute(
            "SELECT path, size, mtime_ns, sha256, ingested_at FROM files WHERE path=?", (path,)
        ).fetchone()
        return FileRecord(*row) if row else None

    def has_content(self, sha256: str) -> bool:
        return self._db.execute("SELECT 1 FROM contents WHERE sha256=?", (sha256,)).fetchone() is not None

    def count_chunks(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def chunk_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM chunks ORDER BY id")]

    def paths_for(self, sha256s: Iterable[str]) -> dict[str, list[str]]:
        sha_list = list(set(sha256s))
        out: dict[str, list[str]] = {s: [] for s in sha_list}
        for part in _batched(sha_list, 500):
            q = ",".join("?" * len(part))
            for sha, path in self._db.execute(f"SELECT sha256, path FROM files WHERE sha256 IN ({q}) ORDER BY path", part):
                out[sha].append(path)
        return out

    def chunks_by_id(self, ids: Sequence[str]) -> dict[str, SourceRef]:
        """Committed chunks for these ids; ids of uncommitted (pending) chunks are absent."""
        found: dict[str, SourceRef] = {}
        for part in _batched(list(ids), 500):
            q = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT id, sha256, idx, text, page, heading FROM chunks WHERE id IN ({q})", part
            ).fetchall()
            for cid, sha, idx, text, page, heading in rows:
                found[cid] = SourceRef(cid, text, [], page, heading, 0.0, sha, idx)
        paths = self.paths_for(ref.content_hash for ref in found.values())
        for ref in found.values():
            ref.sources = paths.get(ref.content_hash, [])
        return {cid: ref for cid, ref in found.items() if ref.sources}

    def sha256s_matching(self, *, file: str | None = None, folder: str | None = None, ext: str | None = None) -> set[str]:
        """Content hashes of files that pass a metadata filter (for filtered search)."""
        sql, args = "SELECT DISTINCT sha256 FROM files WHERE 1=1", []
        if file:
            sql += " AND (path = ? OR path LIKE ? ESCAPE '\\')"
            args += [file, "%" + os.sep + _like_escape(file)]
        if folder:
            sql += " AND path LIKE ? ESCAPE '\\'"
            args.append("%" + _like_escape(folder.strip(os.sep)) + os.sep + "%")
        if ext:
            sql += " AND lower(path) LIKE ?"
            args.append("%." + ext.lower().lstrip("."))
        return {r[0] for r in self._db.execute(sql, args)}

    # ------------------------------------------------------------------ searching
    def dense_search(self, query_vector: np.ndarray, k: int, allowed: set[str] | None = None) -> list[SourceRef]:
        """Nearest chunks by cosine similarity; score = 1 - cosine distance.

        Collections of up to EXACT_SEARCH_MAX chunks are searched exactly, over their committed
        vectors held in memory: Chroma's HNSW graph is approximate and is rebuilt differently by
        each process, so near the k-th hit it can miss true neighbours and return different
        chunks for the same question from one run to the next (measured: recall@20 0.995, and
        4 of 53 evaluation questions changed between two runs). Larger collections use HNSW.
        """
        total = self.count_chunks()
        if total == 0:
            return []
        if allowed is None and total <= EXACT_SEARCH_MAX:
            return self._exact_search(np.asarray(query_vector, dtype=np.float32), k)
        where = None
        if allowed is not None:
            if not allowed:
                return []
            where = {"content_hash": {"$in": sorted(allowed)}}
        n = min(total, k)
        while True:
            res = self.collection.query(
                query_embeddings=[np.asarray(query_vector, dtype=np.float32).tolist()],
                n_results=n,
                where=where,
                include=["distances"],
            )
            ids, dists = res["ids"][0], res["distances"][0]
            refs = self.chunks_by_id(ids)
            hits = []
            for cid, dist in zip(ids, dists):
                if cid in refs:
                    ref = refs[cid]
                    ref.score = float(1.0 - dist)
                    hits.append(ref)
            # Pending (uncommitted) vectors are filtered out above; ask for more if they crowded the top.
            if len(hits) >= k or len(ids) < n or n >= total * 4 + 10:
                return hits[:k]
            n = min(n * 2 + 10, total * 4 + 10)

    def _exact_search(self, query_vector: np.ndarray, k: int) -> list[SourceRef]:
        ids, matrix = self._exact_vectors()
        if not ids:
            return []
        sims = matrix @ query_vector
        top = np.argsort(-sims, kind="stable")[: max(k, 0)]
        refs = self.chunks_by_id([ids[i] for i in top])
        hits = []
        for i in top:
            ref = refs.get(ids[i])
            if ref is not None:
                ref.score = float(sims[i])
                hits.append(ref)
        return hits

    def _exact_vectors(self) -> tuple[list[str], np.ndarray]:
        """The committed chunks' ids (sorted) and unit vectors, reloaded after any commit."""
        with self._lock:
            stamp = (self._db.execute("PRAGMA data_version").fetchone()[0], self._writes)
            if self._exact is None or self._exact[0] != stamp:
                ids = self.chunk_ids()
                found = self.vectors(ids)
                ids = [cid for cid in ids if cid in found]
                matrix = np.stack([found[cid] for cid in ids]) if ids else np.zeros((0, 1), dtype=np.float32)
                self._exact = (stamp, ids, matrix)
            return self._exact[1], self._exact[2]

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for part in _batched(list(ids), 5000):
            res = self.collection.get(ids=part, include=["embeddings"])
            out.update((cid, np.asarray(vec, dtype=np.float32)) for cid, vec in zip(res["ids"], res["embeddings"]))
        return out

    def keyword_count(self, query: str, cap: int) -> int:
        """How many chunks hold any keyword term of ``query``, counted up to ``cap`` (no ranking)."""
        match = _fts_match(query)
        if not match:
            return 0
        sql = "SELECT count(*) FROM (SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)"
        try:
            return int(self._db.execute(sql, [match, cap]).fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def keyword_search(self, query: str, k: int, allowed: set[str] | None = None) -> list[SourceRef]:
        """BM25 over the FTS5 index; score is FTS5's bm25 negated (higher is better)."""
        match = _fts_match(query)
        if not match:
            return []
        sql = (
            "SELECT c.id, bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
            "WHERE chunks_fts MATCH ?"
        )
        args: list = [match]
        if allowed is not None:
            if not allowed:
                return []
            sql += f" AND c.sha256 IN ({','.join('?' * len(allowed))})"
            args += sorted(allowed)
        sql += " ORDER BY s LIMIT ?"
        args.append(k)
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []
        refs = self.chunks_by_id([r[0] for r in rows])
        hits = []
        for cid, s in rows:
            if cid in refs:
                refs[cid].score = float(-s)
                hits.append(refs[cid])
        return hits

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _tx(self) -> Iterator[_Serialized]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
                self._writes += 1

    def link_file(self, path: str, size: int, mtime_ns: int, sha256: str) -> str | None:
        """Point ``path`` at already-committed content. Returns the content hash it pointed at before."""
        with self._tx() as db:
            return self._link(db, path, size, mtime_ns, sha256)

    def _link(self, db, path, size, mtime_ns, sha256) -> str | None:
        row = db.execute("SELECT sha256 FROM files WHERE path=?", (path,)).fetchone()
        db.execute(
            "INSERT OR REPLACE INTO files(path, size, mtime_ns, sha256, ingested_at) VALUES(?,?,?,?,?)",
            (path, size, mtime_ns, sha256, time.time()),
        )
        return row[0] if row else None

    def touch_file(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a new mtime for a file whose content did not change."""
        with self._tx() as db:
            db.execute("UPDATE files SET size=?, mtime_ns=? WHERE path=?", (size, mtime_ns, path))

    # ------------------------------------------------------------------ unreadable contents
    # A content the loaders rejected (corrupt, encrypted, no text) is remembered by its hash and
    # by the reader that tried (localgpt version, OCR on or off): the next run reports it again
    # without parsing it, until the bytes or the reader change.
    def unreadable_reason(self, sha256: str, reader: str) -> str | None:
        row = self._db.execute("SELECT reason FROM unreadable WHERE sha256=? AND reader=?", (sha256, reader)).fetchone()
        return row[0] if row else None

    def remember_unreadable(self, sha256: str, reader: str, reason: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO unreadable(sha256, reader, reason) VALUES(?,?,?)", (sha256, reader, reason))

    def begin_content(self, sha256: str, chunk_ids: Sequence[str]) -> None:
        """Log the intent to write these vectors, before writing any (crash recovery reads it)."""
        owner = self._owner()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO pending(sha256, owner, chunk_ids, started) VALUES(?,?,?,?)",
                (sha256, owner, json.dumps(list(chunk_ids)), time.time()),
            )

    def _owner(self) -> str:
        """This process's writer name for this data folder (its lock taken on first use)."""
        return _writer_token(Path(self.settings.data_dir))

    def write_vectors(self, chunks: Sequence[Chunk], vectors: np.ndarray, ext: str | Sequence[str] = "") -> None:
        """Upsert vectors (invisible to queries until ``commit_content``). ``ext``: one file type
        for all chunks, or one per chunk when the chunks of several files go in one call."""
        exts = [ext] * len(chunks) if isinstance(ext, str) else list(ext)
        for start in range(0, len(chunks), CHROMA_BATCH):
            part = chunks[start : start + CHROMA_BATCH]
            self.collection.upsert(
                ids=[c.id for c in part],
                embeddings=np.asarray(vectors[start : start + CHROMA_BATCH], dtype=np.float32),
                documents=[c.text for c in part],
                metadatas=[_chroma_metadata(c, e) for c, e in zip(part, exts[start : start + CHROMA_BATCH])],
            )

    def commit_content(
        self, path: str, size: int, mtime_ns: int, sha256: str, chunks: Sequence[Chunk], pages: int | None, ext: str
    ) -> str | None:
        """Make a file's chunks visible, all at once. Returns the content hash the path had before.

        Another process may have committed the same content meanwhile (the same file ingested by
        two writers; chunk ids follow from the content): then only the path is linked to it."""
        owner = self._owner()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM contents WHERE sha256=?", (sha256,)).fetchone():
                db.execute("DELETE FROM pending WHERE sha256=? AND owner=?", (sha256, owner))
                return self._link(db, path, size, mtime_ns, sha256)
            for c in chunks:
                cur = db.execute(
                    "INSERT OR REPLACE INTO chunks(id, sha256, idx, text, page, heading, kind, tokens) "
                    "VALUES(?,?,?,?,?,?,?,?)",
                    (c.id, sha256, c.chunk_index, c.text, c.page, c.heading, c.kind, c.tokens),
                )
                terms = " ".join(keyword_terms(((c.heading or "") + "\n" + c.text)))
                db.execute("INSERT INTO chunks_fts(rowid, terms) VALUES(?, ?)", (cur.lastrowid, terms))
            db.execute(
                "INSERT OR REPLACE INTO contents(sha256, n_chunks, pages, ext, created_at) VALUES(?,?,?,?,?)",
                (sha256, len(chunks), pages, ext, time.time()),
            )
            db.execute("DELETE FROM pending WHERE sha256=? AND owner=?", (sha256, owner))
            return self._link(db, path, size, mtime_ns, sha256)

    def abandon_content(self, sha256: str) -> None:
        """Undo a write of this process that did not reach commit (an error or Ctrl-C mid-file)."""
        self._abandon(sha256, self._owner())

    def _abandon(self, sha256: str, owner: str) -> None:
        """Remove the vectors ``owner`` logged as pending for this content, unless they are needed:
        the content was committed (by another writer: the ids are the same), or another writer has
        it pending too (its vectors are the same ids; it commits them or leaves them to recovery).
        The manifest's write lock is held meanwhile, so no writer begins this content mid-delete."""
        if self._db.execute("SELECT 1 FROM pending WHERE sha256=? AND owner=?", (sha256, owner)).fetchone() is None:
            return
        with self._tx() as db:
            row = db.execute("SELECT chunk_ids FROM pending WHERE sha256=? AND owner=?", (sha256, owner)).fetchone()
            if row is None:
                return
            needed = db.execute(
                "SELECT 1 FROM pending WHERE sha256=? AND owner!=? UNION ALL SELECT 1 FROM contents WHERE sha256=? LIMIT 1",
                (sha256, owner, sha256),
            ).fetchone()
            if not needed:
                self._delete_vectors(json.loads(row[0]))
            db.execute("DELETE FROM pending WHERE sha256=? AND owner=?", (sha256, owner))

    def remove_file(self, path: str) -> int:
        """Forget a file; its chunks go once no other file has the same content. Returns the chunks removed."""
        with self._tx() as db:
            row = db.execute("SELECT sha256 FROM files WHERE path=?", (path,)).fetchone()
            db.execute("DELETE FROM files WHERE path=?", (path,))
        return self.drop_content_if_unused(row[0]) if row else 0

    def drop_content_if_unused(self, sha256: str | None) -> int:
        """Remove a content's chunks once no file points at it. Returns the chunks removed."""
        if not sha256:
            return 0
        with self._tx() as db:
            if db.execute("SELECT 1 FROM files WHERE sha256=? LIMIT 1", (sha256,)).fetchone():
                return 0
            rows = db.execute("SELECT rowid, id FROM chunks WHERE sha256=?", (sha256,)).fetchall()
            ids = [r[1] for r in rows]
            # The intent log makes the Chroma delete below survive a crash.
            db.execute(
                "INSERT OR REPLACE INTO pending(sha256, owner, chunk_ids, started) VALUES(?,?,?,?)",
                (sha256, self._owner(), json.dumps(ids), time.time()),
            )
            for part in _batched([r[0] for r in rows], 500):
                q = ",".join("?" * len(part))
                db.execute(f"DELETE FROM chunks_fts WHERE rowid IN ({q})", part)
                db.execute(f"DELETE FROM chunks WHERE rowid IN ({q})", part)
            db.execute("DELETE FROM contents WHERE sha256=?", (sha256,))
        self.abandon_content(sha256)
        return len(ids)

    def _delete_vectors(self, ids: Sequence[str]) -> None:
        for part in _batched(list(ids), CHROMA_BATCH):
            self.collection.delete(ids=part)

    def _recover(self) -> None:
        """Finish what a crashed run left: vectors logged as pending are never visible; remove those
        whose writer is gone. A live writer's (another process ingesting right now) are left alone."""
        rows = self._db.execute("SELECT sha256, owner FROM pending ORDER BY started").fetchall()
        if not rows:
            return
        folder = _writers_folder(Path(self.settings.data_dir))
        alive = {owner: _writer_alive(folder, owner) for owner in {o for _, o in rows}}
        for sha, owner in rows:
            if not alive[owner]:
                self._abandon(sha, owner)

    def drop(self) -> None:
        """Delete the whole collection: vectors, manifest and keyword index."""
        try:
            self.client.delete_collection(_chroma_name(self.name))
        except Exception:
            pass  # never created in Chroma (an empty collection)
        self._collection = None
        path = Path(self.settings.data_dir) / "collections" / f"{self.name}.sqlite"
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def _migrate_pending(db: sqlite3.Connection) -> None:
    """Manifests written before pending rows named their writer: the same rows, writer unknown
    (treated as gone, which is what every open assumed then)."""
    if any(r[1] == "owner" for r in db.execute("PRAGMA table_info(pending)")):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not any(r[1] == "owner" for r in db.execute("PRAGMA table_info(pending)")):  # another process may have won
            db.execute("ALTER TABLE pending RENAME TO pending_v1")
            db.execute(
                "CREATE TABLE pending (sha256 TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', chunk_ids TEXT NOT NULL, "
                "started REAL NOT NULL, PRIMARY KEY (sha256, owner))"
            )
            db.execute("INSERT INTO pending(sha256, owner, chunk_ids, started) SELECT sha256, '', chunk_ids, started FROM pending_v1")
            db.execute("DROP TABLE pending_v1")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# This process's writer name and the locked files that say it is alive, one per data folder.
_WRITER: dict = {"pid": None, "token": "", "files": {}}
_WRITER_LOCK = threading.Lock()


def _writers_folder(data_dir: Path) -> Path:
    return data_dir.resolve() / "collections" / ".writers"


def _writer_token(data_dir: Path) -> str:
    """This process's name in pending rows, after taking the lock on ``.writers/<name>`` in this
    data folder (held until the process ends). '' when the file system refuses locks: such rows
    are treated as any crashed writer's, as before writers had names."""
    import fcntl

    with _WRITER_LOCK:
        if _WRITER["pid"] != os.getpid():  # first use, or a forked child: locks are not inherited
            host = re.sub(r"[^A-Za-z0-9.-]", "_", os.uname().nodename)[:40]
            _WRITER.update(pid=os.getpid(), token=f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}", files={})
        folder = _writers_folder(data_dir)
        if folder not in _WRITER["files"]:
            path = folder / _WRITER["token"]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}, started {time.ctime()}\n".encode())
                except OSError:
                    os.close(fd)
                    raise
            except OSError as exc:
                log.warning("cannot lock %s (%s): another process opening this collection while this one ingests "
                            "may remove the vectors in flight", path, exc)
                return ""
            if not _WRITER["files"]:
                atexit.register(_writer_exit, os.getpid())
            _WRITER["files"][folder] = fd  # kept open: closing it would release the lock
            for other in folder.iterdir():  # the files of writers that were killed (rows or none)
                if other.name != _WRITER["token"] and not other.name.startswith("."):
                    _writer_alive(folder, other.name)
        return _WRITER["token"]


def _writer_exit(pid: int) -> None:
    """At a normal exit: this process's writer files go (the kernel would release the locks anyway)."""
    if _WRITER["pid"] != pid:
        return
    for folder, fd in list(_WRITER["files"].items()):
        try:
            (folder / _WRITER["token"]).unlink()
        except OSError:
            pass
        os.close(fd)
    _WRITER["files"] = {}


def _writer_alive(folder: Path, owner: str) -> bool:
    """Whether the writer that logged these pending rows still runs: this process, or a process
    holding the lock on its file. A file nobody locks (or no file) is a dead writer's: removed."""
    import fcntl

    if not owner:
        return False
    if owner == _WRITER["token"] and _WRITER["pid"] == os.getpid():
        return True
    path = folder / owner
    if "/" in owner or owner.startswith("."):
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave its rows (invisible vectors cost space, a wrong guess costs answers)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # its writer holds the lock
        try:
            path.unlink()
        except OSError:
            pass
        return False
    finally:
        os.close(fd)  # also releases the lock just taken


_CLIENTS: dict[str, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _chroma_client(settings: Settings):
    """One Chroma client per location and process (Chroma dislikes two clients on one folder)."""
    enforce_offline()
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    key = settings.chroma_url or str(Path(settings.data_dir).resolve() / "chroma")
    with _CLIENTS_LOCK:
        if key in _CLIENTS:
            return _CLIENTS[key]
        try:
            if settings.chroma_url:
                m = re.match(r"^(https?)://([^:/]+)(?::(\d+))?/?$", settings.chroma_url)
                if not m:
                    raise StoreError(f"chroma_url must look like http://host:port, not {settings.chroma_url!r}")
                scheme, host, port = m.groups()
                client = chromadb.HttpClient(
                    host=host, port=int(port or (443 if scheme == "https" else 8000)), ssl=scheme == "https",
                    settings=chroma_settings,
                )
                client.heartbeat()
            else:
                Path(key).mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=key, settings=chroma_settings)
        except StoreError:
            raise
        except Exception as exc:
            where = settings.chroma_url or key
            raise StoreError(f"cannot reach the Chroma store at {where}: {exc}") from exc
        _CLIENTS[key] = client
        return client


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch to WAL (readers never block the writer). Two processes opening a new manifest at
    the same moment can both try; SQLite answers 'locked' at once rather than waiting, so retry."""
    for _ in range(200):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.05)
    db.execute("PRAGMA journal_mode=WAL")


def _chroma_name(collection: str) -> str:
    return f"localgpt-{collection}"[:63]


def _chroma_metadata(chunk: Chunk, ext: str) -> dict:
    meta = {"content_hash": chunk.content_hash, "chunk_index": chunk.chunk_index, "kind": chunk.kind, "ext": ext}
    if chunk.page is not None:
        meta["page"] = chunk.page
    if chunk.heading:
        meta["heading"] = chunk.heading[:500]
    return meta


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fts_match(query: str) -> str:
    """An FTS5 query that matches any keyword term of ``query`` ('' when it has none)."""
    terms = sorted(set(keyword_terms(query)))
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
