// RMSNorm for eager training, one pass over memory each way (nn/layers.py's RMSNorm and Block): the
// forward optionally adds a branch's output to the fp32 residual stream first (s = x + y, kept),
// then h = s * rsqrt(mean(s^2) + eps) * w in the compute dtype; the backward gives ds (plus the
// residual's own gradient, when given) in fp32 and in the branch's dtype, and dw.
//
// Why: eager PyTorch makes ~8 passes over memory per norm (the add, pow, mean, rsqrt, two
// products, the cast; more backward). Here each row is read once into registers / L1 and finished
// there; dw is summed per thread and the threads' sums added at the end. lm-small's 2048 x 384
// (AMX CPU, 2 threads): 0.31 ms forward, 0.54 backward, at the machine's ~25 GB/s. A compiled step
// keeps inductor's kernels (0.4-0.5 / 0.8-0.9 ms, but fused with the adds, casts and gradient sums
// around them, which an opaque operator turns into passes of their own: slower overall).
//
// Any CPU capability (ATen's vectors); fp32 or bf16 branches and outputs. Built with the other
// kernels (nn/kernels.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using fV = at::vec::Vectorized<float>;
constexpr int64_t ROWS = 16;  // rows a task takes at a time

// row (C) of T as fp32: a view of the input for fp32, a conversion into buf otherwise.
template <typename T>
const float* as_f32(const T* p, float* buf, int64_t C) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    at::vec::convert(p, buf, C);
    return buf;
  }
}

template <typename T>
void store(const float* src, T* dst, int64_t C) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + C, dst);
  } else {
    at::vec::convert(src, dst, C);
  }
}

// s = x (+ y); h = s * r * w with r = rsqrt(mean(s^2) + eps). x, s: fp32; y: Y or null; h: H.
template <typename Y, typename H>
void forward_kernel(const float* x, const Y* y, const float* w, float* s, H* h, float* rstd, int64_t N, int64_t C,
                    float eps) {
  at::parallel_for(0, N, ROWS, [&](int64_t r0, int64_t r1) {
    std::vector<float> ybuf(C), hbuf(C);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      float* sr = s + r * C;
      const float* yr = y != nullptr ? as_f32(y + r * C, ybuf.data(), C) : nullptr;
      fV acc(0.f);
      float tail = 0.f;
      int64_t j = 0;
      for (; j + fV::size() <= C; j += fV::size()) {
        fV v = fV::loadu(xr + j);
        if (yr != nullptr) {
          v = v + fV::loadu(yr + j);
          v.store(sr + j);
        }
        acc = at::vec::fmadd(v, v, acc);
      }
      for (; j < C; ++j) {
        const float v = yr != nullptr ? (sr[j] = xr[j] + yr[j]) : xr[j];
        tail += v * v;
      }
      const float ss = at::vec::vec_reduce_all<float>([](fV a, fV b) { return a + b; }, acc) + tail;
      const float rs = 1.f / std::sqrt(ss / float(C) + eps);
      rstd[r] = rs;
      const float* src = yr != nullptr ? sr : xr;
      float* hb = hbuf.data();
      j = 0;
      for (; j + fV::size() <= C; j += fV::size()) (fV::loadu(src + j) * fV(rs) * fV::loadu(w + j)).store(hb + j);
      for (; j < C; ++j) hb[j] = src[j] * rs * w[j];
      store(hb, h + r * C, C);
    }
  });
}

// With u = dh * w: ds = r * u - s * r^3 * sum(u * s) / C (+ dres); dw = sum over rows of dh * s * r.
template <typename H, typename Y>
void backward_kernel(const H* dh, const float* s, const float* rstd, const float* w, const float* dres, float* ds,
                     Y* ds_low, float* dw, int64_t N, int64_t C) {
  const int threads = at::get_num_threads();
  std::vector<float> partial(size_t(threads) * C, 0.f);
  at::parallel_for(0, N, ROWS, [&](int64_t r0, int64_t r1) {
    float* pw = partial.data() + size_t(at::get_thread_num()) * C;
    std::vector<float> gbuf(C), obuf(C);
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = as_f32(dh + r * C, gbuf.data(), C);
      const float* sr = s + r * C;
      const float rs = rstd[r];
      fV acc(0.f);
      float tail = 0.f;
      int64_t j = 0;
      for (; j + fV::size() <= C; j += fV::size()) {
        const fV gv = fV::loadu(g + j), sv = fV::loadu(sr + j);
        acc = at::vec::fmadd(gv * fV::loadu(w + j), sv, acc);
        at::vec::fmadd(gv * sv, fV(rs), fV::loadu(pw + j)).store(pw + j);
      }
      for (; j < C; ++j) {
        tail += g[j] * w[j] * sr[j];
        pw[j] += g[j] * sr[j] * rs;
      }
      const float dot = at::vec::vec_reduce_all<float>([](fV a, fV b) { return a + b; }, acc) + tail;
      const float k = rs * rs * rs * dot / float(C);
      float* out = ds + r * C;
      const float* dr = dres != nullptr ? dres + r * C : nullptr;
      j = 0;
      for (; j + fV::size() <= C; j += fV::size()) {
        fV v = fV::loadu(g + j) * fV::loadu(w + j) * fV(rs) - fV::loadu(sr + j) * fV(k);
        if (dr != nullptr) v = v + fV::loadu(dr + j);
        v.store(out + j);
      }
      for (; j < C; ++j) out[j] = g[j] * w[j] * rs - sr[j] * k + (dr != nullptr ? dr[j] : 0.f);
      if (ds_low != nullptr) store(out, ds_low + r * C, C);
    }
  });
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < C; ++j) dw[j] += partial[size_t(t) * C + j];
}

