"""Triton kernels behind ``triton_experts.py``. Imports triton at module load: import it lazily.

Two launches per call, no host sync:
1. ``gate_up_kernel``, grid ``(N*K, cdiv(I, BLOCK_OUT))``: one program per (token, k) pair and tile of
   intermediate rows. It reads the pair's slot from ``slot_ids``, does nothing for a negative slot, and
   otherwise writes ``act[pair, i] = silu(gate x) * (up x)`` in fp32.
2. ``down_kernel``, grid ``(N, cdiv(H, BLOCK_OUT))``: one program per token and tile of hidden rows. It
   loops over the token's K pairs, skips negative slots, and accumulates ``weight * down @ act[pair]``;
   each output element is owned by one program, so there are no atomics.

Both are matrix-vector products (``matvec``): a ``[BLOCK_OUT, BLOCK_IN]`` weight tile is loaded
row-major (contiguous along the input dim, so loads coalesce), dequantised in registers, multiplied by
the matching slice of the input vector and reduced over the input dim, in fp32. ``FMT`` selects the
slot format at compile time: 0 = bf16, 1 = int8 with a per-row scale (applied once after the reduction),
2 = packed int4 with a per-group scale and offset (``BLOCK_IN`` divides the group, so one scale and one
offset per row per tile: ``sum_j w_j x_j = scale * sum_j q_j x_j + offset * sum_j x_j``), 3 = GGUF Q8_0
rows as the host store holds them (blocks of an fp16 scale and 32 int8 values, ``BLOCK_IN`` = 32: one
block per tile, its scale applied after the tile's reduction), 4 = GGUF Q4_K rows (super-blocks of 256
values, 144 bytes: fp16 d and dmin, twelve bytes of 6-bit sub-block scales and mins, 128 bytes of
nibbles; ``BLOCK_IN`` = 32: one sub-block per tile, ``sum_j w_j x_j = d sc sum_j q_j x_j - dmin m sum_j x_j``),
5 = GGUF Q6_K rows (super-blocks of 256 values, 210 bytes: 128 bytes of low nibbles, 64 of high bit
pairs, 16 int8 scales of 16 values each, fp16 d; ``BLOCK_IN`` = 32), 7 = GGUF Q5_K rows (Q4_K's layout
with 32 bytes of fifth bits before the nibbles), 8 = GGUF BF16 rows (two little-endian bytes per
value, read as bytes and bit-cast), 6 = GGUF slots of mixed types: the slot's type for each projection
is read from a per-slot code array and the matching format runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def matvec(w_ptr, scale_ptr, offset_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE,
           FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """fp32 ``[BLOCK_OUT]``: rows ``offs_out`` of one ``[OUT, IN]`` matrix times the vector at ``vec_ptr``.

    ``w_ptr``, ``scale_ptr`` and ``offset_ptr`` already point at the slot's matrix and scales;
    ``ROW_STRIDE``: bytes from one row to the next of a GGUF slot (its rows are as wide as the widest
    type the pool holds).
    """
    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    rows = offs_out.to(tl.int64)                                            # [BLOCK_OUT]
    if FMT == 2:
        half = IN // 2
        n_groups = IN // GROUP
        for k0 in range(0, IN, BLOCK_IN):
            offs_p = k0 // 2 + tl.arange(0, BLOCK_IN // 2)                  # [BLOCK_IN/2] packed columns
            mask_p = offs_p < half
            x_even = tl.load(vec_ptr + 2 * offs_p, mask=mask_p, other=0.0).to(tl.float32)
            x_odd = tl.load(vec_ptr + 2 * offs_p + 1, mask=mask_p, other=0.0).to(tl.float32)
            b = tl.load(w_ptr + rows[:, None] * half + offs_p[None, :],
                        mask=mask_out[:, None] & mask_p[None, :], other=0)   # [BLOCK_OUT, BLOCK_IN/2]
            lo = (b & 0xF).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            qx = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1)  # [BLOCK_OUT]
            xsum = tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0)
            g_off = rows * n_groups + k0 // GROUP                           # [BLOCK_OUT]
            sc = tl.load(scale_ptr + g_off, mask=mask_out, other=0.0)
            of = tl.load(offset_ptr + g_off, mask=mask_out, other=0.0)
            acc += qx * sc + of * xsum
    elif FMT == 3:
        base = rows * ROW_STRIDE                                            # [BLOCK_OUT] int64 row starts
        for k0 in range(0, IN, 32):
            blk = base + (k0 // 32) * 34                                    # [BLOCK_OUT] block starts
            v = tl.load(vec_ptr + k0 + tl.arange(0, 32)).to(tl.float32)     # [32]
            q = tl.load(w_ptr + blk[:, None] + 2 + tl.arange(0, 32)[None, :], mask=mask_out[:, None],
                        other=0)                                            # [BLOCK_OUT, 32] uint8
            q = q.to(tl.int8, bitcast=True).to(tl.float32)
            lo = tl.load(w_ptr + blk, mask=mask_out, other=0).to(tl.uint16)
            hi = tl.load(w_ptr + blk + 1, mask=mask_out, other=0).to(tl.uint16)
            d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)  # [BLOCK_OUT] fp16 scales
            acc += tl.sum(q * v[None, :], axis=1) * d
    elif FMT == 4 or FMT == 7:  # Q4_K, or Q5_K: the same super-block plus 32 bytes of fifth bits
        SB = 144 if FMT == 4 else 176                                       # super-block bytes
        QS = 16 if FMT == 4 else 48                                         # where the nibbles start
        base = rows * ROW_STRIDE                                            # [BLOCK_OUT] int64 row starts
        for k0 in range(0, IN, 32):
            sb = base + (k0 // 256) * SB                                    # [BLOCK_OUT] super-block starts
            j = (k0 % 256) // 32                                            # sub-block 0..7
            v = tl.load(vec_ptr + k0 + tl.arange(0, 32)).to(tl.float32)     # [32]
            qb = tl.load(w_ptr + sb[:, None] + QS + (j // 2) * 32 + tl.arange(0, 32)[None, :],
                         mask=mask_out[:, None], other=0).to(tl.int32)      # [BLOCK_OUT, 32]
            q = tl.where(j % 2 == 0, qb & 0xF, qb >> 4)
            if FMT == 7:  # sub-block j's fifth bit is bit j of qh[l]
                qh = tl.load(w_ptr + sb[:, None] + 16 + tl.arange(0, 32)[None, :], mask=mask_out[:, None],
                             other=0).to(tl.int32)
                q = q + (((qh >> j) & 1) << 4)
            q = q.to(tl.float32)
            lo = j < 4
            ja = tl.where(lo, j, j + 4)       # byte holding sc's low bits (and m's for j >= 4)
            jb = tl.where(lo, j + 4, j - 4)   # byte holding m's low bits (j < 4) or sc's high bits
            a = tl.load(w_ptr + sb + 4 + ja, mask=mask_out, other=0).to(tl.int32)
            b = tl.load(w_ptr + sb + 4 + jb, mask=mask_out, other=0).to(tl.int32)
            c = tl.load(w_ptr + sb + 4 + j, mask=mask_out, other=0).to(tl.int32)  # m's high bits (j >= 4)
            sc = tl.where(lo, a & 63, (a & 0xF) | ((b >> 6) << 4)).to(tl.float32)
            mn = tl.where(lo, b & 63, (a >> 4) | ((c >> 6) << 4)).to(tl.float32)
            d0 = tl.load(w_ptr + sb, mask=mask_out, other=0).to(tl.uint16)
            d1 = tl.load(w_ptr + sb + 1, mask=mask_out, other=0).to(tl.uint16)
            m0 = tl.load(w_ptr + sb + 2, mask=mask_out, other=0).to(tl.uint16)
            m1 = tl.load(w_ptr + sb + 3, mask=mask_out, other=0).to(tl.uint16)
            d = (d0 | (d1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = (m0 | (m1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += d * sc * tl.sum(q * v[None, :], axis=1) - dmin * mn * tl.sum(v, axis=0)
    elif FMT == 5:
        base = rows * ROW_STRIDE                                            # [BLOCK_OUT] int64 row starts
        cols = tl.arange(0, 32)
        for k0 in range(0, IN, 32):
            sb = base + (k0 // 256) * 210                                   # [BLOCK_OUT] super-block starts
            r = (k0 % 256) // 32                                            # 0..7: half r // 4, quarter r % 4
            h = r // 4
            qi = r % 4
            v = tl.load(vec_ptr + k0 + cols).to(tl.float32)                 # [32]
            m2 = mask_out[:, None]
            ql = tl.load(w_ptr + sb[:, None] + h * 64 + (qi % 2) * 32 + cols[None, :], mask=m2,
                         other=0).to(tl.int32)                              # [BLOCK_OUT, 32]
            nib = tl.where(qi < 2, ql & 0xF, ql >> 4)
            qh = tl.load(w_ptr + sb[:, None] + 128 + h * 32 + cols[None, :], mask=m2, other=0).to(tl.int32)
            q = (nib | (((qh >> (qi * 2)) & 3) << 4)) - 32
            sc = tl.load(w_ptr + sb[:, None] + 192 + h * 8 + qi * 2 + cols[None, :] // 16, mask=m2, other=0)
            sc = sc.to(tl.int8, bitcast=True).to(tl.float32)                # [BLOCK_OUT, 32] per-16 scales
            d0 = tl.load(w_ptr + sb + 208, mask=mask_out, other=0).to(tl.uint16)
            d1 = tl.load(w_ptr + sb + 209, mask=mask_out, other=0).to(tl.uint16)
            d = (d0 | (d1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += d * tl.sum(q.to(tl.float32) * sc * v[None, :], axis=1)
    elif FMT == 8:
        base = rows * ROW_STRIDE                                            # [BLOCK_OUT] int64 row starts
        cols = tl.arange(0, 32)
        for k0 in range(0, IN, 32):
            offs_in = k0 + cols                                             # [32]
            mask_in = offs_in < IN
            v = tl.load(vec_ptr + offs_in, mask=mask_in, other=0.0).to(tl.float32)
            m2 = mask_out[:, None] & mask_in[None, :]
            p = w_ptr + base[:, None] + offs_in[None, :] * 2                # [BLOCK_OUT, 32] low bytes
            lo = tl.load(p, mask=m2, other=0).to(tl.uint16)
            hi = tl.load(p + 1, mask=m2, other=0).to(tl.uint16)
            w = (lo | (hi << 8)).to(tl.bfloat16, bitcast=True).to(tl.float32)
            acc += tl.sum(w * v[None, :], axis=1)
    else:
        for k0 in range(0, IN, BLOCK_IN):
            offs_in = k0 + tl.arange(0, BLOCK_IN)                           # [BLOCK_IN]
            mask_in = offs_in < IN
            v = tl.load(vec_ptr + offs_in, mask=mask_in, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * IN + offs_in[None, :],
                        mask=mask_out[:, None] & mask_in[None, :], other=0)  # [BLOCK_OUT, BLOCK_IN]
            acc += tl.sum(w.to(tl.float32) * v[None, :], axis=1)
        if FMT == 1:
            acc *= tl.load(scale_ptr + rows, mask=mask_out, other=0.0)
    return acc


@triton.jit
def weight_matvec(code, w_ptr, scale_ptr, offset_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE,
                  FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """``matvec`` in format ``FMT``; for ``FMT`` 6 (GGUF slots of mixed types) in the slot's own ``code``
    (3 = Q8_0, 4 = Q4_K, 5 = Q6_K, 7 = Q5_K, 8 = BF16), a branch taken at run time."""
    if FMT == 6:
        if code == 8:
            acc = matvec(w_ptr, w_ptr, w_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, 8, 1, BLOCK_OUT, 32)
        elif code == 3:
            acc = matvec(w_ptr, w_ptr, w_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, 3, 1, BLOCK_OUT, 32)
        elif code == 4:
            acc = matvec(w_ptr, w_ptr, w_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, 4, 1, BLOCK_OUT, 32)
        elif code == 5:
            acc = matvec(w_ptr, w_ptr, w_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, 5, 1, BLOCK_OUT, 32)
        else:
            acc = matvec(w_ptr, w_ptr, w_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, 7, 1, BLOCK_OUT, 32)
    else:
        acc = matvec(w_ptr, scale_ptr, offset_ptr, vec_ptr, offs_out, mask_out, IN, ROW_STRIDE, FMT, GROUP,
                     BLOCK_OUT, BLOCK_IN)
    return acc


@triton.jit
def gate_up_kernel(x_ptr, slot_ids_ptr, act_ptr,
                   wg_ptr, sg_ptr, og_ptr, wu_ptr, su_ptr, ou_ptr, tg_ptr, tu_ptr,
                   H, I, K, W_STRIDE, S_STRIDE, ROW_STRIDE, WU_STRIDE, ROW_STRIDE_U,
                   FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """act[pair, tile] = silu(gate x) * up x for one (token, k) pair; nothing for a negative slot.
    ``W_STRIDE``/``ROW_STRIDE`` are gate's slot and row strides, ``WU_STRIDE``/``ROW_STRIDE_U`` up's (GGUF
    slots give each projection its own width)."""
    pair = tl.program_id(0)
    slot = tl.load(slot_ids_ptr + pair)
    if slot >= 0:
        tok = pair // K
        s64 = slot.to(tl.int64)
        offs_out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)   # [BLOCK_OUT] rows of I
        mask_out = offs_out < I
        vec = x_ptr + tok.to(tl.int64) * H
        code_g = 0
        code_u = 0
        if FMT == 6:  # GGUF slots of mixed types: each projection's type for this slot
            code_g = tl.load(tg_ptr + s64)
            code_u = tl.load(tu_ptr + s64)
        g = weight_matvec(code_g, wg_ptr + s64 * W_STRIDE, sg_ptr + s64 * S_STRIDE, og_ptr + s64 * S_STRIDE,
                          vec, offs_out, mask_out, H, ROW_STRIDE, FMT, GROUP, BLOCK_OUT, BLOCK_IN)
        u = weight_matvec(code_u, wu_ptr + s64 * WU_STRIDE, su_ptr + s64 * S_STRIDE, ou_ptr + s64 * S_STRIDE,
                          vec, offs_out, mask_out, H, ROW_STRIDE_U, FMT, GROUP, BLOCK_OUT, BLOCK_IN)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + pair.to(tl.int64) * I + offs_out, act, mask=mask_out)


@triton.jit
def down_kernel(act_ptr, slot_ids_ptr, weights_ptr, out_ptr,
                wd_ptr, sd_ptr, od_ptr, td_ptr,
                H, I, K, W_STRIDE, S_STRIDE, ROW_STRIDE,
                FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """out[tok, tile] = sum_k weight * down @ act[pair] over the token's pairs with a slot."""
    tok = tl.program_id(0)
    offs_out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)       # [BLOCK_OUT] rows of H
    mask_out = offs_out < H
    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    for k in range(0, K):
        pair = tok * K + k
        slot = tl.load(slot_ids_ptr + pair)
        if slot >= 0:
            s64 = slot.to(tl.int64)
            wgt = tl.load(weights_ptr + pair)
            code = 0
            if FMT == 6:
                code = tl.load(td_ptr + s64)
            y = weight_matvec(code, wd_ptr + s64 * W_STRIDE, sd_ptr + s64 * S_STRIDE, od_ptr + s64 * S_STRIDE,
                              act_ptr + pair.to(tl.int64) * I, offs_out, mask_out, I, ROW_STRIDE,
                              FMT, GROUP, BLOCK_OUT, BLOCK_IN)
            acc += wgt * y
    tl.store(out_ptr + tok.to(tl.int64) * H + offs_out, acc, mask=mask_out)
