"""Probe: could a hand-written CPU kernel make a paged KV cache as fast as the dense one?

Context (docs/benchmarks.md, "Why the KV cache is not paged on CPU"): PyTorch has no CPU
attention kernel that reads keys through a block table, and gathering blocks before its own
kernels makes decode attention 2-7x slower. This builds (torch.utils.cpp_extension, g++,
~20 s the first time, cached after) a paged decode-attention kernel — one task per (row, KV
head), ATen's `Vectorized` arithmetic, keys and values read in place from pools of 16-position
blocks, softmax in fp32 — in two key layouts, and times both against serving's dense path
(`_decode_attention` on contiguous rows) at lm-124m's attention shape:
  paged            — keys (block, head, position, dim): a dot product per position;
  keys transposed  — keys (block, head, dim, position): the block's 16 scores as one vector,
                     a multiply-add per dimension, no horizontal sums (what paged-attention
                     kernels on GPUs do too); values (block, head, position, dim), summed in
                     registers.

Measured 2026-12-06 (Intel Xeon AMX-BF16 / AVX512-BF16, 2 threads), kernel / dense at
1 / 8 / 32 rows, keys transposed:
  bf16, context 160:  0.60-0.73x / 0.96-1.21x / 1.11-1.12x;  context 1000: 1.04-1.30x / 1.29-1.32x / 1.13-1.47x
  fp32, context 160:  0.27-0.31x / 0.71x / 0.82-0.99x;       context 1000: 0.65-0.76x / 0.87-0.99x / 0.80-1.00x
  capped to AVX2 (an AVX2 build), fp32 — what serving picks there:
        context 160:  0.53x / 0.82x / 1.07x;  context 1000: 0.87x / 1.14x / 1.25x
(two runs where a range is given; outputs equal the dense path's within 0.004). Keys with
(block, position, head, dim) blocks — a head's keys 1.5 KB apart — were 1.7-3.5x slower in
bf16: layout matters more than arithmetic. So a paged KV cache need not slow decoding on CPU
(fp32 is faster than the dense path; bf16 within ~0-45%), given this kernel, a build step
for it and the cache around it (pool, block tables, refcounts, allocator).
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
#include <type_traits>
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

// Scores of the BLK positions of one block whose keys are stored transposed, (D, BLK): a
// multiply-add per dimension over a vector of positions, no horizontal reduction.
static inline fV load_f(const float* p) { return fV::loadu(p); }
static inline fV load_f(const at::BFloat16* p) {
  auto [lo, hi] = convert_bfloat16_float(Vectorized<at::BFloat16>::loadu(p, fV::size()));
  return lo;
}
template <typename T>
static inline void block_scores(const float* q, const T* kt, int64_t D, int64_t BLK, float* out) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (BLK == fV::size() && D % 2 == 0) {  // rows d and d+1 are one full bf16 vector: no partial loads
      fV acc0(0.f), acc1(0.f);
      for (int64_t d = 0; d < D; d += 2) {
        auto [r0, r1] = convert_bfloat16_float(Vectorized<at::BFloat16>::loadu(kt + d * BLK));
        acc0 = fmadd(fV(q[d]), r0, acc0);
        acc1 = fmadd(fV(q[d + 1]), r1, acc1);
      }
      (acc0 + acc1).store(out);
      return;
    }
  }
  for (int64_t c = 0; c < BLK; c += fV::size()) {
    fV acc(0.f);
    for (int64_t d = 0; d < D; ++d) acc = fmadd(fV(q[d]), load_f(kt + d * BLK + c), acc);
    acc.store(out + c);
  }
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

template <typename T>
static void run_kt(const T* q, const T* pk, const T* pv, const int64_t* table, const int64_t* lens, T* out,
                int64_t B, int64_t H, int64_t K, int64_t D, int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc;
    for (int64_t idx = begin; idx < end; ++idx) {
      int64_t b = idx / K, kh = idx % K, L = lens[b];
      sc.assign(G * L, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = float(q[(b * H + kh * G + g) * D + d]) * scale;
      std::vector<float> blk(BLK);
      for (int64_t j0 = 0; j0 < L; j0 += BLK) {
        const T* kt = pk + (table[b * NBMAX + j0 / BLK] * K + kh) * D * BLK;
        for (int64_t g = 0; g < G; ++g) {
          block_scores(qf.data() + g * D, kt, D, BLK, blk.data());
          for (int64_t j = j0; j < std::min(L, j0 + BLK); ++j) sc[g * L + j] = blk[j - j0];
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
      if (D == 4 * fV::size()) {  // head dim 64 on AVX-512: the sum stays in four registers
        for (int64_t g = 0; g < G; ++g) {
          fV a0(0.f), a1(0.f), a2(0.f), a3(0.f);
          for (int64_t j = 0; j < L; ++j) {
            const T* vp = pv + ((table[b * NBMAX + j / BLK] * K + kh) * BLK + j % BLK) * D;
            fV p(sc[g * L + j]);
            a0 = fmadd(p, load_f(vp), a0);
            a1 = fmadd(p, load_f(vp + fV::size()), a1);
            a2 = fmadd(p, load_f(vp + 2 * fV::size()), a2);
            a3 = fmadd(p, load_f(vp + 3 * fV::size()), a3);
          }
          float* a = acc.data() + g * D;
          a0.store(a); a1.store(a + fV::size()); a2.store(a + 2 * fV::size()); a3.store(a + 3 * fV::size());
        }
      } else {
        for (int64_t j = 0; j < L; ++j) {
          const T* vp = pv + ((table[b * NBMAX + j / BLK] * K + kh) * BLK + j % BLK) * D;
          for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, sc[g * L + j], vp, D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + kh * G + g) * D + d] = T(acc[g * D + d]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor pk, torch::Tensor pv, torch::Tensor table,
                           torch::Tensor lens, double scale, bool keys_transposed) {
  auto out = torch::empty_like(q);
  int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = pv.size(1), BLK = pv.size(2), NBMAX = table.size(1);
  auto* go = keys_transposed ? run_kt<at::BFloat16> : run<at::BFloat16>;
  auto* go32 = keys_transposed ? run_kt<float> : run<float>;
  if (q.scalar_type() == at::kBFloat16) {
    go(q.data_ptr<at::BFloat16>(), pk.data_ptr<at::BFloat16>(), pv.data_ptr<at::BFloat16>(),
        table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(), B, H, K, D, BLK, NBMAX, scale);
  } else {
    go32(q.data_ptr<float>(), pk.data_ptr<float>(), pv.data_ptr<float>(),
        table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, BLK, NBMAX, scale);
  }
  return out;
}
"""


