// AVX-512 kernels for bitmask-compressed weights (2:4 included). Compiled on its own with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vbmi2 -mfma (setup.py) and only
// called after the CPU reported every one of those features (sparse_linear.cpp).
//
// The idea: per 32 inputs (bf16) or 16 (fp32) a row's mask bits say which lanes hold kept weights;
// vpexpandw / vexpandps loads exactly that many values from the row's stream into those lanes, zeros
// elsewhere, so a row is read once, compressed, and dotted with the activations as if it were dense.
// Everything here has internal linkage: see sparse_kernels.h for why no torch/std header is included.
// GCC 12's _mm512_reduce_add_ps trips its own -Wuninitialized (an intentionally undefined register)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sparse_kernels.h"

namespace mixsparse {
namespace {

inline uint32_t load_bits(const uint8_t* p, int64_t nbytes) {  // nbytes in 1..4, never reads past them
  uint32_t bits = 0;
  memcpy(&bits, p, (size_t)nbytes);
  return bits;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- bf16: 32 inputs per step, vdpbf16ps accumulates pairs into 16 fp32 lanes ----

template <int R, int T>
inline void block_bf16(const KernelArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K;
  const uint16_t* v[R];
  const uint8_t* mk[R];
  for (int r = 0; r < R; ++r) {
    v[r] = (const uint16_t*)a.values + a.offsets[n0 + r];
    mk[r] = a.mask + (n0 + r) * a.mask_stride;
  }
  const uint16_t* x[T];
  for (int t = 0; t < T; ++t) x[t] = (const uint16_t*)a.x + (m0 + t) * a.x_stride;
  // Prefetch the same place R rows on (the next block's row r, a row's length times R ahead): R interleaved
  // rows are R short streams the hardware prefetcher ramps up on too late; measured +30-55% GB/s at 1 token
  int64_t ahead[R];
  for (int r = 0; r < R; ++r) ahead[r] = (a.offsets[n0 + r + 1] - a.offsets[n0 + r]) * R;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512((const void*)(x[t] + k));
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(v[r] + ahead[r]), _MM_HINT_T0);
      if ((k & 511) == 0) _mm_prefetch((const char*)(mk[r] + (k >> 3) + R * a.mask_stride), _MM_HINT_T0);
      uint32_t bits;
      memcpy(&bits, mk[r] + (k >> 3), 4);
      __m512i w = _mm512_maskz_expandloadu_epi16((__mmask32)bits, v[r]);
      v[r] += __builtin_popcount(bits);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
    }
  }
  if (k < K) {
    const int64_t rest = K - k;
    const __mmask32 live = (__mmask32)((1ull << rest) - 1);
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_epi16(live, x[t] + k);
    for (int r = 0; r < R; ++r) {
      uint32_t bits = load_bits(mk[r] + (k >> 3), (rest + 7) >> 3) & (uint32_t)live;
      __m512i w = _mm512_maskz_expandloadu_epi16((__mmask32)bits, v[r]);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
    }
  }
  const uint16_t* bias = (const uint16_t*)a.bias;
  uint16_t* y = (uint16_t*)a.y;
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bf16_to_float(bias[n0 + r]) : 0.0f;
    for (int t = 0; t < T; ++t) y[(m0 + t) * a.y_stride + n0 + r] = float_to_bf16(_mm512_reduce_add_ps(acc[r][t]) + b);
  }
}

