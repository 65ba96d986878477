// Decode attention over the fp32 pool layout, per (row, KV head) task (csrc/paged_attention.cpp
// has the layouts and the story): shared by `paged_decode`, `paged_decode_rope` and the fused fp32
// decode step (csrc/decode_f32.cpp), so all three compute the same numbers. Compiled for the
// capability of the including file (ATen's Vectorized types).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace exaflop_attn {

using namespace at::vec;
using fV = Vectorized<float>;

inline fV load_f(const float* p) { return fV::loadu(p); }
// bf16 pools in the fp32 layout (an fp32 model with a bf16 cache): widened on load, exactly.
inline fV load_f(const at::BFloat16* p) { fV v; load_fp32_from_bf16(p, v); return v; }

// Ask for a block's keys or values (one head: 4 KB at head dim 64, fp32) while the block before
// it is computed. A block is one page, and the hardware prefetcher neither crosses pages nor
// knows which block the table names next: without this each block started with cache misses.
template <typename T>
inline void prefetch_block(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + i, 0, 3);
}

template <typename T>
inline void axpy(float* a, float p, const T* v, int64_t D) {
  fV pv(p); int64_t d = 0;
  for (; d + fV::size() <= D; d += fV::size()) fmadd(pv, load_f(v + d), fV::loadu(a + d)).store(a + d);
  for (; d < D; ++d) a[d] += p * float(v[d]);
}

// The BLK scores of one block whose keys are (D, BLK). Four partial sums over the head dim, and
// two vectors of positions at a time (AVX2: a block of 16 is two): eight independent chains of
// FMAs, not one chain of D dependent ones (that waited on each FMA's latency: 2.3x slower for
// the whole kernel at 32 rows, fp32 AVX2). Summed in a fixed order, whatever the batch.
template <typename T>
inline void block_scores(const float* q, const T* kt, int64_t D, int64_t BLK, float* out) {
  const int64_t W = fV::size();
  if (BLK % W == 0 && D % 4 == 0) {
    for (int64_t c = 0; c < BLK; c += 2 * W) {
      const bool two = c + W < BLK;
      fV a0(0.f), a1(0.f), a2(0.f), a3(0.f), b0(0.f), b1(0.f), b2(0.f), b3(0.f);
      for (int64_t d = 0; d < D; d += 4) {
        const T* k = kt + d * BLK + c;
        const fV q0(q[d]), q1(q[d + 1]), q2(q[d + 2]), q3(q[d + 3]);
        a0 = fmadd(q0, load_f(k), a0);
        a1 = fmadd(q1, load_f(k + BLK), a1);
        a2 = fmadd(q2, load_f(k + 2 * BLK), a2);
        a3 = fmadd(q3, load_f(k + 3 * BLK), a3);
        if (two) {
          b0 = fmadd(q0, load_f(k + W), b0);
          b1 = fmadd(q1, load_f(k + BLK + W), b1);
          b2 = fmadd(q2, load_f(k + 2 * BLK + W), b2);
          b3 = fmadd(q3, load_f(k + 3 * BLK + W), b3);
        }
      }
      ((a0 + a1) + (a2 + a3)).store(out + c);
      if (two) ((b0 + b1) + (b2 + b3)).store(out + c + W);
    }
    return;
  }
  for (int64_t c = 0; c < BLK; ++c) {
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * float(kt[d * BLK + c]);
    out[c] = s;
  }
}

// out (NV vectors) = sum over the row's first L positions of p[j] * value[j]: the sum stays in
// NV registers (head dim 64: 4 on AVX-512, 8 on AVX2) instead of a load and store per position.
// `after`: a block (BLK * D values) to prefetch while the last one is summed, or nullptr.
template <int NV, typename T>
inline void weighted_sum(const float* p, const T* pv, const int64_t* tb, int64_t K, int64_t kh, int64_t BLK,
                         int64_t L, float* out, const T* after = nullptr) {
  fV a[NV];
  for (int i = 0; i < NV; ++i) a[i] = fV(0.f);
  const int64_t D = NV * fV::size();
  for (int64_t j0 = 0; j0 < L; j0 += BLK) {
    const T* vb = pv + (tb[j0 / BLK] * K + kh) * BLK * D;
    const int64_t n = std::min(BLK, L - j0);
    if (j0 + BLK < L) prefetch_block(pv + (tb[j0 / BLK + 1] * K + kh) * BLK * D, BLK * D);
    else if (after != nullptr) prefetch_block(after, BLK * D);
    for (int64_t j = 0; j < n; ++j) {
      const fV pj(p[j0 + j]);
      const T* vp = vb + j * D;
      for (int i = 0; i < NV; ++i) a[i] = fmadd(pj, load_f(vp + i * fV::size()), a[i]);
    }
  }
  for (int i = 0; i < NV; ++i) a[i].store(out + i * fV::size());
}

