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
// the k range [k0, k1): the accumulators start at zero (FIRST), continue from `carry` (a
// chunk after the first), and end as sums written to y (LAST) or back into `carry`. Loading
// and storing an accumulator is exact, so chunking K leaves every sum's order (k ascending in
// each lane, lanes summed by lane_sum) as one pass over K has it. FIRST and LAST are template
// arguments and the tile is always inlined: as a called function with run-time flags the
// compiler kept the accumulators on the stack between chunks (fp32 AVX2, 32 rows, lm-124m's
// matrices in L2: 163 -> 218 GFLOP/s with whole-K chunks).
// Prefetch, two kinds: `ahead`, WR rows (K apart) over the same k range, one line per row every
// 16 floats (nullptr: none); and [pl, pe), a byte range asked for one line a step (pl == pe: none).
template <int WR, int XR, bool FIRST, bool LAST, bool AHEAD>
__attribute__((target("avx2,fma"), always_inline))
inline void tile(const float* __restrict x, const float* __restrict w, const float* ahead, const char* pl,
                 const char* pe, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1, __m256* carry) {
  __m256 acc[WR][XR];
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) acc[r][i] = FIRST ? _mm256_setzero_ps() : carry[r * XR + i];
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 xv[XR];
    for (int i = 0; i < XR; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    if (pl < pe) {
      _mm_prefetch(pl, _MM_HINT_T1);
      pl += 64;
    }
    for (int r = 0; r < WR; ++r) {
      if (AHEAD && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
      __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int i = 0; i < XR; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) {
      if (LAST) y[i * N + r] = lane_sum(acc[r][i]);
      else carry[r * XR + i] = acc[r][i];
    }
}

// tile<> with FIRST / LAST / AHEAD (ahead != nullptr) chosen at run time: a test of `ahead` in
// the loop, never taken in the wide scheme, cost 10% of the time at 32 rows.
template <int WR, int XR, bool AHEAD>
__attribute__((target("avx2,fma"), always_inline))
inline void tile_fl(bool first, bool last, const float* x, const float* w, const float* ahead, const char* pl,
                    const char* pe, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1, __m256* carry) {
  if (first && last) tile<WR, XR, true, true, AHEAD>(x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
  else if (first) tile<WR, XR, true, false, AHEAD>(x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
  else if (last) tile<WR, XR, false, true, AHEAD>(x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
  else tile<WR, XR, false, false, AHEAD>(x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
}
template <int WR, int XR>
__attribute__((target("avx2,fma"), always_inline))
inline void tile_at(bool first, bool last, const float* x, const float* w, const float* ahead, const char* pl,
                    const char* pe, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1, __m256* carry) {
  if (ahead != nullptr) tile_fl<WR, XR, true>(first, last, x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
  else tile_fl<WR, XR, false>(first, last, x, w, ahead, pl, pe, y, K, N, k0, k1, carry);
}

// Weight rows [n, n + WR) against every x row (n_end: the end of this thread's rows, the last
// tile whose weights the wide scheme asks for ahead): panels of up to PANEL x rows, and for each panel
// K in chunks, every group of XR rows taking the chunk before the next chunk starts. Two ways
// of keeping the memory busy, by the rows there are:
//  - Few rows (the product bound by the memory's speed: at 8 rows the weights stream at 22 of the 25
//    GB/s this machine reads from 4 KB pages; it reads 33-36 from 2 MB pages): chunks of KC, and
//    while the first group takes a chunk, the chunk PF_CHUNKS after it in this order (this tile's
//    next chunks, then the next tile's) is asked for, WR x 512 bytes each: far enough ahead to hide
//    the memory's latency, near enough to stay in L1 until used. The tile's weights then arrive a
//    chunk at a time while the groups multiply the chunk before: fp32 AVX2, lm-124m's 49 matrices out
//    of cache, 8 rows 76 -> 84 GFLOP/s, 16 rows 98 -> 117 against one whole chunk
//    (docs/benchmarks.md); two chunks ahead measured 0.97-0.98x the time of one whole tile ahead at 1
//    and 8 rows.
//  - From ROWS_WIDE rows on (bound by the multiply-adds): chunks of up to KC_WIDE (fewer carries),
//    and the next tile of this thread's range (WR * K * 4 contiguous bytes) asked for into L2,
//    spread evenly over every group of this tile, so the memory works while all the groups
//    compute, not only while the first one does (before, 32 rows streamed the weights at 9.5
//    GB/s and ran the FMAs at half their peak). lm-124m's 49 matrices, 2 threads: 32 rows
//    37-38 -> 31-32 ms (149 -> 180 GFLOP/s; the FMAs' peak here is 258), 24 rows 28-31 -> 27-29
//    ms; at 12-16 rows it is 5-10% slower (bound by the memory: asking for L1 one chunk ahead
//    keeps more lines in flight), at 20 even.
//    That is with the weights in 4 KB pages. In 2 MB pages (`serve` asks for them: engine/
//    host_memory.py) the wide scheme is often the faster one below 24 rows too, where K fits one
//    chunk: lm-124m's matrices, 8 rows, 2 threads, 352 MB of one shape at a time: 768 x 768 14.5
//    -> 12.3 ms, 2304 x 768 14.6 -> 13.2, 4096 x 768 14.5 -> 12.3, but 768 x 2048 12.7 -> 13.5
//    (K in two chunks). Inside the decode step it paid on long runs only (a thread's share of 2304
//    and 4096 rows: -0.5 ms a step at 8 rows) and lost on 768 rows split in two (the attention's
//    output product: 1.30 -> 1.44-1.57 ms a step), hence RUN_WIDE tiles at least. The whole step
//    (lm-124m, 80 cached positions, both schemes alternating in one process, same bits): 4 / 5 /
//    6 / 8 / 10 / 12 rows 1.02-1.03x / 1.04x / 1.04-1.05x / 1.02-1.03x / 1.02x / 1.00-1.02x
//    faster, 20 / 23 rows 1.05-1.07x; but 2-3 rows 0.95-0.99x and 14-18 rows 0.97-0.98x: those
//    keep the chunk-ahead scheme (bench/linear_f32.py's "2MB/4KB scheme" rows; docs/benchmarks.md).
constexpr int64_t KC = 128, PANEL = 48, PF_CHUNKS = 2, KC_WIDE = 1024, ROWS_WIDE = 24, RUN_WIDE = 256;

// Which scheme a run of tiles [t0, t1) of y (M, N) = x (M, K) @ w (N, K)^T takes; `huge`: the
// weights are in 2 MB pages (the caller knows: engine/host_memory.py huge_page_share).
inline bool wide_scheme(int64_t M, int64_t K, int64_t t0, int64_t t1, bool huge) {
  if (M >= ROWS_WIDE) return true;
  const bool rows = (M >= 4 && M <= 12) || M >= 20;
  return huge && rows && K <= KC_WIDE && t1 - t0 >= RUN_WIDE;
}

template <int WR, int XR>
__attribute__((target("avx2,fma"))) inline void all_rows(const float* x, const float* w, float* y, int64_t M,
                                                         int64_t K, int64_t N, int64_t n, int64_t n_end, bool wide) {
  alignas(32) __m256 carry[PANEL / XR + 1][WR * XR];
  const int64_t chunks = wide ? (K + KC_WIDE - 1) / KC_WIDE : (K + KC - 1) / KC;
  const int64_t kc = wide ? ((K + chunks - 1) / chunks + 7) / 8 * 8 : KC;
  // wide: the next tile's bytes, one part per group call of this tile (`calls` of them).
  const char* next = reinterpret_cast<const char*>(w + (n + WR) * K);
  const int64_t next_bytes = wide && n + WR < n_end ? WR * K * int64_t(sizeof(float)) : 0;
  const int64_t calls = (M / PANEL * ((PANEL + XR - 1) / XR) + (M % PANEL + XR - 1) / XR) * chunks;
  int64_t call = 0;
  auto part = [&](const char*& pl, const char*& pe) {
    pl = next + next_bytes * call / calls / 64 * 64;
    pe = next + next_bytes * (call + 1) / calls / 64 * 64;
    ++call;
  };
  for (int64_t p = 0; p < M; p += PANEL) {
    const int64_t pm = std::min(PANEL, M - p);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc);
      const bool first = k0 == 0, last = k1 == K;
      const float* ahead = nullptr;
      if (!wide && p == 0) {  // later panels find the weights in cache
        const int64_t c = k0 / KC + PF_CHUNKS, n2 = n + c / chunks * WR;
        // Rows n2.. at chunk c % chunks, addressed relative to this chunk's k range.
        if (n2 + WR <= N) ahead = w + n2 * K + (c % chunks) * KC - k0;
      }
      const float* xp = x + p * K;
      float* yp = y + p * N + n;
      const char *pl, *pe;
      int64_t m = 0, g = 0;
      for (; m + XR <= pm; m += XR, ++g) {
        part(pl, pe);
        tile_at<WR, XR>(first, last, xp + m * K, w + n * K, m == 0 ? ahead : nullptr, pl, pe, yp + m * N, K, N, k0,
                        k1, carry[g]);
      }
      const float* a = m == 0 ? ahead : nullptr;
      switch (pm - m) {
        case 3: part(pl, pe); tile_at<WR, 3>(first, last, xp + m * K, w + n * K, a, pl, pe, yp + m * N, K, N, k0, k1, carry[g]); break;
        case 2: part(pl, pe); tile_at<WR, 2>(first, last, xp + m * K, w + n * K, a, pl, pe, yp + m * N, K, N, k0, k1, carry[g]); break;
        case 1: part(pl, pe); tile_at<WR, 1>(first, last, xp + m * K, w + n * K, a, pl, pe, yp + m * N, K, N, k0, k1, carry[g]); break;
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
// caller splits the tiles between threads. `huge`: the weights are in 2 MB pages (wide_scheme).
inline void tiles(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t t0, int64_t t1,
                  bool huge = false) {
  const int64_t WR = tile_rows(M);
  const bool wide = wide_scheme(M, K, t0, t1, huge);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t * WR;
    if (WR == 8) {
      all_rows<8, 1>(x, w, y, M, K, N, n, t1 * WR, wide);
    } else {
      all_rows<4, 3>(x, w, y, M, K, N, n, t1 * WR, wide);
    }
  }
}

// The rows past the last whole tile (N not a multiple of the tile).
inline void tail_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t n = N / tile_rows(M) * tile_rows(M); n < N; ++n) all_rows<1, 3>(x, w, y, M, K, N, n, N, M >= ROWS_WIDE);
}

}  // namespace exaflop_f32