def build():  # noqa: ANN201 — the extension module
    cap = torch.backends.cpu.get_cpu_capability()
    cap = cap if cap in FLAGS else "DEFAULT"
    macros = [f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}"] if cap != "DEFAULT" else []
    return load_inline(f"exaflop_paged_probe6_{cap.lower()}", cpp_sources=KERNEL, functions=["paged_decode"],
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
            pool_kt = pool_k.transpose(-1, -2).contiguous()  # (block, head, dim, position)
            got = mod.paged_decode(q3, pool_k, pool_v, table, lens, dim ** -0.5, False)
            got_t = mod.paged_decode(q3, pool_kt, pool_v, table, lens, dim ** -0.5, True)
            err = max((x.float() - want.float()).abs().max().item() for x in (got, got_t))
            dense = median_us(lambda: _decode_attention(q, k, v, mask))  # noqa: B023
            paged = median_us(lambda: mod.paged_decode(q3, pool_k, pool_v, table, lens, dim ** -0.5, False))  # noqa: B023
            paged_t = median_us(lambda: mod.paged_decode(q3, pool_kt, pool_v, table, lens, dim ** -0.5, True))  # noqa: B023
            print(f"{str(dtype):>15} rows {rows:>2} context {ctx:>4}: dense {dense:7.0f} us, paged {paged:7.0f} us "
                  f"({paged / dense:.2f}x), keys transposed {paged_t:7.0f} us ({paged_t / dense:.2f}x) "
                  f"(max diff {err:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
