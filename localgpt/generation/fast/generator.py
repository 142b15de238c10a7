"""The fast engine behind localgpt's ``Generator`` interface: load, quantise, warm up, stream text.

Streams a safetensors checkpoint from local files straight into the compact networks (``transformer``,
``mamba``) on the device, quantising layer by layer (``load``); a .bin checkpoint is loaded with transformers
first and its weights moved over. Optionally int8 / int4 (cached on disk where it pays), and
compiles the decode step before the first question. Prompt formats, stop strings and prompt
truncation are the transformers backend's (this class extends it), so both engines answer alike.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from localgpt.errors import ConfigError, ModelNotFound
from localgpt.generation.base import StreamTimer, reply_yes_share
from localgpt.generation.fast.engine import Engine
from localgpt.generation.fast.load import load_checkpoint, load_configs, prepare_imports, safetensors_files
from localgpt.generation.transformers_backend import (
    FALLBACK_FAMILY, StopScanner, TransformersGenerator, _check_complete, _first_line, _quantization_config,
    pick_device,
)
from localgpt.models import FAMILIES, detect_family, locate_model, missing_model_advice

QUANTIZATION_MODES = {"none": None, "8bit": "int8", "4bit": "int4"}


class FastGenerator(TransformersGenerator):
    """Streams text from an ``Engine``; one answer at a time per loaded model, or, once ``start_batching``
    ran, many at once through a ``BatchEngine`` (continuous batching) shared by every view of the model."""

    cancelled: threading.Event | None = None  # a view's: set, its batched stream ends (the server's disconnects)

    def __init__(self, engine: Engine, tokenizer: Any, *, generation_config: Any = None, **kwargs: Any):
        self.engine = engine
        self.generation_config = generation_config
        self.lock = threading.Lock()
        self._shared: dict[str, Any] = {}  # copy.copy'd views (get_generator) share it: the BatchEngine
        self.params_at_load: int | None = None  # the checkpoint's size (quantised weights count less)
        super().__init__(engine.model, tokenizer, backend="fast", **kwargs)

    @property
    def n_params(self) -> int | None:
        return self.params_at_load

    @property
    def batch(self):
        """The running ``BatchEngine`` once ``start_batching`` ran, else None."""
        return self._shared.get("batch")

    def start_batching(self, slots: int, *, share_prefill: bool = False):
        """Serve ``stream`` calls through a ``BatchEngine`` of ``slots`` slots from now on (its own KV cache per
        slot, each of the batch-1 engine's ``max_seq`` positions; decode steps captured ahead on CUDA; with
        ``share_prefill`` several waiting prompts prefilled in one pass). Once per loaded model; later calls
        return the running one. ``yes_probability`` stays on the batch-1 engine."""
        from localgpt.generation.fast.batch import BatchEngine

        with self.lock:
            batch = self._shared.get("batch")
            if batch is None:
                batch = BatchEngine(self.engine.model, slots=slots, max_seq=self.engine.max_seq,
                                    share_prefill=share_prefill)
                if batch.device.type == "cuda":
                    self.stats.extra["batch_warm_up_s"] = round(batch.warm_up(sampled=(False, True)), 2)
                batch.start()
                self._shared["batch"] = batch
                self.stats.extra["batch_slots"] = slots
            return batch

    def yes_probability(self, prompt: str | Sequence[dict]) -> float | None:
        """P(the reply starts with yes) / P(yes or no): the engine's prefill logits over the prompt."""
        text = prompt if isinstance(prompt, str) else self.format(prompt)
        ids = self._encode(text, 1)[0].tolist()[-(self.engine.max_seq - 1):]
        with self.lock:
            logits = self.engine.next_logits(ids)
        return reply_yes_share(logits.float().cpu().numpy(), self._word_ids)

    def stream(self, prompt: str | Sequence[dict], *, max_new_tokens: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        import torch

        text = prompt if isinstance(prompt, str) else self.format(prompt)
        stops = list(self.family.stop if stop is None else stop)
        max_new = min(max_new_tokens or self.max_new_tokens, self.engine.max_seq - 1)
        ids = self._encode(text, max_new)[0].tolist()[-(self.engine.max_seq - max_new):]
        eos = set(self._eos_ids())
        scanner = StopScanner(stops)
        batch = self.batch
        with self.lock if batch is None else contextlib.nullcontext():
            timer = StreamTimer(self.stats, prompt_tokens=len(ids))
            if batch is not None:  # waits for a free slot; the time waited counts in ttft_s
                tokens = self._batched(batch, ids, max_new, eos)
            else:
                if self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                tokens = self.engine.generate(ids, max_new, stop_ids=eos, temperature=self.temperature, top_p=self.top_p)
            answer: list[int] = []
            shown = ""
            reached = False
            try:
                for tid in tokens:
                    timer.token()
                    if tid in eos:
                        break
                    answer.append(tid)
                    now = self.tokenizer.decode(answer, skip_special_tokens=True)
                    if now.endswith("\ufffd") or not now.startswith(shown):
                        continue  # half a multi-byte character: wait for the rest
                    out, reached = scanner.feed(now[len(shown):])
                    shown = now
                    if out:
                        yield out
                    if reached:
                        break
                if not reached:
                    now = self.tokenizer.decode(answer, skip_special_tokens=True)
                    out, _ = scanner.feed(now[len(shown):]) if now.startswith(shown) else ("", False)
                    tail = out + scanner.flush()
                    if tail:
                        yield tail
            finally:
                tokens.close()
                timer.finish()
                if self.device == "cuda":
                    self.stats.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20

    def _batched(self, batch, ids: list[int], max_new: int, eos: set[int]) -> Iterator[int]:
        """This request's tokens from the shared ``BatchEngine``; closed early or cancelled, it leaves its slot."""
        req = batch.submit(ids, max_new, stop_ids=eos, temperature=self.temperature, top_p=self.top_p, stream=True)
        cancelled = self.cancelled
        try:
            yield from batch.stream(req, until=None if cancelled is None else cancelled.is_set)
            if req.finish_reason == "error":
                raise RuntimeError(f"the batched decode step failed: {batch.error}")
        finally:
            if not req.done:
                batch.cancel(req)

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        return sorted(set(ids) | set(self._stop_token_ids))


def build_network(hf_model: Any):
    """The compact network for a loaded transformers model (its weights moved, not copied, where possible)."""
    from localgpt.generation.fast.mamba import from_mamba
    from localgpt.generation.fast.transformer import from_falcon, from_llama

    builders = {"llama": from_llama, "falcon": from_falcon, "mamba": from_mamba, "falcon_mamba": from_mamba}
    model_type = hf_model.config.model_type
    if model_type not in builders:
        raise ConfigError(f"engine 'fast' runs {', '.join(sorted(builders))} models, not {model_type!r}; "
                          "use engine='hf'")
    return builders[model_type](hf_model)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "localgpt" / "fast"


def _fingerprint(path: Path) -> str:
    """Names the checkpoint's exact weight files (path, size, mtime): a changed checkpoint misses the cache."""
    parts = [str(path.resolve())]
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]:
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def quantize_network(network: Any, mode: str, *, source: str | None = None, cache_dir: Path | None = None) -> str:
    """Quantise ``network`` in place; with ``source``, reuse or write the on-disk cache. Says which happened."""
    from localgpt.generation.fast.quantize import load_quantized, quantize_model, save_quantized

    if source is None or cache_dir is None:
        quantize_model(network, mode)
        return "quantized"
    path = Path(cache_dir) / f"{source}-{mode}.pt"
    saved = load_quantized(path, mode=mode, source=source)
    if saved is not None:
        quantize_model(network, mode, saved=saved)
        return f"loaded {path}"
    states = quantize_model(network, mode, keep=True)
    try:
        save_quantized(states, path, mode=mode, source=source)
    except OSError:
        return "quantized (cache not writable)"
    return f"quantized, saved {path}"