// One (row, KV head) task: softmax(qf k) v over the row's first L positions, for the G query
// heads of qf (G x D, already scaled); sc (G x L) and acc (G x D) are the caller's scratch.
// `after`: the next task's first key block, prefetched while this task's last values are summed
// (nullptr: none).
template <typename T>
inline void attend_task(const float* qf, const T* pk, const T* pv, const int64_t* tb, int64_t L, int64_t kh,
                        int64_t G, int64_t K, int64_t D, int64_t BLK, std::vector<float>& sc, std::vector<float>& acc,
                        std::vector<float>& blk, float* out, const T* after = nullptr) {
  sc.assign(G * L, 0.f);
  for (int64_t j0 = 0; j0 < L; j0 += BLK) {
    const T* kt = pk + (tb[j0 / BLK] * K + kh) * D * BLK;
    if (j0 + BLK < L) prefetch_block(pk + (tb[j0 / BLK + 1] * K + kh) * D * BLK, D * BLK);
    else prefetch_block(pv + (tb[0] * K + kh) * BLK * D, BLK * D);  // the values' first block, next
    for (int64_t g = 0; g < G; ++g) {
      block_scores(qf + g * D, kt, D, BLK, blk.data());
      for (int64_t j = j0; j < std::min(L, j0 + BLK); ++j) sc[g * L + j] = blk[j - j0];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc.data() + g * L;
    float m = -INFINITY;
    for (int64_t j = 0; j < L; ++j) m = std::max(m, s[j]);
    fV vs(0.f), vm(m);
    int64_t j = 0;
    for (; j + fV::size() <= L; j += fV::size()) {
      fV e = (fV::loadu(s + j) - vm).exp_u20();
      e.store(s + j);
      vs = vs + e;
    }
    float sum = vec_reduce_all<float>([](fV& a, fV& b) { return a + b; }, vs);
    for (; j < L; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
    const float inv = 1.f / sum;
    for (j = 0; j < L; ++j) s[j] *= inv;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  const int64_t NV = D / fV::size();
  if (D % fV::size() == 0 && (NV == 2 || NV == 4 || NV == 8)) {
    for (int64_t g = 0; g < G; ++g) {
      float* a = acc.data() + g * D;
      const float* p = sc.data() + g * L;
      const T* nxt = g == G - 1 ? after : nullptr;
      if (NV == 2) weighted_sum<2>(p, pv, tb, K, kh, BLK, L, a, nxt);
      else if (NV == 4) weighted_sum<4>(p, pv, tb, K, kh, BLK, L, a, nxt);
      else weighted_sum<8>(p, pv, tb, K, kh, BLK, L, a, nxt);
    }
  } else {
    for (int64_t j = 0; j < L; ++j) {
      const T* vp = pv + ((tb[j / BLK] * K + kh) * BLK + j % BLK) * D;
      for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, sc[g * L + j], vp, D);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d];
}

// x (D) rotated by the half-split RoPE (nn/layers.py apply_rope) into out: out = x * c + rot(x) * s
// with rot(x) = (-x2, x1), c and s the row's (cos, cos) and (sin, sin). Each product rounded
// before the sum, as the unfused ops do (the empty asm keeps the compiler from contracting the
// pair into one FMA, which would round once and change the bits).
inline void rope_into(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    float a = x[d] * c[d];
    float b = (d < h ? -x[d + h] : x[d - h]) * s[d];
    asm("" : "+x"(a), "+x"(b));
    out[d] = a + b;
  }
}

// One (row b, KV head kh) task of the fp32 decode step: rotate the row's new key (kin, D) and
// its G queries (qin, G rows qstride apart), write key and value (vin) into the pools at block
// `blk`, offset `off`, and attend over L positions (the new one included) into out (G x D).
// c and s: the row's angles as (cos, cos) and (sin, sin), D each. `kr`, `qf`, `sc`, `acc`,
// `blkbuf`: the caller's scratch.
template <typename T>
inline void step_task(const float* qin, int64_t qstride, const float* kin, const float* vin, const float* c,
                      const float* s, T* pk, T* pv, const int64_t* tb, int64_t L, int64_t blk, int64_t off,
                      int64_t kh, int64_t G, int64_t K, int64_t D, int64_t BLK, float scale, std::vector<float>& kr,
                      std::vector<float>& qf, std::vector<float>& sc, std::vector<float>& acc,
                      std::vector<float>& blkbuf, float* out, const T* after = nullptr) {
  rope_into(kin, c, s, D, kr.data());
  T* kdst = pk + (blk * K + kh) * D * BLK + off;
  T* vdst = pv + ((blk * K + kh) * BLK + off) * D;
  for (int64_t d = 0; d < D; ++d) {
    kdst[d * BLK] = T(kr[d]);
    vdst[d] = T(vin[d]);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* qg = qf.data() + g * D;
    rope_into(qin + g * qstride, c, s, D, qg);
    for (int64_t d = 0; d < D; ++d) qg[d] *= scale;
  }
  attend_task(qf.data(), pk, pv, tb, L, kh, G, K, D, BLK, sc, acc, blkbuf, out, after);
}

}  // namespace exaflop_attn
