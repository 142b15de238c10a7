"""Mamba / FalconMamba as a recurrent network: constant memory and constant time per generated token.

The conv and SSM states live in static buffers (one slot per layer), so a decode step is the same
graph at every position and can be compiled and replayed. A prompt runs in parallel, chunk by chunk:
each chunk's projections are batched matmuls, its convolution starts from the carried conv state and
its selective scan from the carried SSM state (a Triton kernel on CUDA, a plain loop elsewhere), so a
prompt longer than memory allows still runs, in sequential chunks. Never loads files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.generation.fast.transformer import Linear, RMSNorm, _has_triton, _linear

# The batch-1 decode step through mamba_triton's kernels (``Mamba._step_fused``: a layer three kernels around its
# GEMVs, a plain CUDA graph, no compiler). On by default since round 14 (H200, FalconMamba-7B int4 in one call: 351
# against 298 tok/s compiled, TTFT at 512 66 against 92 ms, warm-up 2.1 against 113 s); LOCALGPT_MAMBA_FUSED=0
# compiles the plain step instead.
FUSED = os.environ.get("LOCALGPT_MAMBA_FUSED", "1") != "0"
# The fused step's in_proj and out_proj each as a one-phase ``gemv_chain`` launch over fixed buffers (int4, or int8
# on Hopper), where they build and pass their check against the layers' own GEMVs (``Mamba._chain_ready``): on
# Hopper the chain's producer streams the words by bulk copy, from before the kernel before it has ended (a
# programmatic dependent launch, as mamba_triton's kernels then are too). H200, FalconMamba-7B, one call (round 19):
# int4 383.8 against 369.7 tok/s (the chains without the dependent launches 365.1), int8 243.5 against 188.3.
# LOCALGPT_MAMBA_CHAIN=0: the layers' own GEMV launches.
CHAIN = os.environ.get("LOCALGPT_MAMBA_CHAIN", "1") != "0"
# x_proj folded into the fused step's conv kernel (``mamba_triton.conv_xproj_step``: each of its programs multiplies
# its channels of the conv's output by a bf16 copy of x_proj's weight, its last programs (FOLD_SUM) or the SSM step
# add the parts up, the SSM step shifts the conv state), so x_proj has no launch of its own. Costs a bf16 copy of
# x_proj's weight (~4.7 MB a FalconMamba-7B layer, ~300 MB in all). H200, FalconMamba-7B int4, one call (round 19):
# 427.7 against 383.8 tok/s. LOCALGPT_MAMBA_XPROJ_FOLD=0: x_proj's own launch.
XPROJ_FOLD = os.environ.get("LOCALGPT_MAMBA_XPROJ_FOLD", "1") != "0"
# With XPROJ_FOLD: the conv kernel's parts of x_proj's row added up by its own last program of each block of outputs
# (``conv_xproj_step(counts=)``: an acq_rel count a block, one trip for the parts), so the SSM step reads the row,
# not 32 parts. H200, FalconMamba-7B int4, one call (round 22): 471.8 / 471.4 against 447.1 / 445.1 tok/s (the
# SSM kernel 7.9 -> 3.4 us a layer exposed, the conv kernel 3.8 -> 5.6). LOCALGPT_MAMBA_FOLD_SUM=0: the SSM step
# adds the parts.
FOLD_SUM = os.environ.get("LOCALGPT_MAMBA_FOLD_SUM", "1") != "0"
# With CHAIN and an fp32 residual (FalconMamba): the residual's add in out_proj's chain launch, as it writes its rows
# (``gemv_chain``'s res32: the fp32 sum and its bf16 copy), and the block's RMSNorm in in_proj's (its "rms"
# staging), so the step has no add_norm launch between layers. H200, FalconMamba-7B (round 20): int8 311.1 against
# 294.2 tok/s; int4 417.4 against 428.0 alone, but JOIN needs it. LOCALGPT_MAMBA_RES_CHAIN=0: add_norm's launches.
RES_CHAIN = os.environ.get("LOCALGPT_MAMBA_RES_CHAIN", "1") != "0"
# With RES_CHAIN: a layer's out_proj and the next layer's in_proj (after the last layer, the final norm and the LM
# head, where it is on the chain's words) as one two-phase chain launch, the grid barrier between them, so a layer
# is three launches (the conv + x_proj, the SSM step, the chain). H200, FalconMamba-7B, one call (round 20): int4
# 445.6 against 417.4 tok/s, int8 315.7 against 310.6. LOCALGPT_MAMBA_JOIN=0: a launch each.
JOIN = os.environ.get("LOCALGPT_MAMBA_JOIN", "1") != "0"
# With CHAIN: the conv step in in_proj's chain launch, as it writes its rows (``gemv_chain``'s CONV epilogue: silu of
# the conv into a fixed row, the conv state shifted), and x_proj as the launch's next phase, on the chain's words
# (no bf16 copy of its weight, no x_proj fold), so a layer's conv and x_proj have no launch of their own. H200,
# FalconMamba-7B with JOIN, one call (round 20): int8 328.2 against 314.1 tok/s, int4 437.2 against 446.9 (int4's
# chain is bound by its consumers, which the x_proj phase and its barrier add to; int8's outrun the copy engine, as
# gemv_chain's attention phase pays for int8 only). "fold" (the bulk-copy kernel, with XPROJ_FOLD's copy): the conv
# step in in_proj's chain and x_proj folded into it instead of a phase: each CTA multiplies its conv rows by their rows
# of the bf16 copy and the launch's last CTA adds the CTAs' parts (``gemv_chain``'s XFOLD), so a layer is the chain
# and the SSM step. H200, FalconMamba-7B, one call (round 21): int8 339.1 against 329.7 tok/s for "1"; int4 441.6
# against 448.9 for "0" (the fold in its conv kernel). LOCALGPT_MAMBA_CONV_CHAIN: "auto" (int8 layers: "fold" where
# it can, else "1"; int4: "0"), "1", "fold" or "0".
CONV_CHAIN = os.environ.get("LOCALGPT_MAMBA_CONV_CHAIN", "auto")


@dataclass
class MambaShape:
    n_layers: int
    dim: int
    inner: int
    state: int
    conv: int
    dt_rank: int
    vocab_size: int
    norm_eps: float
    bcdt_norm_eps: float | None  # FalconMamba: weightless RMS norms on B, C and dt; None for Mamba
    residual_fp32: bool


def _weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def scan_reference(x, dt, A, B, C, D, z, h):
    """The selective scan, one position at a time (CPU, tests, and the check for the kernel).

    x, dt, z: [t, inner]; B, C: [t, state]; A: [inner, state] fp32; D: [inner]; h: [inner, state] fp32,
    updated in place. ``dt`` is already biased and softplus-ed (fp32). Returns y [t, inner] in x's dtype.
    """
    ys = []
    for i in range(x.shape[0]):
        xi = x[i].float()
        h.mul_(torch.exp(dt[i, :, None] * A)).add_((dt[i] * xi)[:, None] * B[i].float()[None, :])
        ys.append(h.to(x.dtype) @ C[i].to(x.dtype))
    y = torch.stack(ys).float() + x.float() * D.float()
    return (y * F.silu(z.float())).to(x.dtype)


def scan(x, dt, A, B, C, D, z, h):
    if x.is_cuda:
        from localgpt.generation.fast.scan_triton import selective_scan

        return selective_scan(x.contiguous(), dt, A, B, C, D, z, h)
    return scan_reference(x, dt, A, B, C, D, z, h)


class MambaLayer(nn.Module):
    def __init__(self, shape: MambaShape, *, norm: RMSNorm, in_proj: nn.Module, conv_w: torch.Tensor,
                 conv_b: torch.Tensor | None, x_proj: nn.Module, dt_w: torch.Tensor, dt_b: torch.Tensor,
                 A_log: torch.Tensor, D: torch.Tensor, out_proj: nn.Module):
        super().__init__()
        self.shape = shape
        self.norm, self.in_proj, self.x_proj, self.out_proj = norm, in_proj, x_proj, out_proj
        self.conv_w = nn.Parameter(conv_w, requires_grad=False)  # [inner, conv]
        self.conv_b = nn.Parameter(conv_b if conv_b is not None else torch.zeros_like(conv_w[:, 0]), requires_grad=False)
        self.dt_proj = Linear(dt_w)  # low rank -> inner; its bias is added in fp32 before the softplus
        self.dt_b = nn.Parameter(dt_b.float(), requires_grad=False)
        self.A = nn.Parameter(-torch.exp(A_log.float()), requires_grad=False)
        self.D = nn.Parameter(D.data, requires_grad=False)
        self.register_buffer("conv_state", torch.empty(0), persistent=False)  # last conv-1 inputs [inner, conv-1]
        self.register_buffer("ssm_state", torch.empty(0), persistent=False)  # [inner, state], fp32

    def reset(self) -> None:
        s = self.shape
        dev, dtype = self.conv_w.device, self.conv_w.dtype
        if self.conv_state.numel() == 0:
            self.conv_state = torch.zeros(s.inner, s.conv - 1, dtype=dtype, device=dev)
            self.ssm_state = torch.zeros(s.inner, s.state, dtype=torch.float32, device=dev)
        else:
            self.conv_state.zero_()
            self.ssm_state.zero_()

    def _ssm_inputs(self, x: torch.Tensor):
        s = self.shape
        dt, B, C = self.x_proj(x).split([s.dt_rank, s.state, s.state], dim=-1)
        if s.bcdt_norm_eps is not None:
            dt, B, C = (_weightless_rms(v, s.bcdt_norm_eps) for v in (dt, B, C))
        dt = F.softplus(self.dt_proj(dt).float() + self.dt_b)
        return dt, B, C

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [t, dim] -> [t, dim]; t = 1 is a decode step, t > 1 a prompt chunk."""
        s = self.shape
        residual = hidden.float() if s.residual_fp32 else hidden
        x, z = self.in_proj(self.norm(hidden.to(self.norm.weight.dtype))).chunk(2, dim=-1)  # [t, inner] each
        t = x.shape[0]
        window = torch.cat([self.conv_state, x.t()], dim=1)  # [inner, conv-1+t]
        self.conv_state.copy_(window[:, -(s.conv - 1):])
        if t == 1:
            x = (window * self.conv_w).sum(-1, keepdim=True).t() + self.conv_b
        else:
            # contiguous: tinygemm (int4 layers at few rows, e.g. a prompt chunk's tail) needs it
            x = F.conv1d(window[None], self.conv_w[:, None], self.conv_b, groups=s.inner)[0].t().contiguous()
        x = F.silu(x)
        dt, B, C = self._ssm_inputs(x)
        if t == 1:
            h = self.ssm_state
            h.mul_(torch.exp(dt.t() * self.A)).add_((dt[0] * x[0].float())[:, None] * B.float())
            y = (h.to(x.dtype) @ C[0].to(x.dtype)).float() + x[0].float() * self.D.float()
            y = (y * F.silu(z[0].float())).to(x.dtype)[None]
        else:
            y = scan(x, dt, self.A, B, C, self.D, z, self.ssm_state)
        return residual + self.out_proj(y)

    # --- slots (continuous batching, batch.BatchEngine): a conv / SSM state per slot ------------------------

    def setup_slots(self, slots: int) -> None:
        s = self.shape
        dev, dtype = self.conv_w.device, self.conv_w.dtype
        self.conv_slots = torch.zeros(slots, s.inner, s.conv - 1, dtype=dtype, device=dev)
        self.ssm_slots = torch.zeros(slots, s.inner, s.state, dtype=torch.float32, device=dev)

    def step_slots(self, hidden: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """One decode step of the first B slots: hidden [B, dim]; only ``live`` [B] slots' states move (an idle or
        still-prefilling slot inside the bucket keeps its state). Same arithmetic as ``forward`` at t = 1."""
        s = self.shape
        b = hidden.shape[0]
        residual = hidden.float() if s.residual_fp32 else hidden
        x, z = self.in_proj(self.norm(hidden.to(self.norm.weight.dtype))).chunk(2, dim=-1)  # [B, inner] each
        conv, h = self.conv_slots[:b], self.ssm_slots[:b]
        window = torch.cat([conv, x[:, :, None]], dim=2)  # [B, inner, conv]
        keep = live[:, None, None]
        conv.copy_(torch.where(keep, window[:, :, 1:], conv))
        x = F.silu((window * self.conv_w).sum(-1) + self.conv_b)
        dt, B, C = self._ssm_inputs(x)
        h_new = h * torch.exp(dt[:, :, None] * self.A) + (dt * x.float())[:, :, None] * B.float()[:, None, :]
        h.copy_(torch.where(keep, h_new, h))
        y = torch.matmul(h_new.to(x.dtype), C[:, :, None].to(x.dtype))[..., 0].float() + x.float() * self.D.float()
        y = (y * F.silu(z.float())).to(x.dtype)
        return residual + self.out_proj(y)

    def forward_slot(self, hidden: torch.Tensor, slot: int) -> torch.Tensor:
        """``forward`` (a prompt chunk) on slot ``slot``'s state: the layer's own state buffers are that slot's
        for the call, so the batch-1 path's code runs unchanged."""
        own = self.conv_state, self.ssm_state
        self.conv_state, self.ssm_state = self.conv_slots[slot], self.ssm_slots[slot]
        try:
            return self(hidden)
        finally:
            self.conv_state, self.ssm_state = own


class Mamba(nn.Module):
    """``prefill(ids, chunk) -> logits of the last position``; ``step(token, pos) -> logits``."""

    kind = "mamba"

    def __init__(self, shape: MambaShape, embed: torch.Tensor, layers: list[MambaLayer], norm: RMSNorm,
                 lm_head: nn.Module, prefill_chunk: int = 4096):
        super().__init__()
        self.shape = shape
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.prefill_chunk = prefill_chunk  # tokens per parallel pass; longer prompts run in sequential chunks
        self.max_seq = 0

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def setup_cache(self, max_seq: int) -> None:
        self.max_seq = max_seq  # recorded only: the state does not grow with the context
        for layer in self.layers:
            if layer.conv_state.numel() == 0:
                layer.reset()

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            x = layer(x)
        return x

    def prefill(self, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        for layer in self.layers:
            layer.reset()
        ids = ids[0]
        chunk = chunk or self.prefill_chunk
        for start in range(0, ids.shape[0], chunk):
            x = self._run(ids[start:start + chunk])
        return self.lm_head(self.norm(x[-1:]).to(self.dtype)).float()

    def step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.fused_decode and not torch.compiler.is_compiling():
            return self._step_fused(token)
        x = self._run(token[0])
        return self.lm_head(self.norm(x).to(self.dtype)).float()

    # --- the batch-1 step through mamba_triton's kernels ----------------------------------------------------

    fused_decode = False  # set by ``use_fused_decode``
    graph_step = True  # the fused step is whole without the compiler (generator.default_engine_mode: a CUDA graph)

    def use_fused_decode(self, on: bool = True) -> bool:
        """Run ``step`` through ``mamba_triton``'s kernels (``_step_fused``) where they apply: with FUSED
        (LOCALGPT_MAMBA_FUSED=1), on CUDA with Triton (or under ``TRITON_INTERPRET=1``, for tests), a state size
        that is a power of two and dt_proj weights it can read (bf16, int8 or int4; a bf16 copy of them is made
        for the kernel, ~4 MB a FalconMamba-7B layer; with XPROJ_FOLD x_proj's too, transposed). Returns whether
        the fused step is now on."""
        where = self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        s = self.shape
        ok = bool(on and FUSED and where and _has_triton() and s.state & (s.state - 1) == 0)
        if ok:
            for layer in self.layers:
                if getattr(layer, "dt_w", None) is None:
                    w = _dense_weight(layer.dt_proj)
                    if w is None:
                        ok = False
                        break
                    layer.register_buffer("dt_w", w.to(self.dtype).contiguous(), persistent=False)
                if XPROJ_FOLD and getattr(layer, "xw", None) is None:
                    w = _dense_weight(layer.x_proj)
                    if w is not None:  # else x_proj keeps its launch
                        layer.register_buffer("xw", w.t().to(self.dtype).contiguous(), persistent=False)
                        # FOLD_SUM's counts: one a block of 32 of x_proj's outputs (the kernel leaves them at 0)
                        layer.register_buffer("fold_counts", torch.zeros(-(-w.shape[0] // 32), dtype=torch.int32,
                                                                         device=w.device), persistent=False)
        self.fused_decode = ok
        return ok

    def _step_fused(self, token: torch.Tensor) -> torch.Tensor:
        """``step``: per layer the residual add + norm, in_proj, the conv step, x_proj, the SSM step (dt / B / C
        norms, dt_proj, softplus, state update, gate) and out_proj; the same arithmetic as ``MambaLayer.forward`` at
        t = 1 (mamba_triton's note). in_proj and out_proj as chain launches where ``_chain_ready``; then the
        kernels are programmatic dependent launches too (``slot_triton.gdc``), and with RES_CHAIN the residual's
        add and the norm are in the chains (no add_norm launch but the final norm's)."""
        from localgpt.generation.fast import mamba_triton as K
        from localgpt.generation.fast import slot_triton

        s = self.shape
        x = F.embedding(token.view(1), self.embed)  # [1, dim]
        res = x.float() if s.residual_fp32 else x
        c = self._chain if self._chain_ready() else None
        if c is None:
            # dependent launches only with slot_triton.STEP_PDL_MAMBA (the bf16 GEMVs then dependent ones too)
            pdl = slot_triton.step_gdc(self.device, mamba=True)
            pending = None
            for layer in self.layers:
                res, h = K.add_norm(res, pending, layer.norm.weight, layer.norm.eps, cast_in=True, pdl=pdl)
                xz = layer.in_proj(h)
                y = self._conv_ssm(K, layer, xz, pdl=pdl)
                pending = layer.out_proj(y)
            _, h = K.add_norm(res, pending, self.norm.weight, self.norm.eps, cast_in=res.dtype != torch.float32,
                              pdl=pdl)
            return self.lm_head(h.to(self.dtype)).float()
        pdl = slot_triton.gdc(self.device)
        if c.res:  # the residual (c.r32) and the norms' input (c.xb) kept by the chains
            torch.index_select(self.embed, 0, token.view(-1), out=c.xb.view(1, -1))
            c.r32.copy_(c.xb)
            for layer, in_proj, out_proj in zip(self.layers, c.ins, c.outs):
                if in_proj is not None:  # None: the out_proj chain before ran it (JOIN)
                    in_proj()
                self._chain_ssm(K, c, layer, pdl)
                out_proj()
            if c.logits is not None:  # the last chain's LM head
                return c.logits.view(1, -1).float()
            _, h = K.add_norm(c.r32.view(1, -1), None, self.norm.weight, self.norm.eps, cast_in=False)
            return self.lm_head(h.to(self.dtype)).float()
        pending = None
        for layer, in_proj, out_proj in zip(self.layers, c.ins, c.outs):
            res, _ = K.add_norm(res, pending, layer.norm.weight, layer.norm.eps, cast_in=True, out=c.h, pdl=pdl)
            in_proj()
            self._chain_ssm(K, c, layer, pdl)
            out_proj()
            pending = c.o.view(1, -1)
        _, h = K.add_norm(res, pending, self.norm.weight, self.norm.eps, cast_in=res.dtype != torch.float32)
        return self.lm_head(h.to(self.dtype)).float()

    def _conv_ssm(self, K, layer: MambaLayer, xz: torch.Tensor, out: torch.Tensor | None = None,
                  pdl: bool = False) -> torch.Tensor:
        """The fused step's conv step, x_proj and SSM step of a layer from in_proj's row ``xz``: x_proj folded into
        the conv's kernel where the layer has its bf16 copy (``xw``, XPROJ_FOLD), else its own launch."""
        s = self.shape
        xw = getattr(layer, "xw", None)
        if XPROJ_FOLD and xw is not None:  # with FOLD_SUM the conv kernel adds the parts up into x_proj's row
            xc, got = K.conv_xproj_step(xz, layer.conv_state, layer.conv_w, layer.conv_b, xw, pdl=pdl,
                                        counts=layer.fold_counts if FOLD_SUM else None)
            return K.ssm_step(got if FOLD_SUM else None, xz, xc, layer.dt_w, layer.dt_b, layer.A, layer.D,
                              layer.ssm_state, s.bcdt_norm_eps, out=out, pdl=pdl,
                              parts=None if FOLD_SUM else got, conv_state=layer.conv_state)
        xc = K.conv_step(xz, layer.conv_state, layer.conv_w, layer.conv_b, pdl=pdl)
        return K.ssm_step(layer.x_proj(xc), xz, xc, layer.dt_w, layer.dt_b, layer.A, layer.D, layer.ssm_state,
                          s.bcdt_norm_eps, out=out, pdl=pdl)

    def _chain_ssm(self, K, c, layer: MambaLayer, pdl: bool) -> torch.Tensor:
        """The chained step's SSM step of a layer into ``c.y``, after in_proj's chain: with ``c.conv`` the chain ran
        the conv step and x_proj too (their rows ``c.xc`` and ``c.dbl``), else ``_conv_ssm``."""
        if c.conv:
            return K.ssm_step(c.dbl.view(1, -1), c.xz.view(1, -1), c.xc.view(1, -1), layer.dt_w, layer.dt_b, layer.A,
                              layer.D, layer.ssm_state, self.shape.bcdt_norm_eps, out=c.y, pdl=pdl)
        return self._conv_ssm(K, layer, c.xz.view(1, -1), out=c.y, pdl=pdl)

    _chain = None  # None: not tried yet; False: the network cannot take it; else the buffers and chains
    chain_note = ""  # why the chains are not used (logged; bench/gpu.py prints it)
    chain_kernel = ""  # the chains' kernel when they are: "bulk-copy" (Hopper) or "ring", ", fp16" (operands)

    def _chain_ready(self) -> bool:
        """Whether ``_step_fused`` runs in_proj and out_proj as ``gemv_chain`` launches (CHAIN): every layer's two
        on the chain's words, bf16 activations, and the first layer's chains equal to its own GEMVs on random
        inputs. Built at the first fused step outside a CUDA graph capture (the engine's warm-up)."""
        from localgpt.generation.fast.transformer import chain_ready

        return chain_ready(self, CHAIN)

    def _chain_check(self, c) -> str:
        """The first layer's chains against the fused step's own kernels (its GEMVs, and with ``c.res``
        ``mamba_triton.add_norm``) on random inputs: every output within bf16 rounding. Returns "" or what
        differs."""
        from localgpt.generation.fast import mamba_triton as K
        from localgpt.generation.fast.transformer import _chain_mismatch

        l0, dev = self.layers[0], self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        held = [(la.conv_state.clone(), la.ssm_state.clone()) for la in self.layers[:2]]  # CONV shifts the state
        with torch.inference_mode():
            x = torch.randn(self.shape.dim, generator=gen, device=dev).to(torch.bfloat16)
            y = torch.randn(c.y.numel(), generator=gen, device=dev).to(torch.bfloat16)
            c.y.copy_(y)
            for la in self.layers[:2]:
                la.conv_state.copy_(torch.randn(la.conv_state.shape, generator=gen, device=dev))
            states = [la.conv_state.clone() for la in self.layers[:2]]

            def conv_rows(layer, xz, state, label):  # CONV: the conv's row, x_proj's, the state shifted
                if not c.conv:
                    return []
                state = state.clone()
                xc = K.conv_step(xz.view(1, -1), state, layer.conv_w, layer.conv_b)
                xp = (xc.float() @ layer.xw.float()).to(xc.dtype) if c.xfold else layer.x_proj(xc)  # fold: its copy
                return [(f"{label} conv", c.xc, xc), (f"{label} conv state", layer.conv_state, state),
                        (f"{label} x_proj", c.dbl, xp)]

            try:
                if not c.res:
                    c.h.copy_(x)
                    c.ins[0]()
                    want = [("in_proj", c.xz, l0.in_proj(x.view(1, -1)))] + conv_rows(l0, c.xz, states[0], "in_proj")
                    bad = _chain_mismatch(want)
                    c.outs[0]()
                    return bad or _chain_mismatch([("out_proj", c.o, l0.out_proj(y.view(1, -1)))])
                res = 4 * torch.randn(self.shape.dim, generator=gen, device=dev)
                c.xb.copy_(x)
                c.r32.copy_(res)
                c.ins[0]()
                _, h = K.add_norm(x.view(1, -1), None, l0.norm.weight, l0.norm.eps, cast_in=True)
                bad = _chain_mismatch([("in_proj (rms)", c.xz, l0.in_proj(h))]
                                      + conv_rows(l0, c.xz, states[0], "in_proj"))
                if bad:
                    return bad
                c.outs[0]()  # JOIN: also the next in_proj (its conv, x_proj) or the head
                o = l0.out_proj(y.view(1, -1))
                total = res + o.float().view(-1)
                want = [("out_proj", c.o, o), ("residual", c.r32, total),
                        ("residual bf16", c.xb, total.to(torch.bfloat16))]
                if c.join:  # the second phase: the next layer's in_proj, or the final norm and the head
                    nxt, norm, got = ((self.layers[1].in_proj, self.layers[1].norm, c.xz) if len(self.layers) > 1
                                      else (self.lm_head, self.norm, c.logits))
                    _, h = K.add_norm(total.to(torch.bfloat16).view(1, -1), None, norm.weight, norm.eps,
                                      cast_in=True)
                    want.append(("the joined phase (rms)", got, nxt(h)))
                    if len(self.layers) > 1:
                        want += conv_rows(self.layers[1], c.xz, states[1], "the joined phase")
                return _chain_mismatch(want)
            finally:
                for la, (cs, hs) in zip(self.layers, held):
                    la.conv_state.copy_(cs)
                    la.ssm_state.copy_(hs)

    def _build_chain(self):
        from types import SimpleNamespace

        from localgpt.generation.fast import gemv_chain
        from localgpt.generation.fast.transformer import Transformer, chain_kernels

        if self.dtype != torch.bfloat16:
            self.chain_note = f"activations in {self.dtype}"
            return None
        unfit = [type(m).__name__ for layer in self.layers for m in (layer.in_proj, layer.out_proj)
                 if not gemv_chain.layer_fits(m)]
        if unfit:
            self.chain_note = f"{len(unfit)} layers do not fit it (e.g. {unfit[0]})"
            return None
        dev, l0 = self.device, self.layers[0]
        int8 = type(l0.in_proj).__name__ == "Int8Linear"
        if int8 and not gemv_chain.bulk_copy(dev):
            self.chain_note = "int8 layers chain with the bulk-copy kernel only (Hopper)"
            return None

        def buf(n):
            return torch.zeros(n, dtype=torch.bfloat16, device=dev)

        c = SimpleNamespace(h=buf(l0.in_proj.in_features), xz=buf(l0.in_proj.out_features),
                            y=buf(l0.out_proj.in_features), o=buf(l0.out_proj.out_features))
        # RES_CHAIN: the residual's add and the norm in the chains (FalconMamba's fp32 residual, norm as wide as
        # in_proj's input)
        c.res = bool(RES_CHAIN and self.shape.residual_fp32 and l0.in_proj.in_features == self.shape.dim
                     and l0.out_proj.out_features == self.shape.dim)
        if c.res:
            c.r32 = torch.zeros(self.shape.dim, dtype=torch.float32, device=dev)
            c.xb = buf(self.shape.dim)
        # JOIN: out_proj's chain runs the next layer's in_proj too, the last layer's the head where it is on the
        # chain's words (one weight format a chain)
        c.join = bool(c.res and JOIN)

        def on_words(m):  # a layer that can share a chain with in_proj: its words, one weight format a chain
            return gemv_chain.layer_fits(m) and type(m) is type(l0.in_proj) and m.planes == l0.in_proj.planes

        # CONV_CHAIN: the conv step in in_proj's chain and x_proj as its next phase (x_proj on the chain's words),
        # or ("fold") x_proj folded into in_proj's phase from XPROJ_FOLD's bf16 copy (the bulk-copy kernel)
        wanted = CONV_CHAIN in ("1", "fold") or (CONV_CHAIN == "auto" and int8)
        can_fold = (CONV_CHAIN in ("fold", "auto") and gemv_chain.bulk_copy(dev)
                    and all(getattr(la, "xw", None) is not None for la in self.layers))
        c.conv = bool(wanted and all((can_fold or on_words(la.x_proj)) and la.conv_state.numel()
                                     and la.conv_w.dtype == torch.bfloat16 for la in self.layers))
        c.xfold = c.conv and can_fold
        if c.conv:
            c.xc, c.dbl = buf(l0.conv_w.shape[0]), buf(l0.x_proj.out_features)
        head = self.lm_head
        c.logits = buf(head.out_features) if c.join and on_words(head) else None

        def in_phases(layer):  # in_proj (after the norm: RES_CHAIN), and with CONV_CHAIN its conv and x_proj
            ph = (dict(layer=layer.in_proj, x=c.xb, out=c.xz, xmode="rms", norm=layer.norm) if c.res
                  else dict(layer=layer.in_proj, x=c.h, out=c.xz))
            if not c.conv:
                return [ph]
            ph.update(conv_state=layer.conv_state, conv_w=layer.conv_w.data, conv_b=layer.conv_b.data, xc=c.xc)
            if c.xfold:  # x_proj in in_proj's phase (the chain's last)
                return [{**ph, "xw": layer.xw, "dbl": c.dbl}]
            return [ph, dict(layer=layer.x_proj, x=c.xc, out=c.dbl)]

        def in_chain(layer, tma, f16):
            return gemv_chain.Chain(in_phases(layer), dev, tma=tma, f16=f16)

        def out_chain(i, tma, f16):
            layer = self.layers[i]
            if not c.res:
                return gemv_chain.Chain([dict(layer=layer.out_proj, x=c.y, out=c.o)], dev, tma=tma, f16=f16)
            phases = [dict(layer=layer.out_proj, x=c.y, out=c.o, res32=c.r32, xsum=c.xb)]
            if c.join and i + 1 < len(self.layers):
                phases += in_phases(self.layers[i + 1])
            elif c.logits is not None:
                phases.append(dict(layer=head, x=c.xb, out=c.logits, xmode="rms", norm=self.norm))
            return gemv_chain.Chain(phases, dev, tma=tma, f16=f16)

        def first(tma, f16):
            c.ins = [in_chain(l0, tma, f16)]
            return c.ins[0]

        def rest(tma, f16):
            c.ins += [None if c.join else in_chain(layer, tma, f16) for layer in self.layers[1:]]
            c.outs = [out_chain(i, tma, f16) for i in range(len(self.layers))]

        ok = chain_kernels(self, Transformer._chain_tries(int8=int8), first, rest, lambda: self._chain_check(c))
        if ok and c.conv and not c.xfold:  # x_proj on the chain's words: the fold's bf16 copy is not read
            for layer in self.layers:
                layer.xw = None
        return c if ok else None

    # --- slots (continuous batching): see batch.BatchEngine ---------------------------------------------------

    def setup_slots(self, slots: int, max_seq: int) -> None:
        """A conv / SSM state for each of ``slots`` streams; ``max_seq`` is the idle slots' position marker."""
        self.slots, self.slot_seq = slots, max_seq
        for layer in self.layers:
            layer.setup_slots(slots)

    def step_slots(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] after each slot's token; slots at position ``max_seq`` are idle (state untouched)."""
        live = positions < self.slot_seq
        x = F.embedding(tokens, self.embed)  # [B, dim]
        for layer in self.layers:
            x = layer.step_slots(x, live)
        return self.lm_head(self.norm(x).to(self.dtype)).float()

    def prefill_slots(self, parts: list[tuple[int, torch.Tensor, int]]) -> torch.Tensor:
        """Logits [n, vocab] after each of n prompt chunks (slot, ids [t], start); one after another (each slot's
        scan carries its own state)."""
        return torch.cat([self.prefill_slot(slot, chunk[None], start) for slot, chunk, start in parts])

    def prefill_slot(self, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, vocab] after a chunk ``ids`` [1, t] of slot ``slot``'s prompt (state reset at start 0)."""
        if start == 0:
            for layer in self.layers:
                layer.conv_slots[slot].zero_()
                layer.ssm_slots[slot].zero_()
        x = F.embedding(ids[0], self.embed)
        for layer in self.layers:
            x = layer.forward_slot(x, slot)
        return self.lm_head(self.norm(x[-1:]).to(self.dtype)).float()


def _dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """A linear layer's weight [out, in] as numbers (dequantised: int8 / int4), or None if it cannot say."""
    from localgpt.generation.fast.quantize import Int4Linear, Int8Linear

    if isinstance(layer, Int4Linear):
        return layer.dequantize()[:, :layer.x_features]
    if isinstance(layer, Int8Linear):
        return (layer.int8_weight().float() * layer.scales.float()[:, None])[:, :layer.x_features]
    weight = getattr(layer, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point() else None


def from_mamba(hf: nn.Module) -> Mamba:
    cfg, body = hf.config, hf.backbone
    falcon = cfg.model_type == "falcon_mamba"
    shape = MambaShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.conv_kernel,
                       int(cfg.time_step_rank), cfg.vocab_size, cfg.layer_norm_epsilon,
                       cfg.mixer_rms_eps if falcon else None, bool(cfg.residual_in_fp32))
    layers = []
    for block in body.layers:
        m = block.mixer
        layers.append(MambaLayer(
            shape, norm=RMSNorm(block.norm.weight.data, block.norm.variance_epsilon), in_proj=_linear(m.in_proj),
            conv_w=m.conv1d.weight.data[:, 0], conv_b=None if m.conv1d.bias is None else m.conv1d.bias.data,
            x_proj=_linear(m.x_proj), dt_w=m.dt_proj.weight.data, dt_b=m.dt_proj.bias.data, A_log=m.A_log.data,
            D=m.D.data, out_proj=_linear(m.out_proj)))
    return Mamba(shape, body.embeddings.weight.data, layers, RMSNorm(body.norm_f.weight.data, cfg.layer_norm_epsilon),
                 _linear(hf.lm_head))
