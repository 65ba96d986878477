// AMX helpers shared by csrc/attention_amx.cpp and csrc/wgrad_amx.cpp. Only in the AVX-512 build
// (EXAFLOP_AMX); every function carries the AMX target itself, so the rest of the build keeps its
// flags, and the callers check amx_permitted() (the CPU has AMX and Linux granted it) at run time.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/core/TensorBase.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <new>
#include <sys/syscall.h>
#include <unistd.h>
#define EXAFLOP_AMX 1
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

namespace exaflop_amx {

// Linux hands out the AMX tile state only to processes that ask (oneDNN asks too; asking twice is
// fine). False where the CPU or the kernel has no AMX.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// A thread's scratch buffer, 64-byte aligned: a tile load whose rows straddle cache lines measured
// 6x slower (17.5 vs 2.7 ns a 1 KB tile; 2 x 2 tile blocks 0.96 vs 2.95 TFLOP/s a core).
template <typename T>
class Buf {
 public:
  explicit Buf(size_t n) : p_(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buf() { std::free(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* data() { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  void zero(size_t n) { std::memset(p_, 0, n * sizeof(T)); }

 private:
  T* p_;
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes. The configuration is thread state: set at the start of each
// thread's share of work and released after (_tile_release), so nothing is assumed of oneDNN's.
AMX_TARGET inline void tiles_on() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

// 16 x 16 transpose of 32-bit elements in registers.
AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4 x 4 block; gather the lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// 16 bf16 of two rows as 16 pairs (r0[c], r1[c]): the VNNI form AMX takes along a reduction.
AMX_TARGET inline __m512i pair16(const c10::BFloat16* r0, const c10::BFloat16* r1) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// Rows r0 and r1 interleaved: out[c] = (r0[c], r1[c]) for c < n (n % 16 == 0).
AMX_TARGET inline void interleave_rows(const c10::BFloat16* r0, const c10::BFloat16* r1, int64_t n, uint32_t* out) {
  for (int64_t c = 0; c < n; c += 16) _mm512_storeu_si512(out + c, pair16(r0 + c, r1 + c));
}

AMX_TARGET inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// 16 bf16 at p widened to fp32 (exact).
AMX_TARGET inline __m512 load_bf16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

}  // namespace exaflop_amx
#endif  // CPU_CAPABILITY_AVX512
