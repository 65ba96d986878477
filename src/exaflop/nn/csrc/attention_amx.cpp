// Causal attention for training in bf16 on CPUs with AMX (nn/layers.py): the forward and the
// backward of softmax(q k^T * scale) v, one (batch, head) at a time, every product on the AMX
// tiles and the softmax work in AVX-512 registers between them.
//
// Why: PyTorch's CPU flash attention runs these 256 x 256 x 64 products at ~0.2 TFLOP/s (its
// backward at a seventh of its forward), and the compiled matmul backward spends as long again
// in elementwise passes over a (B, H, T, T) fp32 tensor in memory. Here a head's q, k, v, its
// scores and gradients stay in L1 / L2, and only the causal half of each product is computed.
//
// AMX multiplies A (16 rows x 32 bf16, rows along the reduction) by B in "VNNI" form (16 rows of
// 16 bf16 pairs: B[k/2][n][2]), accumulating C (16 x 16 fp32). Which operand a tensor is decides
// its layout, so each head's inputs are first re-laid out once in the thread's buffers:
//   forward   S = q k^T      A: q rows          B: k as 32-bit pairs transposed (kt)
//             O = P v        A: P rows          B: v with pairs of rows interleaved (vv)
//   backward  S^T = k q^T    A: k rows          B: qt            (the transposed orientation gives
//             dP^T = v dO^T  A: v rows          B: dot            P^T and dS^T as rows, what dK and
//             dV = P^T dO    A: P^T rows        B: dov            dV need as A)
//             dK = dS^T q    A: dS^T rows       B: qv
//             dQ^T = k^T dS^T A: k^T rows       B: dS^T with pairs of rows interleaved
// P is recomputed in the backward from the forward's log-sum-exp (as flash attention does).
// Rotary position embeddings, when given their tables, are applied here too: q and k come in as
// the projections made them, each head is rotated while it is re-laid out (forward) and again in
// the backward, whose dq and dk are rotated back on their way out. That removes RoPE's passes over
// q, k and their gradients in memory from the step (lm-small: ~9 ms of ~220).
// Requires T % 32 == 0 and D % 32 == 0 (D <= 256); nn/layers.py checks and uses PyTorch otherwise.
//
// Built with the other kernels (nn/kernels.py); the AMX code only in the AVX-512 build.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "amx.h"
#ifdef EXAFLOP_AMX
#include <ATen/cpu/vec/vec.h>
#endif

namespace {

constexpr int64_t BLK = 32;  // rows and columns of a block of scores: 2 x 2 tiles

#ifdef EXAFLOP_AMX
using namespace exaflop_amx;

// C (32 x 32 fp32, row stride ldc floats) = A (32 x K bf16, rows at a / a + 16 * lda) times B
// given as VNNI tiles: b0 for columns 0-15, b1 for 16-31, each K/2 rows of stride ldb bytes,
// k-step 32 advancing A by 32 elements and B by bstep bytes. Tiles 0-3: C, 4-5: A, 6-7: B.
AMX_TARGET inline void block32(const void* a, int64_t lda_bytes, const char* b0, const char* b1, int64_t ldb_bytes,
                               int64_t bstep, int64_t ksteps, float* c, int64_t ldc_bytes, bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c + 16, ldc_bytes);
    _tile_loadd(2, reinterpret_cast<char*>(c) + 16 * ldc_bytes, ldc_bytes);
    _tile_loadd(3, reinterpret_cast<char*>(c) + 16 * ldc_bytes + 64, ldc_bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const char* ap = static_cast<const char*>(a);
  for (int64_t s = 0; s < ksteps; ++s) {
    _tile_loadd(4, ap + s * 64, lda_bytes);
    _tile_loadd(5, ap + 16 * lda_bytes + s * 64, lda_bytes);
    _tile_loadd(6, b0 + s * bstep, ldb_bytes);
    _tile_loadd(7, b1 + s * bstep, ldb_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c + 16, ldc_bytes);
  _tile_stored(2, reinterpret_cast<char*>(c) + 16 * ldc_bytes, ldc_bytes);
  _tile_stored(3, reinterpret_cast<char*>(c) + 16 * ldc_bytes + 64, ldc_bytes);
}

// out (D/2, T) 32-bit = x (T rows of D bf16, row stride ldx elements) seen as (T, D/2) pairs, transposed.
AMX_TARGET void pairs_transposed(const at::BFloat16* x, int64_t ldx, int64_t T, int64_t D, uint32_t* out) {
  const int64_t P = D / 2;
  __m512i r[16];
  for (int64_t t0 = 0; t0 < T; t0 += 16)
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(x + (t0 + i) * ldx + 2 * p0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (p0 + i) * T + t0, r[i]);
    }
}

// out (D, T) bf16 = x (T rows of D bf16) transposed, element by element.
AMX_TARGET void bf16_transposed(const at::BFloat16* x, int64_t ldx, int64_t T, int64_t D, at::BFloat16* out) {
  __m512i r[16];
  for (int64_t t0 = 0; t0 < T; t0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      for (int i = 0; i < 16; ++i)
        r[i] = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (t0 + i) * ldx + d0)));
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (d0 + i) * T + t0), _mm512_cvtepi32_epi16(r[i]));
    }
}