def _tokenizer(path: Path, cache_dir: Path | None = None):
    """(tokenizer, how it loaded): from the checked tokenizer cache when an earlier start wrote one (``tokenizers``
    alone, ~0.1 s), else ``AutoTokenizer`` (~5 s of imports on the H200 image), checked and cached (tokenizer.py)."""
    from localgpt.generation.fast.tokenizer import load_tokenizer

    stops = sorted({s for family in FAMILIES.values() for s in family.stop})
    return load_tokenizer(path, cache_dir, stop_tokens=stops)


def default_engine_mode(network: Any, device: str, kernels: str) -> str:
    """How the decode step runs when the caller does not say: "eager" on the CPU; on CUDA a plain CUDA graph of the
    fused step for Llama-style networks, bf16 or quantised (Llama-2-7B on an H200, bench/RESULTS.md: bf16 248 tok/s
    = 0.82 of the bandwidth limit with a 1 s warm-up against 241 tok/s and 44 s compiled, round 7; int4 500-532 tok/s
    with a layer's GEMVs in one launch and its words by bulk copies (rounds 11-12; 487 by a ring of cp.async, round 10;
    464 with the norms in the GEMVs' prologues, round 9), which only
    the graph step has, against 418 compiled; int8 358 with its row scales in the kernel against 346 compiled,
    rounds 7 and 9), torch.compile for the rest (Falcon, whose fused step is its attention over positions 0..pos
    and wants the compiler for its LayerNorm / GELU glue: ``Transformer.graph_step``; Mamba), a graph for
    bitsandbytes."""
    if device != "cuda":
        return "eager"
    if kernels != "torch":
        return "graph"
    fused = getattr(network, "use_fused_decode", None)
    return "graph" if fused is not None and fused(True) and getattr(network, "graph_step", True) else "compile"


