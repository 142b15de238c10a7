"""Loading safetensors checkpoints straight into the fast engine (``localgpt.generation.fast.load``).

What a user relies on: a sharded checkpoint (index + several shards, from a folder or the HF cache) gives the
same network, the same logits and the same answers as the transformers path, without a transformers model or
a second copy of the weights in memory; a damaged copy (truncated shard, missing shard, missing tensor) fails
with a message that names the file to copy again. GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from localgpt.errors import ModelNotFound
from localgpt.generation import clear_generator_cache
from localgpt.generation.fast import load_fast_generator
from localgpt.generation.fast.generator import build_network
from localgpt.generation.fast.load import load_network
from localgpt.generation.fast.quantize import quantize_model
from tiny_models import build_tiny_model

FAMILIES = ["llama2", "falcon", "falcon-mamba", "mamba"]
PROMPT = "Context: the invoice was paid on March 3 by the finance team. Question: what does the report say?"
NEW = 16
ROOT = Path(__file__).resolve().parent.parent


def settings(**values):
    """What ``load_fast_generator`` reads of the settings (a plain namespace: the GPU image has no pydantic)."""
    from types import SimpleNamespace

    base = dict(model=None, family=None, quantization="none", device="cpu", max_new_tokens=NEW, temperature=0.0,
                top_p=0.95, context_window=None)
    return SimpleNamespace(**(base | values))


def save_sharded(source: Path, target: Path, shard_size: str = "20KB", dtype=None) -> Path:
    """``source``'s model saved again as several safetensors shards plus model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **({"dtype": dtype} if dtype else {}))
    model.save_pretrained(target, max_shard_size=shard_size)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, target / f.name)
    return target


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for family in FAMILIES:
        out[family] = save_sharded(build_tiny_model(family, root / f"{family}-one"), root / family)
    return out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    clear_generator_cache()


def transformers_network(folder: Path, quantization: str | None = None):
    """The network as the transformers path builds it (the reference)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        network = build_network(hf)
        if quantization:
            quantize_model(network, quantization)
    return network, hf


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_the_same_network_and_answers_as_transformers(sharded, family, monkeypatch):
    folder = sharded[family]
    assert len(list(folder.glob("model-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    reference, hf = transformers_network(folder)
    # The streamed load never builds a transformers model (no second copy of the weights, no CPU detour).
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the streamed load built a transformers model")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", no_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    generator = load_fast_generator(settings(model=str(folder)))
    network = generator.engine.model
    got, ref = network.state_dict(), reference.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert generator.n_params == hf.num_parameters()
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7]])
    with torch.inference_mode():
        reference.setup_cache(generator.engine.max_seq)
        if reference.kind == "transformer":  # the rotary tables, bit for bit
            assert torch.equal(network.cos, reference.cos) and torch.equal(network.sin, reference.sin)
        # Equal weights; the logits only up to fp32 summation order (BLAS picks kernels by the weights' alignment,
        # and transformers' weights may sit at any offset of a mapped file).
        torch.testing.assert_close(network.prefill(ids), reference.prefill(ids), rtol=1e-5, atol=1e-5)
    prompt = generator._encode(PROMPT, NEW)[0].tolist()
    from localgpt.generation.fast.engine import Engine

    assert list(generator.engine.generate(prompt, NEW)) == list(Engine(reference, max_seq=256).generate(prompt, NEW))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama2", "falcon-mamba"])
def test_layers_quantised_as_they_arrive_equal_quantising_the_whole_network(sharded, family, quantization):
    reference, _ = transformers_network(sharded[family], quantization)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(sharded[family], local_files_only=True)
    streamed = load_network(sharded[family], config, "cpu", torch.float32, quantization=quantization).network
    got, ref = streamed.state_dict(), reference.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_chunked_parallel_reads_land_every_byte_in_place(sharded):
    """Reads cut tensors into odd-sized chunks spread over threads; the weights come out exact."""
    from transformers import AutoConfig

    folder = sharded["falcon"]
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    whole = load_network(folder, config, "cpu", torch.float32).network.state_dict()
    chunked = load_network(folder, config, "cpu", torch.float32, chunk_bytes=1000 - 3, threads=3).network.state_dict()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_a_repo_id_in_the_hf_cache_loads_offline(sharded, tmp_path, monkeypatch):
    """An HF cache snapshot (files are symlinks into blobs/) resolves by repo id without any request."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(sharded["llama2"].iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_cache = load_fast_generator(settings(model="acme/tiny-llama"))
    from_folder = load_fast_generator(settings(model=str(sharded["llama2"])))
    ids = from_folder._encode(PROMPT, NEW)[0].tolist()
    assert list(from_cache.engine.generate(ids, NEW)) == list(from_folder.engine.generate(ids, NEW))


