"""The in-memory weight layout that ``quant_gemm``'s kernels read (torch only, no Triton).

Checkpoints (GPTQ) pack a 4/8-bit weight along K: ``qweight (K // PACK, N)`` int32, PACK = 32 // bits, value
i of word ``[j, n]`` is the code of ``W[n, j*PACK + i]``. Read row by row along N, that layout makes a GEMV
reduce across threads, and a kernel that wants one K run per thread has to load one int32 per code.

The kernels read a *K-interleaved, N-major* repacking instead, made once at load time:

    qweight  int32 (N, KP // PACK)      KP = K rounded up to a multiple of CHUNK_K = PACK * CHUNK_WORDS
    word  ``c * CHUNK_WORDS + w`` of row n, bits ``[i*bits, (i+1)*bits)``  hold the code of
          ``W[n, k]`` with ``k = c * CHUNK_K + i * CHUNK_WORDS + w``            (0 for the padding k >= K)

so a chunk is CHUNK_WORDS = 16 consecutive int32 words of one output row (64 bytes: four 128-bit loads),
and value i of those 16 words are 16 *consecutive* k. A kernel loads each word once, as (BLOCK_N, 16) tiles
(128-bit loads along the contiguous words), and takes value i of every word with one mask: that is a
contiguous (BLOCK_N, 16) slice of W for x[k0 + 16 i : k0 + 16 i + 16], which lies inside one quantisation
group (group sizes are powers of two >= 16), so each slice needs one scale and one zero point per row.
"""
from __future__ import annotations

import torch

CHUNK_WORDS = 16


def chunk_k(bits: int) -> int:
    """K values per chunk: 128 for 4-bit, 64 for 8-bit."""
    return (32 // bits) * CHUNK_WORDS


def padded_k(K: int, bits: int) -> int:
    """K rounded up to a whole number of chunks (the repacked row length in codes)."""
    ck = chunk_k(bits)
    return -(-K // ck) * ck


def repacked_shape(K: int, N: int, bits: int) -> tuple:
    """Shape of the repacked int32 qweight for a weight (N, K)."""
    return (N, padded_k(K, bits) // (32 // bits))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def repack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``q (K, N)`` in [0, 2**bits) -> the repacked int32 ``(N, KP // PACK)`` (module docstring)."""
    pack = 32 // bits
    K, N = q.shape
    KP = padded_k(K, bits)
    q = q.to(torch.int64)
    if KP != K:
        q = torch.cat([q, q.new_zeros(KP - K, N)])
    q = q.reshape(KP // chunk_k(bits), pack, CHUNK_WORDS, N)            # [c, i, w, n]: k = c*CK + i*16 + w
    q = q.permute(3, 0, 2, 1)                                            # [n, c, w, i]
    shifts = torch.arange(pack, device=q.device) * bits
    return _as_int32((q << shifts).sum(-1).reshape(N, -1)).contiguous()


def unrepack_codes(words: torch.Tensor, K: int, bits: int) -> torch.Tensor:
    """The repacked int32 ``(N, KP // PACK)`` -> int64 codes ``(K, N)``; the inverse of repack_codes."""
    pack = 32 // bits
    N = words.shape[0]
    shifts = torch.arange(pack, device=words.device) * bits
    q = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)  # [n, c*16 + w, i]
    q = q.reshape(N, -1, CHUNK_WORDS, pack).permute(1, 3, 2, 0)          # [c, i, w, n]
    return q.reshape(-1, N)[:K]
