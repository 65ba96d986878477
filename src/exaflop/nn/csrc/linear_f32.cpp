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

namespace {

__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  // One fixed order: (lo + hi) halves, then pairs, then the last two.
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// WR weight rows (from w, N apart in y) against XR x rows (x, K apart; y rows N apart).
// `next`: the rows after this tile, prefetched on the way (nullptr: none).
template <int WR, int XR>
__attribute__((target("avx2,fma")))
inline void tile(const float* x, const float* w, const float* next, float* y, int64_t K, int64_t N) {
  __m256 acc[WR][XR];
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[XR];
    for (int i = 0; i < XR; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int r = 0; r < WR; ++r) {
      if (next != nullptr && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int i = 0; i < XR; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < WR; ++r)
    for (int i = 0; i < XR; ++i) y[i * N + r] = lane_sum(acc[r][i]);
}

// Weight rows [n, n + WR) against every x row, XR at a time then the rest.
template <int WR, int XR>
inline void all_rows(const float* x, const float* w, const float* next, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t n) {
  int64_t m = 0;
  for (; m + XR <= M; m += XR) tile<WR, XR>(x + m * K, w + n * K, m == 0 ? next : nullptr, y + m * N + n, K, N);
  switch (M - m) {
    case 3: tile<WR, 3>(x + m * K, w + n * K, m == 0 ? next : nullptr, y + m * N + n, K, N); break;
    case 2: tile<WR, 2>(x + m * K, w + n * K, m == 0 ? next : nullptr, y + m * N + n, K, N); break;
    case 1: tile<WR, 1>(x + m * K, w + n * K, m == 0 ? next : nullptr, y + m * N + n, K, N); break;
    default: break;
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
  // in flight, as the bf16 one-row kernel); up to eight rows, two weight rows x four x rows;
  // more, four weight rows x three x rows: twelve accumulators of AVX2's sixteen registers,
  // seven loads per twelve FMAs, so the FMAs set the pace where the product is compute-bound.
  // (Any tiling gives the same bits: see the header.)
  const int64_t WR = M == 1 ? 8 : M <= 8 ? 2 : 4;
  const int64_t tiles = N / WR;
  // Grain: at least 256 weight rows per task (waking a thread costs more than a smaller share).
  at::parallel_for(0, tiles, 256 / WR, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * WR;
      const float* next = n + 2 * WR <= N ? wp + (n + WR) * K : nullptr;
      if (WR == 8) {
        all_rows<8, 1>(xp, wp, next, yp, M, K, N, n);
      } else if (WR == 2) {
        all_rows<2, 4>(xp, wp, next, yp, M, K, N, n);
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
