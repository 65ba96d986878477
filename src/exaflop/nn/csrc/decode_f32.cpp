// The fp32 model's whole decode step in one operator: `decode_f32`, what `auto` serves on CPUs
// without fast bf16 (AVX2-only ones), one new token per running sequence.
//
// Why one operator: at a decode step's few rows the work between the matrix products is tiny,
// but as separate operators (inductor's kernels in a compiled step) each one was a parallel
// region to enter and leave, plus the wrapper and the guards in Python: the second thread sat
// idle for ~18% of a step at 8 rows (perf, lm-124m, AVX2) while the first ran that serial part.
// Here both threads stay in one parallel region for the whole step and meet at barriers: each
// takes its share of every product (the weight rows `linear_f32_rows` would give it, with the
// same tiles, so the same sums), of the attention tasks (`paged_decode_rope`'s, the same code),
// and of the rows of the norms and the activation.
//
// The numbers are the model's (nn/layers.py) in fp32: products and attention bit for bit the
// kernels the compiled step calls; RMSNorm and SiLU within a few ulps of PyTorch's (another
// summation order, another exp). tests/test_decode_f32.py compares logits and greedy tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "linear_f32.h"
#include "paged_attention.h"

namespace {

using namespace exaflop_attn;

// Items [lo, hi) of n for thread t of nt: contiguous chunks, as at::parallel_for splits them.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t t, int64_t nt) {
  const int64_t chunk = (n + nt - 1) / nt;
  return {std::min(n, t * chunk), std::min(n, (t + 1) * chunk)};
}

// This thread's part of y (M, N) = x (M, K) @ w (N, K)^T: the tiles `linear_f32_rows` gives it
// (as at::parallel_for splits them with its grain, GRAIN_ROWS). Returns its columns [c0, c1).
// `huge`: the weights are in 2 MB pages (linear_f32.h wide_scheme).
inline std::pair<int64_t, int64_t> product(const float* x, const at::Tensor& w, float* y, int64_t M, int64_t t,
                                           int64_t nt, bool huge) {
  const int64_t N = w.size(0), K = w.size(1), WR = exaflop_f32::tile_rows(M), tiles = N / WR;
  const int64_t grain = exaflop_f32::GRAIN_ROWS / WR;
  const int64_t users = std::max<int64_t>(1, std::min(nt, (tiles + grain - 1) / grain));
  if (t >= users) return {0, 0};
  const float* wp = w.const_data_ptr<float>();
  auto [t0, t1] = share(tiles, t, users);
  exaflop_f32::tiles(x, wp, y, M, K, N, t0, t1, huge);
  if (t == users - 1) {
    exaflop_f32::tail_rows(x, wp, y, M, K, N);
    return {t0 * WR, N};
  }
  return {t0 * WR, t1 * WR};
}

// The residual: x (B, C) += y in this thread's columns (a product's share, `product`'s result).
inline void add_into(float* x, const float* y, int64_t B, int64_t C, std::pair<int64_t, int64_t> cols) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = cols.first; c < cols.second; ++c) x[b * C + c] += y[b * C + c];
}

// out = x * rsqrt(mean(x^2) + eps) * w over one row of C (nn/layers.py RMSNorm).
inline void rms_norm(const float* x, const float* w, float* out, int64_t C, float eps) {
  fV acc(0.f);
  int64_t i = 0;
  for (; i + fV::size() <= C; i += fV::size()) {
    const fV v = fV::loadu(x + i);
    acc = fmadd(v, v, acc);
  }
  float ss = vec_reduce_all<float>([](fV& a, fV& b) { return a + b; }, acc);
  for (; i < C; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / float(C) + eps);
  for (i = 0; i < C; ++i) out[i] = (x[i] * r) * w[i];
}

struct Layer {
  const float* attn_norm;
  at::Tensor qkv, wo;
  const float* mlp_norm;
  at::Tensor gate_up, down;
};

