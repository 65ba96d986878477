// One row times a matrix, y (1, N) = x (1, K) @ w (N, K)^T, for decoding a single sequence
// (nn/packed.py): `linear_bf16_row` for bf16 matrices, `linear_int8_row` for int8 ones with a
// scale per output row. At one row the product is a pass over the weights, bound by how fast
// each core streams them: here each thread reads its own contiguous range of the matrix's
// rows, eight rows at a time (eight independent streams in flight), accumulating in fp32, and
// prefetches the next eight rows as it goes (measured: 0.80-0.90x the time without). Against
// the kernels these replace at one row (oneDNN's on its prepacked bf16 layout,
// `_weight_int8pack_mm` for int8): 0.66-0.70x the time for the 49 matrices of an lm-124m
// decode step (bench/linear_row.py, docs/benchmarks.md).
//
// Built with the other kernels (nn/kernels.py). The Python side calls them only where the CPU
// has what they need (bf16: AVX512-BF16, K a multiple of 32; int8: AVX-512 BW, K a multiple
// of 64); they check again here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <type_traits>

namespace {

constexpr int ROWS = 8;  // matrix rows per pass

// Splits the N matrix rows into passes of ROWS across the threads and calls
// pass(rows_in_pass, first_row, first_row_of_the_next_pass): the next pass's rows are what to
// prefetch (the pass itself for the last one); a tail of fewer than ROWS rows goes one by one.
template <typename F>
void over_passes(int64_t N, F&& pass) {
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  // Grain: at least 32 passes (256 rows) per task, so a small matrix is not split finer than
  // what pays for waking a thread.
  at::parallel_for(0, blocks, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      if (n + 2 * ROWS <= N) {
        pass(std::integral_constant<int, ROWS>{}, n, n + ROWS);
      } else if (n + ROWS <= N) {
        pass(std::integral_constant<int, ROWS>{}, n, n);
      } else {
        for (int64_t m = n; m < N; ++m) pass(std::integral_constant<int, 1>{}, m, m);
      }
    }
  });
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
inline void dot_rows(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* next, at::BFloat16* y,
                     int64_t K) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(x + k));
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      __m512bh wv = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(w + r * K + k));
      acc[r] = _mm512_dpbf16_ps(acc[r], wv, xv);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = at::BFloat16(_mm512_reduce_add_ps(acc[r]));
}

at::Tensor linear_bf16_row(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "linear_bf16_row: this CPU has no AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "linear_bf16_row: expects bf16 x (..., K) and bf16 w (N, K)");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K && x.numel() == K && K % 32 == 0,
              "linear_bf16_row: one row of K = ", K, " (a multiple of 32) expected, got ", x.sizes());
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  const at::BFloat16* xp = xc.const_data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.const_data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>();
  over_passes(N, [&](auto rows, int64_t n, int64_t next) {
    dot_rows<decltype(rows)::value>(xp, wp + n * K, wp + next * K, yp + n, K);
  });
  return y;
}

// The same pass over an int8 matrix with one scale per output row (nn/packed.py's weight-only
// int8): y[n] = scale[n] * sum_k q[n, k] x[k], widening sixteen int8 weights at a time to fp32
// against the row converted to fp32 once. Half the bytes of bf16 to stream.
template <int R>
__attribute__((target("avx512f,avx512bw")))
inline void dot_rows_int8(const float* x, const int8_t* w, const int8_t* next, const at::BFloat16* scale,
                          at::BFloat16* y, int64_t K) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = at::BFloat16(_mm512_reduce_add_ps(acc[r]) * static_cast<float>(scale[r]));
}

at::Tensor linear_int8_row(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bw"), "linear_int8_row: this CPU has no AVX-512 BW");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar && q.dim() == 2 &&
              scale.scalar_type() == at::kBFloat16 && scale.numel() == q.size(0),
              "linear_int8_row: expects bf16 x (..., K), int8 q (N, K) and bf16 scale (N)");
  const int64_t K = q.size(1), N = q.size(0);
  TORCH_CHECK(x.size(-1) == K && x.numel() == K && K % 64 == 0,
              "linear_int8_row: one row of K = ", K, " (a multiple of 64) expected, got ", x.sizes());
  auto xf = x.reshape({K}).to(at::kFloat).contiguous();
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  const float* xp = xf.const_data_ptr<float>();
  const int8_t* wp = qc.const_data_ptr<int8_t>();
  const at::BFloat16* sp = sc.const_data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>();
  over_passes(N, [&](auto rows, int64_t n, int64_t next) {
    dot_rows_int8<decltype(rows)::value>(xp, wp + n * K, wp + next * K, sp + n, yp + n, K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("linear_bf16_row(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8_row(Tensor x, Tensor q, Tensor scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("linear_bf16_row", &linear_bf16_row);
  m.impl("linear_int8_row", &linear_int8_row);
}
