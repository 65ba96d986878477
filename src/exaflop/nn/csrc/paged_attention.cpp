// Decode attention over a paged KV cache (nn/paged.py): one new query per row, keys and values
// read in place from pools of fixed-size blocks through each row's block table.
//
// One task per (row, KV head). Softmax in fp32. Two pool layouts, one per dtype:
//  fp32: keys (block, head, dim, position) — a block's scores are one vector, built by a
//        multiply-add per dimension with no horizontal sums — and values (block, head,
//        position, dim), summed in registers;
//  bf16: pairs side by side (below, `run_pairs`), for AVX512-BF16's dot product.
// `paged_decode_rope` is the fp32 layout's decode step with RoPE and the cache write in front
// (one operator per layer for the fp32 model, which `auto` serves on AVX2-only CPUs).
// Compiled for the CPU capability PyTorch dispatches to (nn/paged.py passes the flags), with
// ATen's Vectorized types, so one source serves AVX-512, AVX2 and plain builds.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include "paged_attention.h"
#include <c10/util/bit_cast.h>
#include <cmath>
#include <cstdint>
#include <vector>

using namespace exaflop_attn;

template <typename T>
static void run(const float* q, const T* pk, const T* pv, const int64_t* table, const int64_t* lens, float* out,
                int64_t B, int64_t H, int64_t K, int64_t D, int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc, blk(BLK);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / K, kh = idx % K;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = q[(b * H + kh * G + g) * D + d] * scale;
      attend_task(qf.data(), pk, pv, table + b * NBMAX, lens[b], kh, G, K, D, BLK, sc, acc, blk,
                  out + (b * H + kh * G) * D);
    }
  });
}

// The fp32 decode step's attention for one new position per row, fused: rotate the row's new
// key and query (RoPE), write the key and value into the pools at (blk[b], off[b]), then attend
// over lens[b] positions (the new one included). One kernel instead of inductor's scatter (which
// wrote a key's D values a cache line each, then the attention read those lines again) and the
// attention after it; the same numbers as the two, bit for bit (tests/test_paged.py).
template <typename T>
static void run_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* cos, const float* sin,
                     T* pk, T* pv, const int64_t* table, const int64_t* lens, const int64_t* blk, const int64_t* off,
                     float* out, int64_t B, int64_t H, int64_t K, int64_t D, int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K;
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), khs = k.stride(1), vb = v.stride(0),
                vh = v.stride(1);
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc, blkbuf(BLK), kr(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / K, kh = idx % K;
      step_task(qp + b * qb + kh * G * qh, qh, kp + b * kb + kh * khs, vp + b * vb + kh * vh, cos + b * D,
                sin + b * D, pk, pv, table + b * NBMAX, lens[b], blk[b], off[b], kh, G, K, D, BLK, scale, kr, qf,
                sc, acc, blkbuf, out + (b * H + kh * G) * D);
    }
  };
  at::parallel_for(0, B * K, 1, body);
}

// ---- bf16 pools in pair layout -------------------------------------------------------------
// keys (N, K, D/2, BLK, 2): for each pair of dimensions, the block's positions with the two
// values side by side; values (N, K, BLK/2, D, 2): for each pair of positions, every dimension
// with the two values side by side. A 32-bit lane then holds a pair, which is what the
// AVX512-BF16 dot product (vdpbf16ps: lane += a.lo*b.lo + a.hi*b.hi, fp32 accumulation)
// consumes: scores are one instruction per two dimensions for 16 positions, and the weighted
// sum one per two positions for 16 dimensions, with no bf16 -> fp32 conversions. Without
// that instruction, a pair widens to fp32 with a shift and a mask.

static inline uint32_t bf16_bits(float x) {  // round to nearest even, as at::BFloat16 does
  return uint32_t(c10::bit_cast<uint16_t>(at::BFloat16(x)));
}
static inline float lo_f(uint32_t pair) { return c10::bit_cast<float>(pair << 16); }
static inline float hi_f(uint32_t pair) { return c10::bit_cast<float>(pair & 0xffff0000u); }

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define EXAFLOP_DPBF16 1
// Scores of 16 positions: kp (D/2, 16) pairs, q (D/2) pairs.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void scores16_dp(const uint32_t* q, const uint32_t* kp, int64_t P, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 1 < P; p += 2) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(kp + p * 16), (__m512bh)_mm512_set1_epi32(int(q[p])));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(kp + (p + 1) * 16),
                          (__m512bh)_mm512_set1_epi32(int(q[p + 1])));
  }
  if (p < P) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(kp + p * 16), (__m512bh)_mm512_set1_epi32(int(q[p])));
  _mm512_storeu_ps(out, _mm512_add_ps(a0, a1));
}
// acc (D = 16 * NV) += sum over n position pairs of (p[2i], p[2i+1]) . values pair i; vp (n, D) pairs.
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void wsum_dp(const uint32_t* pp, const uint32_t* vp, int64_t n, float* acc) {
  __m512 a[NV];
  for (int i = 0; i < NV; ++i) a[i] = _mm512_loadu_ps(acc + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pp[j]));
    const uint32_t* v = vp + j * 16 * NV;
    for (int i = 0; i < NV; ++i) a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_loadu_si512(v + 16 * i), w);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}
