"""Streams a safetensors checkpoint (HF layout) straight into the fast engine's network on its device.

Each tensor is read with plain ``pread`` calls in chunks, by a few threads, into small pinned buffers that are
copied to the GPU (on the CPU: straight into the tensor), so the process never holds a whole shard or a CPU copy
of the model, and no transformers model is built. Layers arrive one after another (the next ones read while the
current one is built); each is turned into the engine's block by the same ``from_llama`` / ``from_falcon`` /
``from_mamba`` that convert a transformers model, and quantised to int8 / int4 right there, so a quantised model
never sits on the GPU in bf16. Never downloads; reads only the folder it is given.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from localgpt.errors import ConfigError, ModelNotFound

INDEX = "model.safetensors.index.json"
# 32 MiB a read: large enough that a read costs far more than its GPU copy, small enough that the pinned
# buffers (one a reader thread) stay a few hundred MB of host memory.
CHUNK_BYTES = 32 << 20
READERS = 8  # threads reading the page cache in parallel (one thread copies ~5 GB/s, not the 50 of PCIe)
LOOKAHEAD = 2  # layers read ahead of the one being built (their weights wait on the device in bf16)

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}

# model_type -> the body's attribute, its layer list's, its embedding's, and the rotary module (None: no rotary)
_LAYOUTS = {
    "llama": ("model", "layers", "embed_tokens", ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding")),
    "falcon": ("transformer", "h", "word_embeddings",
               ("transformers.models.falcon.modeling_falcon", "FalconRotaryEmbedding")),
    "mamba": ("backbone", "layers", "embeddings", None),
    "falcon_mamba": ("backbone", "layers", "embeddings", None),
}


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors shards (from the index when there is one); [] if it has none."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelNotFound(f"{index} is not a safetensors index ({exc}); copy the model folder again") from None
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("model*.safetensors"))


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, with where each one lies; opening reads headers only.

    Every problem a copy can have is found here and named by file: a shard listed in the index but absent,
    a file too short for its own header or tensors (truncated), a tensor the index puts in a shard that lacks it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        if not self.files:
            raise ModelNotFound(f"{self.folder} holds no safetensors weights")
        self.entries: dict[str, Entry] = {}
        for file in self.files:
            if not file.is_file():
                raise ModelNotFound(f"{file} is listed in {INDEX} but missing: copy the whole model folder")
            for name, entry in _read_header(file).items():
                self.entries.setdefault(name, entry)
        index = self.folder / INDEX
        if index.is_file():
            for name, shard in json.loads(index.read_text())["weight_map"].items():
                if name not in self.entries:
                    raise ModelNotFound(f"{self.folder / shard} lacks tensor {name!r} that {INDEX} puts there: "
                                        "the shard is damaged or from another copy; copy it again")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.entries if n.startswith(prefix)]

    def missing(self, name: str) -> ModelNotFound:
        shards = ", ".join(f.name for f in self.files)
        return ModelNotFound(f"tensor {name!r} is not in the checkpoint at {self.folder} ({shards}): "
                             "the copy is incomplete or the model is of another layout")


def _read_header(file: Path) -> dict[str, Entry]:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelNotFound(f"{file} is truncated ({size} bytes, not even a safetensors header): copy it again")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ModelNotFound(f"{file} is truncated: its header needs {8 + length} bytes, the file has {size}; "
                                "copy it again")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise ModelNotFound(f"{file} is not a safetensors file (unreadable header): copy it again") from None
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConfigError(f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}, which the fast engine "
                              "does not read; use engine='hf'")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ModelNotFound(f"{file} is truncated: tensor {name!r} ends at byte {base + end}, the file has "
                                f"{size}; copy it again")
        entries[name] = Entry(file, dtype, tuple(info["shape"]), base + begin, end - begin)
    return entries


class Reader:
    """Reads tensors into place on ``device`` with a pool of threads; ``fetch`` starts, ``Batch.wait`` finishes.

    CUDA: each thread preads a chunk into its own pinned buffer and copies it on its own stream, after an
    event recorded where the destination was allocated (the caching allocator may hand out a block that
    queued kernels of the main stream still read). CPU: threads pread straight into the tensor's memory.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, *,
                 chunk_bytes: int = CHUNK_BYTES, threads: int = READERS):
        self.checkpoint, self.device, self.dtype, self.chunk = checkpoint, torch.device(device), dtype, chunk_bytes
        self.pool = ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1)), thread_name_prefix="localgpt-read")
        self.local = threading.local()
        self.pinned: list[torch.Tensor] = []  # every thread's buffer, freed by close()
        self.fds: dict[Path, int] = {}
        self.fd_lock = threading.Lock()
        self.bytes_read = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.pinned.clear()

    def _fd(self, file: Path) -> int:
        with self.fd_lock:
            if file not in self.fds:
                self.fds[file] = os.open(file, os.O_RDONLY)
            return self.fds[file]

    def fetch(self, names: Iterable[str]) -> "Batch":
        """Start reading ``names``; each becomes a tensor of ``dtype`` (floating ones) on the device."""
        batch = Batch(self)
        for name in names:
            entry = self.checkpoint.entries.get(name)
            if entry is None:
                raise self.checkpoint.missing(name)
            raw = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
            ready = None
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            jobs = [self.pool.submit(self._read, entry, name, raw, offset, min(self.chunk, entry.nbytes - offset),
                                     ready)
                    for offset in range(0, entry.nbytes, self.chunk)]
            batch.items.append((name, entry, raw, jobs))
        return batch

    def _read(self, entry: Entry, name: str, raw: torch.Tensor, offset: int, n: int, ready) -> None:
        fd = self._fd(entry.file)
        with torch.inference_mode():
            if self.device.type != "cuda":
                self._pread(fd, memoryview(raw[offset:offset + n].numpy()), entry, name, offset)
                return
            local = self.local
            if getattr(local, "buffer", None) is None:
                local.buffer = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
                local.stream = torch.cuda.Stream(device=self.device)
                self.pinned.append(local.buffer)
            buffer = local.buffer
            self._pread(fd, memoryview(buffer[:n].numpy()), entry, name, offset)
            with torch.cuda.stream(local.stream):
                local.stream.wait_event(ready)
                raw[offset:offset + n].copy_(buffer[:n], non_blocking=True)
            local.stream.synchronize()  # the buffer is free for this thread's next chunk

    def _pread(self, fd: int, view: memoryview, entry: Entry, name: str, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], entry.start + offset + done)
            if got <= 0:
                raise ModelNotFound(f"{entry.file} ended while reading tensor {name!r} (it changed or was "
                                    "truncated during the load): copy it again")
            done += got
        self.bytes_read += done  # a race between threads may lose an addition: it is only reported


