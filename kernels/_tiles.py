"""Tile scheduling shared by the GEMM kernels (rms_norm_matmul, quant_gemm prefill, low_rank)."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over an (M, N) output in grouped order (Triton tutorial 03): GROUP_M
    consecutive row tiles walk the column tiles together, so each weight column tile is re-read from L2 by
    GROUP_M programs in a row instead of once per row tile."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n
