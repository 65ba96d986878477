// Cross-entropy and its logit gradient for a chunk of rows, in one pass per row (nn/loss.py's
// chunked LM head + loss): `xent_rows` returns them, `xent_rows_` writes the gradient over the
// logits it is given.
//
// For each row (logits x over the vocabulary, its target t and weight r): the row is read once
// into an fp32 buffer of the thread's (a vocabulary of 8192 is 32 KB: it stays in L1 / L2 for
// the passes below), then its max, exp(x - max) kept in the buffer and summed, and the gradient
// r * (softmax - onehot(t)) written in the logits' dtype; the row's loss r * (lse - x[t]) goes
// to a per-row slot, summed in row order at the end, so the result does not depend on the
// thread count (fp32 resume stays bit-exact). Compiled, the same work took inductor's kernels
// several passes over the chunk in memory (docs/benchmarks.md).
//
// Built with the other kernels (nn/kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <tuple>
#include <vector>

namespace {

using fV = at::vec::Vectorized<float>;

template <typename T>
void xent_kernel(const T* x, T* g, const int64_t* targets, const float* rw, float* row_loss, int64_t n, int64_t V) {
  using tV = at::vec::Vectorized<T>;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(V);
    float* b = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * V;
      T* gr = g + r * V;
      // The row in fp32 (a copy for fp32 too: g may be x itself) and its max, in one pass; three
      // passes over the row in all (five before: ~0.8 of lm-small's 6.2 ms a step).
      fV vmax(-std::numeric_limits<float>::infinity());
      int64_t j = 0;
      if constexpr (std::is_same_v<T, float>) {
        for (; j + fV::size() <= V; j += fV::size()) {
          const fV v = fV::loadu(xr + j);
          v.store(b + j);
          vmax = at::vec::maximum(vmax, v);
        }
      } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
        for (; j + tV::size() <= V; j += tV::size()) {
          auto [lo, hi] = at::vec::convert_to_float<T>(tV::loadu(xr + j));
          lo.store(b + j);
          hi.store(b + j + fV::size());
          vmax = at::vec::maximum(vmax, at::vec::maximum(lo, hi));
        }
      }
      float m = at::vec::vec_reduce_all<float>([](fV a, fV c) { return at::vec::maximum(a, c); }, vmax);
      for (; j < V; ++j) {
        b[j] = static_cast<float>(xr[j]);
        m = std::isnan(b[j]) ? b[j] : std::max(m, b[j]);
      }
      const int64_t t = targets[r];
      const float xt = b[t];
      float sum = 0.f;
      fV vsum(0.f), vm(m);
      for (j = 0; j + fV::size() <= V; j += fV::size()) {
        fV e = (fV::loadu(b + j) - vm).exp_u20();
        e.store(b + j);
        vsum = vsum + e;
      }
      sum = at::vec::vec_reduce_all<float>([](fV a, fV c) { return a + c; }, vsum);
      for (; j < V; ++j) {
        b[j] = std::exp(b[j] - m);
        sum += b[j];
      }
      const float w = rw[r];
      row_loss[r] = w * (m + std::log(sum) - xt);
      // The gradient w * softmax - w * onehot(t), scaled and written in the logits' dtype at once.
      const float scale = w / sum;
      const fV vs(scale);
      const float gt = b[t] * scale - w;
      j = 0;
      if constexpr (std::is_same_v<T, float>) {
        for (; j + fV::size() <= V; j += fV::size()) (fV::loadu(b + j) * vs).store(gr + j);
      } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
        for (; j + tV::size() <= V; j += tV::size())
          at::vec::convert_from_float<T>(fV::loadu(b + j) * vs, fV::loadu(b + j + fV::size()) * vs).store(gr + j);
      }
      for (; j < V; ++j) gr[j] = static_cast<T>(b[j] * scale);
      gr[t] = static_cast<T>(gt);
    }
  });
}

void check(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& rw) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu() &&
              (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "xent_rows: contiguous fp32 / bf16 CPU logits (n, V) expected, got ", logits.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == logits.size(0),
              "xent_rows: int64 targets (n,) expected");
  TORCH_CHECK(rw.scalar_type() == at::kFloat && rw.numel() == logits.size(0), "xent_rows: fp32 row weights (n,) expected");
  if (targets.numel() > 0) {
    TORCH_CHECK(targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < logits.size(1),
                "xent_rows: a target is outside the vocabulary of ", logits.size(1));
  }
}

at::Tensor run(const at::Tensor& logits, at::Tensor& g, const at::Tensor& targets_in, const at::Tensor& rw_in) {
  const int64_t n = logits.size(0), V = logits.size(1);
  const auto targets = targets_in.contiguous();
  const auto rw = rw_in.contiguous();
  auto row_loss = at::empty({n}, rw.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "xent_rows", [&] {
    xent_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(),
                          targets.const_data_ptr<int64_t>(), rw.const_data_ptr<float>(),
                          row_loss.mutable_data_ptr<float>(), n, V);
  });
  // In row order, one thread: the same sum whatever the thread count.
  double total = 0.0;
  const float* lp = row_loss.const_data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) total += lp[r];
  return at::scalar_tensor(static_cast<float>(total), rw.options());
}

std::tuple<at::Tensor, at::Tensor> xent_rows(const at::Tensor& logits, const at::Tensor& targets,
                                             const at::Tensor& rw) {
  check(logits, targets, rw);
  auto g = at::empty_like(logits);
  auto loss = run(logits, g, targets, rw);
  return {loss, g};
}

at::Tensor xent_rows_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& rw) {
  check(logits, targets, rw);
  return run(logits, logits, targets, rw);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("xent_rows(Tensor logits, Tensor targets, Tensor rw) -> (Tensor, Tensor)");
  m.def("xent_rows_(Tensor(a!) logits, Tensor targets, Tensor rw) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("xent_rows", &xent_rows);
  m.impl("xent_rows_", &xent_rows_);
}
