// Decode attention over a paged KV cache (nn/paged.py): one new query per row, keys and values
// read in place from pools of fixed-size blocks through each row's block table.
//
// One task per (row, KV head); the query heads that share the KV head are done together so
// each block is loaded once. Keys are stored transposed per block, (block, head, dim, position):
// a block's scores are one vector, built by a multiply-add per dimension with no horizontal
// sums. Values are (block, head, position, dim) and summed in registers. Softmax in fp32.
// Compiled for the CPU capability PyTorch dispatches to (nn/paged.py passes the flags), with
// ATen's Vectorized types, so one source serves AVX-512, AVX2 and plain builds.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <cmath>
#include <type_traits>
#include <vector>

using namespace at::vec;
using fV = Vectorized<float>;

static inline fV load_f(const float* p) { return fV::loadu(p); }
static inline fV load_f(const at::BFloat16* p) {
  auto [lo, hi] = convert_bfloat16_float(Vectorized<at::BFloat16>::loadu(p, fV::size()));
  (void)hi;
  return lo;
}

static inline void axpy(float* a, float p, const float* v, int64_t D) {
  fV pv(p); int64_t d = 0;
  for (; d + fV::size() <= D; d += fV::size()) fmadd(pv, fV::loadu(v + d), fV::loadu(a + d)).store(a + d);
  for (; d < D; ++d) a[d] += p * v[d];
}
static inline void axpy(float* a, float p, const at::BFloat16* v, int64_t D) {
  fV pv(p); int64_t d = 0;
  for (; d + fV::size() <= D; d += fV::size()) fmadd(pv, load_f(v + d), fV::loadu(a + d)).store(a + d);
  for (; d < D; ++d) a[d] += p * float(v[d]);
}

// The BLK scores of one block whose keys are (D, BLK).
template <typename T>
static inline void block_scores(const float* q, const T* kt, int64_t D, int64_t BLK, float* out) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (BLK == fV::size() && D % 2 == 0) {  // rows d and d+1 are one full bf16 vector
      fV acc0(0.f), acc1(0.f);
      for (int64_t d = 0; d < D; d += 2) {
        auto [r0, r1] = convert_bfloat16_float(Vectorized<at::BFloat16>::loadu(kt + d * BLK));
        acc0 = fmadd(fV(q[d]), r0, acc0);
        acc1 = fmadd(fV(q[d + 1]), r1, acc1);
      }
      (acc0 + acc1).store(out);
      return;
    }
  }
  if (BLK % fV::size() == 0) {
    for (int64_t c = 0; c < BLK; c += fV::size()) {
      fV acc(0.f);
      for (int64_t d = 0; d < D; ++d) acc = fmadd(fV(q[d]), load_f(kt + d * BLK + c), acc);
      acc.store(out + c);
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
template <int NV, typename T>
static inline void weighted_sum(const float* p, const T* pv, const int64_t* tb, int64_t K, int64_t kh,
                                int64_t BLK, int64_t L, float* out) {
  fV a[NV];
  for (int i = 0; i < NV; ++i) a[i] = fV(0.f);
  const int64_t D = NV * fV::size();
  for (int64_t j0 = 0; j0 < L; j0 += BLK) {
    const T* vb = pv + (tb[j0 / BLK] * K + kh) * BLK * D;
    const int64_t n = std::min(BLK, L - j0);
    for (int64_t j = 0; j < n; ++j) {
      const fV pj(p[j0 + j]);
      const T* vp = vb + j * D;
      for (int i = 0; i < NV; ++i) a[i] = fmadd(pj, load_f(vp + i * fV::size()), a[i]);
    }
  }
  for (int i = 0; i < NV; ++i) a[i].store(out + i * fV::size());
}

template <typename T>
static void run(const T* q, const T* pk, const T* pv, const int64_t* table, const int64_t* lens, T* out,
                int64_t B, int64_t H, int64_t K, int64_t D, int64_t BLK, int64_t NBMAX, float scale) {
  const int64_t G = H / K;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), sc, blk(BLK);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / K, kh = idx % K, L = lens[b];
      const int64_t* tb = table + b * NBMAX;
      sc.assign(G * L, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = float(q[(b * H + kh * G + g) * D + d]) * scale;
      for (int64_t j0 = 0; j0 < L; j0 += BLK) {
        const T* kt = pk + (tb[j0 / BLK] * K + kh) * D * BLK;
        for (int64_t g = 0; g < G; ++g) {
          block_scores(qf.data() + g * D, kt, D, BLK, blk.data());
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
          if (NV == 2) weighted_sum<2>(p, pv, tb, K, kh, BLK, L, a);
          else if (NV == 4) weighted_sum<4>(p, pv, tb, K, kh, BLK, L, a);
          else weighted_sum<8>(p, pv, tb, K, kh, BLK, L, a);
        }
      } else {
        for (int64_t j = 0; j < L; ++j) {
          const T* vp = pv + ((tb[j / BLK] * K + kh) * BLK + j % BLK) * D;
          for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, sc[g * L + j], vp, D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + kh * G + g) * D + d] = T(acc[g * D + d]);
    }
  });
}

// q (B, H, D); keys_t (N, K, D, BLK); values (N, K, BLK, D); table (B, NBMAX) block ids;
// lens (B,) keys per row (>= 1). Returns (B, H, D), softmax(q k / sqrt(D)) v per head.
at::Tensor paged_decode(const at::Tensor& q_, const at::Tensor& keys_t, const at::Tensor& values,
                        const at::Tensor& table_, const at::Tensor& lens_) {
  TORCH_CHECK(keys_t.is_contiguous() && values.is_contiguous(), "paged_decode: contiguous pools expected");
  const at::Tensor q = q_.contiguous(), table = table_.contiguous(), lens = lens_.contiguous();
  const double scale = 1.0 / std::sqrt(double(q.size(2)));
  TORCH_CHECK(q.scalar_type() == keys_t.scalar_type() && q.scalar_type() == values.scalar_type(),
              "paged_decode: q, keys and values must share a dtype");
  auto out = at::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = values.size(1), BLK = values.size(2);
  const int64_t NBMAX = table.size(1);
  if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q.data_ptr<at::BFloat16>(), keys_t.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
                      table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(),
                      B, H, K, D, BLK, NBMAX, scale);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: bf16 or fp32 only");
    run<float>(q.data_ptr<float>(), keys_t.data_ptr<float>(), values.data_ptr<float>(), table.data_ptr<int64_t>(),
               lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, D, BLK, NBMAX, scale);
  }
  return out;
}

// An operator of the dispatcher, not a Python function: a compiled decode step (and its C++
// wrapper) calls it without going through Python, once per layer per step.
TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("paged_decode(Tensor q, Tensor keys_t, Tensor values, Tensor table, Tensor lens) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) { m.impl("paged_decode", &paged_decode); }