AMX_TARGET void rows_interleaved(const at::BFloat16* x, int64_t ldx, int64_t T, int64_t D, uint32_t* out) {
  for (int64_t i = 0; i < T / 2; ++i) interleave_rows(x + 2 * i * ldx, x + (2 * i + 1) * ldx, D, out + i * D);
}

// out (T rows of D bf16, contiguous) = x rotated as nn/layers.py apply_rope does: the pairs
// (j, j + D/2) of row t by row t's angles (cos / sin: (T, D/2) fp32), in fp32, rounded once.
AMX_TARGET void rope_rows(const at::BFloat16* x, int64_t ldx, int64_t T, int64_t D, const float* cos, const float* sin,
                          at::BFloat16* out) {
  const int64_t h = D / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < h; j += 16) {
      const __m512 x1 = load_bf16(x + t * ldx + j), x2 = load_bf16(x + t * ldx + h + j);
      const __m512 c = _mm512_loadu_ps(cos + t * h + j), s = _mm512_loadu_ps(sin + t * h + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * D + j),
                          to_bf16(_mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * D + h + j),
                          to_bf16(_mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s))));
    }
}

// out (T rows of D bf16, row stride ldo) = g (T x D fp32, contiguous) in bf16; with RoPE tables,
// first taken back through the rotation (its transpose: g1 c + g2 s, g2 c - g1 s).
AMX_TARGET void rows_out(const float* g, int64_t T, int64_t D, const float* cos, const float* sin, at::BFloat16* out,
                         int64_t ldo) {
  const int64_t h = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* gr = g + t * D;
    at::BFloat16* o = out + t * ldo;
    if (cos == nullptr) {
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), to_bf16(_mm512_loadu_ps(gr + d)));
      continue;
    }
    for (int64_t j = 0; j < h; j += 16) {
      const __m512 g1 = _mm512_loadu_ps(gr + j), g2 = _mm512_loadu_ps(gr + h + j);
      const __m512 c = _mm512_loadu_ps(cos + t * h + j), s = _mm512_loadu_ps(sin + t * h + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), to_bf16(_mm512_fmadd_ps(g1, c, _mm512_mul_ps(g2, s))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + h + j),
                          to_bf16(_mm512_fmsub_ps(g2, c, _mm512_mul_ps(g1, s))));
    }
  }
}

AMX_TARGET inline __m512 exp16(__m512 v) { return at::vec::Vectorized<float>(v).exp_u20(); }

struct Strides {  // element strides of a (B, H, T, D) view with unit stride in D
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
};

