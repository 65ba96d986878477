"""Probe: could a hand-written CPU kernel make a paged KV cache as fast as the dense one?

Context (docs/benchmarks.md, "Why the KV cache is not paged on CPU"): PyTorch has no CPU
attention kernel that reads keys through a block table, and gathering blocks before its own
kernels makes decode attention 2-7x slower. This builds (torch.utils.cpp_extension, g++,
~20 s the first time, cached after) a first paged decode-attention kernel — one task per
(row, KV head), ATen's `Vectorized` dot products, axpys and exp, keys and values read straight
from a pool of blocks laid out (block, KV head, 16 positions, head dim) so that one head's
block is contiguous, softmax in fp32 — and times it against serving's dense path
(`_decode_attention` on contiguous rows) at lm-124m's attention shape.

Measured 2026-12-06 (Intel Xeon AMX-BF16 / AVX512-BF16, 2 threads), paged kernel / dense at
1 / 8 / 32 rows (two runs):
  bf16, context 160:  0.79x / 1.34-1.41x / 1.31-1.33x;  context 1000: 1.57-1.61x / 1.58-1.62x / 1.69-1.77x
  fp32, context 160:  0.38-0.39x / 0.78-0.79x / 1.02-1.10x;  context 1000: 0.80-0.82x / 1.07-1.24x / 1.21-1.36x
  capped to AVX2 (an AVX2 build of the kernel), fp32 — what serving picks there:
        context 160:  0.44x / 0.77x / 1.06x;  context 1000: 0.85x / 1.14x / 1.50x
Outputs equal the dense path's within 0.004. With (block, position, head, dim) blocks (a head's
keys 1.5 KB apart) the same kernel was 1.7-3.5x slower in bf16: the layout matters more than
the arithmetic. What is left for bf16: SDPA scores blocks of keys as small matrix products
where this kernel reduces one dot product per position.
    python tools/paged_attention_probe.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from exaflop.nn.decode import _decode_attention  # noqa: E402

# The ATen vector types compile for the capability named here; the flags match it (not -march=native,
# so that a process capped with ATEN_CPU_CAPABILITY=avx2 builds and measures an AVX2 kernel).
FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
         "AVX2": ["-mavx2", "-mfma", "-mf16c"], "DEFAULT": []}

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <cmath>
#include <vector>
using namespace at::vec;


using fV = Vectorized<float>;
static inline float dot(const float* q, const float* k, int64_t D) {
  fV acc(0.f); int64_t d = 0;
  for (; d + fV::size() <= D; d += fV::size()) acc = fmadd(fV::loadu(q + d), fV::loadu(k + d), acc);
  float s = vec_reduce_all<float>([](fV& a, fV& b) { return a + b; }, acc);
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}
static inline float dot(const float* q, const at::BFloat16* k, int64_t D) {
  using bV = Vectorized<at::BFloat16>;
  fV acc(0.f); int64_t d = 0;
  for (; d + bV::size() <= D; d += bV::size()) {
    auto [k0, k1] = convert_bfloat16_float(bV::loadu(k + d));
    acc = fmadd(fV::loadu(q + d), k0, acc);
    acc = fmadd(fV::loadu(q + d + fV::size()), k1, acc);
  }
  float s = vec_reduce_all<float>([](fV& a, fV& b) { return a + b; }, acc);
  for (; d < D; ++d) s += q[d] * float(k[d]);
  return s;
}
static inline void axpy(float* a, float p, const float* v, int64_t D) {
  fV pv(p); int64_t d = 0;
  for (; d + fV::size() <= D; d += fV::size()) fmadd(pv, fV::loadu(v + d), fV::loadu(a + d)).store(a + d);
  for (; d < D; ++d) a[d] += p * v[d];
}
static inline void axpy(float* a, float p, const at::BFloat16* v, int64_t D) {
  using bV = Vectorized<at::BFloat16>;
  fV pv(p); int64_t d = 0;
  for (; d + bV::size() <= D; d += bV::size()) {
    auto [v0, v1] = convert_bfloat16_float(bV::loadu(v + d));
    fmadd(pv, v0, fV::loadu(a + d)).store(a + d);
    fmadd(pv, v1, fV::loadu(a + d + fV::size())).store(a + d + fV::size());
  }
  for (; d < D; ++d) a[d] += p * float(v[d]);
}

template <typename T>
static void run(const T* q, const T* pk, const T* pv, const int64_t* table, const int64_t* lens, T* out,
                int64_t B, int64_t H, int64_t K, int64_t D, int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc;
    for (int64_t idx = begin; idx < end; ++idx) {
      int64_t b = idx / K, kh = idx % K, L = lens[b];
      sc.assign(G * L, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = float(q[(b * H + kh * G + g) * D + d]) * scale;
      for (int64_t j = 0; j < L; ++j) {
        const T* kp = pk + ((table[b * NBMAX + j / BLK] * K + kh) * BLK + j % BLK) * D;
        for (int64_t g = 0; g < G; ++g) {
          sc[g * L + j] = dot(qf.data() + g * D, kp, D);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY, sum = 0.f;
        float* s = sc.data() + g * L;
        for (int64_t j = 0; j < L; ++j) m = std::max(m, s[j]);
        int64_t j = 0;
        fV vs(0.f), vm(m);
        for (; j + fV::size() <= L; j += fV::size()) {
          fV e = (fV::loadu(s + j) - vm).exp_u20();
          e.store(s + j);
          vs = vs + e;
        }
        sum = vec_reduce_all<float>([](fV& a, fV& b) { return a + b; }, vs);
        for (; j < L; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
        for (int64_t j = 0; j < L; ++j) s[j] /= sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const T* vp = pv + ((table[b * NBMAX + j / BLK] * K + kh) * BLK + j % BLK) * D;
        for (int64_t g = 0; g < G; ++g) {
          float p = sc[g * L + j];
          axpy(acc.data() + g * D, p, vp, D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + kh * G + g) * D + d] = T(acc[g * D + d]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor pk, torch::Tensor pv, torch::Tensor table,
                           torch::Tensor lens, double scale) {
  auto out = torch::empty_like(q);
  int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = pk.size(1), BLK = pk.size(2), NBMAX = table.size(1);
  if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q.data_ptr<at::BFloat16>(), pk.data_ptr<at::BFloat16>(), pv.data_ptr<at::BFloat16>(),
        table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(), B, H, K, D, BLK, NBMAX, scale);
  } else {
    run<float>(q.data_ptr<float>(), pk.data_ptr<float>(), pv.data_ptr<float>(),
        table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, BLK, NBMAX, scale);
  }
  return out;
}
"""


