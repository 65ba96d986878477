// The fp32 decode kernel's tiles (csrc/linear_f32.cpp has the whole story): shared by
// `linear_f32_rows` and the fused fp32 decode step (csrc/decode_f32.cpp), so both compute every
// output in the same order.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace exaflop_f32 {

__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  // One fixed order: (lo + hi) halves, then pairs, then the last two.
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// WR weight rows (from w, N apart in y) against XR x rows (x, K apart; y rows N apart), over
// the k range [k0, k1): the accumulators start at zero (first), continue from `carry` (a
// chunk after the first), and end as sums written to y (last) or back into `carry`. Loading
// and storing an accumulator is exact, so chunking K leaves every sum's order (k ascending in
// each lane, lanes summed by lane_sum) as one pass over K has it.
// `ahead`: WR rows (K apart) to prefetch over the same k range, one line per row every 16
// floats (nullptr: none).
template <int WR, int XR>
__attribute__((target("avx2,fma")))
inline void tile(const float* x, const float* w, const float* ahead, float* y, int64_t K, int64_t N, int64_t k0,
                 int64_t k1, __m256* carry, bool first, bool last) {
  __m256 acc[WR][XR];
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) acc[r][i] = first ? _mm256_setzero_ps() : carry[r * XR + i];
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 xv[XR];
    for (int i = 0; i < XR; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int r = 0; r < WR; ++r) {
      if (ahead != nullptr && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
      __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int i = 0; i < XR; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) {
      if (last) y[i * N + r] = lane_sum(acc[r][i]);
      else carry[r * XR + i] = acc[r][i];
    }
}

// Weight rows [n, n + WR) against every x row: panels of up to PANEL x rows, and for each panel
// K in chunks of KC, every group of XR rows taking the chunk before the next chunk starts. The
// tile's weights then arrive from memory a chunk at a time while the groups multiply the chunk
// before (in L1), instead of in one burst per tile with the multiply-adds of the other groups
// after it: fp32 AVX2, lm-124m's 49 matrices out of cache, 8 rows 76 -> 84 GFLOP/s, 16 rows
// 98 -> 117, 32 rows 138 -> 142 (docs/benchmarks.md).
// Prefetch: while the first group takes a chunk, the chunk PF_CHUNKS after it in this order
// (this tile's next chunks, then the next tile's) is asked for, WR x 512 bytes each: far enough
// ahead to hide the memory's latency, near enough to stay in L1 until used. Two chunks ahead
// measured 0.97-0.98x the time of one whole tile ahead (the earlier scheme: 12-32 KB ahead,
// more than L1 holds for the 2048-wide matrices) at 1, 8 and 16 rows, and the same at 32
// (lm-124m's fused decode step, AVX2).
constexpr int64_t KC = 128, PANEL = 48, PF_CHUNKS = 2;

template <int WR, int XR>
inline void all_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  alignas(32) __m256 carry[PANEL / XR + 1][WR * XR];
  const int64_t chunks = (K + KC - 1) / KC;
  for (int64_t p = 0; p < M; p += PANEL) {
    const int64_t pm = std::min(PANEL, M - p);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t k1 = std::min(K, k0 + KC);
      const bool first = k0 == 0, last = k1 == K;
      const float* ahead = nullptr;
      if (p == 0) {  // later panels find the weights in cache
        const int64_t c = k0 / KC + PF_CHUNKS, n2 = n + c / chunks * WR;
        // Rows n2.. at chunk c % chunks, addressed relative to this chunk's k range.
        if (n2 + WR <= N) ahead = w + n2 * K + (c % chunks) * KC - k0;
      }
      int64_t m = 0, g = 0;
      for (; m + XR <= pm; m += XR, ++g)
        tile<WR, XR>(x + (p + m) * K, w + n * K, m == 0 ? ahead : nullptr, y + (p + m) * N + n, K, N, k0, k1,
                     carry[g], first, last);
      const float* xr = x + (p + m) * K;
      float* yr = y + (p + m) * N + n;
      switch (pm - m) {
        case 3: tile<WR, 3>(xr, w + n * K, m == 0 ? ahead : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        case 2: tile<WR, 2>(xr, w + n * K, m == 0 ? ahead : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        case 1: tile<WR, 1>(xr, w + n * K, m == 0 ? ahead : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        default: break;
      }
    }
  }
}

// Tiles, by measurement (AVX2, lm-124m's matrices): one row, eight weight rows (eight streams in
// flight, as the bf16 one-row kernel); more, four weight rows x three x rows: twelve accumulators
// of AVX2's sixteen registers, seven loads per twelve FMAs, so the FMAs set the pace where the
// product is compute-bound (with K in chunks, as fast as two x four at 2-8 rows).
inline int64_t tile_rows(int64_t M) { return M == 1 ? 8 : 4; }

// A thread takes at least this many weight rows of a product (waking one costs more than a smaller share).
constexpr int64_t GRAIN_ROWS = 256;

// Weight-row tiles [t0, t1) of y (M, N) = x (M, K) @ w (N, K)^T, tile_rows(M) rows a tile; the
// caller splits the tiles between threads.
inline void tiles(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t t0, int64_t t1) {
  const int64_t WR = tile_rows(M);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t * WR;
    if (WR == 8) {
      all_rows<8, 1>(x, w, y, M, K, N, n);
    } else {
      all_rows<4, 3>(x, w, y, M, K, N, n);
    }
  }
}

// The rows past the last whole tile (N not a multiple of the tile).
inline void tail_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t n = N / tile_rows(M) * tile_rows(M); n < N; ++n) all_rows<1, 3>(x, w, y, M, K, N, n);
}

}  // namespace exaflop_f32
