"""Generation with Hugging Face transformers: CUDA bf16, bitsandbytes NF4/int8, Apple MPS, CPU.

Models come from a local folder or the user's HF cache only (``local_files_only=True``); a missing
model is a ``ModelNotFound`` that says how to provide one, never a download. Tokens stream from a
background ``generate`` thread; closing the stream (the consumer stops iterating, Ctrl-C in the chat)
sets a flag that a StoppingCriteria reads, so the thread ends after the current step.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from localgpt.errors import ConfigError, LocalGPTError, ModelNotFound
from localgpt.generation.base import GenerationStats, StreamTimer, reply_yes_share
from localgpt.models import FAMILIES, ModelFamily, detect_family, format_prompt, locate_model, missing_model_advice

FALLBACK_FAMILY = "llama2"  # the classic localGPT default, used when a model says nothing about itself


def pick_device(requested: str = "auto") -> str:
    """``auto`` means cuda, then mps, then cpu; an explicit choice that this machine lacks is an error."""
    import torch

    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if requested == "cuda" and not has_cuda:
        raise ConfigError("device='cuda' but torch sees no CUDA GPU here; use device='auto' or 'cpu'")
    if requested == "mps" and not has_mps:
        raise ConfigError("device='mps' but this torch has no Apple MPS support here; use device='auto' or 'cpu'")
    return requested


def _dtype_for(device: str):
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def _quantization_config(quantization: str, device: str):
    """BitsAndBytesConfig for '4bit' (NF4, double quant, bf16 compute) or '8bit'; None for 'none'."""
    if quantization == "none":
        return None
    if device != "cuda":
        raise ConfigError(f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes); this run is on {device}. "
                          "Set quantization='none', or use a GGUF model on CPU")
    try:
        import bitsandbytes  # noqa: F401 - imported only to fail early with a clear message
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"quantization={quantization!r} needs bitsandbytes and accelerate ({exc.name} is missing): "
                          "pip install 'localgpt[gpu]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantization must be none, 8bit or 4bit, not {quantization!r}")


class StopScanner:
    """Cuts a text stream at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buffer)), keep, -1):
                if self.buffer.endswith(stop[:k]):
                    keep = k
                    break
        cut = len(self.buffer) - keep
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _streamer_class():
    from transformers import StoppingCriteria, TextIteratorStreamer

    class TimedStreamer(TextIteratorStreamer):
        """TextIteratorStreamer that tells a StreamTimer about every generated token as it is made."""

        def __init__(self, tokenizer, timer: StreamTimer, **kwargs):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
            self.timer = timer

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.timer.token(int(value.numel()))
            super().put(value)

        def fail(self):
            # generate() raised: wake the consumer instead of leaving it waiting on the queue.
            self.text_queue.put(self.stop_signal)

    class StopWhenSet(StoppingCriteria):
        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    return TimedStreamer, StopWhenSet