// From 6 tokens on, re-expanding a row for every block of 4 tokens costs more than expanding
// 4 rows once into a dense panel (L1/L2) and running dense dot products on it for all tokens: measured
// on a 4096x4096 2:4 weight (AMD EPYC, 1 thread) 22% faster at 8 tokens, 15-40% from 16 on.
template <int T>
inline void panel_bf16(const KernelArgs& a, const uint16_t* panel, int64_t n0, int64_t m0) {
  const int64_t K = a.K;
  const uint16_t* x[T];
  for (int t = 0; t < T; ++t) x[t] = (const uint16_t*)a.x + (m0 + t) * a.x_stride;
  __m512 acc[4][T];
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512((const void*)(x[t] + k));
    for (int r = 0; r < 4; ++r) {
      const __m512i w = _mm512_loadu_si512((const void*)(panel + r * K + k));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
    }
  }
  if (k < K) {  // the panel holds zeros past K's last full step: only x needs masking
    const __mmask32 live = (__mmask32)((1ull << (K - k)) - 1);
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_epi16(live, x[t] + k);
    for (int r = 0; r < 4; ++r) {
      const __m512i w = _mm512_maskz_loadu_epi16(live, panel + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
    }
  }
  const uint16_t* bias = (const uint16_t*)a.bias;
  uint16_t* y = (uint16_t*)a.y;
  for (int r = 0; r < 4; ++r) {
    const float b = bias ? bf16_to_float(bias[n0 + r]) : 0.0f;
    for (int t = 0; t < T; ++t) y[(m0 + t) * a.y_stride + n0 + r] = float_to_bf16(_mm512_reduce_add_ps(acc[r][t]) + b);
  }
}

void unpack_bf16(const KernelArgs& a, int64_t n0, int64_t n1, void* tile);

// ---- fp32: 16 inputs per step, FMA ----

template <int R, int T>
inline void block_f32(const KernelArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K;
  const float* v[R];
  const uint8_t* mk[R];
  for (int r = 0; r < R; ++r) {
    v[r] = (const float*)a.values + a.offsets[n0 + r];
    mk[r] = a.mask + (n0 + r) * a.mask_stride;
  }
  const float* x[T];
  for (int t = 0; t < T; ++t) x[t] = (const float*)a.x + (m0 + t) * a.x_stride;
  int64_t ahead[R];  // as in block_bf16
  for (int r = 0; r < R; ++r) ahead[r] = (a.offsets[n0 + r + 1] - a.offsets[n0 + r]) * R;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x[t] + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(v[r] + ahead[r]), _MM_HINT_T0);
      if ((k & 511) == 0) _mm_prefetch((const char*)(mk[r] + (k >> 3) + R * a.mask_stride), _MM_HINT_T0);
      uint16_t bits;
      memcpy(&bits, mk[r] + (k >> 3), 2);
      __m512 w = _mm512_maskz_expandloadu_ps((__mmask16)bits, v[r]);
      v[r] += __builtin_popcount(bits);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
    }
  }
  if (k < K) {
    const int64_t rest = K - k;
    const __mmask16 live = (__mmask16)((1u << rest) - 1);
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(live, x[t] + k);
    for (int r = 0; r < R; ++r) {
      uint32_t bits = load_bits(mk[r] + (k >> 3), (rest + 7) >> 3) & (uint32_t)live;
      __m512 w = _mm512_maskz_expandloadu_ps((__mmask16)bits, v[r]);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
    }
  }
  const float* bias = (const float*)a.bias;
  float* y = (float*)a.y;
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
    for (int t = 0; t < T; ++t) y[(m0 + t) * a.y_stride + n0 + r] = _mm512_reduce_add_ps(acc[r][t]) + b;
  }
}

// Rows in blocks of 4 (each activation load feeds 4 rows), tokens in blocks of up to 4 (each expanded
// weight feeds up to 4 tokens): at most 16 accumulators + 4 activations + 1 weight of the 32 zmm.
#define MIXSPARSE_TOKENS(BLOCK, R, a, n, m, count)  \
  switch (count) {                                  \
    case 4: BLOCK<R, 4>(a, n, m); break;            \
    case 3: BLOCK<R, 3>(a, n, m); break;            \
    case 2: BLOCK<R, 2>(a, n, m); break;            \
    default: BLOCK<R, 1>(a, n, m); break;           \
  }

