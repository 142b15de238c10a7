"""Weight-only int8 and int4 for batch-1 decode, as module swaps (gpt-fast's recipe).

int8: one scale per output channel; the compiled decode step fuses the dequantisation into the
matrix-vector product, so each weight byte is read once. int4: asymmetric groups along the input
dimension, run by PyTorch's tinygemm kernel (``_weight_int4pack_mm``) for decode on CUDA; a prompt
(more than ``PROMPT_ROWS`` rows) instead has each layer dequantised to bf16 by a Triton kernel into a
short-lived buffer and multiplied by cuBLAS (tinygemm is a small-M kernel); elsewhere a plain
dequantise-and-multiply. Quantised tensors are saved in a device-neutral layout
(``save_quantized`` / ``load_quantized``) so the second load skips the work. Never downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.generation.fast.transformer import Linear

# Rows (prompt tokens) above which an int4 layer is dequantised for cuBLAS instead of run by tinygemm: on an
# H100, Llama-2-7B's gate/up layer costs the same both ways at about 30 rows (tinygemm grows ~6.5 us a row,
# dequantise + cuBLAS stays ~0.19 ms up to 128 rows).
PROMPT_ROWS = 32


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
        # The Triton kernel that dequantises this layer for prompts ("tile" / "gather"), set by quantize_model
        # once checked on this GPU; None: prompts also run on tinygemm.
        self.prompt_kernel: str | None = None
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
        nibbles = self.nibbles if self.nibbles is not None else unpack_int4_reference(self.packed, self.out_features)
        return dequantize_int4(nibbles, self.scales_and_zeros, self.groupsize)

    def dequantize_packed(self, kernel: str | None = None) -> torch.Tensor:
        """The bf16 weight [out, in] from tinygemm's packed tensor, by a Triton kernel (CUDA only)."""
        from localgpt.generation.fast.int4_triton import dequantize_int4pack

        out = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return dequantize_int4pack(self.packed, self.scales_and_zeros, self.groupsize, out,
                                   kernel=kernel or self.prompt_kernel or "tile")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            lead = x.shape[:-1]
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if self.prompt_kernel and rows.shape[0] > PROMPT_ROWS:
                # A prompt: this layer's bf16 weight lives only until the matmul is queued; the caching
                # allocator hands the same block to the next layer, so at most one layer is ever in bf16.
                out = F.linear(rows, self.dequantize_packed())
            else:
                out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.groupsize, self.scales_and_zeros)
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


def dequantize_int4(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int) -> torch.Tensor:
    """fp32 weight [out, in] from nibbles [out, in/2] (high nibble first) and (scale, zero) [in/group, out, 2]."""
    out_f = nibbles.shape[0]
    q = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(out_f, -1).float()
    scales, zeros = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups]
    q = q.reshape(out_f, -1, groupsize)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(out_f, -1)


# tinygemm's packed int4 layout (aten's matrix_to_m16n8k16_Bint4_layout, CUDA): an int32 tensor
# [N/8, K/(tiles*16), 32, tiles/2]. Word [nt, kt, lane, i] holds rows n = nt*8 + lane//4 and the 32
# columns from k0 = (kt*tiles + 2i)*16: with q = lane % 4, bits 4j..4j+3 hold column k0 + 2q + c_j and
# bits 16+4j.. hold k0 + 2q + c_j + 1, for c = (0, 8, 16, 24). Written out as axes of one permute:
# word axes [nt, kt, nr, q, i] and bit slot [odd, half, hi8] ->  n = (nt, nr), k = (kt, i, half, hi8, q, odd).


def pack_int4_reference(nibbles: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """What ``torch.ops.aten._convert_weight_to_int4pack`` writes on CUDA, in plain PyTorch (any device)."""
    n, half_k = nibbles.shape
    k, tiles = half_k * 2, inner_k_tiles
    q = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(n, k).to(torch.int32)
    q = q.reshape(n // 8, 8, k // (tiles * 16), tiles // 2, 2, 2, 4, 2)  # nt nr kt i half hi8 q odd
    q = q.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // 8, k // (tiles * 16), 32, tiles // 2, 8)
    shifts = torch.arange(8, dtype=torch.int32, device=nibbles.device) * 4
    return _sum_bits(q << shifts)


def _sum_bits(parts: torch.Tensor) -> torch.Tensor:
    # Disjoint bit fields: OR them (int64 sum, then wrap to int32 as the kernel's two's complement does).
    total = parts.to(torch.int64).sum(-1)
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def unpack_int4_reference(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The nibbles [out, in/2] (high nibble first) behind a tinygemm-packed tensor, in plain PyTorch."""
    nt, kt, _, pairs = packed.shape
    tiles = pairs * 2
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 4
    q = (packed[..., None] >> shifts) & 15  # [nt, kt, 32, tiles/2, slot]
    q = q.reshape(nt, kt, 8, 4, tiles // 2, 2, 2, 2)  # nt kt nr q i odd half hi8
    q = q.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(nt * 8, kt * tiles * 16)[:out_features].to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def check_prompt_kernel(layer: "Int4Linear", nibbles: torch.Tensor) -> str | None:
    """The first Triton kernel that turns ``layer.packed`` into exactly the weight its nibbles mean, here.

    Guards against a torch whose packing differs from the layout above, or a Triton that cannot build a
    kernel: then None, and prompts stay on tinygemm (slow, but right).
    """
    want = dequantize_int4(nibbles.to(layer.packed.device), layer.scales_and_zeros, layer.groupsize)
    for kernel in ("tile", "gather"):
        try:
            got = layer.dequantize_packed(kernel)
        except Exception:  # noqa: BLE001 - no Triton, or this kernel does not compile here
            continue
        # Equal up to bf16 rounding (the kernel may fuse multiply and add); a misread nibble is off by a whole step.
        if bool(((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all()):
            return kernel
    return None


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
    prompt_kernel: str | None | bool = False  # checked on the first int4 layer on CUDA
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
        new = kinds[mode].from_state(state, device)
        setattr(parent, attr, new)
        if mode == "int4" and new.packed is not None:
            if prompt_kernel is False:
                prompt_kernel = check_prompt_kernel(new, state["nibbles"])
            new.prompt_kernel = prompt_kernel
        del layer, state, new
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
