// A few rows times an fp32 matrix, y (M, N) = x (M, K) @ w (N, K)^T, for the fp32 decode step
// (nn/packed.py: one row per running sequence): `linear_f32_rows`. What `auto` serves in on
// CPUs without fast bf16 (AVX2-only ones), where MKL's sgemm at 1-8 rows neither streams the
// weights at the memory's speed nor keeps the multiply-adds busy (docs/benchmarks.md).
//
// Each thread takes its own contiguous range of the matrix's rows and reads each weight row
// once: for a tile of weight rows, every group of x rows (x stays in L1/L2: 32 rows of 768
// floats are 96 KB) is multiplied against it before the next tile. Eight-lane fp32 FMAs,
// accumulated per (weight row, x row) in k order and summed across lanes the same way
// whatever the tile: a row's result does not depend on how many rows came with it (a batch of
// sequences decodes bit for bit like each one alone).
//
// Built with the other kernels (nn/kernels.py); needs AVX2 + FMA (checked at run time) and K a
// multiple of 8 (checked by the caller and here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>

namespace {

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
// `next`: the rows after this tile, prefetched over the same k range (nullptr: none).
template <int WR, int XR>
__attribute__((target("avx2,fma")))
inline void tile(const float* x, const float* w, const float* next, float* y, int64_t K, int64_t N, int64_t k0,
                 int64_t k1, __m256* carry, bool first, bool last) {
  __m256 acc[WR][XR];
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) acc[r][i] = first ? _mm256_setzero_ps() : carry[r * XR + i];
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 xv[XR];
    for (int i = 0; i < XR; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int r = 0; r < WR; ++r) {
      if (next != nullptr && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
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

// Weight rows [n, n + WR) against every x row. One row: a single pass over K. More: panels of up
// to PANEL x rows, and for each panel K in chunks of KC, every group of XR rows taking the chunk
// before the next chunk starts. The tile's weights then arrive from memory a chunk at a time
// while the groups multiply the chunk before (in L1), instead of in one burst per tile with the
// multiply-adds of the other groups after it: fp32 AVX2, lm-124m's 49 matrices out of cache, 8
// rows 76 -> 84 GFLOP/s, 16 rows 98 -> 117, 32 rows 138 -> 142 (docs/benchmarks.md).
constexpr int64_t KC = 128, PANEL = 48;

template <int WR, int XR>
inline void all_rows(const float* x, const float* w, const float* next, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t n) {
  alignas(32) __m256 carry[PANEL / XR + 1][WR * XR];
  for (int64_t p = 0; p < M; p += PANEL) {
    const int64_t pm = std::min(PANEL, M - p);
    const int64_t kc = M == 1 ? K : KC;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc);
      const bool first = k0 == 0, last = k1 == K;
      const float* pf = p == 0 ? next : nullptr;
      int64_t m = 0, g = 0;
      for (; m + XR <= pm; m += XR, ++g)
        tile<WR, XR>(x + (p + m) * K, w + n * K, m == 0 ? pf : nullptr, y + (p + m) * N + n, K, N, k0, k1, carry[g],
                     first, last);
      const float* xr = x + (p + m) * K;
      float* yr = y + (p + m) * N + n;
      switch (pm - m) {
        case 3: tile<WR, 3>(xr, w + n * K, m == 0 ? pf : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        case 2: tile<WR, 2>(xr, w + n * K, m == 0 ? pf : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        case 1: tile<WR, 1>(xr, w + n * K, m == 0 ? pf : nullptr, yr, K, N, k0, k1, carry[g], first, last); break;
        default: break;
      }
    }
  }
}

at::Tensor linear_f32_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "linear_f32_rows: this CPU has no AVX2 + FMA");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 2,
              "linear_f32_rows: expects fp32 x (..., K) and fp32 w (N, K)");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K && K % 8 == 0, "linear_f32_rows: rows of K = ", K,
              " (a multiple of 8) expected, got ", x.sizes());
  auto xc = x.reshape({-1, K}).contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // Tiles, by measurement (AVX2, lm-124m's matrices): one row, eight weight rows (eight streams
  // in flight, as the bf16 one-row kernel); more, four weight rows x three x rows: twelve
  // accumulators of AVX2's sixteen registers, seven loads per twelve FMAs, so the FMAs set the
  // pace where the product is compute-bound (with K in chunks, as fast as two x four at 2-8 rows).
  // (Any tiling gives the same bits: see the header.)
  const int64_t WR = M == 1 ? 8 : 4;
  const int64_t tiles = N / WR;
  // Grain: at least 256 weight rows per task (waking a thread costs more than a smaller share).
  at::parallel_for(0, tiles, 256 / WR, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * WR;
      const float* next = n + 2 * WR <= N ? wp + (n + WR) * K : nullptr;
      if (WR == 8) {
        all_rows<8, 1>(xp, wp, next, yp, M, K, N, n);
      } else {
        all_rows<4, 3>(xp, wp, next, yp, M, K, N, n);
      }
    }
  });
  for (int64_t n = tiles * WR; n < N; ++n) all_rows<1, 3>(xp, wp, nullptr, yp, M, K, N, n);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("linear_f32_rows(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("linear_f32_rows", &linear_f32_rows);
}