def build():  # noqa: ANN201 — the extension module
    cap = torch.backends.cpu.get_cpu_capability()
    cap = cap if cap in FLAGS else "DEFAULT"
    macros = [f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}"] if cap != "DEFAULT" else []
    return load_inline(f"exaflop_paged_probe3_{cap.lower()}", cpp_sources=KERNEL, functions=["paged_decode"],
                       extra_cflags=["-O3", "-fopenmp", *FLAGS[cap], *macros], extra_ldflags=["-fopenmp"])


def median_us(fn, reps: int = 100) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> int:
    t0 = time.time()
    mod = build()
    print(f"kernel built in {time.time() - t0:.1f} s; CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    blk, heads, dim = 16, 12, 64
    for dtype in (torch.bfloat16, torch.float32):
        for rows, ctx in [(1, 160), (8, 160), (32, 160), (1, 1000), (8, 1000), (32, 1000)]:
            g = torch.Generator().manual_seed(0)
            nb = -(-ctx // blk)
            L = nb * blk
            q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
            pool_k = torch.randn(rows * nb * 2, heads, blk, dim, generator=g).to(dtype)
            pool_v = torch.randn(rows * nb * 2, heads, blk, dim, generator=g).to(dtype)
            table = torch.randperm(rows * nb * 2, generator=g)[:rows * nb].view(rows, nb).contiguous()
            lens = torch.full((rows,), ctx, dtype=torch.long)
            k = pool_k[table].permute(0, 2, 1, 3, 4).reshape(rows, heads, L, dim)
            v = pool_v[table].permute(0, 2, 1, 3, 4).reshape(rows, heads, L, dim)
            mask = (torch.arange(L) < ctx)[None, None, None, :].expand(rows, 1, 1, L)
            q3 = q[:, :, 0].contiguous()
            want = _decode_attention(q, k, v, mask)[:, :, 0]
            got = mod.paged_decode(q3, pool_k, pool_v, table, lens, dim ** -0.5)
            err = (got.float() - want.float()).abs().max().item()
            dense = median_us(lambda: _decode_attention(q, k, v, mask))  # noqa: B023
            paged = median_us(lambda: mod.paged_decode(q3, pool_k, pool_v, table, lens, dim ** -0.5))  # noqa: B023
            print(f"{str(dtype):>15} rows {rows:>2} context {ctx:>4}: dense {dense:7.0f} us, paged kernel "
                  f"{paged:7.0f} us, {paged / dense:.2f}x (max diff {err:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
