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

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.generation.fast.transformer import Linear

# Rows (prompt tokens) above which an int4 layer is dequantised for cuBLAS instead of run by tinygemm: on an
# H100, Llama-2-7B's gate/up layer costs the same both ways at about 30 rows (tinygemm grows ~6.5 us a row,
# dequantise + cuBLAS stays ~0.19 ms up to 128 rows).
PROMPT_ROWS = 32

# One-token kernels by mode for quantize_model(decode="auto"). int8: the Triton GEMV (gemv_triton.X2; 2282 us of
# GEMV a Llama-2-7B step against 2698 for the FMA kernel, H200). int4, round 8 (2026-12-01, H200): the CUDA
# tensor-core GEMV (gemv_cuda) 1507-1604 us a step against tinygemm's 2105 and the Triton X2 kernel's 2061;
# the engine 434 tok/s against tinygemm's 378 (CUDA graph), Falcon-7B 304 vs 280, FalconMamba-7B 303 vs 266;
# round 9, with the norms in the GEMVs' prologues (``prologue_gemv``): 464 tok/s. int8 "cuda" (one token on
# gemv_cuda too, prologues included) ran 304-310 tok/s against Triton X2's 358 with the scales in it.
DECODE_DEFAULT = {"int4": "cuda", "int8": "triton"}
# int8 inputs padded to whole 128-column blocks on CUDA (quantize_model; LOCALGPT_INT8_PAD=0 keeps them as they
# are): Falcon-7B's 4,544-column layers get 32 planes as its 18,176-column w_out (the widest GEMV blocks, and one
# weight format for gemv_chain). Its int8 step on the H200: 214.1 -> 251.7 tok/s, 351.3 with its layers chained
# (0.36 -> 0.59, round 15)
INT8_PAD = os.environ.get("LOCALGPT_INT8_PAD", "1") != "0"

# Tokens up to which a planar layer multiplies through the CUDA tensor-core GEMV (``gemv_cuda``, 16 tokens a
# launch: a batch of decoding streams) instead of being written out in bf16 for cuBLAS.
CUDA_ROWS = 16

def cuda_gemv_fits(planes: int | None, out_features: int, in_features: int, device=None) -> bool:
    """Whether a planar layer of this shape can run on ``gemv_cuda`` here (16-word blocks, 16-row tiles)."""
    if not planes or planes % 16 or out_features % 16 or in_features % 128:
        return False
    from localgpt.generation.fast import gemv_cuda

    return gemv_cuda.available(device if device is not None else torch.cuda.current_device())


# Whether ``prologue_gemv`` folds the norms and silu·up into the GEMVs (LOCALGPT_GEMV_PROLOGUE=0: separate kernels).
PROLOGUE = os.environ.get("LOCALGPT_GEMV_PROLOGUE", "1") != "0"