def load_fast_generator(settings: Any, *, mode: str | None = None, max_seq: int | None = None,
                        kernels: str = "torch", cache_dir: Path | None = None, warm_up: bool | None = None) -> FastGenerator:
    """The fast engine for ``settings.model`` (a local Llama, Falcon, Mamba or FalconMamba checkpoint).

    ``settings.quantization``: "none" (bf16 on CUDA, fp32 on CPU), "8bit" (int8 weight-only) or "4bit"
    (int4, groups of 128), quantised at load and cached under ``cache_dir`` (default
    ``~/.cache/localgpt/fast``). ``kernels="bitsandbytes"`` keeps bitsandbytes NF4/int8 layers instead.
    ``mode``: "compile", "graph" or "eager" (default: ``default_engine_mode``). ``max_seq``: KV-cache positions
    (default: the model's context window). Raises ``ModelNotFound`` / ``ConfigError``; never downloads.
    """
    import torch

    name = str(settings.model or "")
    if not name:
        raise ConfigError("engine 'fast' needs a model: set model to a folder that holds config.json")
    path = locate_model(name)
    if path.is_file():
        raise ConfigError(f"engine 'fast' loads transformers checkpoints, not {path.name}; use engine='hf' for GGUF")
    _check_complete(path, name)
    device = pick_device(settings.device)
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"engine 'fast' runs on cuda or cpu, not {device}; use engine='hf'")
    if settings.quantization not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization must be none, 8bit or 4bit, not {settings.quantization!r}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    started = time.perf_counter()
    phases: dict[str, float] = {}  # seconds from ``started`` at the end of each step (stats.extra["load_phases"])

    def phase(name: str) -> None:
        phases[name] = round(time.perf_counter() - started, 3)

    load_kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if kernels == "bitsandbytes":
        bnb = _quantization_config(settings.quantization, device)
        if bnb is None:
            raise ConfigError("kernels='bitsandbytes' needs quantization '8bit' or '4bit'")
        load_kwargs["quantization_config"] = bnb
    elif kernels != "torch":
        raise ConfigError(f"kernels must be 'torch' or 'bitsandbytes', not {kernels!r}")
    if device == "cuda" and importlib.util.find_spec("accelerate"):
        load_kwargs["device_map"] = {"": torch.cuda.current_device()}
    weight_mode = QUANTIZATION_MODES[settings.quantization] if kernels == "torch" else None
    # safetensors shards stream straight onto the device, layer by layer (load.py); .bin checkpoints and
    # bitsandbytes layers go through a transformers model first.
    streamed = kernels == "torch" and bool(safetensors_files(path))
    try:
        if streamed:
            # The weights do not need the tokenizer, whose imports take seconds (about 5 s on the H200 image, where
            # transformers' Auto classes pull in torch.distributed, sympy and sklearn): it loads beside them.
            # An earlier start's snapshot of the configs spares transformers' imports (load.load_configs).
            config, generation_config, config_note = load_configs(path, cache_dir or default_cache_dir())
            phase("configs")
            prepare_imports(device, transformers=config_note.startswith("transformers"))
            phase("imports")
            with ThreadPoolExecutor(1, thread_name_prefix="localgpt-tokenizer") as pool:
                tokenizer_job = pool.submit(_tokenizer, path, cache_dir or default_cache_dir())
                network, config, generation_config, n_params, quant_note = load_checkpoint(
                    path, device, dtype, weight_mode, source=_fingerprint(path), cache_dir=cache_dir or default_cache_dir(),
                    configs=(config, generation_config))
                phase("weights")
                tokenizer, tokenizer_note = tokenizer_job.result()
                phase("tokenizer")
        else:
            from transformers import AutoModelForCausalLM

            config_note = "transformers"
            tokenizer, tokenizer_note = _tokenizer(path, cache_dir or default_cache_dir())
            hf = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    except OSError as exc:
        raise ModelNotFound(f"{missing_model_advice(name)} ({_first_line(exc)})") from exc
    except ValueError as exc:
        raise ConfigError(f"transformers cannot load {name}: {_first_line(exc)}") from exc
    if not streamed:
        if "device_map" not in load_kwargs:
            hf = hf.to(device)
        hf.eval()
        config, generation_config = hf.config, hf.generation_config
        n_params = int(hf.num_parameters())
        with torch.inference_mode():
            network = build_network(hf)
        del hf
        gc.collect()
        quant_note = "none"
        if weight_mode:
            with torch.inference_mode():
                quant_note = quantize_network(network, weight_mode, source=_fingerprint(path),
                                              cache_dir=cache_dir or default_cache_dir())
    decode_note = "torch"
    if device == "cuda" and kernels == "torch" and getattr(network, "kind", "") in ("transformer", "mamba"):
        # One token through the Triton bf16 GEMV (checked on the first layer; cuBLAS/inductor if that fails): on an
        # H200, Llama-2-7B 0.65 -> 0.88 of the bandwidth limit with the dependent launches, Falcon-7B 0.76 -> 0.85,
        # FalconMamba-7B 0.75 -> 0.79 (bench/RESULTS.md, round 23).
        from localgpt.generation.fast.quantize import decode_kernels, use_bf16_gemv

        with torch.inference_mode():
            n_gemv = use_bf16_gemv(network)
        decode_note = ", ".join(filter(None, [decode_kernels(network), f"bf16 Triton GEMV x{n_gemv}" if n_gemv else ""]))
    if device == "cuda":
        torch.cuda.empty_cache()
    phase("decode kernels checked")

    family_name = settings.family or detect_family(path) or FALLBACK_FAMILY
    family = FAMILIES.get(family_name)
    if family is None:
        raise ConfigError(f"unknown model family {family_name!r}; choose one of: {', '.join(FAMILIES)}")
    context_window = int(settings.context_window or getattr(config, "max_position_embeddings", None)
                         or family.context_window)
    engine_mode = mode or default_engine_mode(network, device, kernels)
    engine = Engine(network, mode=engine_mode, max_seq=max_seq or context_window)
    warm_s = 0.0
    if warm_up if warm_up is not None else device == "cuda":
        warm_s = engine.warm_up(sampled=settings.temperature > 0)
    phase("warm-up")
    load_s = time.perf_counter() - started

    generator = FastGenerator(
        engine, tokenizer, generation_config=generation_config, family=family, device=device,
        context_window=min(context_window, engine.max_seq), name=path.name, load_s=load_s,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p)
    generator.params_at_load = n_params
    generator.stats.extra.update(dtype=str(dtype).removeprefix("torch."), quantization=settings.quantization,
                                 kernels=kernels, engine_mode=engine.mode, weights=quant_note, decode=decode_note,
                                 warm_up_s=round(warm_s, 2), max_seq=engine.max_seq, tokenizer=tokenizer_note,
                                 configs=config_note, load_phases=phases)
    return generator