#define MIXSPARSE_ROWS(NAME, BLOCK)                                            \
  void NAME(const KernelArgs& a, int64_t n0, int64_t n1) {                     \
    int64_t n = n0;                                                            \
    for (; n + 4 <= n1; n += 4)                                                \
      for (int64_t m = 0; m < a.M; m += 4) {                                   \
        const int64_t count = a.M - m < 4 ? a.M - m : 4;                       \
        MIXSPARSE_TOKENS(BLOCK, 4, a, n, m, count)                             \
      }                                                                        \
    for (; n < n1; ++n)                                                        \
      for (int64_t m = 0; m < a.M; m += 4) {                                   \
        const int64_t count = a.M - m < 4 ? a.M - m : 4;                       \
        MIXSPARSE_TOKENS(BLOCK, 1, a, n, m, count)                             \
      }                                                                        \
  }

MIXSPARSE_ROWS(rows_bf16_stream, block_bf16)
MIXSPARSE_ROWS(rows_f32, block_f32)

constexpr int64_t kPanelTokens = 6;

void rows_bf16(const KernelArgs& a, int64_t n0, int64_t n1) {
  const int64_t whole = n0 + (n1 - n0) / 4 * 4;
  uint16_t* panel = a.M >= kPanelTokens && whole > n0 ? (uint16_t*)malloc(4 * a.K * sizeof(uint16_t)) : nullptr;
  if (!panel) return rows_bf16_stream(a, n0, n1);  // few tokens (or no memory for a panel): stream
  for (int64_t n = n0; n < whole; n += 4) {
    unpack_bf16(a, n, n + 4, panel);
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) panel_bf16<4>(a, panel, n, m);
    switch (a.M - m) {
      case 3: panel_bf16<3>(a, panel, n, m); break;
      case 2: panel_bf16<2>(a, panel, n, m); break;
      case 1: panel_bf16<1>(a, panel, n, m); break;
      default: break;
    }
  }
  free(panel);
  if (whole < n1) rows_bf16_stream(a, whole, n1);
}

void unpack_bf16(const KernelArgs& a, int64_t n0, int64_t n1, void* tile) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* v = (const uint16_t*)a.values + a.offsets[n];
    const uint8_t* mk = a.mask + n * a.mask_stride;
    uint16_t* out = (uint16_t*)tile + (n - n0) * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      uint32_t bits;
      memcpy(&bits, mk + (k >> 3), 4);
      _mm512_storeu_si512((void*)(out + k), _mm512_maskz_expandloadu_epi16((__mmask32)bits, v));
      v += __builtin_popcount(bits);
    }
    if (k < K) {
      const int64_t rest = K - k;
      const __mmask32 live = (__mmask32)((1ull << rest) - 1);
      const uint32_t bits = load_bits(mk + (k >> 3), (rest + 7) >> 3) & (uint32_t)live;
      _mm512_mask_storeu_epi16(out + k, live, _mm512_maskz_expandloadu_epi16((__mmask32)bits, v));
    }
  }
}

void unpack_f32(const KernelArgs& a, int64_t n0, int64_t n1, void* tile) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = (const float*)a.values + a.offsets[n];
    const uint8_t* mk = a.mask + n * a.mask_stride;
    float* out = (float*)tile + (n - n0) * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      uint16_t bits;
      memcpy(&bits, mk + (k >> 3), 2);
      _mm512_storeu_ps(out + k, _mm512_maskz_expandloadu_ps((__mmask16)bits, v));
      v += __builtin_popcount(bits);
    }
    if (k < K) {
      const int64_t rest = K - k;
      const __mmask16 live = (__mmask16)((1u << rest) - 1);
      const uint32_t bits = load_bits(mk + (k >> 3), (rest + 7) >> 3) & (uint32_t)live;
      _mm512_mask_storeu_ps(out + k, live, _mm512_maskz_expandloadu_ps((__mmask16)bits, v));
    }
  }
}

const IsaKernels kAvx512 = {
    "avx512",
    {rows_f32, rows_bf16, nullptr},
    {unpack_f32, unpack_bf16, nullptr},
};

}  // namespace

const IsaKernels* avx512_kernels() { return &kAvx512; }

}  // namespace mixsparse