#endif

static void run_pairs(const at::BFloat16* q, const at::BFloat16* pk, const at::BFloat16* pv, const int64_t* table,
                      const int64_t* lens, at::BFloat16* out, int64_t B, int64_t H, int64_t K, int64_t D,
                      int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K, P = D / 2, BP = BLK / 2;
  bool dp = false;
#ifdef EXAFLOP_DPBF16
  dp = BLK == 16 && D % 32 == 0 && D / 16 <= 8 && __builtin_cpu_supports("avx512bf16");
#endif
  const uint32_t* K32 = reinterpret_cast<const uint32_t*>(pk);
  const uint32_t* V32 = reinterpret_cast<const uint32_t*>(pv);
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), sc, blk(BLK);
    std::vector<uint32_t> pp(BP);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / K, kh = idx % K, L = lens[b], NB = (L + BLK - 1) / BLK;
      const int64_t* tb = table + b * NBMAX;
      sc.assign(G * NB * BLK, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t* qg = reinterpret_cast<const uint32_t*>(q + (b * H + kh * G + g) * D);  // D/2 pairs
        float* s = sc.data() + g * NB * BLK;
        for (int64_t j0 = 0, blkno = 0; j0 < L; j0 += BLK, ++blkno) {
          const uint32_t* kp = K32 + (tb[blkno] * K + kh) * P * BLK;
#ifdef EXAFLOP_DPBF16
          if (dp) { scores16_dp(qg, kp, P, s + j0); continue; }
#endif
          for (int64_t c = 0; c < BLK; ++c) {
            float a = 0.f;
            for (int64_t i = 0; i < P; ++i) {
              const uint32_t kv = kp[i * BLK + c], qv = qg[i];
              a += lo_f(qv) * lo_f(kv) + hi_f(qv) * hi_f(kv);
            }
            s[j0 + c] = a;
          }
        }
        // softmax over the L real positions (scaled here: q stays the bf16 the model made)
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) { s[j] *= scale; m = std::max(m, s[j]); }
        fV vs(0.f), vm(m);
        int64_t j = 0;
        for (; j + fV::size() <= L; j += fV::size()) {
          fV e = (fV::loadu(s + j) - vm).exp_u20();
          e.store(s + j);
          vs = vs + e;
        }
        float sum = vec_reduce_all<float>([](fV& x, fV& y) { return x + y; }, vs);
        for (; j < L; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
        const float inv = 1.f / sum;
        for (j = 0; j < L; ++j) s[j] *= inv;
        for (; j < NB * BLK; ++j) s[j] = 0.f;  // the last block's unfilled positions weigh nothing
        // weighted sum of values
        float* a = acc.data() + g * D;
        std::fill(a, a + D, 0.f);
        for (int64_t j0 = 0, blkno = 0; j0 < L; j0 += BLK, ++blkno) {
          const uint32_t* vb = V32 + (tb[blkno] * K + kh) * BP * D;
          for (int64_t i = 0; i < BP; ++i) pp[i] = bf16_bits(s[j0 + 2 * i]) | (bf16_bits(s[j0 + 2 * i + 1]) << 16);
#ifdef EXAFLOP_DPBF16
          if (dp) {
            const int64_t n = std::min(BP, (L - j0 + 1) / 2);
            switch (D / 16) {
              case 2: wsum_dp<2>(pp.data(), vb, n, a); break;
              case 4: wsum_dp<4>(pp.data(), vb, n, a); break;
              case 6: wsum_dp<6>(pp.data(), vb, n, a); break;
              default: wsum_dp<8>(pp.data(), vb, n, a); break;
            }
            continue;
          }
#endif
          for (int64_t i = 0; i < BP; ++i) {
            const float p0 = s[j0 + 2 * i], p1 = s[j0 + 2 * i + 1];
            if (p0 == 0.f && p1 == 0.f) continue;
            const uint32_t* v = vb + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p0 * lo_f(v[d]) + p1 * hi_f(v[d]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + kh * G + g) * D + d] = at::BFloat16(acc[g * D + d]);
    }
  });
}