def prologue_gemv(layer: nn.Module, x: torch.Tensor, xmode: str, y: torch.Tensor | None = None,
                  norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token through ``layer`` with the kernels before it folded into its GEMV's prologue (``gemv_cuda``):
    xmode "swiglu": ``layer(silu(gate) * up)`` for x = [gate | up]; "rms": ``layer(norm(x + y))`` (y may be None),
    and x + y, the next residual. Returns (out [1, N], x + y or x or None). A layer without the CUDA GEMV (or with
    a bias) runs the same arithmetic as separate kernels (``slot_triton``)."""
    if PROLOGUE and getattr(layer, "prologue_ok", False) and x.is_contiguous() and x.data_ptr() % 16 == 0 and (
            y is None or (y.is_contiguous() and y.data_ptr() % 16 == 0)):
        from localgpt.generation.fast import gemv_cuda

        bits = 4 if isinstance(layer, Int4Linear) else 8
        x = x.reshape(1, -1)
        total = torch.empty_like(x) if xmode == "rms" and y is not None else None
        out = torch.empty(1, layer.out_features, dtype=torch.bfloat16, device=x.device)
        cfg = layer.gemv_config if bits == 4 else layer.cuda_config
        ws, lock = (layer.gemv_ws, layer.gemv_lock) if bits == 4 else (layer.cuda_ws, layer.cuda_lock)
        gemv_cuda.gemv(bits, x, layer.words, layer.pairs() if bits == 4 else None, out, ws, lock, layer.planes,
                       cfg, xmode=gemv_cuda.XMODES[xmode], y=None if y is None else y.reshape(1, -1),
                       norm=None if norm is None else norm.weight, eps=0.0 if norm is None else float(norm.eps),
                       xsum=total, scales=None if bits == 4 else layer.scales)
        return out, (total if total is not None else x if xmode == "rms" else None)
    from localgpt.generation.fast import slot_triton

    if xmode == "swiglu":
        return layer(slot_triton.silu_mul(x)), None
    if y is None:
        return layer(slot_triton.rms_norm(x, norm.weight, norm.eps)), x
    total, h = slot_triton.add_rms_norm(x, y, norm.weight, norm.eps)
    return layer(h), total


def _prologue_fits(words: torch.Tensor, in_features: int, bias) -> bool:
    # The prologue reads rows of 8 bf16 at a time (16-byte aligned: in_features % 8 == 0), no bias.
    return bias is None and in_features % 8 == 0 and words.is_cuda


def _pad_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as wide as a padded layer's weight (``x_features`` real columns, zero columns up to ``in_features``):
    zeros for the padding, so its weights multiply nothing; an input already that wide as it is."""
    if x.shape[-1] == layer.x_features != layer.in_features:
        return F.pad(x, (0, layer.in_features - layer.x_features))
    return x


class Int8Linear(nn.Module):
    """Per-channel int8. ``layout``: "plain" (int8 [out, in]; one token runs as the compiler's generated
    reduction), "planar" (CUDA: int32 words for the Triton GEMV, ``gemv_triton``; 2-16 tokens on the CUDA
    tensor-core GEMV, ``gemv_cuda``; prompts multiply the same bytes viewed as int8, with x's columns put in
    their order) or "cuda" (planar words, one token on ``gemv_cuda`` too, the row scales applied in it)."""

    cuda_rows = 0  # tokens up to which a call runs on gemv_cuda (from 2, or from 1 in the "cuda" layout)

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, layout: str = "plain",
                 x_features: int | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # the input's width: fewer where the weight was padded with zero columns (``quantize``'s pad_to); forward
        # pads x to in_features with zeros
        self.x_features = x_features or self.in_features
        self.register_buffer("scales", scales)  # [out], activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.planes = int8_planes(self.in_features) if layout in ("planar", "cuda") else None
        self.layout = "planar" if self.planes and weight.is_cuda else "plain"
        if self.layout == "planar":
            from localgpt.generation.fast.gemv_triton import scratch

            self.register_buffer("weight", None)
            self.register_buffer("words", pack_int8_planar(weight, self.planes))  # int32 [out, in/4]
            self.gemv_config, ws, lock = scratch("int8", self.out_features, self.in_features, weight.device)
            self.register_buffer("gemv_ws", ws, persistent=False)
            self.register_buffer("gemv_lock", lock, persistent=False)
            # A few tokens at once (decoding streams of a batch): the CUDA tensor-core GEMV on the same words.
            self.cuda_config = None
            if cuda_gemv_fits(self.planes, self.out_features, self.in_features, weight.device):
                from localgpt.generation.fast import gemv_cuda

                cfg = gemv_cuda.config("int8", self.out_features, self.in_features,
                                       *gemv_cuda.device_traits(weight.device))
                self.cuda_config = cfg[:7] + (False,)  # the Triton kernel reads the words: not tiled
                ws, lock = gemv_cuda.scratch(self.out_features, self.cuda_config, weight.device)
                self.register_buffer("cuda_ws", ws, persistent=False)
                self.register_buffer("cuda_lock", lock, persistent=False)
                self.cuda_rows = CUDA_ROWS
                if layout == "cuda":
                    self.layout = "cuda"
        else:
            self.register_buffer("weight", weight)  # int8 [out, in]
            self.register_buffer("words", None)

    @classmethod
    def quantize(cls, layer: Linear, pad_to: int = 0) -> "Int8Linear":
        """Per-channel int8 of ``layer``; ``pad_to``: the weight's input dimension padded with zero columns to this
        many (whole 32-word planes: Falcon-7B's 4,544 to 4,608), the layer padding its input the same way."""
        w = layer.weight.data.float()
        x_features = w.shape[1]
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        if pad_to > x_features:
            q = F.pad(q, (0, pad_to - x_features))
        return cls(q, scales.to(layer.weight.dtype), None if layer.bias is None else layer.bias.data,
                   x_features=x_features)

    def int8_weight(self) -> torch.Tensor:
        if self.words is None:
            return self.weight
        cols = int8_planar_columns(self.in_features, self.planes, self.words.device)
        out = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=self.words.device)
        out[:, cols] = self.words.view(torch.int8)
        return out

    prologues = True  # False when quantize_model's check of the prologues failed on this GPU

    @property
    def prologue_ok(self) -> bool:
        """Whether one token can take ``prologue_gemv``'s fused prologue (the "cuda" layout)."""
        return (self.prologues and self.layout == "cuda" and self.cuda_rows >= 1
                and self.x_features == self.in_features and _prologue_fits(self.words, self.in_features, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_input(self, x)
        rows = x.numel() // self.in_features
        if self.words is not None:
            if (2 if self.layout == "planar" else 1) <= rows <= self.cuda_rows and self.cuda_config is not None:
                from localgpt.generation.fast.gemv_cuda import call

                out = call(8, x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous(), self.words, None,
                           self.cuda_ws, self.cuda_lock, self.planes, self.cuda_config, scales=self.scales)
                out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
                return out if self.bias is None else out + self.bias
            elif rows == 1:  # the Triton GEMV, the row scales in it
                bn, split, warps, dot = self.gemv_config
                from localgpt.generation.fast.gemv_triton import int8_gemv_call

                out = int8_gemv_call(x.reshape(-1).to(torch.bfloat16).contiguous(), self.words,
                                     self.gemv_ws, self.gemv_lock, self.planes, bn, split, warps, dot,
                                     scales=self.scales)
                out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
                return out if self.bias is None else out + self.bias
            else:
                cols = int8_planar_columns(self.in_features, self.planes, x.device)
                out = F.linear(x[..., cols], self.words.view(torch.int8).to(x.dtype))
        elif x.numel() == x.shape[-1]:
            # One token: written as multiply-and-sum so the compiler emits one reduction kernel that
            # reads each int8 weight once (an mm on the converted weight would materialise it in bf16).
            out = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(dim=-1, dtype=torch.float32).to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype))
        out = out * self.scales
        return out if self.bias is None else out + self.bias

    def state(self) -> dict:
        state = {"weight": self.int8_weight(), "scales": self.scales, "bias": self.bias}
        if self.x_features != self.in_features:
            state["x_features"] = self.x_features
        return state

    @classmethod
    def from_state(cls, state: dict, device, layout: str = "plain") -> "Int8Linear":
        bias = state["bias"]
        return cls(state["weight"].to(device), state["scales"].to(device), None if bias is None else bias.to(device),
                   layout=layout, x_features=state.get("x_features"))


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
                 groupsize: int, inner_k_tiles: int, layout: str = "tinygemm", x_features: int | None = None):
        super().__init__()
        self.out_features, half = nibbles.shape
        self.in_features = half * 2  # the words' columns
        # the input's: fewer where the weight was padded with zero columns (``int4_state``'s pad_to); forward
        # pads x to in_features with zeros, so the padding's weights multiply nothing
        self.x_features = x_features or self.in_features
        self.groupsize, self.inner_k_tiles = groupsize, inner_k_tiles
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in/group, out, 2], bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # The Triton kernel that dequantises this layer for prompts ("planar", or "tile" / "gather" for tinygemm's
        # layout), set by quantize_model once checked on this GPU; None: prompts also run on tinygemm.
        self.prompt_kernel: str | None = None
        if layout == "cuda" and not (nibbles.is_cuda and cuda_gemv_fits(int4_planes(self.in_features, groupsize),
                                                                        self.out_features, self.in_features,
                                                                        nibbles.device)):
            layout = "tinygemm"  # a shape (or GPU) the CUDA GEMV does not take: what ran before
        self.planes = int4_planes(self.in_features, groupsize) if layout in ("planar", "cuda") else None
        self.register_buffer("packed", None)
        self.register_buffer("words", None)
        self.register_buffer("nibbles", None)
        self.tiled = False  # words in gemv_cuda.tile_words' order (the CUDA tensor-core GEMV)
        self.cuda_rows = 0  # tokens up to which one call runs on that GEMV (CUDA_ROWS; 1 if only one token passed)
        if nibbles.is_cuda and self.planes:
            # The planar layout of the decode GEMV kernels; prompts dequantise it for cuBLAS.
            self.layout = "planar"
            words = pack_int4_planar(nibbles.contiguous(), self.planes)
            if layout == "cuda":
                from localgpt.generation.fast import gemv_cuda

                self.layout = "cuda"
                self.tiled = True
                self.cuda_rows = CUDA_ROWS
                words = gemv_cuda.tile_words(words, self.planes)
                self.gemv_config = gemv_cuda.config("int4", self.out_features, self.in_features,
                                                    *gemv_cuda.device_traits(nibbles.device))
                ws, lock = gemv_cuda.scratch(self.out_features, self.gemv_config, nibbles.device)
            else:
                from localgpt.generation.fast.gemv_triton import scratch

                self.gemv_config, ws, lock = scratch("int4", self.out_features, self.in_features, nibbles.device)
            self.words = words
            self.register_buffer("gemv_ws", ws, persistent=False)
            self.register_buffer("gemv_lock", lock, persistent=False)
            self.prompt_kernel = "planar"
        elif nibbles.is_cuda:
            # tinygemm's tiled layout; built from the portable [out, in/2] uint8 on the device it runs on.
            self.layout = "tinygemm"
            self.packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)
        else:
            self.layout = "cpu"
            self.nibbles = nibbles  # [out, in/2] uint8, high nibble first

    @classmethod
    def quantize(cls, layer: Linear, groupsize: int, inner_k_tiles: int) -> "Int4Linear":
        return cls.from_state(int4_state(layer, groupsize, inner_k_tiles), layer.weight.device)

    def portable_nibbles(self) -> torch.Tensor:
        if self.nibbles is not None:
            return self.nibbles
        if self.words is not None:
            words = self.words
            if self.tiled:
                from localgpt.generation.fast.gemv_cuda import untile_words

                words = untile_words(words, self.planes)
            return unpack_int4_planar(words, self.planes)
        return unpack_int4_reference(self.packed, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.portable_nibbles(), self.scales_and_zeros, self.groupsize)

    def pairs(self) -> torch.Tensor:
        """(scale, zero) as one int32 per group and channel [in/group, out] (bf16 scale in the low half)."""
        return self.scales_and_zeros.view(torch.int32).reshape(-1, self.out_features)

    def dequantize_packed(self, kernel: str | None = None) -> torch.Tensor:
        """The bf16 weight [out, in] from tinygemm's packed tensor, by a Triton kernel (CUDA only)."""
        from localgpt.generation.fast.int4_triton import dequantize_int4pack

        kernel = kernel or self.prompt_kernel or "tile"
        device = (self.words if self.words is not None else self.packed).device
        out = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16, device=device)
        if kernel == "planar":
            from localgpt.generation.fast.gemv_triton import int4_planar_dequant

            return int4_planar_dequant(self.words, self.pairs(), self.groupsize, self.planes, out, tiled=self.tiled)
        return dequantize_int4pack(self.packed, self.scales_and_zeros, self.groupsize, out, kernel=kernel)

    prologues = True  # False when quantize_model's check of the prologues failed on this GPU

    @property
    def prologue_ok(self) -> bool:
        """Whether one token can take ``prologue_gemv``'s fused prologue (the "cuda" layout)."""
        return (self.prologues and self.words is not None and self.layout == "cuda" and self.cuda_rows >= 1
                and self.x_features == self.in_features and _prologue_fits(self.words, self.in_features, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_input(self, x)
        if self.words is not None:
            lead = x.shape[:-1]
            rows = x.numel() // self.in_features
            if rows <= self.cuda_rows:  # up to 16 tokens: the tensor-core GEMV, in one launch
                from localgpt.generation.fast.gemv_cuda import call

                out = call(4, x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous(), self.words,
                           self.pairs(), self.gemv_ws, self.gemv_lock, self.planes, self.gemv_config)
            elif rows == 1 and not self.tiled:  # one token: the Triton GEMV
                bn, split, warps, dot = self.gemv_config
                from localgpt.generation.fast.gemv_triton import int4_gemv_call

                out = int4_gemv_call(x.reshape(-1).to(torch.bfloat16).contiguous(), self.words,
                                     self.pairs(), self.gemv_ws, self.gemv_lock, self.groupsize,
                                     self.planes, bn, split, warps, dot)
            else:  # a prompt: this layer in bf16 for cuBLAS, for as long as the matmul needs it
                out = F.linear(x.reshape(-1, self.in_features).to(torch.bfloat16), self.dequantize_packed())
            out = out.reshape(*lead, self.out_features).to(x.dtype)
        elif self.packed is not None:
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
    def from_state(cls, state: dict, device, layout: str = "tinygemm") -> "Int4Linear":
        bias = state["bias"]
        return cls(state["nibbles"].to(device), state["scales_and_zeros"].to(device),
                   None if bias is None else bias.to(device), state["groupsize"], state["inner_k_tiles"], layout=layout,
                   x_features=state.get("x_features"))


def int4_state(layer: Linear, groupsize: int, inner_k_tiles: int, pad_to: int = 0) -> dict:
    """The portable int4 form of ``layer`` (computed where its weight lives). ``pad_to``: the weight's input
    dimension padded with zero columns to this many (the tensor-core GEMV's 128-column blocks: Falcon-7B's 4,544
    to 4,608); the layer then pads its input the same way (``Int4Linear.x_features``: the real width)."""
    w = layer.weight.data.float()
    x_features = w.shape[1]
    if pad_to > x_features:
        w = F.pad(w, (0, pad_to - x_features))
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
    state = {"nibbles": nibbles, "scales_and_zeros": sz, "bias": bias, "groupsize": groupsize,
             "inner_k_tiles": inner_k_tiles}
    if in_f != x_features:
        state["x_features"] = x_features
    return state


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


# The planar layouts the decode GEMV kernels read (gemv_triton.py): each row is cut into blocks of P int32
# words; in a block, bit field j of word i (fields of 4 bits for int4, 8 for int8, field 0 the lowest) holds
# column block * F * P + j * P + i (F = 8 or 4 fields a word). Field j of a whole block then multiplies the
# contiguous slice x[block * F * P + j * P : + P], and one 16-byte load brings 4 words of a row.


def int4_planes(in_features: int, groupsize: int) -> int | None:
    """Words a block (P) for a planar int4 layer, such that a block holds whole groups and a group whole
    planes; None if no P fits (the layer then stays on tinygemm). One group a block (P = group / 8) first: the
    layout the bf16x2 kernel (``gemv_triton.X2``) reads; the FMA kernels read any of them."""
    for planes in (groupsize // 8, 32, 16, 8, 4):
        if planes < 4:
            continue
        if in_features % (8 * planes) == 0 and groupsize % planes == 0 and (8 * planes) % groupsize == 0:
            return planes
    return None


def int8_planes(in_features: int) -> int | None:
    for planes in (32, 16, 8, 4, 2, 1):
        if in_features % (4 * planes) == 0:
            return planes
    return None


def pack_int4_planar(nibbles: torch.Tensor, planes: int) -> torch.Tensor:
    """Planar int32 [N, K/8] from nibbles [N, K/2] (high nibble first), in plain PyTorch (any device)."""
    n, half_k = nibbles.shape
    k = half_k * 2
    q = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(n, k).to(torch.int32)
    q = q.reshape(n, k // (8 * planes), 8, planes).transpose(-1, -2)  # n, block, word, field
    shifts = torch.arange(8, dtype=torch.int32, device=nibbles.device) * 4
    return _sum_bits(q << shifts).reshape(n, k // 8)


def unpack_int4_planar(words: torch.Tensor, planes: int) -> torch.Tensor:
    """The nibbles [N, K/2] (high nibble first) behind a planar int4 tensor."""
    n, kw = words.shape
    shifts = torch.arange(8, dtype=torch.int32, device=words.device) * 4
    q = (words.reshape(n, kw // planes, planes)[..., None] >> shifts) & 15  # n, block, word, field
    q = q.transpose(-1, -2).reshape(n, kw * 8).to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def pack_int8_planar(q: torch.Tensor, planes: int) -> torch.Tensor:
    """Planar int32 [N, K/4] from int8 [N, K], in plain PyTorch (any device)."""
    n, k = q.shape
    u = q.to(torch.int32).reshape(n, k // (4 * planes), 4, planes).transpose(-1, -2) & 255
    shifts = torch.arange(4, dtype=torch.int32, device=q.device) * 8
    return _sum_bits(u << shifts).reshape(n, k // 4)


def int8_planar_columns(in_features: int, planes: int, device=None) -> torch.Tensor:
    """For a planar int8 tensor viewed as int8 [N, K] (little-endian bytes): the original column of each byte,
    so that ``F.linear(x[..., cols], words.view(torch.int8))`` is the layer's product."""
    block = torch.arange(in_features // (4 * planes), device=device)[:, None, None] * (4 * planes)
    word = torch.arange(planes, device=device)[None, :, None]
    field = torch.arange(4, device=device)[None, None, :]
    return (block + field * planes + word).reshape(-1)


def int4_gemv_reference(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, groupsize: int,
                        planes: int) -> torch.Tensor:
    """W x in fp32 for one token x [K], computed from the planar words with the kernel's own arithmetic
    (bit fields OR-ed into 2^23's mantissa, one multiply-add to the exact integer): pins that trick on the CPU."""
    n, kw = words.shape
    k = kw * 8
    w = words.reshape(n, kw // planes, 1, planes)
    src = torch.where(torch.arange(8, device=words.device)[None, None, :, None] < 4, w, w >> 16)  # n, blk, j, i
    sh = (torch.arange(8, dtype=torch.int32, device=words.device) % 4 * 4)[None, None, :, None]
    bits = (src & (15 << sh)) | 0x4B000000
    step = torch.exp2(-sh.float())
    q = bits.view(torch.float32) * step - (8388608.0 * step + 8.0)  # q - 8, exactly
    q = q.reshape(n, k)
    pairs = sz.reshape(k // groupsize, n).to(torch.int32)
    scale = (pairs << 16).view(torch.float32).t().repeat_interleave(groupsize, dim=1)
    zero = (pairs & -65536).view(torch.float32).t().repeat_interleave(groupsize, dim=1)
    return ((q * scale + zero) * x.float()[None, :]).sum(-1)


def check_prologues(layer: nn.Module) -> bool:
    """Whether ``prologue_gemv`` on ``layer`` (its GEMV with RMSNorm(x + y) or silu·up folded in) gives what the
    separate kernels and the layer's plain GEMV give, for random inputs: the residual sum bit-identical, the
    outputs within bf16 rounding of the normed / activated input. Any failure (a kernel that does not build, a
    wrong result) is False: the model then runs those steps as separate kernels."""
    try:
        from localgpt.generation.fast import slot_triton
        from localgpt.generation.fast.transformer import RMSNorm

        k, dev = layer.in_features, layer.words.device
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        y = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        norm = RMSNorm((1 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16), 1e-5)
        gate_up = torch.randn(1, 2 * k, device=dev, dtype=torch.bfloat16)

        def close(got, want):
            return bool(((got.float() - want.float()).norm() <= 1e-2 * want.float().norm()).item())

        got, total = prologue_gemv(layer, x, "rms", y, norm)
        want_total, h = slot_triton.add_rms_norm(x, y, norm.weight, norm.eps)
        ok = torch.equal(total, want_total) and close(got, layer(h))
        got, _ = prologue_gemv(layer, x, "rms", None, norm)
        ok = ok and close(got, layer(slot_triton.rms_norm(x, norm.weight, norm.eps)))
        got, _ = prologue_gemv(layer, gate_up, "swiglu")
        return ok and close(got, layer(slot_triton.silu_mul(gate_up)))
    except Exception:  # noqa: BLE001
        return False


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


def check_decode_kernel(layer: nn.Module, reference: torch.Tensor, *, tries: int = 2, rows: int = 1) -> bool:
    """Whether ``layer``'s decode path (a Triton or CUDA GEMV) computes x @ ``reference``^T here, for random x.

    ``reference``: the fp32 weight [out, in] the layer's bits mean. Allowed: bf16 rounding of the result plus
    fp32 summation-order error; a misread bit field is off by a whole quantisation step, ~10x more. Any
    failure (no Triton, a kernel that does not build, a wrong layout) is False: the caller falls back.
    ``rows``: tokens at once (a batch of decoding streams takes other kernels than one token).
    """
    try:
        for _ in range(tries):
            x = torch.randn(1, rows, reference.shape[1], device=reference.device, dtype=torch.bfloat16)
            want = x.reshape(rows, -1).float() @ reference.t()
            got = layer(x).reshape(rows, -1).float()
            if layer.bias is not None:
                got = got - layer.bias.float()
            slack = want.abs() * 2**-7 + 1e-5 * (x.reshape(rows, -1).float().abs() @ reference.abs().t()) + 1e-6
            if not bool(((got - want).abs() <= slack).all()):
                return False
        if rows > 1:
            return True
        # The prompt path of the same bits: the weight written out (int4) or the bytes in their order (int8).
        if isinstance(layer, Linear):
            return True
        if isinstance(layer, Int4Linear):
            got_w = layer.dequantize_packed().float()
        else:
            got_w = layer.int8_weight().float() * layer.scales.float()[:, None]
        return bool(((got_w - reference).abs() <= reference.abs() * 2**-7 + 1e-6).all())
    except Exception:  # noqa: BLE001
        return False


def _use_fma_kernel(layer: nn.Module, mode: str) -> None:
    from localgpt.generation.fast.gemv_triton import FMA, scratch

    layer.gemv_config, ws, lock = scratch(mode, layer.out_features, layer.in_features, layer.words.device, kernel=FMA)
    layer.gemv_ws, layer.gemv_lock = ws, lock


def quantize_model(model: nn.Module, mode: str, *, groupsize: int = 128, saved: dict | None = None,
                   keep: bool = False, decode: str = "auto") -> dict:
    """Swap every ``Linear`` of ``model`` for its ``mode`` ("int8" or "int4") version, in place.

    ``saved``: layer states from ``load_quantized`` (no quantising then). Returns the device-neutral
    layer states when ``keep`` (for ``save_quantized``), else {}. Layers whose shape the int4 kernel
    cannot take stay as they are. ``decode``: "cuda" (int4 on CUDA: tiled planar words and the tensor-core
    GEMV of ``gemv_cuda`` for up to 16 tokens, once the first layer's check passes; where it does not build
    or fails, the Triton kernels), "triton" (the planar layouts and Triton GEMV kernels of ``gemv_triton``
    for one token; int8 layers then take 2-16 tokens through ``gemv_cuda`` when its check passes), "legacy"
    (tinygemm for int4, the compiler's reduction for int8: what ran before, and the last fallback) or
    "auto": the faster one measured on the H200 (``DECODE_DEFAULT``). int8 "cuda": one token on ``gemv_cuda``
    as well (the "cuda" layout), its row scales applied in the kernel.
    """
    if decode == "auto":
        decode = DECODE_DEFAULT[mode] if mode in DECODE_DEFAULT else "legacy"
    kinds = {"int8": Int8Linear, "int4": Int4Linear}
    if mode not in kinds:
        raise ValueError(f"unknown weight-only mode {mode!r}")
    states: dict = {}
    prompt_kernel: str | None | bool = False  # checked on the first tinygemm-layout int4 layer on CUDA
    planar: bool | None = None if decode in ("triton", "cuda") else False  # checked on the first layer on CUDA
    fma_only = False  # the first layer's tuned kernel failed its check: every layer on the FMA kernel
    batched: bool | None = None  # the first layer's several-token CUDA path (int4 cuda, int8 planar), checked
    prologues: bool | None = None  # the first prologue-capable layer's norms / silu·up in gemv_cuda, checked
    for parent, attr, name in list(_linears(model)):
        layer = getattr(parent, attr)
        device = layer.weight.device
        if saved is not None:
            if name not in saved:
                continue
            state = saved[name]
        elif mode == "int8":
            # Planar int8 words on CUDA: an input that is not whole 128-column blocks (32 words a row of a block)
            # padded with zero columns (Falcon-7B's 4,544 to 4,608), so every layer has 32 planes: the Triton and
            # CUDA GEMVs' widest blocks, and one weight format for gemv_chain
            k = layer.weight.shape[1]
            pad = -k % 128 if INT8_PAD and decode in ("triton", "cuda") and device.type == "cuda" else 0
            state = Int8Linear.quantize(layer, pad_to=k + pad).state()
        else:
            k = layer.weight.shape[1]
            # For the tensor-core GEMV (128-column blocks of one group) an input that is not a whole number of
            # blocks is padded with zero columns (Falcon-7B's 4,544 to 4,608: its layers were on tinygemm, ~1.6 ms
            # of its 3.35 ms step on the H200); its other kernels take the padded layer too.
            pad = -k % 128 if decode == "cuda" and device.type == "cuda" and groupsize == 128 else 0
            layout = int4_layout(k + pad, layer.weight.shape[0], groupsize)
            if layout is None:
                continue
            state = int4_state(layer, *layout, pad_to=k + pad)
        if keep:
            states[name] = _host(state)
        del layer
        new = None
        if device.type == "cuda" and planar is not False:
            new = kinds[mode].from_state(state, device, layout="cuda" if decode == "cuda" else "planar")
            if planar is None and new.layout in ("planar", "cuda"):
                if mode == "int4":
                    reference = dequantize_int4(state["nibbles"].to(device), new.scales_and_zeros, new.groupsize)
                else:
                    reference = state["weight"].to(device).float() * new.scales.float()[:, None]
                planar = check_decode_kernel(new, reference)
                if not planar and new.layout == "cuda":
                    # The CUDA tensor-core GEMV is wrong or does not build here: the Triton kernels.
                    decode = "triton"
                    new = kinds[mode].from_state(state, device, layout="planar")
                    planar = check_decode_kernel(new, reference)
                if not planar and new.gemv_config[3] != 0:
                    # The tuned kernel (bf16x2 or tensor-core) is wrong or does not build here: the FMA kernel.
                    fma_only = True
                    _use_fma_kernel(new, mode)
                    planar = check_decode_kernel(new, reference)
                if planar and (new.layout == "cuda" or getattr(new, "cuda_config", None) is not None):
                    batched = check_decode_kernel(new, reference, rows=12)  # both token tiles of a launch
                del reference
                if not planar:
                    new = None
            elif fma_only and new.layout == "planar":
                _use_fma_kernel(new, mode)
            if new is not None and batched is False:  # several tokens: bf16 through cuBLAS, as before
                if new.layout == "cuda":
                    new.cuda_rows = 1
                else:
                    new.cuda_config = None
                    new.cuda_rows = 0
        if new is None:
            new = kinds[mode].from_state(state, device)
        setattr(parent, attr, new)
        if getattr(new, "prologue_ok", False):
            if prologues is None:  # the first layer that can: its prologues against the separate kernels
                prologues = check_prologues(new)
            new.prologues = prologues
        if mode == "int4" and new.packed is not None:
            if prompt_kernel is False:
                prompt_kernel = check_prompt_kernel(new, state["nibbles"])
            new.prompt_kernel = prompt_kernel
        del state, new
    if getattr(model, "_chain", None) is not None:
        model._chain = None  # the chained step (Transformer._step_chain) decided again for the new layers
    return states


def use_bf16_gemv(model: nn.Module) -> int:
    """One token through the Triton bf16 GEMV for every bf16 ``Linear`` on CUDA whose check passes; the count.

    A transformer's GEMVs launch as dependent launches where the step's other kernels do (slot_triton.step_gdc):
    Llama-2-7B 255.1 -> 271.9 tok/s, Falcon-7B 245.6 -> 257.0 on an H200. A Mamba network's stay plain launches
    unless its whole fused step is dependent launches (slot_triton.STEP_PDL_MAMBA; FalconMamba-7B 228-229 plain
    against 225-226 with only the GEMVs dependent)."""
    pdl = 2 if getattr(model, "kind", "transformer") == "mamba" else 1
    done = 0
    for module in model.modules():
        if not isinstance(module, Linear) or not module.weight.is_cuda or module.weight.dtype != torch.bfloat16:
            continue
        n, k = module.weight.shape
        if k % 8:  # 16-byte rows (the kernel's loads); a masked tail covers the rest
            continue
        from localgpt.generation.fast.gemv_triton import bf16_block, scratch

        bk = bf16_block(n, k)

        (bn, split, warps, _), ws, lock = scratch("bf16", n, k, module.weight.device)
        module.register_buffer("gemv_ws", ws, persistent=False)
        module.register_buffer("gemv_lock", lock, persistent=False)
        module.gemv = (bk, bn, split, warps, pdl)
        if done == 0 and not check_decode_kernel(module, module.weight.float()):
            module.gemv = None
            return 0
        done += 1
    return done


def decode_kernels(model: nn.Module) -> str:
    """How the model's quantised layers run one token, e.g. "int4 planar (Triton GEMV)" (for stats and benches)."""
    seen = sorted({f"{'int4' if isinstance(m, Int4Linear) else 'int8'} {m.layout}" for m in model.modules()
                   if isinstance(m, (Int4Linear, Int8Linear))})
    return ", ".join(seen)


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