// ---------------------------------------------------------------------------------------------
// Forward: one query block of 32 rows at a time, its scores against the keys up to the block's
// end (causal) in a row strip, the softmax over the strip, then P v.
// Tasks begin .. end of B * H (batch, query head) pairs. (A lambda would not carry the AMX target.)
AMX_TARGET void forward_range(int64_t begin, int64_t end, const at::BFloat16* q, const at::BFloat16* k,
                              const at::BFloat16* v, at::BFloat16* out, float* lse, int64_t H, int64_t Hk,
                              int64_t T, int64_t D, float scale, Strides sq, Strides sk, Strides sv, Strides so,
                              const float* cos, const float* sin) {
  const int64_t G = H / Hk;
  {
    Buf<uint32_t> kt(D / 2 * T), vv(T / 2 * D);
    Buf<float> s(BLK * T), o(BLK * D);
    Buf<at::BFloat16> p(BLK * T), qr(T * D), kr(T * D);
    tiles_on();
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / H, h = idx % H, hk = h / G;
      const at::BFloat16* qh = q + b * sq.b + h * sq.h;
      int64_t ldq = sq.t;
      const at::BFloat16* vh = v + b * sv.b + hk * sv.h;
      at::BFloat16* oh = out + b * so.b + h * so.h;
      float* lh = lse + (b * H + h) * T;
      // A head of a group reuses its predecessor's re-laid-out k and v.
      if (idx == begin || h % G == 0) {
        const at::BFloat16* kh = k + b * sk.b + hk * sk.h;
        if (cos != nullptr) rope_rows(kh, sk.t, T, D, cos, sin, kr.data());
        pairs_transposed(cos != nullptr ? kr.data() : kh, cos != nullptr ? D : sk.t, T, D, kt.data());
        rows_interleaved(vh, sv.t, T, D, vv.data());
      }
      if (cos != nullptr) {
        rope_rows(qh, sq.t, T, D, cos, sin, qr.data());
        qh = qr.data(), ldq = D;
      }
      for (int64_t i0 = 0; i0 < T; i0 += BLK) {
        const int64_t kend = i0 + BLK;
        for (int64_t j0 = 0; j0 < kend; j0 += BLK)
          block32(qh + i0 * ldq, ldq * 2, reinterpret_cast<const char*>(kt.data() + j0),
                  reinterpret_cast<const char*>(kt.data() + j0 + 16), T * 4, 16 * T * 4, D / 32, s.data() + j0, T * 4,
                  false);
        for (int64_t r = 0; r < BLK; ++r) {
          float* sr = s.data() + r * T;
          const int64_t n = i0 + r + 1;  // keys 0..i visible to query i
          const __m512 vs = _mm512_set1_ps(scale);
          __m512 vmax = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < kend; j += 16) {
            const __mmask16 m = j + 16 <= n ? 0xffff : j < n ? __mmask16((1u << (n - j)) - 1) : 0;
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), vs);
            _mm512_storeu_ps(sr + j, x);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
          }
          const float mx = _mm512_reduce_max_ps(vmax);
          __m512 vsum = _mm512_setzero_ps();
          const __m512 vm = _mm512_set1_ps(mx);
          for (int64_t j = 0; j < kend; j += 16) {
            const __mmask16 m = j + 16 <= n ? 0xffff : j < n ? __mmask16((1u << (n - j)) - 1) : 0;
            const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm)));
            _mm512_storeu_ps(sr + j, e);
            vsum = _mm512_add_ps(vsum, e);
          }
          const float sum = _mm512_reduce_add_ps(vsum);
          lh[i0 + r] = mx + std::log(sum);
          const __m512 inv = _mm512_set1_ps(1.f / sum);
          at::BFloat16* pr = p.data() + r * T;
          for (int64_t j = 0; j < kend; j += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(sr + j), inv)));
        }
        for (int64_t d0 = 0; d0 < D; d0 += BLK)
          block32(p.data(), T * 2, reinterpret_cast<const char*>(vv.data() + d0),
                  reinterpret_cast<const char*>(vv.data() + d0 + 16), D * 4, 16 * D * 4, kend / 32, o.data() + d0,
                  D * 4, false);
        for (int64_t r = 0; r < BLK; ++r)
          for (int64_t d = 0; d < D; d += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(oh + (i0 + r) * so.t + d), to_bf16(_mm512_loadu_ps(o.data() + r * D + d)));
      }
    }
    _tile_release();
  }
}

void forward_kernel(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out,
                    float* lse, int64_t B, int64_t H, int64_t Hk, int64_t T, int64_t D, float scale, Strides sq,
                    Strides sk, Strides sv, Strides so, const float* cos, const float* sin) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    forward_range(begin, end, q, k, v, out, lse, H, Hk, T, D, scale, sq, sk, sv, so, cos, sin);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: per (batch, key head), each query head of its group in turn. For each block of 32