// q (B, H, D); keys and values in either layout (above); table (B, NBMAX) block ids; lens (B,)
// keys per row (>= 1). Returns (B, H, D), softmax(q k / sqrt(D)) v per head.
at::Tensor paged_decode(const at::Tensor& q_, const at::Tensor& keys_t, const at::Tensor& values,
                        const at::Tensor& table_, const at::Tensor& lens_) {
  TORCH_CHECK(keys_t.is_contiguous() && values.is_contiguous(), "paged_decode: contiguous pools expected");
  const at::Tensor q = q_.contiguous(), table = table_.contiguous(), lens = lens_.contiguous();
  const double scale = 1.0 / std::sqrt(double(q.size(2)));
  TORCH_CHECK(keys_t.scalar_type() == values.scalar_type(), "paged_decode: keys and values must share a dtype");
  auto out = at::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = values.size(1);
  const int64_t NBMAX = table.size(1);
  if (keys_t.dim() == 5) {  // bf16 pair layout: keys (N, K, D/2, BLK, 2), values (N, K, BLK/2, D, 2)
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16,
                "paged_decode: the pair layout is for bf16 q, keys and values");
    run_pairs(q.data_ptr<at::BFloat16>(), keys_t.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
              table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(),
              B, H, K, D, keys_t.size(3), NBMAX, scale);
    return out;
  }
  // The fp32 layout, keys (N, K, D, BLK) and values (N, K, BLK, D): fp32 q, pools in fp32 or (an
  // fp32 model's bf16 cache, half the bytes to read) bf16.
  TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: the (N, K, D, BLK) layout takes an fp32 q");
  if (keys_t.scalar_type() == at::kBFloat16) {
    run(q.data_ptr<float>(), keys_t.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
        table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, values.size(2),
        NBMAX, scale);
    return out;
  }
  TORCH_CHECK(keys_t.scalar_type() == at::kFloat, "paged_decode: pools in fp32 or bf16 expected");
  run(q.data_ptr<float>(), keys_t.data_ptr<float>(), values.data_ptr<float>(), table.data_ptr<int64_t>(),
      lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, values.size(2), NBMAX, scale);
  return out;
}

// q (B, H, 1, D), k and v (B, K, 1, D): fp32, the step's projections before RoPE (any strides
// but the last, e.g. views of the fused q/k/v product); cos, sin (B, 1, 1, D): each row's angles
// as (cos, cos) and (sin, sin); keys (N, K, D, BLK) and values (N, K, BLK, D) in fp32 or bf16,
// written at block blk[b], offset off[b] (both (B, 1)); lens (B,) positions to attend, the new
// one included. Returns (B, H, D).
at::Tensor paged_decode_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_,
                             const at::Tensor& sin_, at::Tensor& keys_t, at::Tensor& values, const at::Tensor& table_,
                             const at::Tensor& lens_, const at::Tensor& blk_, const at::Tensor& off_) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1 && k.size(2) == 1,
              "paged_decode_rope: q (B, H, 1, D) and k, v (B, K, 1, D) expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "paged_decode_rope: fp32 q, k, v expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "paged_decode_rope: unit stride in D expected");
  TORCH_CHECK(keys_t.dim() == 4 && keys_t.is_contiguous() && values.is_contiguous() &&
              keys_t.scalar_type() == values.scalar_type(), "paged_decode_rope: the (N, K, D, BLK) layout expected");
  const at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  const at::Tensor table = table_.contiguous(), lens = lens_.contiguous(), blk = blk_.contiguous(),
                   off = off_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), K = values.size(1), BLK = values.size(2);
  TORCH_CHECK(cos.numel() == B * D && sin.numel() == B * D && blk.numel() == B && off.numel() == B,
              "paged_decode_rope: one angle row and one slot per row expected");
  const float scale = float(1.0 / std::sqrt(double(D)));
  auto out = at::empty({B, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (keys_t.scalar_type() == at::kBFloat16) {
    run_step(q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), keys_t.data_ptr<at::BFloat16>(),
             values.data_ptr<at::BFloat16>(), table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
             blk.data_ptr<int64_t>(), off.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, BLK,
             table.size(1), scale);
  } else {
    TORCH_CHECK(keys_t.scalar_type() == at::kFloat, "paged_decode_rope: pools in fp32 or bf16 expected");
    run_step(q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), keys_t.data_ptr<float>(),
             values.data_ptr<float>(), table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), blk.data_ptr<int64_t>(),
             off.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, BLK, table.size(1), scale);
  }
  return out;
}

// An operator of the dispatcher, not a Python function: a compiled decode step (and its C++
// wrapper) calls it without going through Python, once per layer per step.
TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("paged_decode(Tensor q, Tensor keys_t, Tensor values, Tensor table, Tensor lens) -> Tensor");
  m.def("paged_decode_rope(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys_t, "
        "Tensor(b!) values, Tensor table, Tensor lens, Tensor blk, Tensor off) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_decode_rope", &paged_decode_rope);
}
