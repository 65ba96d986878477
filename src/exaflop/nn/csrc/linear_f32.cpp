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
#include "linear_f32.h"

namespace {

using namespace exaflop_f32;

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
  // Tiles of tile_rows(M) weight rows (linear_f32.h); any tiling gives the same bits (see above).
  const int64_t tiles_n = N / tile_rows(M);
  at::parallel_for(0, tiles_n, GRAIN_ROWS / tile_rows(M),
                   [&](int64_t t0, int64_t t1) { tiles(xp, wp, yp, M, K, N, t0, t1); });
  tail_rows(xp, wp, yp, M, K, N);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("linear_f32_rows(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("linear_f32_rows", &linear_f32_rows);
}