template <typename T>
void run(const int64_t* tok, const float* emb, const std::vector<Layer>& layers, const float* final_norm,
         const at::Tensor& head, const float* cos, const float* sin, int64_t half, std::vector<T*> pk,
         std::vector<T*> pv, const int64_t* table, int64_t NBMAX, const int64_t* start, float* logits, int64_t B,
         int64_t C, int64_t H, int64_t K, int64_t D, int64_t F, int64_t BLK, float eps, bool huge) {
  const int64_t G = H / K, QKV = (H + 2 * K) * D;
  const float scale = float(1.0 / std::sqrt(double(D)));
  std::vector<float> x(B * C), h(B * C), qkv(B * QKV), att(B * H * D), tmp(B * C), gu(B * 2 * F), act(B * F);
  const int64_t nt = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    std::vector<float> qf(G * D), acc(G * D), sc, blkbuf(BLK), kr(D), c2(D), s2(D);
    auto [r0, r1] = share(B, t, n);
    for (int64_t b = r0; b < r1; ++b) std::copy(emb + tok[b] * C, emb + (tok[b] + 1) * C, x.data() + b * C);
#pragma omp barrier
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      for (int64_t b = r0; b < r1; ++b) rms_norm(x.data() + b * C, L.attn_norm, h.data() + b * C, C, eps);
#pragma omp barrier
      product(h.data(), L.qkv, qkv.data(), B, t, n, huge);
#pragma omp barrier
      // Attention, one task per (row, KV head): RoPE, the cache write at the row's new position,
      // softmax(q k) v over its positions (`paged_decode_rope`'s task).
      auto [i0, i1] = share(B * K, t, n);
      for (int64_t idx = i0; idx < i1; ++idx) {
        const int64_t b = idx / K, kh = idx % K, pos = start[b];
        for (int64_t d = 0; d < D; ++d) {
          c2[d] = cos[pos * half + d % half];
          s2[d] = sin[pos * half + d % half];
        }
        const float* row = qkv.data() + b * QKV;
        const int64_t* tb = table + b * NBMAX;
        const T* after = nullptr;  // the next task's first key block
        if (idx + 1 < i1) after = pk[l] + (table[((idx + 1) / K) * NBMAX] * K + (idx + 1) % K) * D * BLK;
        step_task(row + kh * G * D, D, row + H * D + kh * D, row + (H + K) * D + kh * D, c2.data(), s2.data(),
                  pk[l], pv[l], tb, pos + 1, tb[pos / BLK], pos % BLK, kh, G, K, D, BLK, scale, kr, qf, sc, acc,
                  blkbuf, att.data() + (b * H + kh * G) * D, after);
      }
#pragma omp barrier
      add_into(x.data(), tmp.data(), B, C, product(att.data(), L.wo, tmp.data(), B, t, n, huge));
#pragma omp barrier
      for (int64_t b = r0; b < r1; ++b) rms_norm(x.data() + b * C, L.mlp_norm, h.data() + b * C, C, eps);
#pragma omp barrier
      product(h.data(), L.gate_up, gu.data(), B, t, n, huge);
#pragma omp barrier
      {
        // SwiGLU: silu(gate) * up, with silu(g) = g / (1 + exp(-g)) as PyTorch's CPU kernel has it.
        auto [e0, e1] = share(B * F, t, n);
        const fV one(1.f);
        for (int64_t e = e0; e < e1;) {
          const int64_t b = e / F, end = std::min(e1, (b + 1) * F);
          const float* g = gu.data() + b * F;  // row b's gate of element e at g[e], its up at g[e + F]
          int64_t i = e;
          for (; i + fV::size() <= end; i += fV::size()) {
            const fV gv = fV::loadu(g + i);
            ((gv / (one + gv.neg().exp())) * fV::loadu(g + i + F)).store(act.data() + i);
          }
          for (; i < end; ++i) act[i] = (g[i] / (1.f + std::exp(-g[i]))) * g[i + F];
          e = end;
        }
      }
#pragma omp barrier
      add_into(x.data(), tmp.data(), B, C, product(act.data(), L.down, tmp.data(), B, t, n, huge));
#pragma omp barrier
    }
    for (int64_t b = r0; b < r1; ++b) rms_norm(x.data() + b * C, final_norm, h.data() + b * C, C, eps);
#pragma omp barrier
    product(h.data(), head, logits, B, t, n, huge);
  }
}

