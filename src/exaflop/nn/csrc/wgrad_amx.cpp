// The weight gradient of a linear layer in bf16 on AMX tiles: dW (N, K) fp32 = g^T x for g (M, N)
// and x (M, K), the reduction over M tokens (nn/layers.py's Linear while training, nn/loss.py's head).
//
// Why: oneDNN runs this product (a 2048-long reduction into a small output, its first operand
// transposed) at 0.9-1.1 TFLOP/s on lm-small's shapes, against 1.9-2.2 for the forward and input
// gradient products of the same size: it lays out both operands in memory first. Here the tokens
// are taken in chunks that stay in L2 and laid out for the tiles chunk by chunk: x with pairs of
// rows interleaved (the B operand's VNNI form), g as pairs transposed into A tiles, 32 output rows
// at a time so each A panel is used from L1 across all K. The result comes out in fp32, which is
// what the fp32 master weight wants (no bf16 gradient to cast back).
//
// Threads split the output rows when there are many (the LM head's 8192), else the tokens, with the
// partial sums added at the end. Requires M, N, K multiples of 32; the caller checks.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "amx.h"

namespace {

#ifdef EXAFLOP_AMX
using namespace exaflop_amx;

constexpr int64_t MC = 256;  // tokens per chunk: 8 reduction steps of 32 (measured fastest of 128-1024)

// dst (rows n0..n1 of dW, row stride K) (+)= g[m0:m1, n0:n1]^T x[m0:m1, :].
AMX_TARGET void wgrad_part(const c10::BFloat16* g, int64_t ldg, const c10::BFloat16* x, int64_t ldx, int64_t m0,
                           int64_t m1, int64_t n0, int64_t n1, int64_t K, float* dst) {
  const int64_t S = MC / 32;
  Buf<uint32_t> xb(K / 16 * S * 256), ga(2 * S * 256);
  tiles_on();
  for (int64_t mc = m0; mc < m1; mc += MC) {
    const int64_t steps = std::min(MC, m1 - mc) / 32;
    // x's chunk as B tiles: tile (kb, s) row r = pairs (x[2r], x[2r+1]) of step s, columns kb*16..+15.
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t kb = 0; kb < K / 16; ++kb) {
        const c10::BFloat16* r0 = x + (mc + 32 * s) * ldx + kb * 16;
        uint32_t* t = xb.data() + (kb * S + s) * 256;
        for (int64_t r = 0; r < 16; ++r) _mm512_store_si512(t + r * 16, pair16(r0 + 2 * r * ldx, r0 + (2 * r + 1) * ldx));
      }
    for (int64_t nb = n0; nb < n1; nb += 32) {
      // g's 32 columns nb.. as A tiles: tile (half, s) row r = output row nb + 16 half + r, its
      // 16 token pairs of step s. Pairs of rows of g, transposed.
      __m512i v[16];
      for (int64_t half = 0; half < 2; ++half)
        for (int64_t s = 0; s < steps; ++s) {
          for (int c = 0; c < 16; ++c) {
            const c10::BFloat16* r0 = g + (mc + 32 * s + 2 * c) * ldg + nb + 16 * half;
            v[c] = pair16(r0, r0 + ldg);
          }
          transpose16(v);
          uint32_t* t = ga.data() + (half * S + s) * 256;
          for (int r = 0; r < 16; ++r) _mm512_store_si512(t + r * 16, v[r]);
        }
      for (int64_t kb = 0; kb < K; kb += 32) {
        float* c = dst + (nb - n0) * K + kb;
        const int64_t ldc = K * 4;
        if (mc == m0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, ldc);
          _tile_loadd(1, c + 16, ldc);
          _tile_loadd(2, c + 16 * K, ldc);
          _tile_loadd(3, c + 16 * K + 16, ldc);
        }
        const uint32_t* b0 = xb.data() + (kb / 16) * S * 256;
        const uint32_t* b1 = b0 + S * 256;
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, ga.data() + s * 256, 64);
          _tile_loadd(5, ga.data() + (S + s) * 256, 64);
          _tile_loadd(6, b0 + s * 256, 64);
          _tile_loadd(7, b1 + s * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, ldc);
        _tile_stored(1, c + 16, ldc);
        _tile_stored(2, c + 16 * K, ldc);
        _tile_stored(3, c + 16 * K + 16, ldc);
      }
    }
  }
  _tile_release();
}

AMX_TARGET void add_into(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] += src[i];
}
#endif  // EXAFLOP_AMX

at::Tensor linear_wgrad_amx(const at::Tensor& g, const at::Tensor& x) {
#ifdef EXAFLOP_AMX
  TORCH_CHECK(amx_permitted(), "linear_wgrad_amx: AMX is not available in this process");
#else
  TORCH_CHECK(false, "linear_wgrad_amx: built without AMX (not the AVX-512 build)");
#endif
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0) && g.scalar_type() == at::kBFloat16 &&
                  x.scalar_type() == at::kBFloat16 && g.device().is_cpu() && x.device().is_cpu() &&
                  g.stride(1) == 1 && x.stride(1) == 1,
              "linear_wgrad_amx: bf16 CPU g (M, N) and x (M, K) with unit column stride expected");
  const int64_t M = g.size(0), N = g.size(1), K = x.size(1);
  TORCH_CHECK(M % 32 == 0 && N % 32 == 0 && K % 32 == 0, "linear_wgrad_amx: M, N, K must be multiples of 32");
  auto out = at::empty({N, K}, g.options().dtype(at::kFloat));
#ifdef EXAFLOP_AMX
  const c10::BFloat16* gp = g.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* xp = x.const_data_ptr<c10::BFloat16>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / 32));
  if (N >= 64 * nt * 4 || nt == 1) {  // many output rows: each thread its own rows, no sum after
    const int64_t per = (N / 32 + nt - 1) / nt * 32;
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n0 = std::min(N, p * per), n1 = std::min(N, n0 + per);
        if (n0 < n1) wgrad_part(gp, g.stride(0), xp, x.stride(0), 0, M, n0, n1, K, op + n0 * K);
      }
    });
  } else {  // each thread its share of the tokens into its own sum; the sums added after
    std::vector<at::Tensor> parts(nt - 1);
    for (auto& t : parts) t = at::empty({N, K}, out.options());
    const int64_t per = (M / 32 + nt - 1) / nt * 32;
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t m0 = std::min(M, p * per), m1 = std::min(M, m0 + per);
        float* d = p == 0 ? op : parts[p - 1].mutable_data_ptr<float>();
        if (m0 < m1) wgrad_part(gp, g.stride(0), xp, x.stride(0), m0, m1, 0, N, K, d);
        else std::fill(d, d + N * K, 0.f);
      }
    });
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      for (auto& t : parts) add_into(op + r0 * K, t.const_data_ptr<float>() + r0 * K, (r1 - r0) * K);
    });
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exaflop, m) {
  m.def("linear_wgrad_amx(Tensor g, Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(exaflop, CPU, m) {
  m.impl("linear_wgrad_amx", &linear_wgrad_amx);
}