// keys, the blocks of P^T and dS^T against every later query block (causal), then that key
// block's dV and dK rows; dQ^T once all of dS^T is there.
struct BwdArgs {
  const at::BFloat16 *go, *q, *k, *v, *o;
  const float *lse, *cos, *sin;  // cos / sin: RoPE tables, or null
  at::BFloat16 *dq, *dk, *dv;
  int64_t H, Hk, T, D;
  float scale;
  Strides sgo, sq, sk, sv, so, sdq, sdk, sdv;
};

// Tasks begin .. end of B * Hk (batch, key head) pairs.
AMX_TARGET void backward_range(int64_t begin, int64_t end, const BwdArgs& a) {
  const at::BFloat16 *go = a.go, *q = a.q, *k = a.k, *v = a.v, *o = a.o;
  const float *lse = a.lse, *cos = a.cos, *sin = a.sin;
  at::BFloat16 *dq = a.dq, *dk = a.dk, *dv = a.dv;
  const int64_t H = a.H, Hk = a.Hk, T = a.T, D = a.D, G = H / Hk;
  const float scale = a.scale;
  const Strides &sgo = a.sgo, &sq = a.sq, &sk = a.sk, &sv = a.sv, &so = a.so, &sdq = a.sdq, &sdk = a.sdk, &sdv = a.sdv;
  {
    Buf<uint32_t> qt(D / 2 * T), dot(D / 2 * T), qv(T / 2 * D), dov(T / 2 * D), dsv(T / 2 * T);
    Buf<at::BFloat16> kT(D * T), pt(BLK * T), dst(BLK * T), qr(T * D), kr(T * D);
    Buf<float> sc(BLK * BLK), dpc(BLK * BLK), delta(T), dkacc(T * D), dvacc(T * D), dqt(D * T), dqf(T * D);
    tiles_on();
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / Hk, hk = idx % Hk;
      const at::BFloat16* kh = k + b * sk.b + hk * sk.h;
      int64_t ldk = sk.t;
      if (cos != nullptr) {  // the rotated keys the forward used
        rope_rows(kh, sk.t, T, D, cos, sin, kr.data());
        kh = kr.data(), ldk = D;
      }
      const at::BFloat16* vh = v + b * sv.b + hk * sv.h;
      bf16_transposed(kh, ldk, T, D, kT.data());
      dkacc.zero(T * D);
      dvacc.zero(T * D);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const at::BFloat16* qh = q + b * sq.b + h * sq.h;
        int64_t ldq = sq.t;
        if (cos != nullptr) {
          rope_rows(qh, sq.t, T, D, cos, sin, qr.data());
          qh = qr.data(), ldq = D;
        }
        const at::BFloat16* gh = go + b * sgo.b + h * sgo.h;
        const at::BFloat16* oh = o + b * so.b + h * so.h;
        const float* lh = lse + (b * H + h) * T;
        pairs_transposed(qh, ldq, T, D, qt.data());
        pairs_transposed(gh, sgo.t, T, D, dot.data());
        rows_interleaved(qh, ldq, T, D, qv.data());
        rows_interleaved(gh, sgo.t, T, D, dov.data());
        for (int64_t i = 0; i < T; ++i) {  // delta_i = rowsum(P * dP) = dO_i . O_i
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16)
            acc = _mm512_fmadd_ps(load_bf16(gh + i * sgo.t + d), load_bf16(oh + i * so.t + d), acc);
          delta[i] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t j0 = 0; j0 < T; j0 += BLK) {
          for (int64_t i0 = j0; i0 < T; i0 += BLK) {
            block32(kh + j0 * ldk, ldk * 2, reinterpret_cast<const char*>(qt.data() + i0),
                    reinterpret_cast<const char*>(qt.data() + i0 + 16), T * 4, 16 * T * 4, D / 32, sc.data(), BLK * 4,
                    false);
            block32(vh + j0 * sv.t, sv.t * 2, reinterpret_cast<const char*>(dot.data() + i0),
                    reinterpret_cast<const char*>(dot.data() + i0 + 16), T * 4, 16 * T * 4, D / 32, dpc.data(), BLK * 4,
                    false);
            const __m512 vs = _mm512_set1_ps(scale);
            for (int64_t r = 0; r < BLK; ++r) {  // key j = j0 + r against queries i0 .. i0 + 31
              const int64_t j = j0 + r;
              for (int64_t c = 0; c < BLK; c += 16) {
                const int64_t i = i0 + c;
                // queries i .. i+15 see key j when i + lane >= j
                const __mmask16 m = i >= j ? 0xffff : i + 16 <= j ? 0 : __mmask16(0xffffu << (j - i));
                const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sc.data() + r * BLK + c), vs, _mm512_loadu_ps(lh + i));
                const __m512 pv = _mm512_maskz_mov_ps(m, exp16(x));
                const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpc.data() + r * BLK + c),
                                                                               _mm512_loadu_ps(delta.data() + i))), vs);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt.data() + r * T + i), to_bf16(pv));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst.data() + r * T + i),
                                    to_bf16(_mm512_maskz_mov_ps(m, ds)));
              }
            }
            for (int64_t r = 0; r < BLK; r += 2)
              interleave_rows(dst.data() + r * T + i0, dst.data() + (r + 1) * T + i0, BLK,
                              dsv.data() + ((j0 + r) / 2) * T + i0);
          }
          // dV, dK rows j0 .. j0+31: the reduction over queries j0 .. T.
          const int64_t n = (T - j0) / 32;
          for (int64_t d0 = 0; d0 < D; d0 += BLK) {
            block32(pt.data() + j0, T * 2, reinterpret_cast<const char*>(dov.data() + (j0 / 2) * D + d0),
                    reinterpret_cast<const char*>(dov.data() + (j0 / 2) * D + d0 + 16), D * 4, 16 * D * 4, n,
                    dvacc.data() + j0 * D + d0, D * 4, true);
            block32(dst.data() + j0, T * 2, reinterpret_cast<const char*>(qv.data() + (j0 / 2) * D + d0),
                    reinterpret_cast<const char*>(qv.data() + (j0 / 2) * D + d0 + 16), D * 4, 16 * D * 4, n,
                    dkacc.data() + j0 * D + d0, D * 4, true);
          }
        }
        // dQ^T (D, T) = k^T (D, T) dS^T (T, T): queries i0.. see keys up to i0 + 31.
        for (int64_t i0 = 0; i0 < T; i0 += BLK)
          for (int64_t d0 = 0; d0 < D; d0 += BLK)
            block32(kT.data() + d0 * T, T * 2, reinterpret_cast<const char*>(dsv.data() + i0),
                    reinterpret_cast<const char*>(dsv.data() + i0 + 16), T * 4, 16 * T * 4, (i0 + BLK) / 32,
                    dqt.data() + d0 * T + i0, T * 4, false);
        __m512i r[16];  // dQ^T back to rows (fp32), then out through the rotation
        for (int64_t i0 = 0; i0 < T; i0 += 16)
          for (int64_t d0 = 0; d0 < D; d0 += 16) {
            for (int x = 0; x < 16; ++x) r[x] = _mm512_loadu_si512(dqt.data() + (d0 + x) * T + i0);
            transpose16(r);
            for (int x = 0; x < 16; ++x) _mm512_storeu_si512(dqf.data() + (i0 + x) * D + d0, r[x]);
          }
        rows_out(dqf.data(), T, D, cos, sin, dq + b * sdq.b + h * sdq.h, sdq.t);
      }
      rows_out(dkacc.data(), T, D, cos, sin, dk + b * sdk.b + hk * sdk.h, sdk.t);
      rows_out(dvacc.data(), T, D, nullptr, nullptr, dv + b * sdv.b + hk * sdv.h, sdv.t);
    }
    _tile_release();
  }
}

