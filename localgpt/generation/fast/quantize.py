"""Weight-only int8 and int4 for batch-1 decode, as module swaps (gpt-fast's recipe).

int8: one scale per output channel; the compiled decode step fuses the dequantisation into the
matrix-vector product, so each weight byte is read once. int4: asymmetric groups along the input
dimension, run by PyTorch's tinygemm kernel (``_weight_int4pack_mm``) on CUDA and by a plain
dequantise-and-multiply elsewhere. Quantised tensors are saved in a device-neutral layout
(``save_quantized`` / ``load_quantized``) so the second load skips the work. Never downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.generation.fast.transformer import Linear


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [out, in]
        self.register_buffer("scales", scales)  # [out], activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(cls, layer: Linear) -> "Int8Linear":
        w = layer.weight.data.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(q, scales.to(layer.weight.dtype), None if layer.bias is None else layer.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            # One token: written as multiply-and-sum so the compiler emits one reduction kernel that
            # reads each int8 weight once (an mm on the converted weight would materialise it in bf16).
            out = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(dim=-1, dtype=torch.float32).to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype))
        out = out * self.scales
        return out if self.bias is None else out + self.bias

    def state(self) -> dict:
        return {"weight": self.weight, "scales": self.scales, "bias": self.bias}

    @classmethod
    def from_state(cls, state: dict, device) -> "Int8Linear":
        bias = state["bias"]
        return cls(state["weight"].to(device), state["scales"].to(device), None if bias is None else bias.to(device))


def int4_layout(in_features: int, out_features: int, groupsize: int = 128) -> tuple[int, int] | None:
    """(groupsize, inner_k_tiles) that tinygemm accepts for this shape, or None (the layer stays as it is)."""
    if out_features % 8:
        return None
    for g in (groupsize, 64, 32):
        if g <= groupsize and in_features % g == 0:
            for tiles in (8, 4, 2):
                if in_features % (tiles * 16) == 0:
                    return g, tiles
    return None


class Int4Linear(nn.Module):
    """Asymmetric int4 per group: w = (q - 8) * scale + zero, with (scale, zero) per group and channel."""

    def __init__(self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 groupsize: int, inner_k_tiles: int):
        super().__init__()
        self.out_features, half = nibbles.shape
        self.in_features = half * 2
        self.groupsize, self.inner_k_tiles = groupsize, inner_k_tiles
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in/group, out, 2], bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if nibbles.is_cuda:
            # tinygemm's tiled layout; built from the portable [out, in/2] uint8 on the device it runs on.
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles))
            self.nibbles = None
        else:
            self.register_buffer("nibbles", nibbles)  # [out, in/2] uint8, high nibble first
            self.packed = None

    @classmethod
    def quantize(cls, layer: Linear, groupsize: int, inner_k_tiles: int) -> "Int4Linear":
        return cls.from_state(int4_state(layer, groupsize, inner_k_tiles), layer.weight.device)

    def dequantize(self) -> torch.Tensor:
        q = torch.stack([self.nibbles >> 4, self.nibbles & 15], dim=-1).reshape(self.out_features, -1).float()
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups]
        q = q.reshape(self.out_features, -1, self.groupsize)
        return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            lead = x.shape[:-1]
            out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed,
                                                     self.groupsize, self.scales_and_zeros)
            out = out.reshape(*lead, self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.dequantize().to(x.dtype))
        return out if self.bias is None else out + self.bias

    @classmethod
    def from_state(cls, state: dict, device) -> "Int4Linear":
        bias = state["bias"]
        return cls(state["nibbles"].to(device), state["scales_and_zeros"].to(device),
                   None if bias is None else bias.to(device), state["groupsize"], state["inner_k_tiles"])


def int4_state(layer: Linear, groupsize: int, inner_k_tiles: int) -> dict:
    """The portable int4 form of ``layer`` (computed where its weight lives)."""
    w = layer.weight.data.float()
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // groupsize, groupsize)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = ((g - lo) / scales).round().clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    nibbles = (q[:, ::2] << 4) | q[:, 1::2]
    # tinygemm wants bf16 (scale, zero) pairs laid out [in/group, out, 2].
    sz = torch.cat([scales, zeros], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()
    bias = None if layer.bias is None else layer.bias.data
    return {"nibbles": nibbles, "scales_and_zeros": sz, "bias": bias, "groupsize": groupsize,
            "inner_k_tiles": inner_k_tiles}


def _linears(model: nn.Module):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, Linear):
                yield module, child_name, f"{name}.{child_name}".lstrip(".")


def _host(state: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def quantize_model(model: nn.Module, mode: str, *, groupsize: int = 128, saved: dict | None = None,
                   keep: bool = False) -> dict:
    """Swap every ``Linear`` of ``model`` for its ``mode`` ("int8" or "int4") version, in place.

    ``saved``: layer states from ``load_quantized`` (no quantising then). Returns the device-neutral
    layer states when ``keep`` (for ``save_quantized``), else {}. Layers whose shape the int4 kernel
    cannot take stay as they are.
    """
    kinds = {"int8": Int8Linear, "int4": Int4Linear}
    if mode not in kinds:
        raise ValueError(f"unknown weight-only mode {mode!r}")
    states: dict = {}
    for parent, attr, name in list(_linears(model)):
        layer = getattr(parent, attr)
        device = layer.weight.device
        if saved is not None:
            if name not in saved:
                continue
            state = saved[name]
        elif mode == "int8":
            state = Int8Linear.quantize(layer).state()
        else:
            layout = int4_layout(layer.weight.shape[1], layer.weight.shape[0], groupsize)
            if layout is None:
                continue
            state = int4_state(layer, *layout)
        if keep:
            states[name] = _host(state)
        setattr(parent, attr, kinds[mode].from_state(state, device))
        del layer, state
    return states


def save_quantized(states: dict, path: Path, *, mode: str, source: str) -> None:
    """Write layer states atomically (a crash leaves no half file that a later load would trust)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": 1, "mode": mode, "source": source, "layers": states}, tmp)
    tmp.replace(path)


def load_quantized(path: Path, *, mode: str, source: str) -> dict | None:
    """Layer states saved for exactly this checkpoint and mode, or None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        return None
    if blob.get("format") != 1 or blob.get("mode") != mode or blob.get("source") != source:
        return None
    return blob["layers"]
