"""The optional stages of the chain: a local cross-encoder reranker, and condensing a follow-up question."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ingested_collection
from localgpt.chain import QAChain
from localgpt.config import Settings
from localgpt.embeddings import minilm_path
from localgpt.retrieval import Retriever

DOCS = {
    "pumps.txt": "The feed pump must be inspected every month. Its seals are replaced every two years.",
    "valves.txt": "Pressure valves are tested every week. A valve that leaks is replaced the same day.",
    "fans.txt": "Cooling fans run at 1,200 rpm. Their filters are cleaned every spring.",
}


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return ingested_collection(tmp_path_factory.mktemp("rerank"), DOCS, "rerank")


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A random-weight BERT cross-encoder (a few MB) with MiniLM's real tokenizer files."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("cross-encoder")
    src = minilm_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    vocab = sum(1 for _ in open(out / "vocab.txt", encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, max_position_embeddings=512)
    BertForSequenceClassification(config).save_pretrained(out)
    return out


def test_a_local_cross_encoder_reorders_the_candidates_by_its_own_scores(settings, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    plain = Retriever.from_settings(settings).search("How often are valves tested?", k=3).hits
    reranking = Retriever.from_settings(settings.with_overrides(reranker=str(tiny_cross_encoder)))
    hits = reranking.search("How often are valves tested?", k=3).hits
    assert sorted(h.chunk_id for h in hits) == sorted(h.chunk_id for h in plain)
    expected = CrossEncoder(str(tiny_cross_encoder), local_files_only=True).predict(
        [("How often are valves tested?", h.text) for h in hits]
    )
    assert [h.score for h in hits] == pytest.approx(sorted(map(float, expected), reverse=True), rel=1e-4)


def test_a_missing_reranker_folder_is_a_clear_error(settings, tmp_path):
    from localgpt.errors import ModelNotFound

    retriever = Retriever.from_settings(settings.with_overrides(reranker=str(tmp_path / "nope")))
    with pytest.raises(ModelNotFound, match="cross-encoder"):
        retriever.search("pumps", k=2)


def test_a_follow_up_is_condensed_with_the_history_before_retrieval(settings):
    chain = QAChain(settings)  # the embedded SmolLM2
    history = [("How often must the feed pump be inspected?", "Every month [1].")]
    prepared = chain.prepare.invoke({"question": "And its seals?", "history": history, "filters": None})
    standalone = prepared["standalone"]
    assert standalone.strip() and standalone != "And its seals?"
    assert Path(prepared["search"].hits[0].source).name == "pumps.txt"
