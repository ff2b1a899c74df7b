"""The store of the quantized matmul (qmatmul_kernels.py): split-K partial sums combined through a zeroed fp32
workspace, then the fused epilogue (kernels/epilogue.py) on the finished sums.

Split-K: each program adds its partial sums into the workspace; the last program of a column block (an atomic
counter) reads the sums back while re-zeroing them, finishes and stores the tile, and resets the counter, so
the workspace is zero again for the next launch (CUDA-graph replays included).
Or, where the splits of a column block run as one thread-block cluster (CLUSTER, sm_90), their sums meet in
distributed shared memory (cluster_sum) and never reach global memory: no atomics, fence, counter or read-back."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.constexpr_function
def cluster_sum_ptx(ranks, pack, threads):
    """PTX of one inline-asm instance of cluster_sum: `pack` fp32 values of this thread ($pack..$2pack-1) -> their
    sums over the cluster's `ranks` CTAs ($0..$pack-1). The block declares its own shared buffer, `pack` floats
    for each of the CTA's `threads` threads, the same in every CTA since they all run this code. A cluster
    barrier, then each rank's slot through mapa + ld.shared::cluster (every CTA sums all ranks, its own included:
    same order, same sums), then a second barrier so that no CTA leaves, freeing its shared memory, while
    another still reads it."""
    outs = [f"${i}" for i in range(pack)]
    ins = "{" + ", ".join(f"${pack + i}" for i in range(pack)) + "}" if pack > 1 else f"${pack}"
    tmp = [f"t{i}" for i in range(pack)]
    vec = f".v{pack}" if pack > 1 else ""
    tmps = "{" + ", ".join(tmp) + "}" if pack > 1 else tmp[0]
    lines = [
        "{",
        f".shared .align 16 .b32 ember_cl[{threads * pack}];",
        ".reg .b32 a, ra, tid;",
        f".reg .f32 {', '.join(tmp)};",
        "mov.u32 tid, %tid.x;",
        "mov.u32 a, ember_cl;",
        f"mad.lo.u32 a, tid, {4 * pack}, a;",
        f"st.shared{vec}.f32 [a], {ins};",
        "barrier.cluster.arrive.release.aligned;",
        "barrier.cluster.wait.acquire.aligned;",
        *[f"mov.f32 {o}, 0f00000000;" for o in outs],
    ]
    for r in range(ranks):
        lines += [f"mapa.shared::cluster.u32 ra, a, {r};", f"ld.shared::cluster{vec}.f32 {tmps}, [ra];"]
        lines += [f"add.f32 {o}, {o}, {t};" for o, t in zip(outs, tmp)]
    lines += ["barrier.cluster.arrive.release.aligned;", "barrier.cluster.wait.acquire.aligned;", "}"]
    return "\n".join(lines)


@triton.constexpr_function
def cluster_sum_constraints(pack):
    return ",".join(["=r"] * pack + ["r"] * pack)


@triton.jit
def cluster_sum(acc, RANKS: tl.constexpr, PACK: tl.constexpr, THREADS: tl.constexpr):
    """acc (BM, BN) fp32, this CTA's partial sums -> their sum over the RANKS CTAs of its thread-block cluster,
    in every CTA; PACK values per asm instance (it must divide each thread's share of acc: qmatmul._cpack),
    THREADS threads a CTA.
    Plain Triton 3.6 cannot express a cross-CTA sum (scripts/probe_cluster_reduce.py), hence the PTX."""
    return tl.inline_asm_elementwise(cluster_sum_ptx(RANKS, PACK, THREADS), cluster_sum_constraints(PACK), [acc],
                                     dtype=tl.float32, is_pure=False, pack=PACK)


@triton.jit
def _operands(offs_m, m_mask, offs_n, n_mask, ss_in_ptr, res_ptr, stride_rm, gamma_ptr, NORM_IN: tl.constexpr,
              RESID: tl.constexpr):
    """What the epilogue reads besides the sums: NORM_IN the rows' sum of squares (BM,), RESID the residual
    tile (BM, BN) and gamma (BN,) (placeholders when off)."""
    ss = tl.load(ss_in_ptr + offs_m, mask=m_mask, other=0.0) if NORM_IN else 0.0
    if RESID:
        mask = m_mask[:, None] & n_mask[None, :]
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        res = 0.0
        gamma = 0.0
    return ss, res, gamma


@triton.jit
def _finish(y, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr, stride_rm,
            gamma_ptr, ss_out_ptr, ss, res, gamma, pid_n, BM: tl.constexpr, BN: tl.constexpr,
            NORM_IN: tl.constexpr, RESID: tl.constexpr, GLU: tl.constexpr, LOADED: tl.constexpr):
    """Store the finished (BM, BN) fp32 sums y of a tile, with the steps of kernels/epilogue.py (LOADED: ss,
    res, gamma are `_operands`' loads, else they are loaded here, each where it is first needed):
    NORM_IN: x was h * gamma of un-normalized rows h: times the RMSNorm's 1/rms = rsqrt(mean(h^2) + eps);
    then y is rounded to the output dtype, as the unfused path stores it;
    RESID: h = y + residual is written back to the residual, the output is h * gamma (the next RMSNorm's
    weight) and mean(h^2) per row is accumulated into ss_out;
    GLU: the tile is [gate | up] halves (qmatmul_kernel), the output silu(gate) * up, BN/2 columns."""
    dt = out_ptr.dtype.element_ty
    if NORM_IN:
        if not LOADED:
            ss = tl.load(ss_in_ptr + offs_m, mask=m_mask, other=0.0)
        y = y * tl.rsqrt(ss + eps)[:, None]
    y = y.to(dt).to(tl.float32)
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if GLU:  # (BM, BN) -> (BM, BN/2, 2): [.., 0] gate, [.., 1] up of the same output column
        gate, up = tl.split(tl.permute(tl.reshape(y, (BM, 2, BN // 2)), (0, 2, 1)))
        cols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], act.to(dt),
                 mask=m_mask[:, None] & (cols < N // 2)[None, :])
    elif RESID:
        res_ptrs = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :]
        if not LOADED:
            res = tl.load(res_ptrs, mask=mask, other=0.0)
        h = (y + res.to(tl.float32)).to(dt)
        tl.store(res_ptrs, h, mask=mask)
        hf = tl.where(mask, h.to(tl.float32), 0.0)
        tl.atomic_add(ss_out_ptr + offs_m, tl.sum(hf * hf, axis=1) / N, mask=m_mask, sem="relaxed")
        if not LOADED:
            gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptrs, (hf * gamma.to(tl.float32)[None, :]).to(dt), mask=mask)
    else:
        tl.store(out_ptrs, y.to(dt), mask=mask)


@triton.jit
def store_tile(acc, out_ptr, stride_om, buf_ptr, ibuf_ptr, cnt_ptr, offs_m, m_mask, offs_n, n_mask, N,
               ss_in_ptr, eps, res_ptr, stride_rm, gamma_ptr, ss_out_ptr, pid_n, pid_s, BM: tl.constexpr,
               BN: tl.constexpr, ATOMIC: tl.constexpr, NORM_IN: tl.constexpr, RESID: tl.constexpr,
               GLU: tl.constexpr, EPI_EARLY: tl.constexpr = False, DRAIN: tl.constexpr = 0,
               CLUSTER: tl.constexpr = 0, CPACK: tl.constexpr = 4, CTHREADS: tl.constexpr = 0):
    """acc (BM, BN): this program's partial sums (ATOMIC: one of several K splits) -> the stored tile.
    EPI_EARLY (ATOMIC): every program loads the epilogue's operands before its atomics, so that the last one
    has them when the sums are complete instead of waiting one more round trip then.
    DRAIN (ATOMIC): how the last split reads the sums back: 1 a vector load and a store of zeros, 0 atomic
    exchanges (qmatmul._drain).
    CLUSTER: the program is split pid_s of CLUSTER, all CTAs of one cluster (ATOMIC is off): cluster_sum, then
    split 0 finishes the tile."""
    if CLUSTER:
        total = cluster_sum(acc, CLUSTER, CPACK, CTHREADS)
        if pid_s == 0:
            _finish(total, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr,
                    stride_rm, gamma_ptr, ss_out_ptr, 0.0, 0.0, 0.0, pid_n, BM, BN, NORM_IN, RESID, GLU, False)
    elif ATOMIC:
        if EPI_EARLY:
            ss, res, gamma = _operands(offs_m, m_mask, offs_n, n_mask, ss_in_ptr, res_ptr, stride_rm, gamma_ptr,
                                       NORM_IN, RESID)
        mask = m_mask[:, None] & n_mask[None, :]
        buf_ptrs = buf_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(buf_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are issued before the counter is released
        cnt = cnt_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(cnt, 1, sem="acq_rel") == tl.num_programs(1) - 1:  # last split of this block
            if DRAIN:
                # read the sums back from L2 (.cg: the acq_rel counter orders it after every split's adds) in
                # the atomics' own layout (one 16-byte load a thread), then store zeros
                total = tl.load(buf_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(buf_ptrs, tl.zeros(acc.shape, tl.float32), mask=mask)
            else:
                # read the sums back and re-zero them (exchanged as int32: same bits, wider support); compiles
                # to one scalar exchange per element and a shared-memory layout change before the store
                ibuf_ptrs = ibuf_ptr + offs_m[:, None] * N + offs_n[None, :]
                zero = tl.zeros(acc.shape, tl.int32)
                total = tl.atomic_xchg(ibuf_ptrs, zero, mask=mask, sem="relaxed").to(tl.float32, bitcast=True)
            if not EPI_EARLY:
                ss, res, gamma = 0.0, 0.0, 0.0  # loaded by _finish
            _finish(total, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr,
                    stride_rm, gamma_ptr, ss_out_ptr, ss, res, gamma, pid_n, BM, BN, NORM_IN, RESID, GLU,
                    EPI_EARLY)
            if DRAIN:
                tl.store(cnt, 0)  # seen by the next launch (kernel boundary); a store needs no reply
            else:
                tl.atomic_xchg(cnt, 0, sem="relaxed")
    else:
        _finish(acc, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr, stride_rm,
                gamma_ptr, ss_out_ptr, 0.0, 0.0, 0.0, pid_n, BM, BN, NORM_IN, RESID, GLU, False)