void backward_kernel(int64_t B, const BwdArgs& a) {
  at::parallel_for(0, B * a.Hk, 1, [&](int64_t begin, int64_t end) { backward_range(begin, end, a); });
}
#endif  // EXAFLOP_AMX

void check(const at::Tensor& x, const char* name, int64_t T, int64_t D) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.stride(3) == 1,
              "attention_amx: ", name, " must be a bf16 CPU (B, H, T, D) tensor with unit stride in D");
  TORCH_CHECK(x.size(2) == T && x.size(3) == D, "attention_amx: ", name, " has shape ", x.sizes());
}

// (B, H, T, D) with the memory of (B, T, H, D): what the model's next reshape wants.
at::Tensor heads_view(const at::Tensor& like, int64_t H) {
  return at::empty({like.size(0), like.size(2), H, like.size(3)}, like.options()).transpose(1, 2);
}

bool available() {
#ifdef EXAFLOP_AMX
  return amx_permitted();
#else
  return false;
#endif
}

void check_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(available(), "attention_amx: AMX is not available in this process");
  const int64_t T = q.size(2), D = q.size(3);
  TORCH_CHECK(T % 32 == 0 && D % 32 == 0 && D <= 256, "attention_amx: T and D must be multiples of 32 (D <= 256)");
  check(q, "q", T, D);
  check(k, "k", T, D);
  check(v, "v", T, D);
  TORCH_CHECK(k.size(0) == q.size(0) && v.sizes() == k.sizes() && q.size(1) % k.size(1) == 0,
              "attention_amx: k / v heads must divide q's");
}