// tokens (B,): each row's newest token; start (B,): its position (the cache rows 0..B-1 hold
// that many); weights: per layer attn_norm, qkv, wo, mlp_norm, gate_up, down (the packed
// matrices, nn/packed.py), then the final norm and the head; cos, sin: RoPE tables (positions,
// D/2); keys / values: each layer's pools (N, K, D, BLK) and (N, K, BLK, D), fp32 or bf16,
// written at each row's new position; table (slots, NBMAX) block ids; huge_pages: the weights
// are in 2 MB pages (it picks the products' scheme, linear_f32.h). Returns logits (B, V).
at::Tensor decode_f32(const at::Tensor& tokens, const at::Tensor& emb, at::TensorList weights, const at::Tensor& cos_,
                      const at::Tensor& sin_, at::TensorList keys, at::TensorList values, const at::Tensor& table_,
                      const at::Tensor& start_, int64_t n_head, int64_t n_kv_head, double eps, bool huge_pages) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "decode_f32: this CPU has no AVX2 + FMA");
  const int64_t n_layer = int64_t(keys.size());
  TORCH_CHECK(n_layer >= 1 && int64_t(values.size()) == n_layer && int64_t(weights.size()) == 6 * n_layer + 2,
              "decode_f32: 6 weights per layer + final norm + head, and one key and value pool per layer expected");
  const at::Tensor tok = tokens.contiguous(), start = start_.contiguous(), table = table_.contiguous();
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  const int64_t B = tok.numel(), C = emb.size(1), H = n_head, K = n_kv_head, D = C / H;
  const int64_t BLK = values[0].size(2), NBMAX = table.size(1), F = weights[4].size(0) / 2;
  TORCH_CHECK(emb.scalar_type() == at::kFloat && emb.is_contiguous(), "decode_f32: a contiguous fp32 embedding expected");
  TORCH_CHECK(C % 8 == 0 && F % 8 == 0 && H * D == C && H % K == 0 && cos.size(1) * 2 == D,
              "decode_f32: widths multiple of 8, heads dividing the width, RoPE tables of D/2 expected");
  TORCH_CHECK(start.numel() == B && B <= table.size(0), "decode_f32: one start per row, rows within the table");
  for (const auto& w : weights)
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "decode_f32: contiguous fp32 weights expected");
  const int64_t* sp = start.const_data_ptr<int64_t>();
  const int64_t* tp = tok.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < NBMAX * BLK && sp[b] < cos.size(0), "decode_f32: row ", b, " at position ",
                sp[b], " is past the cache or the RoPE table");
    TORCH_CHECK(tp[b] >= 0 && tp[b] < emb.size(0), "decode_f32: token ", tp[b], " out of the vocabulary");
  }
  std::vector<Layer> layers;
  for (int64_t l = 0; l < n_layer; ++l) {
    const auto* w = &weights[6 * l];
    TORCH_CHECK(w[1].size(0) == (H + 2 * K) * D && w[1].size(1) == C && w[2].size(0) == C && w[2].size(1) == C &&
                    w[4].size(1) == C && w[5].size(0) == C && w[5].size(1) == F && w[0].numel() == C && w[3].numel() == C,
                "decode_f32: layer ", l, "'s weights do not have the model's shapes");
    layers.push_back({w[0].const_data_ptr<float>(), w[1], w[2], w[3].const_data_ptr<float>(), w[4], w[5]});
  }
  const at::Tensor& head = weights[6 * n_layer + 1];
  TORCH_CHECK(head.size(1) == C, "decode_f32: the head's width is not the model's");
  auto logits = at::empty({B, head.size(0)}, emb.options());
  const bool bf16 = keys[0].scalar_type() == at::kBFloat16;
  for (int64_t l = 0; l < n_layer; ++l)
    TORCH_CHECK(keys[l].is_contiguous() && values[l].is_contiguous() && keys[l].dim() == 4 &&
                    keys[l].scalar_type() == values[l].scalar_type() &&
                    (keys[l].scalar_type() == at::kFloat || keys[l].scalar_type() == at::kBFloat16),
                "decode_f32: the (N, K, D, BLK) pool layout in fp32 or bf16 expected");
  auto go = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<T*> pk, pv;
    for (int64_t l = 0; l < n_layer; ++l) {
      pk.push_back(keys[l].data_ptr<T>());
      pv.push_back(values[l].data_ptr<T>());
    }
    run<T>(tp, emb.const_data_ptr<float>(), layers, weights[6 * n_layer].const_data_ptr<float>(), head,
           cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), D / 2, pk, pv, table.const_data_ptr<int64_t>(),
           NBMAX, sp, logits.mutable_data_ptr<float>(), B, C, H, K, D, F, BLK, float(eps), huge_pages);
  };
  if (bf16) go(static_cast<at::BFloat16*>(nullptr));
  else go(static_cast<float*>(nullptr));
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("decode_f32(Tensor tokens, Tensor emb, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!)[] keys, "
        "Tensor(b!)[] values, Tensor table, Tensor start, int n_head, int n_kv_head, float eps, "
        "bool huge_pages=False) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("decode_f32", &decode_f32);
}