void check2d(const at::Tensor& t, const char* name, int64_t N, int64_t C) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2 && t.size(0) == N && t.size(1) == C,
              "rmsnorm: ", name, " must be a contiguous CPU (", N, ", ", C, ") tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "rmsnorm: ", name,
              " must be fp32 or bf16");
}

template <typename F>
void by_dtype(at::ScalarType a, at::ScalarType b, F&& f) {
  // f(A(), B()) with the C++ types of the two dtypes (fp32 or bf16 each).
  auto inner = [&](auto ta) {
    if (b == at::kFloat) f(ta, float());
    else f(ta, at::BFloat16());
  };
  if (a == at::kFloat) inner(float());
  else inner(at::BFloat16());
}

// x (N, C) fp32, y: (N, C) fp32 / bf16 or None, w (C) fp32 -> s = x + y (without y: an empty
// tensor, s being x; an operator's output may not alias its input), h (N, C) in out_dtype, rstd (N).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                                           const at::Tensor& w, double eps,
                                                           at::ScalarType out_dtype) {
  const int64_t N = x.size(0), C = x.dim() == 2 ? x.size(1) : 0;
  check2d(x, "x", N, C);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rmsnorm: x must be fp32");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == C, "rmsnorm: w must be fp32 (C)");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "rmsnorm: out_dtype must be fp32 or bf16");
  if (y.has_value()) check2d(*y, "y", N, C);
  auto s = at::empty({y.has_value() ? N : 0, C}, x.options());
  auto h = at::empty({N, C}, x.options().dtype(out_dtype));
  auto rstd = at::empty({N}, x.options());
  const at::ScalarType yt = y.has_value() ? y->scalar_type() : at::kFloat;
  by_dtype(yt, out_dtype, [&](auto ty, auto th) {
    using Y = decltype(ty);
    using H = decltype(th);
    forward_kernel<Y, H>(x.const_data_ptr<float>(), y.has_value() ? y->const_data_ptr<Y>() : nullptr,
                         w.const_data_ptr<float>(), y.has_value() ? s.mutable_data_ptr<float>() : nullptr,
                         h.mutable_data_ptr<H>(),
                         rstd.mutable_data_ptr<float>(), N, C, float(eps));
  });
  return {s, h, rstd};
}

// dh (N, C) fp32 / bf16, s (N, C) fp32, rstd (N), w (C), dres: the residual's own gradient (N, C)
// fp32 or None -> ds (fp32), ds in low_dtype (an empty tensor when low_dtype is fp32), dw (C) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_bwd(const at::Tensor& dh, const at::Tensor& s,
                                                           const at::Tensor& rstd, const at::Tensor& w,
                                                           const c10::optional<at::Tensor>& dres,
                                                           at::ScalarType low_dtype) {
  const int64_t N = s.size(0), C = s.dim() == 2 ? s.size(1) : 0;
  check2d(s, "s", N, C);
  check2d(dh, "dh", N, C);
  TORCH_CHECK(s.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                  rstd.numel() == N && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == C,
              "rmsnorm: s, rstd and w must be fp32");
  if (dres.has_value()) {
    check2d(*dres, "dres", N, C);
    TORCH_CHECK(dres->scalar_type() == at::kFloat, "rmsnorm: dres must be fp32");
  }
  auto ds = at::empty({N, C}, s.options());
  const bool low = low_dtype == at::kBFloat16;
  auto ds_low = at::empty({low ? N : 0, C}, s.options().dtype(low_dtype));
  auto dw = at::zeros({C}, s.options());
  by_dtype(dh.scalar_type(), low_dtype, [&](auto th, auto ty) {
    using H = decltype(th);
    using Y = decltype(ty);
    backward_kernel<H, Y>(dh.const_data_ptr<H>(), s.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                          w.const_data_ptr<float>(), dres.has_value() ? dres->const_data_ptr<float>() : nullptr,
                          ds.mutable_data_ptr<float>(), low ? ds_low.mutable_data_ptr<Y>() : nullptr,
                          dw.mutable_data_ptr<float>(), N, C);
  });
  return {ds, ds_low, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("rmsnorm_fwd(Tensor x, Tensor? y, Tensor w, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("rmsnorm_bwd(Tensor dh, Tensor s, Tensor rstd, Tensor w, Tensor? dres, ScalarType low_dtype) "
        "-> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("rmsnorm_fwd", &rmsnorm_fwd);
  m.impl("rmsnorm_bwd", &rmsnorm_bwd);
}