class TransformersGenerator:
    """A loaded transformers model and its tokenizer behind the ``Generator`` interface."""

    def __init__(self, model: Any, tokenizer: Any, *, family: ModelFamily, device: str, context_window: int,
                 name: str, load_s: float = 0.0, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 0.95, backend: str = "transformers"):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.device = device
        self.context_window = context_window
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stats = GenerationStats(backend=backend, model=name, device=device, load_s=load_s)
        self.stats.extra["family"] = family.name
        # Family stop strings that are single special tokens (<|im_end|>) also end generation as tokens.
        self._stop_token_ids = sorted({
            tid for s in family.stop
            if (tid := tokenizer.convert_tokens_to_ids(s)) is not None and tid != tokenizer.unk_token_id
        })

    # --- the Generator interface ---------------------------------------------------------

    def format(self, messages: Sequence[dict]) -> str:
        return format_prompt(messages, self.family, self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def n_params(self) -> int | None:
        try:
            return int(self.model.num_parameters())
        except Exception:  # noqa: BLE001 - a wrapped or stand-in model: size unknown
            return None

    def yes_probability(self, prompt: str | Sequence[dict]) -> float | None:
        """P(the reply starts with yes) / P(yes or no), from one forward pass over the prompt."""
        import torch

        text = prompt if isinstance(prompt, str) else self.format(prompt)
        input_ids = self._encode(text, 1)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, -1]
        return reply_yes_share(logits.float().cpu().numpy(), self._word_ids)

    def stream(self, prompt: str | Sequence[dict], *, max_new_tokens: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        import torch

        text = prompt if isinstance(prompt, str) else self.format(prompt)
        stops = list(self.family.stop if stop is None else stop)
        max_new = max_new_tokens or self.max_new_tokens
        input_ids = self._encode(text, max_new)

        timer = StreamTimer(self.stats, prompt_tokens=int(input_ids.shape[1]))
        TimedStreamer, StopWhenSet = _streamer_class()
        streamer = TimedStreamer(self.tokenizer, timer)
        halt = threading.Event()
        failure: list[BaseException] = []
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new,
            streamer=streamer,
            stopping_criteria=[StopWhenSet(halt)],
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
            **self._sampling(),
        )
        eos = self._eos_ids()
        if eos:
            kwargs["eos_token_id"] = eos

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread below
                failure.append(exc)
                streamer.fail()

        worker = threading.Thread(target=run, name="localgpt-generate", daemon=True)
        scanner = StopScanner(stops)
        worker.start()
        try:
            for piece in streamer:
                out, reached = scanner.feed(piece)
                if out:
                    yield out
                if reached:
                    break
            else:
                if failure:
                    raise LocalGPTError(f"generation failed in {self.name}: {failure[0]}") from failure[0]
                tail = scanner.flush()
                if tail:
                    yield tail
        finally:
            halt.set()  # the consumer stopped (answer done, stop string, or the generator was closed)
            worker.join()
            timer.finish()
            if self.device == "cuda":
                self.stats.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20

    # --- helpers ---------------------------------------------------------------------------

    def _word_ids(self, word: str) -> list[int]:
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]

    def _encode(self, text: str, max_new: int):
        bos = self.tokenizer.bos_token
        # A prompt that already starts with BOS text (Llama-2's "<s>[INST]", templates with bos_token)
        # must not get a second one.
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
        budget = max(1, self.context_window - max_new)
        if ids.shape[1] > budget:
            # Keep the end (the question and the generation prompt); the chain packs context to the
            # budget, so this only bites on raw prompts that are too long.
            self.stats.extra["truncated_prompt_tokens"] = int(ids.shape[1] - budget)
            ids = ids[:, -budget:]
        return ids.to(self._input_device())

    def _input_device(self):
        try:
            return self.model.get_input_embeddings().weight.device
        except Exception:  # noqa: BLE001
            return self.model.device

    def _sampling(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        return sorted(set(ids) | set(self._stop_token_ids))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_complete(path: Path, name: str) -> None:
    """A folder with config.json but no weights or no tokenizer is a half-copied model: say so plainly."""
    missing = []
    if not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        missing.append("weights (*.safetensors)")
    if not any((path / f).is_file() for f in _TOKENIZER):
        missing.append("tokenizer files (tokenizer.json)")
    if missing:
        raise ModelNotFound(f"model folder {path} has config.json but no {' and no '.join(missing)}: "
                            f"copy the whole folder; {missing_model_advice(name)}")


def load_transformers_generator(settings: Any, *, model_path: str | Path | None = None, gguf_file: str | None = None,
                                dtype: Any = None) -> TransformersGenerator:
    """Load ``settings.model`` (or ``model_path``) with transformers, strictly from local files.

    ``gguf_file``: a file name inside the folder, loaded through transformers' GGUF reader
    (dequantised to ``dtype``, fp32 by default on CPU). ``dtype`` overrides the device default
    (cuda bf16, mps fp16, cpu fp32), for example ``torch.bfloat16`` on a CPU with AVX512-BF16.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(model_path or settings.model or "")
    if not name:
        raise ConfigError("the transformers backend needs a model: set model to a folder that holds config.json")
    path = locate_model(name)
    if path.is_file():  # a .gguf file given directly
        path, gguf_file = path.parent, path.name
    if not gguf_file:
        _check_complete(path, name)
    device = pick_device(settings.device)
    quantization = _quantization_config(settings.quantization, device)
    torch_dtype = dtype or _dtype_for(device)

    started = time.perf_counter()
    common: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype, **common}
        if quantization is not None:
            load_kwargs["quantization_config"] = quantization
        if device == "cuda" and importlib.util.find_spec("accelerate"):
            # Straight to the GPU: a 7B model never has to fit in host RAM first.
            load_kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    except OSError as exc:  # no weights, no tokenizer files, unreadable folder
        raise ModelNotFound(f"{missing_model_advice(name)} ({_first_line(exc)})") from exc
    except ValueError as exc:  # a model_type this transformers cannot build
        raise ConfigError(f"transformers cannot load {name}: {_first_line(exc)}") from exc
    if "device_map" not in load_kwargs:
        model = model.to(device)
    model.eval()
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started

    family_name = settings.family or detect_family(path / gguf_file if gguf_file else path) or FALLBACK_FAMILY
    family = FAMILIES.get(family_name)
    if family is None:
        raise ConfigError(f"unknown model family {family_name!r}; choose one of: {', '.join(FAMILIES)}")
    context_window = (settings.context_window
                      or getattr(model.config, "max_position_embeddings", None)
                      or family.context_window)
    label = f"{path.name}/{gguf_file}" if gguf_file else path.name
    generator = TransformersGenerator(
        model, tokenizer, family=family, device=device, context_window=int(context_window), name=label,
        load_s=load_s, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        backend="transformers-gguf" if gguf_file else "transformers",
    )
    generator.stats.extra.update(dtype=str(torch_dtype).removeprefix("torch."), quantization=settings.quantization)
    return generator