// RoPE tables: (at least T, D/2) contiguous fp32 whose first T rows are positions 0 .. T-1.
const float* rope_table(const c10::optional<at::Tensor>& t, const char* name, int64_t T, int64_t D) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous() &&
                  t->size(0) >= T && t->size(1) == D / 2,
              "attention_amx: ", name, " must be a contiguous fp32 CPU (T, D/2) RoPE table, got ", t->sizes());
  return t->const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> attention_amx_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, const c10::optional<at::Tensor>& cos,
                                                     const c10::optional<at::Tensor>& sin) {
  check_all(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(cos.has_value() == sin.has_value(), "attention_amx: give both RoPE tables or neither");
  const float *c = rope_table(cos, "cos", T, D), *s = rope_table(sin, "sin", T, D);
  auto out = heads_view(q, H);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
#ifdef EXAFLOP_AMX
  forward_kernel(q.const_data_ptr<at::BFloat16>(), k.const_data_ptr<at::BFloat16>(), v.const_data_ptr<at::BFloat16>(),
                 out.mutable_data_ptr<at::BFloat16>(), lse.mutable_data_ptr<float>(), B, H, Hk, T, D, float(scale),
                 Strides(q), Strides(k), Strides(v), Strides(out), c, s);
#else
  (void)c, (void)s;
#endif
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_amx_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale, const c10::optional<at::Tensor>& cos,
                                                                 const c10::optional<at::Tensor>& sin) {
  check_all(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3);
  check(grad, "grad", T, D);
  check(out, "out", T, D);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * H * T,
              "attention_amx: lse must be contiguous fp32 (B, H, T)");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "attention_amx: give both RoPE tables or neither");
  const float *c = rope_table(cos, "cos", T, D), *s = rope_table(sin, "sin", T, D);
  auto dq = heads_view(q, H), dk = heads_view(k, Hk), dv = heads_view(v, Hk);
#ifdef EXAFLOP_AMX
  const BwdArgs args{grad.const_data_ptr<at::BFloat16>(), q.const_data_ptr<at::BFloat16>(),
                     k.const_data_ptr<at::BFloat16>(), v.const_data_ptr<at::BFloat16>(),
                     out.const_data_ptr<at::BFloat16>(), lse.const_data_ptr<float>(), c, s,
                     dq.mutable_data_ptr<at::BFloat16>(), dk.mutable_data_ptr<at::BFloat16>(),
                     dv.mutable_data_ptr<at::BFloat16>(), H, Hk, T, D, float(scale), Strides(grad), Strides(q),
                     Strides(k), Strides(v), Strides(out), Strides(dq), Strides(dk), Strides(dv)};
  backward_kernel(B, args);
#else
  (void)c, (void)s;
#endif
  return {dq, dk, dv};
}

bool attention_amx_available() { return available(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("attention_amx_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? cos=None, Tensor? sin=None) "
        "-> (Tensor, Tensor)");
  m.def("attention_amx_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
        "Tensor? cos=None, Tensor? sin=None) -> (Tensor, Tensor, Tensor)");
  m.def("attention_amx_available() -> bool", &attention_amx_available);
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("attention_amx_fwd", &attention_amx_fwd);
  m.impl("attention_amx_bwd", &attention_amx_bwd);
}