class Batch:
    """Tensors being read; ``wait`` returns them by name, in the reader's dtype, once all their chunks landed."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.items: list[tuple[str, Entry, torch.Tensor, list[Future]]] = []

    def wait(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, entry, raw, jobs in self.items:
            for job in jobs:
                job.result()
            tensor = raw.view(entry.dtype).view(entry.shape)
            if tensor.dtype.is_floating_point and tensor.dtype != self.reader.dtype:
                tensor = tensor.to(self.reader.dtype)
            out[name] = tensor
        return out


# --- the checkpoint as the module tree that transformer.from_* / mamba.from_mamba read ---------------------


class _Node:
    """One module of the checkpoint's own layout: children and tensors by attribute. A missing attribute is
    the checkpoint's missing tensor (a clear error), except ``bias``, which layers may lack."""

    def __init__(self, path: str, eps: float | None, checkpoint: Checkpoint):
        self.__dict__.update(_path=path, _items={}, eps=eps, variance_epsilon=eps, _checkpoint=checkpoint)

    def __getattr__(self, name: str):
        items = self.__dict__["_items"]
        if name in items:
            return items[name]
        if name == "bias":
            return None
        raise self.__dict__["_checkpoint"].missing(self.__dict__["_path"] + name + ".*")


def _tree(tensors: dict[str, torch.Tensor], eps: float | None, checkpoint: Checkpoint) -> _Node:
    root = _Node("", eps, checkpoint)
    for name, tensor in tensors.items():
        *parents, leaf = name.split(".")
        node, path = root, ""
        for part in parents:
            path += part + "."
            node = node._items.setdefault(part, _Node(path, eps, checkpoint))
        node._items[leaf] = tensor
    return _finish(root)


