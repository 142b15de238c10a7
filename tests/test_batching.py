"""Continuous batching in the fast engine (localgpt.generation.fast.batch): many streams, one network.

CPU tests use the tiny random-weight Llama, Falcon, FalconMamba and Mamba checkpoints (fp32): requests of different lengths that
join at different steps, more requests than slots, chunked prefill, per-request stop ids, lengths and
sampling; each greedy request must produce exactly the tokens the batch-1 engine produces for it alone.
The GPU test (marked ``gpu``) runs the captured CUDA-graph steps in bf16.
"""

from __future__ import annotations

import random

import pytest
import torch

from localgpt.config import Settings
from localgpt.generation import clear_generator_cache
from localgpt.generation.fast import load_fast_generator
from localgpt.generation.fast.batch import BatchEngine, pick_rows
from tiny_models import build_tiny_model

FAMILIES = ["llama2", "falcon", "falcon-mamba", "mamba"]


def settings(**values) -> Settings:
    base = dict(backend="transformers", engine="fast", model=None, family=None, quantization="none", device="cpu",
                max_new_tokens=16, temperature=0.0, top_p=0.95, context_window=None, openai_url=None)
    return Settings.model_construct(**(Settings.model_construct().model_dump() | base | values))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-batch")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    clear_generator_cache()


def prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def alone(engine, ids: list[int], n: int, stop_ids=frozenset()) -> list[int]:
    return list(engine.generate(ids, n, stop_ids=stop_ids))


def drive(batch: BatchEngine, arrivals: dict[int, list[tuple]]) -> list:
    """Submit each (ids, n, kwargs) at its step number; step until all are done. Requests in arrival order."""
    reqs = []
    step = 0
    while step <= max(arrivals) or batch.busy:
        for ids, n, kw in arrivals.get(step, []):
            reqs.append(batch.submit(ids, n, **kw))
        batch.step()
        step += 1
        assert step < 10_000
    return reqs


@pytest.mark.parametrize("family, share", [(f, False) for f in FAMILIES] + [("llama2", True), ("falcon", True),
                                                                            ("mamba", True)])
