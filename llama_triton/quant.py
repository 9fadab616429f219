"""Weight-only quantization, the weight *format* (below the ops): the packed layout the kernels read,
round-to-nearest quantization, GPTQ/AWQ/int8 import and GPTQ export, and the plain-PyTorch dequantisation
(the test oracle). Model surgery (``quantize_model``, ``load_quantized_state_dict``, saving a model as a
GPTQ checkpoint) is in ``llama_triton.quantize`` (above the layers); the names are re-exported here.

A linear weight ``W (N, K)`` (``nn.Linear`` layout: out_features x in_features), ``bits`` in {4, 8},
``PACK = 32 // bits``, held by ``QuantizedWeight`` as:

    qweight  int32 (N, KP // PACK)  the codes q[k, n] in [0, 2**bits), repacked at load time into the
                                    K-interleaved layout of kernels/quant_layout.py (KP: K padded to a
                                    whole number of 16-word chunks); ``gptq_qweight()`` gives them back in
                                    GPTQ's layout (K // PACK, N): bits [i*bits, (i+1)*bits) of word [j, n]
                                    hold q[j*PACK + i, n]
    scales   (G, N) fp16/bf16/fp32  G = K // group_size; group_size == K means one scale per output channel
    zeros    (G, N) or None         integer zero points (uint8 for 4-bit, int16 for 8-bit); None means
                                    symmetric: the zero point is 2**(bits-1) (8 for 4-bit, 128 for 8-bit)
    perm     int32 (K,) or None     act-order (GPTQ desc_act): stored column k is input feature perm[k]

    W[n, perm[k]] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]     (perm = identity
                                                                                           when None)

group_size is K (per channel) or a power of two >= 16 dividing K (32/64/128 are the usual ones).

GPTQ checkpoints (``qweight`` int32 (K/PACK, N) packed along K, ``qzeros`` int32 (G, N/PACK) packed along N,
``scales`` (G, N), ``g_idx`` int32 (K,)). ``checkpoint_format="gptq"`` (v1, AutoGPTQ) stores ``zero - 1`` in
qzeros: the importer adds the 1 back (v1's overflow included: a stored 2**bits - 1 means zero point
2**bits); ``"gptq_v2"`` (GPTQModel) stores the zero point itself.
Act-order: ``g_idx[k]`` is the group of input feature k, in no particular order. We reorder at load time:
``perm = argsort(g_idx)`` (stable) makes every group a contiguous run of group_size stored columns, the codes
are re-packed in that order, and the kernel reads x's columns through ``perm`` (a gather of the small
activation, once per K tile) instead of gathering scales and zeros per element in the hot loop. Scales and
zeros keep their group index, so they are not touched. ``to_gptq`` undoes all of it (original feature order,
g_idx, packed qzeros), so what we write is a standard GPTQ checkpoint.

AWQ checkpoints (AutoAWQ GEMM: ``qweight`` int32 (K, N/8) packed along N, nibble i of word c holding column
``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``; ``qzeros`` int32 (G, N/8) packed the same way; ``scales`` (G, N);
``W = (q - zero) * scale``) are unpacked and repacked (4-bit only, as AWQ is).

Symmetric int8 weight-only tensors (``weight`` int8 (N, K), per-channel ``scales``; ``import_int8``) become
8-bit codes ``weight + 128`` with the midpoint zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .kernels.quant_layout import repack_codes, repacked_shape, unrepack_codes

SUPPORTED_BITS = (4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
SOURCES = ("rtn", "gptq", "gptq_v2", "awq", "int8")
LAYOUTS = ("repacked", "gptq")
_SURGERY = ("quantize_model", "load_quantized_state_dict", "gptq_state_dict", "save_gptq")


def __getattr__(name):
    """Model surgery moved to llama_triton.quantize (above the layers); re-exported lazily, so that this
    format module never imports the layers."""
    if name in _SURGERY:
        from . import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_bits(bits) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 32 // bits


def zeros_dtype(bits: int) -> torch.dtype:
    """Storage dtype of zero points: uint8 for 4-bit, int16 for 8-bit (GPTQ v1's zero point 256 fits)."""
    return torch.uint8 if bits == 4 else torch.int16


def check_group_size(group_size: int, K: int) -> None:
    """Raise ValueError unless group_size is K (per channel) or a power of two >= 16 dividing K."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or K % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of in_features K={K} "
                         "(or -1 for one group per output channel)")
    if group_size != K and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"group_size={group_size} must be a power of two >= 16, or K={K} (per output channel)")


# -------------------------------------------------------------------------------------- packing helpers
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (R, C) in [0, 2**bits) -> int32 (R / PACK, C), PACK consecutive rows per word (low first)."""
    pack = _check_bits(bits)
    R, C = q.shape
    if R % pack:
        raise ValueError(f"cannot pack {R} rows {pack} to an int32 word: not a multiple of {pack}")
    q = q.to(torch.int64).reshape(R // pack, pack, C)
    shifts = (torch.arange(pack, device=q.device) * bits).view(1, pack, 1)
    return _to_int32((q << shifts).sum(1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R / PACK, C) -> int64 codes (R, C); the inverse of pack_rows."""
    pack = _check_bits(bits)
    shifts = (torch.arange(pack, device=words.device) * bits).view(1, pack, 1)
    q = (words.to(torch.int64)[:, None, :] >> shifts) & ((1 << bits) - 1)
    return q.reshape(-1, words.shape[1])


def pack_cols(q: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Codes (R, C) -> int32 (R, C / PACK), PACK consecutive columns per word; value i of word c (bits
    [i*bits, ...)) is column PACK*c + order[i] (order: identity for GPTQ qzeros, AWQ_ORDER for AWQ)."""
    pack = _check_bits(bits)
    order = list(order) if order is not None else list(range(pack))
    R, C = q.shape
    if C % pack:
        raise ValueError(f"cannot pack {C} columns {pack} to an int32 word: not a multiple of {pack}")
    q = q.to(torch.int64).reshape(R, C // pack, pack)[:, :, order]
    shifts = torch.arange(pack, device=q.device) * bits
    return _to_int32((q << shifts).sum(-1))


def unpack_cols(words: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 (R, C / PACK) -> int64 codes (R, C); the inverse of pack_cols with the same order."""
    pack = _check_bits(bits)
    order = list(order) if order is not None else list(range(pack))
    shifts = torch.arange(pack, device=words.device) * bits
    vals = (words.to(torch.int64)[:, :, None] >> shifts) & ((1 << bits) - 1)   # value i of each word
    inverse = [order.index(j) for j in range(pack)]                              # column j is value inverse[j]
    return vals[:, :, inverse].reshape(words.shape[0], -1)


# ------------------------------------------------------------------------------------------ the weight
@dataclass
class QuantizedWeight:
    """A quantized linear weight ``W (out_features N, in_features K)`` in our format (module docstring).

    Attributes: ``qweight`` int32, repacked (N, KP // PACK); ``scales`` (G, N); ``zeros`` (G, N) or None
    (symmetric); ``perm`` int32 (K,) or None (act-order); ``bits`` 4 or 8; ``group_size`` (K: per channel);
    ``source`` the layout it came from ("rtn", "gptq", "gptq_v2", "awq", "int8"); ``error``: reconstruction
    error of ``quantize_weight`` ({"max_abs", "rel_fro"}) or None.

    Construct it from GPTQ's qweight layout ``(K // PACK, N)`` (the default ``layout="gptq"``: repacked here,
    once) or, with ``layout="repacked"`` and ``in_features=K``, from tensors already repacked.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    perm: torch.Tensor | None = None
    source: str = "rtn"
    error: dict | None = field(default=None, compare=False)
    layout: str = "gptq"
    in_features: int | None = None

    def __post_init__(self):
        pack = _check_bits(self.bits)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dtype != torch.int32 or self.qweight.dim() != 2:
            raise TypeError("qweight must be a 2-D int32 tensor ((K // (32 // bits), N) in GPTQ's layout)")
        if self.layout == "gptq":
            K = self.qweight.shape[0] * pack
            if self.in_features not in (None, K):
                raise ValueError(f"in_features={self.in_features} does not match qweight {tuple(self.qweight.shape)} "
                                 f"(GPTQ layout, {self.bits}-bit: K = {K})")
            self.qweight = repack_codes(unpack_rows(self.qweight, self.bits), self.bits)
            self.in_features, self.layout = K, "repacked"
        if not isinstance(self.in_features, (int, torch.SymInt)) or self.in_features < 1 or self.in_features % pack:
            raise ValueError(f"in_features must be a positive multiple of {pack} for a repacked {self.bits}-bit "
                             f"qweight, got {self.in_features!r}")
        K, N = self.in_features, self.qweight.shape[0]
        if tuple(self.qweight.shape) != repacked_shape(K, N, self.bits):
            raise ValueError(f"qweight has shape {tuple(self.qweight.shape)}; the repacked layout for K={K}, "
                             f"N={N}, {self.bits}-bit is {repacked_shape(K, N, self.bits)}")
        check_group_size(self.group_size, K)
        G = K // self.group_size
        if not isinstance(self.scales, torch.Tensor) or not self.scales.is_floating_point():
            raise TypeError("scales must be a floating-point tensor (K // group_size, N)")
        if tuple(self.scales.shape) != (G, N):
            raise ValueError(f"scales has shape {tuple(self.scales.shape)}; expected ({G}, {N}) for a {N}x{K} "
                             f"weight, {self.bits}-bit, group_size={self.group_size}")
        if self.zeros is not None and tuple(self.zeros.shape) != (G, N):
            raise ValueError(f"zeros has shape {tuple(self.zeros.shape)}; expected ({G}, {N})")
        if self.perm is not None and tuple(self.perm.shape) != (K,):
            raise ValueError(f"perm has shape {tuple(self.perm.shape)}; expected ({K},)")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales, zeros, bits: int, group_size: int, perm=None, source="rtn",
                   error=None) -> "QuantizedWeight":
        """From integer codes ``q (K, N)`` (stored column order) in [0, 2**bits)."""
        return cls(repack_codes(q, bits), scales, zeros, bits, group_size, perm, source, error,
                   layout="repacked", in_features=q.shape[0])

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def shape(self) -> tuple:
        """(out_features, in_features), like the nn.Linear weight it stands for."""
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """The integer codes ``q (K, N)`` int64, in stored column order (perm applied)."""
        return unrepack_codes(self.qweight, self.in_features, self.bits)

    def gptq_qweight(self) -> torch.Tensor:
        """The codes in GPTQ's qweight layout, int32 ``(K // PACK, N)`` (stored column order)."""
        return pack_rows(self.codes(), self.bits)

    def to(self, device=None, dtype=None) -> "QuantizedWeight":
        """Move to a device; ``dtype`` changes the scales' dtype only (the codes stay integers)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        scales = self.scales.to(device=device, dtype=dtype) if dtype is not None else self.scales.to(device)
        return replace(self, qweight=mv(self.qweight), scales=scales, zeros=mv(self.zeros), perm=mv(self.perm))

    def nbytes(self) -> int:
        """Bytes of the quantized tensors (what a matmul streams from memory)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)


def _zero_points(qw: QuantizedWeight) -> torch.Tensor:
    if qw.zeros is not None:
        return qw.zeros.to(torch.int64)
    return torch.full_like(qw.scales, 1 << (qw.bits - 1), dtype=torch.int64)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference: the weight ``W (N, K)`` in ``dtype`` (default: the scales' dtype), in the
    original input-feature order (act-order undone). Computed in fp32 (fp64 for fp64) and rounded once."""
    dtype = dtype or qw.scales.dtype
    ct = torch.promote_types(dtype, torch.float32)
    q = qw.codes()                                                         # (K, N) codes, stored order
    rep = lambda t: t.repeat_interleave(qw.group_size, dim=0)            # noqa: E731  (G, N) -> (K, N)
    w_t = (q - rep(_zero_points(qw))).to(ct) * rep(qw.scales.to(ct))     # (K, N)
    if qw.perm is not None:
        out = torch.empty_like(w_t)
        out[qw.perm.long()] = w_t                                          # stored row k is feature perm[k]
        w_t = out
    return w_t.t().contiguous().to(dtype)


# --------------------------------------------------------------------------------------- RTN quantizer
def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of an ``nn.Linear`` weight ``w (N, K)`` (fp16/bf16/fp32).

    sym=True: ``scale = max|w| / (2**(bits-1) - 1)`` per group, zero point 2**(bits-1) (zeros=None);
    sym=False: ``scale = (max - min) / (2**bits - 1)`` with min <= 0 <= max, zero = round(-min / scale).
    group_size: a power of two >= 16 dividing K, or -1 / K for one group per output channel.
    Scales are kept in w's dtype. The returned weight's ``error`` holds the reconstruction error
    ``{"max_abs": max|W - dequant|, "rel_fro": ||W - dequant||_F / ||W||_F}``.
    """
    _check_bits(bits)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError("w must be a 2-D floating-point tensor (out_features, in_features)")
    N, K = w.shape
    pack = 32 // bits
    if K % pack:
        raise ValueError(f"in_features K={K} must be a multiple of {pack} for {bits}-bit packing")
    if group_size == -1:
        group_size = K
    check_group_size(group_size, K)
    G, maxq = K // group_size, (1 << bits) - 1
    wg = w.detach().to(torch.float32).reshape(N, G, group_size)          # (N, G, g)
    if sym:
        amax = wg.abs().amax(-1)
        scale = (amax / ((1 << (bits - 1)) - 1)).to(w.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int64)
    else:
        wmin, wmax = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((wmax - wmin) / maxq).to(w.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale.float()).clamp(0, maxq).to(torch.int64)
    # codes from the scale as stored (rounded to w's dtype), so dequantize reproduces what we chose
    q = torch.round(wg / scale.float()[..., None]) + zero[..., None]
    q = q.clamp(0, maxq).to(torch.int64).reshape(N, K)
    qw = QuantizedWeight.from_codes(q.t(), scale.t().contiguous(),
                                    None if sym else zero.t().contiguous().to(zeros_dtype(bits)), bits, group_size)
    diff = dequantize(qw, torch.float32) - w.detach().float()
    qw.error = {"max_abs": diff.abs().max().item(),
                "rel_fro": (diff.norm() / w.detach().float().norm().clamp_min(1e-30)).item()}
    return qw


# ------------------------------------------------------------------------------------ checkpoint import
def _act_order_perm(g_idx: torch.Tensor, K: int, group_size: int):
    """perm putting each group's features in one contiguous run, or None when g_idx is already in order."""
    if g_idx is None:
        return None
    if not isinstance(g_idx, torch.Tensor) or g_idx.dim() != 1 or g_idx.shape[0] != K or g_idx.is_floating_point():
        raise ValueError(f"g_idx must be an integer tensor of shape ({K},), got "
                         f"{tuple(g_idx.shape) if isinstance(g_idx, torch.Tensor) else type(g_idx).__name__}")
    g_idx = g_idx.long()
    expected = torch.arange(K, device=g_idx.device) // group_size
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        raise ValueError(f"g_idx does not assign exactly group_size={group_size} input features to each of the "
                         f"{K // group_size} groups; such checkpoints are not supported")
    return perm.to(torch.int32)


def _infer_group_size(K: int, scales: torch.Tensor, group_size) -> int:
    G = scales.shape[0]
    if G < 1 or K % G:
        raise ValueError(f"scales has {G} rows, which does not divide in_features K={K}")
    inferred = K // G
    if group_size not in (None, -1, inferred):
        raise ValueError(f"group_size={group_size} does not match the checkpoint: scales has {G} rows for K={K} "
                         f"(group_size {inferred})")
    return inferred


def _finish_zeros(zeros: torch.Tensor, bits: int):
    """Zero points (G, N) int64 -> None when all are the symmetric midpoint, else our storage dtype."""
    if bool((zeros == (1 << (bits - 1))).all()):
        return None
    return zeros.to(zeros_dtype(bits))


def _check_packed_tensors(qweight, qzeros, scales) -> None:
    """GPTQ/AWQ checkpoint tensors: int32 2-D qweight and qzeros, floating 2-D scales (TypeError otherwise)."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int32 tensor")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        raise TypeError("scales must be a 2-D floating-point tensor (K // group_size, N)")


def import_gptq(qweight, qzeros, scales, g_idx=None, bits: int = 4, group_size: int | None = None,
                checkpoint_format: str = "gptq") -> QuantizedWeight:
    """A GPTQ linear (AutoGPTQ / GPTQModel tensors) -> QuantizedWeight (format in the module docstring).

    qweight int32 (K/PACK, N); qzeros int32 (G, N/PACK); scales (G, N); g_idx int (K,) or None;
    checkpoint_format "gptq" (v1: stored zero = zero - 1) or "gptq_v2". Act-order is resolved here.
    """
    pack = _check_bits(bits)
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' (v1) or 'gptq_v2', got {checkpoint_format!r}")
    _check_packed_tensors(qweight, qzeros, scales)
    K, N = qweight.shape[0] * pack, qweight.shape[1]
    group_size = _infer_group_size(K, scales, group_size)
    check_group_size(group_size, K)
    G = K // group_size
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales has shape {tuple(scales.shape)}; expected ({G}, {N}) for qweight {tuple(qweight.shape)}")
    if tuple(qzeros.shape) != (G, N // pack) or N % pack:
        raise ValueError(f"qzeros has shape {tuple(qzeros.shape)}; expected ({G}, {N // pack}) ({bits}-bit zero "
                         f"points packed {pack} per int32 along N={N})")
    zeros = unpack_cols(qzeros, bits)                                    # (G, N)
    if checkpoint_format == "gptq":
        zeros = zeros + 1                                                # v1 stores zero - 1
    perm = _act_order_perm(g_idx, K, group_size)
    q = unpack_rows(qweight, bits)                                       # (K, N), feature order
    if perm is not None:
        q = q[perm.long()]                                               # stored order: groups contiguous
    return QuantizedWeight.from_codes(q, scales.contiguous(), _finish_zeros(zeros, bits), bits, group_size, perm,
                                      source=checkpoint_format)


def import_awq(qweight, qzeros, scales, bits: int = 4, group_size: int | None = None) -> QuantizedWeight:
    """An AutoAWQ GEMM linear -> QuantizedWeight: qweight int32 (K, N/8) and qzeros int32 (G, N/8) packed
    along N in AWQ's order (module docstring); scales (G, N). Re-packed along K."""
    if bits != 4:
        raise ValueError(f"AWQ checkpoints are 4-bit; bits must be 4, got {bits!r}")
    _check_packed_tensors(qweight, qzeros, scales)
    K, N = qweight.shape[0], qweight.shape[1] * 8
    if K % 8:
        raise ValueError(f"qweight has {K} rows (in_features); it must be a multiple of 8")
    group_size = _infer_group_size(K, scales, group_size)
    check_group_size(group_size, K)
    G = K // group_size
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales has shape {tuple(scales.shape)}; expected ({G}, {N}) for qweight {tuple(qweight.shape)}")
    if tuple(qzeros.shape) != (G, N // 8):
        raise ValueError(f"qzeros has shape {tuple(qzeros.shape)}; expected ({G}, {N // 8})")
    q = unpack_cols(qweight, 4, AWQ_ORDER)                               # (K, N)
    zeros = unpack_cols(qzeros, 4, AWQ_ORDER)                            # (G, N)
    return QuantizedWeight.from_codes(q, scales.contiguous(), _finish_zeros(zeros, 4), 4, group_size, source="awq")


def import_int8(weight: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 weight-only tensors (torchao / LLM.int8-style): ``weight`` int8 (N, K), ``scales``
    (N,) or (N, 1) float, ``W = weight * scales`` -> an 8-bit per-channel QuantizedWeight (codes shifted by
    the midpoint 128, packed along K)."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError("weight must be a 2-D int8 tensor (out_features, in_features)")
    N, K = weight.shape
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.numel() != N:
        raise ValueError(f"scales must be a floating-point tensor with one value per output channel ({N})")
    if K % 4:
        raise ValueError(f"in_features K={K} must be a multiple of 4 for 8-bit packing")
    codes = weight.to(torch.int64).t() + 128                           # (K, N) in [0, 255]
    return QuantizedWeight.from_codes(codes, scales.reshape(1, N).contiguous(), None, 8, K, source="int8")


# ------------------------------------------------------------------------------------------ GPTQ export
def to_gptq(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict:
    """A QuantizedWeight as a standard GPTQ checkpoint's tensors (what ``import_gptq`` reads back):
    ``qweight`` int32 (K/PACK, N) in input-feature order, ``qzeros`` int32 (G, N/PACK) packed along N
    (v1 ``"gptq"``: zero - 1; ``"gptq_v2"``: the zero point), ``scales`` (G, N) and ``g_idx`` int32 (K,)
    (each feature's group: act-order survives). Raises ValueError for a zero point the format cannot hold
    (v1: 0; v2: 2**bits) or N not a multiple of PACK."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' (v1) or 'gptq_v2', got {checkpoint_format!r}")
    pack, maxq = 32 // qw.bits, (1 << qw.bits) - 1
    K, N = qw.in_features, qw.out_features
    if N % pack:
        raise ValueError(f"out_features N={N} must be a multiple of {pack} to pack {qw.bits}-bit GPTQ qzeros")
    q = qw.codes()                                                       # (K, N) stored order
    g_idx = torch.arange(K, device=q.device, dtype=torch.int32) // qw.group_size
    if qw.perm is not None:                                              # stored column j is feature perm[j]
        perm = qw.perm.long()
        q_feat, g_feat = torch.empty_like(q), torch.empty_like(g_idx)
        q_feat[perm], g_feat[perm] = q, g_idx
        q, g_idx = q_feat, g_feat
    z = _zero_points(qw)                                                 # (G, N) int64
    if checkpoint_format == "gptq":
        if bool((z == 0).any()):
            raise ValueError("a zero point is 0, which GPTQ v1 (stored zero - 1) cannot represent; "
                             "use checkpoint_format='gptq_v2'")
        z = z - 1
    if bool((z > maxq).any()):
        raise ValueError(f"a zero point exceeds {maxq}, which {checkpoint_format} cannot store in {qw.bits} bits")
    return {"qweight": pack_rows(q, qw.bits), "qzeros": pack_cols(z, qw.bits), "scales": qw.scales.contiguous(),
            "g_idx": g_idx}
