"""The batched mxs1 checksum kernel (Triton, which ships with PyTorch's CUDA builds).

Imported only when a GPU checksum runs (sidecar.memory.cuda.device_checksums). Kept free of annotations other than
`tl.constexpr`: Triton reads the kernel's source.
"""

import triton
import triton.language as tl


@triton.jit
def mxs1_blocks(addrs, nwords, first, out, P: tl.constexpr, BLOCK: tl.constexpr):
    """One program per block of up to BLOCK 32-bit words of one range: its partial S0 and S1 (see device_checksum).

    addrs/nwords/first: int64 per block (address of its first word, words in it, index of its first word within its
    range); out: int64 [2 * blocks]. Every partial stays below 2^47: exact in int64.
    """
    pid = tl.program_id(0)
    base = tl.load(addrs + pid).to(tl.pointer_type(tl.int32))
    n = tl.load(nwords + pid)
    w0 = tl.load(first + pid)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(base + offs, mask=mask, other=0).to(tl.uint32).to(tl.int64)  # zero-extended: the word as unsigned
    idx = (w0 + offs.to(tl.int64)) % P + 1
    s1 = (idx * (u % P)) % P
    tl.store(out + 2 * pid, tl.sum(u, axis=0))
    tl.store(out + 2 * pid + 1, tl.sum(s1, axis=0))