def test_concurrent_greedy_requests_equal_their_answers_alone(tiny_dir, family, share):
    generator = load_fast_generator(settings(model=str(tiny_dir[family])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    lengths = [3, 17, 1, 40, 9, 26, 5, 12]
    news = [20, 7, 15, 1, 30, 11, 18, 9]
    asks = prompts(vocab, lengths)
    want = [alone(engine, ids, n) for ids, n in zip(asks, news)]
    # 8 requests, 3 slots, prompts prefilled 4 tokens at a time, arriving at steps 0, 0, 2, 3, 5, 9, 9, 30.
    batch = BatchEngine(engine.model, slots=3, max_seq=128, prefill_chunk=4, buckets=(1,), share_prefill=share)
    assert batch.mode == "eager" and batch.buckets == [1, 3]
    if family.endswith("mamba"):
        for layer in engine.model.layers:  # slot states start from garbage: a joining request must reset its own
            layer.conv_slots.normal_()
            layer.ssm_slots.normal_()
    at = [0, 0, 2, 3, 5, 9, 9, 30]
    arrivals: dict[int, list] = {}
    for ids, n, step in zip(asks, news, at):
        arrivals.setdefault(step, []).append((ids, n, {}))
    reqs = drive(batch, arrivals)
    for req, tokens, ids in zip(reqs, want, asks):
        assert req.done and req.finish_reason == "length"
        assert req.tokens == tokens, (len(ids), req.tokens, tokens)
    assert not batch.busy and all(r is None for r in batch.active)
    # Streams really overlapped: fewer decode steps than the requests' tokens one after another.
    assert batch.steps_run < sum(news) - len(news)


def test_the_default_engine_decodes_at_one_shape():
    class Net:
        kind, device = "transformer", torch.device("cpu")

        def setup_slots(self, slots, max_seq):
            pass

        def prefill_fixed(self, ids, meta):
            pass

    assert BatchEngine(Net(), slots=16).buckets == [16]
    assert BatchEngine(Net(), slots=16, buckets=(1, 4, 16, 64)).buckets == [1, 4, 16]
    # On the CPU (eager): variable-shape prompt passes, 256 tokens, one a step; fixed-shape ones (the CUDA graph
    # default) take 512-token chunks, up to 4 passes a step, padded to 1/8, 1/4, 1/2, 3/4 or all of a chunk.
    cpu = BatchEngine(Net(), slots=4)
    assert (cpu.fixed_prompts, cpu.prefill_chunk, cpu.prompt_passes) == (False, 256, 1)
    fixed = BatchEngine(Net(), slots=4, fixed_prompts=True)
    assert (fixed.prefill_chunk, fixed.prompt_passes, fixed.prompt_rows) == (512, 4, [64, 128, 256, 384, 512])


def graph_stand_in(monkeypatch) -> None:
    """The batch engine's ``_Graph`` replaced, on the CPU, by a stand-in that runs the captured function twice when
    built (as ``_Graph``'s warm-up does) and once a call: what is captured must be idempotent."""
    import localgpt.generation.fast.batch as batch_module

    class Replay:
        def __init__(self, fn):
            fn()
            fn()
            self.fn = fn

        def __call__(self):
            return self.fn()

    monkeypatch.setattr(batch_module, "_Graph", Replay)


@pytest.mark.parametrize("family", ["llama2", "falcon-mamba"])
def test_steps_built_while_streams_run_leave_their_answers_alone(tiny_dir, family, monkeypatch):
    """A CUDA-graph step is built on first use of its (bucket, sampling) while other slots are busy; the warm-up
    runs before its capture execute it. Here on the CPU: a stand-in for the graph that runs the step twice when
    built, as _Graph's warm-up does, then once a call."""
    graph_stand_in(monkeypatch)
    generator = load_fast_generator(settings(model=str(tiny_dir[family])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    asks = prompts(vocab, [6, 19, 3, 11, 8], seed=5)
    news = [14, 9, 12, 7, 10]
    want = [alone(engine, ids, n) for ids, n in zip(asks, news)]
    batch = BatchEngine(engine.model, slots=4, max_seq=64, prefill_chunk=4, buckets=(1, 2))
    batch.mode = "graph"  # steps built lazily, mid-run, through the stand-in
    arrivals = {0: [(asks[0], news[0], {})], 3: [(asks[1], news[1], {})], 5: [(asks[2], news[2], {})],
                8: [(asks[3], news[3], {}), (asks[4], news[4], {})],
                9: [(asks[0], 6, {"temperature": 0.8, "top_p": 0.9})]}
    reqs = drive(batch, arrivals)
    assert len(batch._steps) >= 4  # buckets 1, 2, 4, greedy and mixed, built while others decoded
    assert [r.tokens for r in reqs if r.temperature == 0] == want


@pytest.mark.parametrize("family, chunk, passes", [("llama2", 16, 1), ("llama2", 32, 2), ("falcon", 16, 3)])
def test_fixed_shape_prompt_passes_equal_answers_alone(tiny_dir, family, chunk, passes, monkeypatch):
    """The CUDA default for own-chunk prompts (one pass per chunk at a fixed row count, padding rows writing only
    the scratch row, replayed from a captured graph), here eager on the CPU through a stand-in for the graph that
    runs the pass twice when built (as _Graph's warm-up does) and once a call: the pass must be idempotent, and
    every greedy answer equals the batch-1 engine's, whatever else runs, with several passes a step too."""
    graph_stand_in(monkeypatch)
    generator = load_fast_generator(settings(model=str(tiny_dir[family])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    lengths = [3, 17, 1, 40, 9, 33, 16, 70]
    news = [20, 7, 15, 1, 30, 11, 18, 9]
    asks = prompts(vocab, lengths, seed=4)
    want = [alone(engine, ids, n) for ids, n in zip(asks, news)]
    batch = BatchEngine(engine.model, slots=3, max_seq=128, prefill_chunk=chunk, fixed_prompts=True,
                        prompt_passes=passes)
    assert batch.fixed_prompts and batch.prompt_rows == {16: [16], 32: [16, 24, 32]}[chunk] and batch.buckets == [3]
    batch.mode = "graph"  # prompt passes built lazily, mid-run, through the stand-in
    for block in engine.model.blocks:  # caches start from garbage: nothing may read what a request did not write
        block.k_slots.normal_()
        block.v_slots.normal_()
    arrivals: dict[int, list] = {}
    for ids, n, step in zip(asks, news, [0, 0, 0, 1, 2, 2, 6, 6]):
        arrivals.setdefault(step, []).append((ids, n, {}))
    reqs = drive(batch, arrivals)
    for req, tokens, ids in zip(reqs, want, asks):
        assert req.tokens == tokens, (len(ids), req.tokens, tokens)
    assert set(batch._prompts) <= set(batch.prompt_rows) and len(batch._prompts) >= 1
    assert batch.prompt_passes_run == sum(-(-n // chunk) for n in lengths)
    with pytest.raises(ValueError):
        BatchEngine(engine.model, slots=2, max_seq=64, share_prefill=True, fixed_prompts=True)


def test_stop_ids_lengths_and_sampling_are_per_request(tiny_dir):
    generator = load_fast_generator(settings(model=str(tiny_dir["llama2"])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    a, b, c, d = prompts(vocab, [6, 11, 4, 8], seed=3)
    full_a = alone(engine, a, 24)
    stop = frozenset({full_a[5]})
    want_a = full_a[:full_a.index(full_a[5]) + 1]
    want_b = alone(engine, b, 9)
    batch = BatchEngine(engine.model, slots=4, max_seq=64, prefill_chunk=5)
    torch.manual_seed(0)
    ra = batch.submit(a, 24, stop_ids=stop)
    rc = batch.submit(c, 12, temperature=1.0, top_p=0.9)  # a sampled neighbour
    rb = batch.submit(b, 9)
    rd = batch.submit(d, 10, temperature=0.7, top_p=1.0)
    batch.run()
    assert ra.tokens == want_a and ra.finish_reason == "stop"
    assert rb.tokens == want_b and rb.finish_reason == "length"
    for r, n in ((rc, 12), (rd, 10)):
        assert len(r.tokens) == n and all(0 <= t < vocab for t in r.tokens)
    with pytest.raises(ValueError):
        batch.submit(a, 64)


def test_pick_rows_is_greedy_where_the_temperature_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.01, 1.0])
    got = pick_rows(logits, temperature, top_p, sampled=True)
    best = logits.argmax(-1)
    assert torch.equal(got[[0, 2, 4]], best[[0, 2, 4]])
    assert got[3] == best[3]  # top_p 0.01 keeps only the most likely token
    assert torch.equal(pick_rows(logits, temperature, top_p, sampled=False), best)


def test_a_thread_serves_streams_submitted_from_other_threads(tiny_dir):
    import threading

    generator = load_fast_generator(settings(model=str(tiny_dir["llama2"])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    asks = prompts(vocab, [5, 13, 2, 21], seed=7)
    want = [alone(engine, ids, 10) for ids in asks]
    batch = BatchEngine(engine.model, slots=2, max_seq=64, prefill_chunk=8)
    batch.start()
    got: dict[int, list[int]] = {}
    try:
        def client(i):
            req = batch.submit(asks[i], 10, stream=True)
            got[i] = list(BatchEngine.stream(req))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batch.stop()
    assert [got[i] for i in range(len(asks))] == want


def test_cancelled_requests_leave_and_the_others_are_unchanged(tiny_dir):
    generator = load_fast_generator(settings(model=str(tiny_dir["llama2"])))
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    a, b, c = prompts(vocab, [7, 5, 9], seed=11)
    want_c = alone(engine, c, 12)
    batch = BatchEngine(engine.model, slots=1, max_seq=64, prefill_chunk=4)
    ra = batch.submit(a, 30, stream=True)
    rb = batch.submit(b, 30)
    rc = batch.submit(c, 12)
    for _ in range(6):
        batch.step()
    assert ra.slot == 0 and 0 < len(ra.tokens) < 30
    batch.cancel(ra)  # mid-answer
    batch.cancel(rb)  # still waiting
    batch.run()
    assert ra.finish_reason == rb.finish_reason == "cancelled" and rb.tokens == []
    assert list(BatchEngine.stream(ra)) == ra.tokens
    assert rc.tokens == want_c and not batch.busy


def test_only_transformer_and_mamba_networks_batch(tmp_path):
    class Other:
        kind = "other"

    with pytest.raises(ValueError):
        BatchEngine(Other())


# --- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family, chunk, passes", [(f, 8, 1) for f in FAMILIES] + [("llama2", 32, 2), ("falcon", 32, 3)])
def test_gpu_batched_graph_steps_equal_each_request_alone(tiny_dir, family, chunk, passes):
    """bf16, CUDA graphs: at one bucket (same matrix shapes) a request's tokens are bit for bit its tokens alone
    in the same engine; across buckets and against the batch-1 engine the first tokens agree. Llama / Falcon
    prompts run in captured fixed-shape passes (chunk 32: passes of 16, 24 and 32 rows), several a step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = load_fast_generator(settings(model=str(tiny_dir[family]), device="cuda"), mode="graph")
    engine = generator.engine
    vocab = engine.model.shape.vocab_size
    lengths, news = [3, 17, 1, 40, 9, 26], [20, 7, 15, 3, 30, 11]
    asks = prompts(vocab, lengths, seed=1)
    batch = BatchEngine(engine.model, slots=4, max_seq=128, prefill_chunk=chunk, buckets=(4,), prompt_passes=passes)
    assert batch.mode == "graph" and batch.fixed_prompts == (not family.endswith("mamba"))
    batch.warm_up(sampled=(False, True))
    solo = []
    for ids, n in zip(asks, news):
        r = batch.submit(ids, n)
        batch.run()
        solo.append(r.tokens)
    arrivals: dict[int, list] = {}
    for i, (ids, n) in enumerate(zip(asks, news)):
        arrivals.setdefault([0, 0, 1, 4, 6, 6][i], []).append((ids, n, {}))
    arrivals[2] = arrivals.get(2, []) + [(asks[0], 12, {"temperature": 0.9, "top_p": 0.9})]
    reqs = drive(batch, arrivals)
    greedy_reqs = [r for r in reqs if r.temperature == 0]
    assert [r.tokens for r in greedy_reqs] == solo
    batch1 = [list(engine.generate(ids, n)) for ids, n in zip(asks, news)]
    assert all(a[:3] == b[:3] for a, b in zip(solo, batch1)), (solo, batch1)
    # Buckets 1, 2, 4: the busy slots decide the shape; first tokens still agree with the batch-1 engine.
    multi = BatchEngine(engine.model, slots=4, max_seq=128, prefill_chunk=8, buckets=(1, 2))
    reqs = drive(multi, arrivals)
    assert all(r.tokens[:3] == b[:3] for r, b in zip([r for r in reqs if r.temperature == 0], batch1))


# --- the fused slot kernels (slot_triton) on the CPU, through Triton's interpreter ---------------------------


def test_fused_slot_kernels_match_the_eager_step_in_the_triton_interpreter(subprocess_env):
    """The Triton kernels of the CUDA decode step (rms_norm, rope + cache write, attention over each slot's own
    positions, silu·up) against the eager step, run by Triton's interpreter on the CPU in a child process (the
    interpreter must be chosen before Triton is first imported)."""
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter  # here: the child imports this module, not conftest

    run_in_triton_interpreter(subprocess_env, "test_batching", "fused_slot_kernels_check",
                              "fused slot kernels check passed")


@pytest.mark.gpu
def test_gpu_fused_slot_kernels_match_the_eager_step():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    fused_slot_kernels_check("cuda", torch.bfloat16)


def fused_slot_kernels_check(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Llama (grouped kv heads) and Falcon (multi-query, parallel) tiny networks: the same slot caches stepped by
    the eager and the fused step give the same logits and the same caches (fp32: to 1e-4; bf16: to its rounding);
    idle slots (at the scratch position) and a cache longer than one attention split are included."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import slot_triton
    from localgpt.generation.fast.transformer import from_falcon, from_llama

    root = Path(tempfile.mkdtemp())
    held = dict(slot_triton.ATTENTION)
    try:
        _fused_slot_kernels_check(root, device, dtype)
    finally:
        slot_triton.ATTENTION.update(held)
    print("fused slot kernels check passed")


def _fused_slot_kernels_check(root, device, dtype) -> None:
    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import slot_triton
    from localgpt.generation.fast.transformer import from_falcon, from_llama

    for family, build, dot in (("llama2", from_llama, False), ("falcon", from_falcon, False),
                               ("llama2", from_llama, True), ("falcon", from_falcon, True)):
        # several splits and loop steps at a small cache; both attention kernels
        slot_triton.ATTENTION.update(split=32, block_n=16, dot=dot)
        extra = {"num_key_value_heads": 2} if family == "llama2" else {}
        folder = root / family
        hf = AutoModelForCausalLM.from_pretrained(
            folder if folder.exists() else build_tiny_model(family, folder, **extra), dtype=dtype)
        net = build(hf.to(device).eval())
        torch.manual_seed(0)
        slots, max_seq = 5, 70
        net.setup_slots(slots, max_seq, kernels="eager")
        for block in net.blocks:
            block.k_slots.normal_()
            block.v_slots.normal_()
        positions = torch.tensor([0, 69, 33, max_seq, 12], device=device)  # slot 3 idle
        tokens = torch.randint(4, net.shape.vocab_size, (slots,), device=device)
        with torch.inference_mode():
            start = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            want = net.step_slots(tokens, positions)
            want_caches = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            for b, (k, v) in zip(net.blocks, start):
                b.k_slots.copy_(k)
                b.v_slots.copy_(v)
            net.slot_kernels = "fused"
            got = net.step_slots(tokens, positions)
            got_caches = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            # A shared prompt pass (two slots' chunks, one at a cached start) through the fused norms / silu·up.
            parts = [(1, tokens[:3].clone(), 40), (4, tokens[2:].clone(), 0)]
            got_prompt = net.prefill_slots(parts)
            # Fixed-shape passes (rope + cache write of the chunk's rows, chunk attention): a chunk after cached
            # positions, one from position 0 with padding rows, and one of 20 rows (two attention row blocks).
            ids = torch.randint(4, net.shape.vocab_size, (32,), device=device)
            fixed = [(ids[:16], torch.tensor([2, 40, 3], device=device)),
                     (ids[:16], torch.tensor([0, 0, 16], device=device)),
                     (ids, torch.tensor([3, 5, 20], device=device))]
            held = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            got_fixed = [net.prefill_fixed(i, m) for i, m in fixed]
            got_fixed_caches = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            net.slot_kernels = "eager"
            want_prompt = net.prefill_slots(parts)
            for b, (k, v) in zip(net.blocks, held):
                b.k_slots.copy_(k)
                b.v_slots.copy_(v)
            want_fixed = [net.prefill_fixed(i, m) for i, m in fixed]
            want_fixed_caches = [(b.k_slots.clone(), b.v_slots.clone()) for b in net.blocks]
            # and the eager fixed pass against the variable-shape one (same slot, same cached start)
            for b, (k, v) in zip(net.blocks, held):
                b.k_slots.copy_(k)
                b.v_slots.copy_(v)
            want_first = net.prefill_slots([(2, ids[:3], 40)])
        rel = ((got_prompt - want_prompt).norm() / want_prompt.norm()).item()
        assert rel < (1e-4 if dtype == torch.float32 else 3e-2), (family, "prompt", rel)
        for got_f, want_f in zip(got_fixed, want_fixed):
            rel = ((got_f - want_f).norm() / want_f.norm()).item()
            assert rel < (1e-4 if dtype == torch.float32 else 3e-2), (family, "fixed prompt", rel)
        rel = ((want_fixed[0] - want_first).norm() / want_first.norm()).item()
        assert rel < (1e-4 if dtype == torch.float32 else 3e-2), (family, "fixed vs variable", rel)
        written = [(2, slice(40, 43)), (0, slice(0, 16)), (3, slice(5, 25))]
        for layer, ((k_got, v_got), (k, v)) in enumerate(zip(got_fixed_caches, want_fixed_caches)):
            for slot, span in written:
                for mine, theirs in ((k_got[slot, :, span], k[slot, :, span]), (v_got[slot, :, span], v[slot, :, span])):
                    if dtype == torch.float32:
                        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)
                    else:  # bf16: the fused rotary rounds once, the eager one per operation; deeper layers drift more
                        rel = ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item()
                        assert rel < 3e-2, (family, "fixed-pass cache", layer, slot, rel)
        for (k_got, v_got), (k0, v0) in zip(got_fixed_caches, held):  # nothing else written, scratch rows aside
            untouched = torch.ones(k0.shape[:3], dtype=torch.bool, device=k0.device)
            for slot, span in written:
                untouched[slot, :, span] = False
            untouched[:, :, max_seq] = False
            assert torch.equal(k_got[untouched], k0[untouched]) and torch.equal(v_got[untouched], v0[untouched])
        live = positions < max_seq
        rel = ((got - want)[live].norm() / want[live].norm()).item()
        fp32 = dtype == torch.float32
        assert rel < (1e-4 if fp32 else 3e-2), (family, rel)
        for (k_got, v_got), (k, v) in zip(got_caches, want_caches):
            for mine, theirs in ((k_got[live], k[live]), (v_got[live], v[live])):
                assert torch.allclose(mine.float(), theirs.float(), atol=1e-5 if fp32 else 5e-2, rtol=0 if fp32 else 2e-2)
        print(family, "dot" if dot else "", "rel", rel)
