// The per-row building blocks of the decode path: a dot product (shrink) and a
// short-row GEMV (expand), each with an AVX2+FMA version for fp32/bf16 weights chosen
// at run time, and a portable version for every other case.
//
//   dot(a, b, n)                         = sum_k a[k] * b[k]                  a fp32/fp64, b any float type
//   gemv_rows(c, Bs, R, r, o0, o1, out)  out[o - o0] = sum_{k<r} c[k] * Bs[o * R + k]   for o in [o0, o1)
//
// gemv_rows is expand's inner loop: Bs is one slot's B (out, R) with only its first r
// columns in use. Rows of Bs are short (r = 8..64), so the AVX2 version keeps eight
// outputs' partial sums in registers and reduces them together (one transpose-add for
// eight outputs instead of eight horizontal sums).
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define ADAPTERHUB_AVX2 1
#include <immintrin.h>
#endif

namespace adapterhub::cpu {

template <typename acc_t, typename scalar_t>
inline acc_t dot_portable(const acc_t* a, const scalar_t* b, int64_t n) {
  constexpr int kLanes = 8;  // independent partial sums, so the compiler can vectorize
  acc_t lane[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += a[k + j] * static_cast<acc_t>(b[k + j]);
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  for (; k < n; ++k) sum += a[k] * static_cast<acc_t>(b[k]);
  return sum;
}

#ifdef ADAPTERHUB_AVX2
#define AVX2_FN __attribute__((target("avx2,fma"))) inline

inline bool has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

AVX2_FN __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2_FN __m256 load8(const c10::BFloat16* p) {
  // bf16 is the upper half of fp32: widen to 32 bits and shift into place.
  __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
template <typename T>
AVX2_FN __m256 load_tail(const T* p, int64_t n) {  // n < 8 elements, the rest zero
  alignas(32) float buf[8] = {};
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[j]);
  return _mm256_load_ps(buf);
}

AVX2_FN float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The eight horizontal sums of v[0..7], as one vector.
AVX2_FN __m256 hsum8(const __m256* v) {
  __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

template <typename T>
AVX2_FN float dot_avx2(const float* a, const T* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), load8(b + k + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), load8(b + k + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), load8(b + k + 24), s3);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
  if (k < n) s1 = _mm256_fmadd_ps(load_tail(a + k, n - k), load_tail(b + k, n - k), s1);
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

template <typename T>
AVX2_FN void gemv_rows_avx2(const float* c, const T* Bs, int64_t R, int64_t r, int64_t o_begin, int64_t o_end,
                            float* out) {
  const int64_t full = r / 8 * 8;
  const __m256 c_tail = full < r ? load_tail(c + full, r - full) : _mm256_setzero_ps();
  int64_t o = o_begin;
  for (; o + 8 <= o_end; o += 8) {
    __m256 v[8];
    for (int j = 0; j < 8; ++j) {
      const T* row = Bs + (o + j) * R;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < full; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(c + k), load8(row + k), acc);
      if (full < r) acc = _mm256_fmadd_ps(c_tail, load_tail(row + full, r - full), acc);
      v[j] = acc;
    }
    _mm256_storeu_ps(out + (o - o_begin), hsum8(v));
  }
  for (; o < o_end; ++o) out[o - o_begin] = dot_avx2(c, Bs + o * R, r);
}
#undef AVX2_FN
#endif  // ADAPTERHUB_AVX2

template <typename scalar_t>
constexpr bool kHasAvx2Path = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
#ifdef ADAPTERHUB_AVX2
  if constexpr (std::is_same_v<acc_t, float> && kHasAvx2Path<scalar_t>) {
    if (has_avx2_fma()) return dot_avx2(a, b, n);
  }
#endif
  return dot_portable(a, b, n);
}

template <typename acc_t, typename scalar_t>
inline void gemv_rows(const acc_t* c, const scalar_t* Bs, int64_t R, int64_t r, int64_t o_begin, int64_t o_end,
                      acc_t* out) {
#ifdef ADAPTERHUB_AVX2
  if constexpr (std::is_same_v<acc_t, float> && kHasAvx2Path<scalar_t>) {
    if (has_avx2_fma()) return gemv_rows_avx2(c, Bs, R, r, o_begin, o_end, out);
  }
#endif
  for (int64_t o = o_begin; o < o_end; ++o) out[o - o_begin] = dot_portable(c, Bs + o * R, r);
}

}  // namespace adapterhub::cpu