def _finish(node: _Node):
    """Numbered children become a list (``layers``); a weight matrix with at most a bias becomes an
    ``nn.Linear`` holding those tensors (what ``transformer._linear`` takes the weights of)."""
    items = {k: _finish(v) if isinstance(v, _Node) else v for k, v in node._items.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    weight = items.get("weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and set(items) <= {"weight", "bias"}:
        linear = nn.Linear(1, 1, bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if items.get("bias") is not None:
            linear.bias = nn.Parameter(items["bias"], requires_grad=False)
        return linear
    node._items = items
    return node


@dataclass
class Streamed:
    network: nn.Module
    config: Any
    n_params: int
    states: dict  # device-neutral quantised layer states (``keep``), for quantize.save_quantized
    seconds: float = 0.0  # the whole load: reads, building, quantising
    bytes_read: int = 0


def load_network(folder: Path, config: Any, device: str | torch.device, dtype: torch.dtype, *,
                 quantization: str | None = None, saved: dict | None = None, keep: bool = False,
                 checkpoint: Checkpoint | None = None, chunk_bytes: int = CHUNK_BYTES,
                 threads: int = READERS) -> Streamed:
    """The engine's network for the safetensors checkpoint in ``folder`` (its transformers ``config``), read
    onto ``device`` in ``dtype``; with ``quantization`` ("int8" / "int4"), each layer quantised as it arrives
    (``saved``: quantised states from the disk cache instead; ``keep``: return the states to save)."""
    from localgpt.generation.fast.generator import build_network
    from localgpt.generation.fast.quantize import quantize_model

    model_type = config.model_type
    if model_type not in _LAYOUTS:
        build_network(_Shim(config))  # raises the engine's "runs ... not ..." ConfigError
    body_name, list_name, embed_name, rope_path = _LAYOUTS[model_type]
    checkpoint = checkpoint or Checkpoint(folder)
    device = torch.device(device)
    eps = getattr(config, "layer_norm_epsilon", None) or getattr(config, "rms_norm_eps", None)
    layer_prefix = f"{body_name}.{list_name}."
    n_layers = int(config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    rest_names = [n for n in checkpoint.names() if not n.startswith(layer_prefix) and not n.endswith("inv_freq")
                  and not (tied and n == "lm_head.weight")]
    started = time.perf_counter()
    reader = Reader(checkpoint, device, dtype, chunk_bytes=chunk_bytes, threads=threads)
    scaled_rope = rope_path is not None and _rope_type(config) != "default"
    states: dict = {}
    n_params = 0
    try:
        with torch.inference_mode():
            rest = reader.fetch(rest_names).wait()
            n_params += sum(t.numel() for t in rest.values())
            if tied:
                embed = f"{body_name}.{embed_name}.weight"
                if embed not in rest:
                    raise checkpoint.missing(embed)
                rest["lm_head.weight"] = rest[embed]
            rope = None
            if scaled_rope:  # transformers' own module (its import takes seconds: only for these checkpoints)
                rope = getattr(importlib.import_module(rope_path[0]), rope_path[1])(config=config).to(device)
            elif rope_path is not None:
                rope = Rotary(config).to(device)

            def shim(tensors: dict[str, torch.Tensor], empty_layers: bool = False) -> _Shim:
                root = _tree(tensors, eps, checkpoint)
                body = getattr(root, body_name)
                if empty_layers:
                    body._items[list_name] = []
                if rope is not None:
                    body._items["rotary_emb"] = rope
                return _Shim(config, root)

            def layer_names(i: int) -> list[str]:
                names = [n for n in checkpoint.names(f"{layer_prefix}{i}.") if not n.endswith("inv_freq")]
                if not names:
                    raise checkpoint.missing(f"{layer_prefix}{i}.*")
                return names

            blocks = []
            pending: deque = deque()
            for i in range(n_layers + LOOKAHEAD):
                if i < n_layers:
                    pending.append(reader.fetch(layer_names(i)))
                if i < LOOKAHEAD:
                    continue
                index = i - LOOKAHEAD
                tensors = pending.popleft().wait()
                n_params += sum(t.numel() for t in tensors.values())
                built = build_network(shim(rest | tensors))
                block = (built.blocks if hasattr(built, "blocks") else built.layers)[0]
                del built, tensors
                if quantization:
                    prefix = f"{'blocks' if model_type in ('llama', 'falcon') else 'layers'}.{index}."
                    mine = None if saved is None else {k[len(prefix):]: v for k, v in saved.items()
                                                        if k.startswith(prefix)}
                    done = quantize_model(block, quantization, saved=mine, keep=keep)
                    states.update({prefix + k: v for k, v in done.items()})
                blocks.append(block)
            network = build_network(shim(rest, empty_layers=True))
            if hasattr(network, "blocks"):
                network.blocks = nn.ModuleList(blocks)
            else:
                network.layers = nn.ModuleList(blocks)
            del rest
            if quantization:  # what is left: the output head
                states.update(quantize_model(network, quantization, saved=saved, keep=keep))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        reader.close()
    return Streamed(network, config, n_params, states, time.perf_counter() - started, reader.bytes_read)


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


class Rotary(nn.Module):
    """transformers' default (unscaled) rotary cos / sin with the same arithmetic (``LlamaRotaryEmbedding``,
    ``FalconRotaryEmbedding``), so that the streamed load never imports transformers' modeling stack (about
    2 s of a start); checkpoints with a scaled rotary (rope_type other than default) use transformers' own."""

    def __init__(self, config: Any):
        super().__init__()
        params = getattr(config, "rope_parameters", None) or {}
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class _Shim:
    """What ``generator.build_network`` reads of a transformers model: its config and its module tree."""

    def __init__(self, config: Any, root: _Node | None = None):
        self.config = config
        if root is not None:
            self.__dict__.update(root._items)


def prepare_imports(device: str, transformers: bool = True) -> None:
    """Import now what a streamed load of ``device`` imports later, so that a thread importing something else
    meanwhile (the tokenizer's transformers modules) never waits on, or deadlocks with, the load's imports.
    ``transformers=False``: the configs come from the start cache (``read_configs``), none of it is imported."""
    if transformers:
        from transformers import AutoConfig, GenerationConfig  # noqa: F401

    import localgpt.generation.fast.mamba  # noqa: F401
    import localgpt.generation.fast.quantize  # noqa: F401
    import localgpt.generation.fast.transformer  # noqa: F401

    if torch.device(device).type == "cuda":
        for kernels in ("gemv_triton", "gemv_cuda", "int4_triton", "scan_triton"):
            try:
                importlib.import_module(f"localgpt.generation.fast.{kernels}")
            except ImportError:  # no Triton: the load's own checks fall back, as they always did
                pass


# --- the model's configs without transformers on a repeated start ---------------------------------------------

CONFIG_FORMAT = 1
_CONFIG_FILES = ("config.json", "generation_config.json")


class NotCached(RuntimeError):
    """An attribute the transformers config had but the start cache did not keep: fail loudly, never default."""


class CachedConfig:
    """The public attributes of a transformers config (its own and its class's defaults, attribute_map names,
    properties) as read on an earlier start, for code that only reads them (the network builders, the loader, the
    generator: ``getattr`` of plain values). A name the real config had but whose value could not be kept raises
    ``NotCached`` (not AttributeError, so ``getattr(cfg, name, default)`` cannot silently take the default)."""

    def __init__(self, values: dict[str, Any], dropped: Iterable[str] = ()):
        self.__dict__.update(values)
        self.__dict__["_dropped"] = frozenset(dropped)

    def __getattr__(self, name: str):
        if name in self.__dict__.get("_dropped", ()):
            raise NotCached(f"config attribute {name!r} is not in the start cache")
        raise AttributeError(name)


def _snapshot(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """(JSON-exact public non-callable attributes, the names left out)."""
    values, dropped = {}, []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:  # a property that says "no such attribute": absent from the cache alike
            continue
        except Exception:  # noqa: BLE001 - a property that raises otherwise: reading it from the cache raises too
            dropped.append(name)
            continue
        if callable(value):
            continue
        try:
            same = json.loads(json.dumps(value)) == value and type(json.loads(json.dumps(value))) is type(value)
        except (TypeError, ValueError):
            same = False
        if same:
            values[name] = value
        else:
            dropped.append(name)
    return values, dropped


def config_cache_path(folder: Path, cache_dir: Path) -> Path:
    from localgpt.generation.fast.tokenizer import files_key

    key = files_key(folder, _CONFIG_FILES, f"format {CONFIG_FORMAT}", f"transformers {_transformers_version()}")
    return Path(cache_dir) / "configs" / f"{key}.json"


def read_configs(folder: Path, cache_dir: Path | None):
    """(config, generation config) as ``CachedConfig`` from an earlier start's snapshot, or None (a miss)."""
    if cache_dir is None or os.environ.get("LOCALGPT_CONFIG_CACHE", "1") == "0":
        return None
    try:
        state = json.loads(config_cache_path(folder, cache_dir).read_text(encoding="utf-8"))
        if state.get("format") != CONFIG_FORMAT:
            return None
        return (CachedConfig(state["config"], state["config_dropped"]),
                CachedConfig(state["generation"], state["generation_dropped"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_configs(folder: Path, cache_dir: Path | None, config: Any, generation_config: Any) -> str:
    """Snapshot both configs for the next start, if every attribute the engine reads survives the round trip."""
    if cache_dir is None:
        return "not cached"
    try:
        if _rope_type(config) != "default":  # transformers' own rotary module needs the real config
            return "not cached (scaled rotary)"
        cfg, cfg_dropped = _snapshot(config)
        gen, gen_dropped = _snapshot(generation_config)
        needed = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings")
        if any(n in cfg_dropped for n in needed) or "eos_token_id" in gen_dropped:
            return "not cached (a needed attribute is not plain data)"
        cached = CachedConfig(cfg, cfg_dropped)
        if any(getattr(cached, n) != getattr(config, n) for n in cfg):
            return "not cached (round trip differs)"
        path = config_cache_path(folder, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CONFIG_FORMAT, "config": cfg, "config_dropped": cfg_dropped,
                                   "generation": gen, "generation_dropped": gen_dropped}), encoding="utf-8")
        os.replace(tmp, path)
        return "cached for the next start"
    except Exception as exc:  # noqa: BLE001 - an optimisation: never fail a load over it
        return f"not cached ({type(exc).__name__}: {exc})"


def transformers_configs(folder: Path):
    """(config, generation config) as transformers builds them from the checkpoint's files (the generation
    config from the model config when generation_config.json is missing)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    try:
        generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:
        generation_config = GenerationConfig.from_model_config(config)
    return config, generation_config


def load_configs(folder: Path, cache_dir: Path | None):
    """(config, generation config, how): the start cache's snapshot; else, for the families and files
    ``direct_configs`` covers, config.json read directly (no transformers import); else transformers' (then
    snapshotted for the next start)."""
    hit = read_configs(folder, cache_dir)
    if hit is not None:
        return hit[0], hit[1], "cache"
    why = "direct off"
    if os.environ.get("LOCALGPT_DIRECT_CONFIG", "1") != "0":
        try:
            config, generation_config = direct_configs(folder)
            return config, generation_config, "config.json (direct)"
        except Unsupported as exc:
            why = f"not direct: {exc}"
    config, generation_config = transformers_configs(folder)
    return config, generation_config, f"transformers ({why}); " + write_configs(folder, cache_dir, config,
                                                                               generation_config)


def load_checkpoint(folder: Path, device: str, dtype: torch.dtype, quantization: str | None, *,
                    source: str | None = None, cache_dir: Path | None = None, configs: tuple | None = None):
    """(network, config, generation config, parameter count, what happened to the weights) for ``folder``.

    Quantised weights: on CUDA they are computed on the GPU as the layers stream in, and the disk cache of
    ``generator.quantize_network`` is neither read nor written (reading the bf16 shards from the page cache and
    quantising costs less than reading the cache, and writing it would need a host copy of every quantised
    layer: 3.9 GB for a 7B model at 4 bits, against the 2 GiB of host memory a load may use). On the CPU the
    cache works as before: reused when it matches the checkpoint, written otherwise.
    """
    config, generation_config = configs if configs is not None else transformers_configs(folder)
    use_cache = bool(quantization and source and cache_dir and torch.device(device).type != "cuda")
    saved = None
    if use_cache:
        from localgpt.generation.fast.quantize import load_quantized

        cache = Path(cache_dir) / f"{source}-{quantization}.pt"
        saved = load_quantized(cache, mode=quantization, source=source)
    loaded = load_network(folder, config, device, dtype, quantization=quantization, saved=saved,
                          keep=use_cache and saved is None)
    note = "none"
    if quantization and not use_cache:
        note = f"quantized on {torch.device(device).type} while loading"
    elif quantization and saved is not None:
        note = f"loaded {cache}"
    elif quantization:
        from localgpt.generation.fast.quantize import save_quantized

        try:
            save_quantized(loaded.states, cache, mode=quantization, source=source)
            note = f"quantized, saved {cache}"
        except OSError:
            note = "quantized (cache not writable)"
    note += f"; streamed {loaded.bytes_read / 1e9:.2f} GB in {loaded.seconds:.2f} s"
    return loaded.network, config, generation_config, loaded.n_params, note


# --- the model's configs on a first start, straight from config.json -------------------------------------------

# The transformers versions whose config classes (LlamaConfig, FalconConfig, FalconMambaConfig, GenerationConfig) were
# checked to give the values below for the fields the engine reads (tests/test_fast_direct.py compares them against
# AutoConfig on many config.json files; run it on a new version before adding it here). Any other installed version:
# the transformers path, as before. No transformers installed at all: nothing to differ from, the direct path serves.
DIRECT_CONFIG_VERSIONS = ("5.17.0", "5.24.0")

# config.json keys that may be present without changing any value the engine reads (in the versions above
# transformers keeps them as plain attributes or ignores them). Any key outside these and a family's own fields
# sends the start to transformers.
_INERT_KEYS = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
               "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "attention_dropout"}
_INT, _FLOAT, _BOOL, _STR = "int", "float", "bool", "str"
# family -> {field: (kind, may be null, transformers' default)}; the fields the engine reads, with the defaults of
# the family's config class (transformers 5: models/<family>/configuration_<family>.py).
_DIRECT_FIELDS = {
    "llama": {"vocab_size": (_INT, False, 32000), "hidden_size": (_INT, False, 4096),
              "intermediate_size": (_INT, False, 11008), "num_hidden_layers": (_INT, False, 32),
              "num_attention_heads": (_INT, False, 32), "num_key_value_heads": (_INT, True, None),
              "hidden_act": (_STR, False, "silu"), "max_position_embeddings": (_INT, False, 2048),
              "rms_norm_eps": (_FLOAT, False, 1e-6), "tie_word_embeddings": (_BOOL, False, False),
              "head_dim": (_INT, True, None), "eos_token_id": (_INT, True, 2), "pretraining_tp": (_INT, True, 1),
              "attention_bias": (_BOOL, False, False), "mlp_bias": (_BOOL, False, False)},
    "falcon": {"vocab_size": (_INT, False, 65024), "hidden_size": (_INT, False, 4544),
               "num_hidden_layers": (_INT, False, 32), "num_attention_heads": (_INT, False, 71),
               "num_ln_in_parallel_attn": (_INT, True, None), "layer_norm_epsilon": (_FLOAT, False, 1e-5),
               "num_kv_heads": (_INT, True, None), "alibi": (_BOOL, False, False),
               "new_decoder_architecture": (_BOOL, False, False), "multi_query": (_BOOL, False, True),
               "parallel_attn": (_BOOL, False, True), "bias": (_BOOL, False, False),
               "max_position_embeddings": (_INT, False, 2048), "eos_token_id": (_INT, True, 11),
               "ffn_hidden_size": (_INT, True, None), "activation": (_STR, False, "gelu"),
               "tie_word_embeddings": (_BOOL, False, True)},
    "falcon_mamba": {"vocab_size": (_INT, False, 50280), "hidden_size": (_INT, False, 768),
                     "state_size": (_INT, False, 16), "num_hidden_layers": (_INT, False, 32),
                     "layer_norm_epsilon": (_FLOAT, False, 1e-5), "eos_token_id": (_INT, True, 0),
                     "expand": (_INT, False, 2), "conv_kernel": (_INT, False, 4), "use_bias": (_BOOL, False, False),
                     "use_conv_bias": (_BOOL, False, True), "hidden_act": (_STR, False, "silu"),
                     "residual_in_fp32": (_BOOL, False, True), "time_step_rank": (_INT, False, "auto"),
                     "tie_word_embeddings": (_BOOL, False, True), "mixer_rms_eps": (_FLOAT, False, 1e-6),
                     "intermediate_size": (_INT, False, None)},
}
# Further keys of each family's config class the engine never reads (accepted, not interpreted).
_DIRECT_OTHER_KEYS = {
    "llama": set(),
    "falcon": {"apply_residual_connection_post_layernorm", "hidden_dropout"},
    "falcon_mamba": {"time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor",
                     "rescale_prenorm_residual", "use_mambapy", "use_associative_scan", "use_falcon_mambapy"},
}
# What the engine reads of the config (load.py, transformer.from_llama / from_falcon, mamba.from_mamba, the
# generator's context window) and each family's value; ABSENT: read with a default, but transformers' config has
# no such attribute (AttributeError there, AttributeError here). Reading any other name raises NotCached.
DIRECT_READS = {
    "llama": ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
              "max_position_embeddings", "rope_parameters", "rope_scaling", "eos_token_id", "intermediate_size"),
    "falcon": ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
               "vocab_size", "layer_norm_epsilon", "alibi", "new_decoder_architecture", "multi_query",
               "parallel_attn", "num_ln_in_parallel_attn", "activation", "tie_word_embeddings",
               "max_position_embeddings", "rope_parameters", "rope_scaling", "eos_token_id"),
    "falcon_mamba": ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "state_size",
                     "conv_kernel", "time_step_rank", "vocab_size", "layer_norm_epsilon", "mixer_rms_eps",
                     "residual_in_fp32", "tie_word_embeddings", "eos_token_id"),
}
DIRECT_ABSENT = {
    "llama": ("layer_norm_epsilon", "rope_theta"),
    "falcon": ("rms_norm_eps", "rope_theta"),
    "falcon_mamba": ("rms_norm_eps", "head_dim", "rope_parameters", "rope_scaling", "rope_theta",
                     "max_position_embeddings"),
}


class Unsupported(ValueError):
    """config.json holds something the direct path does not reproduce: the start takes transformers' path."""


class DirectConfig(CachedConfig):
    """The fields the engine reads, from config.json with transformers' defaults (``direct_configs``). A name outside
    them raises ``NotCached`` (never a silent default), one transformers' config lacks raises AttributeError."""

    def __init__(self, values: dict[str, Any], absent: Iterable[str] = ()):
        super().__init__(values)
        self.__dict__["_absent"] = frozenset(absent)

    def __getattr__(self, name: str):
        if name in self.__dict__.get("_absent", ()) or name.startswith("__"):
            raise AttributeError(name)
        raise NotCached(f"config attribute {name!r} is not read from config.json by the direct path")


def _checked(value: Any, kind: str, nullable: bool, key: str) -> Any:
    if value is None:
        if nullable:
            return None
        raise Unsupported(f"{key} is null")
    ok = {_INT: type(value) is int, _FLOAT: type(value) is float, _BOOL: type(value) is bool,
          _STR: type(value) is str}[kind]
    if not ok:
        raise Unsupported(f"{key} = {value!r} is not a plain {kind}")
    return value


def _rope(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' standardised ``rope_parameters`` for an unscaled rotary; anything else is Unsupported."""
    theta = raw.get("rope_theta", 10000.0)
    params = raw.get("rope_parameters")
    if raw.get("rope_scaling") is not None:
        raise Unsupported("rope_scaling is set")
    if "partial_rotary_factor" in raw:
        raise Unsupported("partial_rotary_factor is set")
    if params is not None:
        if "rope_theta" in raw or not isinstance(params, dict) or set(params) - {"rope_theta", "rope_type"}:
            raise Unsupported(f"rope_parameters {params!r}")
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            raise Unsupported(f"rope_type {params.get('rope_type')!r}")
    if type(theta) is not float:
        raise Unsupported(f"rope_theta {theta!r} is not a float")
    return {"rope_theta": theta, "rope_type": "default"}


def _transformers_version() -> str:
    from localgpt.generation.fast.tokenizer import package_version

    return package_version("transformers")


def direct_configs(folder: Path):
    """(config, generation config) as ``DirectConfig`` read from the checkpoint's JSON files alone, equal to what
    transformers builds for the fields the engine reads; raises ``Unsupported`` for anything it does not cover."""
    version = _transformers_version()
    if version != "none" and version not in DIRECT_CONFIG_VERSIONS:
        raise Unsupported(f"transformers {version} is not one the direct path was checked against")
    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unsupported(f"config.json: {exc}") from None
    if not isinstance(raw, dict):
        raise Unsupported("config.json is not an object")
    family = raw.get("model_type")
    if family not in _DIRECT_FIELDS:
        raise Unsupported(f"model_type {family!r}")
    fields = _DIRECT_FIELDS[family]
    rope_keys = {"rope_theta", "rope_scaling", "rope_parameters"} if family != "falcon_mamba" else set()
    unknown = set(raw) - set(fields) - _INERT_KEYS - _DIRECT_OTHER_KEYS[family] - rope_keys - {"model_type"}
    if unknown:
        raise Unsupported(f"config.json keys {sorted(unknown)}")
    v: dict[str, Any] = {"model_type": family}
    for key, (kind, nullable, default) in fields.items():
        as_is = (key == "eos_token_id" and isinstance(raw.get(key), list)) or (key == "time_step_rank"
                                                                            and raw.get(key) == "auto")
        if as_is and key == "eos_token_id" and not (raw[key] and all(type(i) is int for i in raw[key])):
            raise Unsupported(f"eos_token_id {raw[key]!r}")
        v[key] = raw[key] if as_is else _checked(raw[key], kind, nullable, key) if key in raw else default
    if family == "llama":
        v["head_dim"] = v["head_dim"] if v["head_dim"] is not None else v["hidden_size"] // v["num_attention_heads"]
        if v["num_key_value_heads"] is None:
            v["num_key_value_heads"] = v["num_attention_heads"]
        if v["hidden_size"] % v["num_attention_heads"]:
            raise Unsupported("hidden_size is not a multiple of num_attention_heads")
    elif family == "falcon":
        if v["num_kv_heads"] is None:
            v["num_kv_heads"] = v["num_attention_heads"]
        v["head_dim"] = v["hidden_size"] // v["num_attention_heads"]
    else:
        if "intermediate_size" not in raw:  # __post_init__ sets expand * hidden_size; a value in the file wins
            v["intermediate_size"] = int(v["expand"] * v["hidden_size"])
        if v["time_step_rank"] == "auto":
            v["time_step_rank"] = math.ceil(v["hidden_size"] / 16)
        elif type(v["time_step_rank"]) is not int:
            raise Unsupported(f"time_step_rank {v['time_step_rank']!r}")
    if family != "falcon_mamba":
        v["rope_parameters"] = _rope(raw)
        v["rope_scaling"] = dict(v["rope_parameters"])
    values = {name: v[name] for name in DIRECT_READS[family]}
    config = DirectConfig(values, DIRECT_ABSENT[family])
    return config, DirectConfig({"eos_token_id": _generation_eos(Path(folder), v["eos_token_id"])})


def _generation_eos(folder: Path, config_eos: Any):
    """``eos_token_id`` of transformers' generation config: generation_config.json's, else the model config's."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return config_eos  # GenerationConfig.from_model_config
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unsupported(f"generation_config.json: {exc}") from None
    if not isinstance(raw, dict):
        raise Unsupported("generation_config.json is not an object")
    eos = raw.get("eos_token_id")
    if eos is None or type(eos) is int or (isinstance(eos, list) and all(type(i) is int for i in eos)):
        return eos
    raise Unsupported(f"generation_config.json eos_token_id {eos!r}")