def test_peak_memory_holds_one_copy_of_the_weights(tmp_path, subprocess_env):
    """A load's peak resident memory grows by about the model's size (the CPU engine holds its weights in
    RAM), not twice that: no whole shard mapped, no transformers model, no staging copy of the checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="30MB")
    del model
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    warm = build_tiny_model("llama2", tmp_path / "warm")  # a first, tiny load imports all the loader needs
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoConfig
        from localgpt.generation.fast.load import load_network
        def kib(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        load_network({str(warm)!r}, AutoConfig.from_pretrained({str(warm)!r}), "cpu", torch.float32)
        config = AutoConfig.from_pretrained({str(folder)!r}, local_files_only=True)
        before = kib("VmRSS")
        network = load_network({str(folder)!r}, config, "cpu", torch.float32).network
        print(json.dumps({{"grew": (kib("VmHWM") - before) * 1024,
                           "held": sum(p.numel() * 4 for p in network.parameters())}}))
    """)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {model_bytes / 2**20:.0f} MiB, peak grew {numbers['grew'] / 2**20:.0f} MiB")
    assert numbers["held"] == model_bytes
    assert numbers["grew"] < 1.4 * model_bytes


def test_a_scaled_rotary_uses_transformers_own_module(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_sharded(build_tiny_model("llama2", tmp_path / "one", rope_scaling={"rope_type": "linear",
                                                                                    "factor": 2.0}), tmp_path / "sh")
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        reference = build_network(hf)
        reference.setup_cache(64)
    network = load_fast_generator(settings(model=str(folder))).engine.model
    assert type(network.rope).__name__ == "LlamaRotaryEmbedding"
    assert torch.equal(network.cos[:64], reference.cos)


def test_streamed_load_never_imports_transformers_modeling_stack(sharded, subprocess_env):
    """The seconds transformers' model classes take to import are not part of a streamed start."""
    script = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace
        from localgpt.generation.fast import load_fast_generator
        for folder in {[str(sharded[f]) for f in FAMILIES]!r}:
            g = load_fast_generator(SimpleNamespace(model=folder, family=None, quantization="none", device="cpu",
                                                    max_new_tokens=4, temperature=0.0, top_p=1.0, context_window=None))
        print(sorted(m for m in sys.modules if m.startswith("transformers.model")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert "transformers.modeling_utils" not in loaded and "modeling_llama" not in loaded, loaded


# --- damaged copies --------------------------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_a_truncated_shard_names_the_file(sharded, tmp_path):
    folder = _copy(sharded["llama2"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelNotFound, match=f"{shard.name} is truncated"):
        load_fast_generator(settings(model=str(folder)))


def test_a_shard_cut_inside_its_header_names_the_file(sharded, tmp_path):
    folder = _copy(sharded["falcon-mamba"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ModelNotFound, match=f"{shard.name} is truncated"):
        load_fast_generator(settings(model=str(folder)))


def test_a_missing_shard_names_the_file(sharded, tmp_path):
    folder = _copy(sharded["falcon"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelNotFound, match=f"{shard.name} is listed in model.safetensors.index.json but missing"):
        load_fast_generator(settings(model=str(folder)))


def test_a_tensor_missing_from_its_shard_names_the_shard_and_the_tensor(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(sharded["llama2"], tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelNotFound, match=f"{shard.name} lacks tensor '{name}'"):
        load_fast_generator(settings(model=str(folder)))
    # Gone from the index too: the error names the tensor and the checkpoint's shards.
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFound, match=f"tensor '{name.removesuffix('.weight')}.*' is not in the checkpoint"):
        load_fast_generator(settings(model=str(folder)))


def test_bin_checkpoints_still_load_through_transformers(tmp_path):
    """A checkpoint in PyTorch .bin files (no safetensors) takes the transformers path, as before."""
    from transformers import AutoModelForCausalLM

    source = build_tiny_model("llama2", tmp_path / "st")
    folder = tmp_path / "bin"
    folder.mkdir()
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith("config.json"):
            shutil.copy(f, folder / f.name)
    assert not list(folder.glob("*.safetensors"))
    generator = load_fast_generator(settings(model=str(folder)))
    reference = load_fast_generator(settings(model=str(source)))
    ids = reference._encode(PROMPT, NEW)[0].tolist()
    assert list(generator.engine.generate(ids, NEW)) == list(reference.engine.generate(ids, NEW))


# --- on a GPU --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_size_llama(tmp_path_factory):
    """Llama-2-7B's real layer and vocabulary shapes (2 of its 32 layers) as bf16 shards on disk."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("real-size")
    folder = root / "llama-2-layers"
    source = build_tiny_model("llama2", root / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         initializer_range=0.02)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="300MB")
    del model
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    torch.cuda.empty_cache()
    return folder


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_gpu_real_size_layers_stream_onto_the_gpu_equal_to_the_transformers_path(real_size_llama, tmp_path,
                                                                                  quantization):
    """The network streamed onto the GPU equals the transformers path's, weight for weight (int8 / int4:
    bit for bit), and answers alike."""
    folder = real_size_llama
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    s = settings(model=str(folder), device="cuda", quantization=quantization)
    torch.cuda.reset_peak_memory_stats()
    streamed = load_fast_generator(s, mode="graph", cache_dir=tmp_path / "cache")
    peak = torch.cuda.max_memory_allocated()
    from localgpt.generation.fast import generator as gen

    original = gen.safetensors_files
    gen.safetensors_files = lambda path: []  # the transformers path, for reference
    try:
        reference = load_fast_generator(s, mode="graph", cache_dir=tmp_path / "cache")
    finally:
        gen.safetensors_files = original
    got, ref = streamed.engine.model.state_dict(), reference.engine.model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:  # bf16 weights, and packed int4 / int8 words, bit for bit
        assert torch.equal(got[k], ref[k]), k
    ids = list(range(5, 60))
    assert list(streamed.engine.generate(ids, 8)) == list(reference.engine.generate(ids, 8))
    print(f"{quantization}: {streamed.stats.extra['weights']}, {streamed.stats.extra['decode']}, "
          f"GPU peak while loading {peak / 2**30:.2f} GiB")


GEMV_LAYERS = textwrap.dedent("""
    import sys, torch
    from localgpt.generation.fast.quantize import quantize_model, use_bf16_gemv
    from localgpt.generation.fast.transformer import Linear
    torch.manual_seed(0)
    layers = {}
    for mode in ("none", "int8", "int4", "int4-cuda"):
        net = torch.nn.Sequential(Linear((torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16)))
        if mode == "none":
            assert use_bf16_gemv(net) == 1
        elif mode == "int4-cuda":  # the default: gemv_cuda's tensor-core kernel (localgpt::gemv_cuda)
            quantize_model(net, "int4")
            assert net[0].layout == "cuda"
        else:
            quantize_model(net, mode, decode="triton")
        layers[mode] = net
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = {m: net(x) for m, net in layers.items()}
""")


@pytest.mark.gpu
def test_gpu_decode_gemv_layers_run_without_torch_dynamo_and_compile_to_their_operator(subprocess_env):
    """A start that never compiles (engine mode "graph", the load checks) does not pay torch._dynamo's import
    (4.7 s on the H200 image): the GEMV layers launch their kernels directly; under torch.compile they are the
    opaque operators, with the same result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    script = GEMV_LAYERS + textwrap.dedent("""
        print("dynamo imported:", "torch._dynamo" in sys.modules)
        with torch.inference_mode():
            for m, net in layers.items():
                compiled = torch.compile(net, fullgraph=True)(x)
                assert torch.equal(compiled, eager[m]), m
        print("compiled equal")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dynamo imported: False" in out.stdout and "compiled equal" in out.stdout, out.stdout
