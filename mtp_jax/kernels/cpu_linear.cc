// mtp_jax CPU kernels: mtp_linear (below) and mtp_attend (attention over a KV-cache layer read in place, AttendImpl).
// mtp_linear: y[M, N] (f32) = x[M, K] (f32) @ W, W an f32 / f16 / bf16 matrix read IN PLACE out of a
// stack w[L, E, K, N] (or [L, E, N, K] with trans=1) at layer `layer` and, per row m, expert `eids[m]`.
// W may also be GGUF-quantized (attribute `qtype` = the ggml type id: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
// Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, TQ2_0): w is then u8 [L, E, N, row_bytes], one GGUF row (ggml blocks along
// the K inputs) per output column, always trans=1. qtype 0 (or a float type's id) keeps the float meaning.
//
// Why: XLA:CPU runs f16/bf16 dots at ~0.6 GB/s (it converts operands and calls Eigen), and a dynamic slice or
// gather of a layer's or an expert's weights is materialized as a copy before every dot. Decoding is
// bound by reading the weights once, so the kernel reads each needed expert matrix exactly once per call,
// converts 16 values per instruction, and splits the output columns over spinning worker threads.
//
// Numerics: every output is a sequential f32 FMA chain over k (trans=0) or a fixed 16-lane split of k
// reduced in a fixed order (trans=1), so a row's result does not depend on M or on the other rows: a
// verify of K+1 tokens gives bit-identical logits to K+1 single-token decodes. A quantized weight is
// dequantized value by value to exactly the f32 gguf-py's dequantize (and mtp_jax.qweight) gives: the same
// f32 operations in the same order, never fused (built with -ffp-contract=off; the products of an f16 scale
// and small integers are exact in f32 anyway), e.g. Q4_K (d*sc)*q - dmin*m; then it goes through the same
// trans=1 FMA chains as an f32 weight, so the result equals the f32 kernel's on the dequantized matrix bit for
// bit. Every row of w is read once per 4 rows of x (values decoded in registers): for up to 4 rows one weight
// row at a time (one sequential stream per thread), for more 4 columns at a time.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

// MTP_JAX_SCALAR (tests only): build the portable scalar code even where AVX-512 is available.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && \
    !defined(MTP_JAX_SCALAR)
#include <immintrin.h>
#define MTP_AVX512 1
#endif

namespace ffi = xla::ffi;

namespace {

enum WType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int WT>
inline float load1(const void* w, int64_t i) {
  if (WT == kF32) return static_cast<const float*>(w)[i];
  uint16_t h = static_cast<const uint16_t*>(w)[i];
  if (WT == kF16) return half_to_float(h);
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- GGUF block types: each value dequantized as gguf-py's dequantize_blocks computes it -------------------
// A type is a struct: QK values in BYTES bytes per block; deq(): a block's values (scalar code); with AVX-512,
// prep() reads a block's scales and chunk(j) gives values 16j..16j+15 of the block in one vector.
enum QType {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13,
  kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kTQ2_0 = 35
};

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef MTP_AVX512
  return _cvtsh_ss(h);  // exact, as half_to_float
#else
  return half_to_float(h);
#endif
}

inline uint32_t u32_at(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

constexpr float kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Q4_K / Q5_K: 6-bit scales and mins of the 8 sub-blocks, packed in 12 bytes
inline void scale_min_k4(const uint8_t* s, int* sc, int* m) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    m[i] = s[4 + i] & 63;
    sc[4 + i] = (s[8 + i] & 15) | ((s[i] >> 2) & 0x30);
    m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
  }
}

// Q2_K, Q3_K, TQ2_0: value 16j + i of a 256-block is 2 bits of byte 32h + 16(j&1) + i, h = j/8, shift 2((j&7)/2)
inline int q2_byte(int j) { return 32 * (j >> 3) + 16 * (j & 1); }
inline int q2_shift(int j) { return 2 * ((j & 7) >> 1); }
// Q3_K's 6-bit scale of sub-block j
inline int q3_scale(const uint8_t* s, int j) {
  const int lo = (j < 8 ? s[j] : s[j - 8] >> 4) & 15, hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
  return (lo | (hi << 4)) - 32;
}
// IQ4_XS's 6-bit scale of sub-block i
inline int iq4xs_scale(const uint8_t* b, int i) {
  const int sh = b[2] | (b[3] << 8);
  return (((b[4 + i / 2] >> (4 * (i & 1))) & 15) | (((sh >> (2 * i)) & 3) << 4)) - 32;
}

#ifdef MTP_AVX512
inline __m512 cvt(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m512 bc(float f) { return _mm512_set1_ps(f); }
// The quants of 16 values are put together in the 16 bytes of an xmm register (cheap 128-bit integer ops), then
// widened to 16 int32 lanes once and converted.
inline __m128i ld16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128i set8(int v) { return _mm_set1_epi8(char(v)); }
// (byte >> s) & m in each byte (m must not reach the bits a 16-bit shift brings in from the next byte)
inline __m128i field8(__m128i v, int s, int m) {
  return _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(s)), set8(m));
}
inline __m512 widen_u(__m128i v) { return cvt(_mm512_cvtepu8_epi32(v)); }
inline __m512 widen_s(__m128i v) { return cvt(_mm512_cvtepi8_epi32(v)); }
inline __m128i nib8(const uint8_t* p, int high) { return field8(ld16(p), 4 * high, 15); }  // low (0) or high nibbles
inline __m512 iq4(__m128i idx) { return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(idx), _mm512_loadu_ps(kIQ4Values)); }
#endif

struct BQ8_0 {
  static constexpr int kId = kQ8_0, QK = 32, BYTES = 34;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b);
    for (int i = 0; i < 32; ++i) y[i] = float(int8_t(b[2 + i])) * d;
  }
#ifdef MTP_AVX512
  struct St { __m512 d; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b))}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * j));
    return _mm512_mul_ps(cvt(_mm512_cvtepi8_epi32(q)), s.d);
  }
#endif
};

struct BQ4_0 {
  static constexpr int kId = kQ4_0, QK = 32, BYTES = 18;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b);
    for (int i = 0; i < 16; ++i) {
      y[i] = d * float((b[2 + i] & 15) - 8);
      y[16 + i] = d * float((b[2 + i] >> 4) - 8);
    }
  }
#ifdef MTP_AVX512
  struct St { __m512 d; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b))}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    return _mm512_mul_ps(s.d, widen_s(_mm_sub_epi8(nib8(b + 2, j), set8(8))));
  }
#endif
};

struct BQ4_1 {
  static constexpr int kId = kQ4_1, QK = 32, BYTES = 20;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b), m = f16_at(b + 2);
    for (int i = 0; i < 16; ++i) {
      y[i] = d * float(b[4 + i] & 15) + m;
      y[16 + i] = d * float(b[4 + i] >> 4) + m;
    }
  }
#ifdef MTP_AVX512
  struct St { __m512 d, m; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b)), bc(f16_at(b + 2))}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    return _mm512_add_ps(_mm512_mul_ps(s.d, widen_u(nib8(b + 4, j))), s.m);
  }
#endif
};

struct BQ5_0 {
  static constexpr int kId = kQ5_0, QK = 32, BYTES = 22;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b);
    const uint32_t qh = u32_at(b + 2);
    for (int i = 0; i < 16; ++i) {
      y[i] = d * float(int((b[6 + i] & 15) | (((qh >> i) & 1) << 4)) - 16);
      y[16 + i] = d * float(int((b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
    }
  }
#ifdef MTP_AVX512
  struct St { __m512 d; uint32_t qh; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b)), u32_at(b + 2)}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i lo = nib8(b + 6, j), q = _mm_mask_add_epi8(lo, __mmask16(s.qh >> (16 * j)), lo, set8(16));
    return _mm512_mul_ps(s.d, widen_s(_mm_sub_epi8(q, set8(16))));
  }
#endif
};

struct BQ5_1 {
  static constexpr int kId = kQ5_1, QK = 32, BYTES = 24;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b), m = f16_at(b + 2);
    const uint32_t qh = u32_at(b + 4);
    for (int i = 0; i < 16; ++i) {
      y[i] = d * float((b[8 + i] & 15) | (((qh >> i) & 1) << 4)) + m;
      y[16 + i] = d * float((b[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + m;
    }
  }
#ifdef MTP_AVX512
  struct St { __m512 d, m; uint32_t qh; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b)), bc(f16_at(b + 2)), u32_at(b + 4)}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i lo = nib8(b + 8, j), q = _mm_mask_add_epi8(lo, __mmask16(s.qh >> (16 * j)), lo, set8(16));
    return _mm512_add_ps(_mm512_mul_ps(s.d, widen_u(q)), s.m);
  }
#endif
};

struct BQ2_K {  // scales[16] qs[64] d dmin
  static constexpr int kId = kQ2_K, QK = 256, BYTES = 84;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b + 80), dmin = f16_at(b + 82);
    for (int j = 0; j < 16; ++j) {
      const float dl = d * float(b[j] & 15), ml = dmin * float(b[j] >> 4);
      for (int i = 0; i < 16; ++i) y[16 * j + i] = dl * float((b[16 + q2_byte(j) + i] >> q2_shift(j)) & 3) - ml;
    }
  }
#ifdef MTP_AVX512
  struct St { float dl[16], ml[16]; };
  static St prep(const uint8_t* b) {
    St s;
    _mm512_storeu_ps(s.dl, _mm512_mul_ps(bc(f16_at(b + 80)), widen_u(nib8(b, 0))));
    _mm512_storeu_ps(s.ml, _mm512_mul_ps(bc(f16_at(b + 82)), widen_u(nib8(b, 1))));
    return s;
  }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i q = field8(ld16(b + 16 + q2_byte(j)), q2_shift(j), 3);
    return _mm512_sub_ps(_mm512_mul_ps(bc(s.dl[j]), widen_u(q)), bc(s.ml[j]));
  }
#endif
};

struct BQ3_K {  // hmask[32] qs[64] scales[12] d
  static constexpr int kId = kQ3_K, QK = 256, BYTES = 110;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b + 108);
    for (int j = 0; j < 16; ++j) {
      const float dl = d * float(q3_scale(b + 96, j));
      for (int i = 0; i < 16; ++i) {
        const int ql = (b[32 + q2_byte(j) + i] >> q2_shift(j)) & 3, qh = (b[16 * (j & 1) + i] >> (j >> 1)) & 1;
        y[16 * j + i] = dl * float(ql - ((qh ^ 1) << 2));
      }
    }
  }
#ifdef MTP_AVX512
  struct St { float dl[16]; };
  static St prep(const uint8_t* b) {  // the 16 scales of q3_scale() at once (llama.cpp's unpacking)
    uint32_t a[4];
    std::memcpy(a, b + 96, 12);
    const uint32_t t = a[2];
    a[2] = ((a[0] >> 4) & 0x0f0f0f0f) | (((t >> 4) & 0x03030303) << 4);
    a[3] = ((a[1] >> 4) & 0x0f0f0f0f) | (((t >> 6) & 0x03030303) << 4);
    a[0] = (a[0] & 0x0f0f0f0f) | ((t & 0x03030303) << 4);
    a[1] = (a[1] & 0x0f0f0f0f) | (((t >> 2) & 0x03030303) << 4);
    St s;
    const __m128i sc = _mm_sub_epi8(ld16(reinterpret_cast<uint8_t*>(a)), set8(32));
    _mm512_storeu_ps(s.dl, _mm512_mul_ps(bc(f16_at(b + 108)), widen_s(sc)));
    return s;
  }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i ql = field8(ld16(b + 32 + q2_byte(j)), q2_shift(j), 3);
    const __mmask16 h0 = _mm_testn_epi8_mask(ld16(b + 16 * (j & 1)), set8(1 << (j >> 1)));  // hmask bit clear: -4
    return _mm512_mul_ps(bc(s.dl[j]), widen_s(_mm_mask_sub_epi8(ql, h0, ql, set8(4))));
  }
#endif
};

struct BQ4_K {  // d dmin scales[12] qs[128]
  static constexpr int kId = kQ4_K, QK = 256, BYTES = 144;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    int sc[8], m[8];
    scale_min_k4(b + 4, sc, m);
    for (int i = 0; i < 8; ++i) {
      const float d1 = d * float(sc[i]), m1 = dmin * float(m[i]);
      for (int t = 0; t < 32; ++t) y[32 * i + t] = d1 * float((b[16 + 32 * (i >> 1) + t] >> (4 * (i & 1))) & 15) - m1;
    }
  }
#ifdef MTP_AVX512
  struct St { float v[16]; };  // d * sc[i] (i < 8), then dmin * m[i]
  static St prep(const uint8_t* b) {  // scale_min_k4() of all 8 sub-blocks at once (llama.cpp's unpacking)
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t m03 = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = m03;
    u[0] &= 0x3f3f3f3f;
    St s;
    const __m512 dd = _mm512_mask_blend_ps(0xff00, bc(f16_at(b)), bc(f16_at(b + 2)));
    _mm512_storeu_ps(s.v, _mm512_mul_ps(dd, widen_u(ld16(reinterpret_cast<uint8_t*>(u)))));
    return s;
  }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const int i = j >> 1;
    const __m128i q = nib8(b + 16 + 32 * (i >> 1) + 16 * (j & 1), i & 1);
    return _mm512_sub_ps(_mm512_mul_ps(bc(s.v[i]), widen_u(q)), bc(s.v[8 + i]));
  }
#endif
};

struct BQ5_K {  // d dmin scales[12] qh[32] qs[128]
  static constexpr int kId = kQ5_K, QK = 256, BYTES = 176;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    int sc[8], m[8];
    scale_min_k4(b + 4, sc, m);
    for (int i = 0; i < 8; ++i) {
      const float d1 = d * float(sc[i]), m1 = dmin * float(m[i]);
      for (int t = 0; t < 32; ++t) {
        const int q = ((b[48 + 32 * (i >> 1) + t] >> (4 * (i & 1))) & 15) | (((b[16 + t] >> i) & 1) << 4);
        y[32 * i + t] = d1 * float(q) - m1;
      }
    }
  }
#ifdef MTP_AVX512
  using St = BQ4_K::St;
  static St prep(const uint8_t* b) { return BQ4_K::prep(b); }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const int i = j >> 1;
    const __m128i lo = nib8(b + 48 + 32 * (i >> 1) + 16 * (j & 1), i & 1);
    const __mmask16 h = _mm_test_epi8_mask(ld16(b + 16 + 16 * (j & 1)), set8(1 << i));  // qh bit i: +16
    const __m128i q = _mm_mask_add_epi8(lo, h, lo, set8(16));
    return _mm512_sub_ps(_mm512_mul_ps(bc(s.v[i]), widen_u(q)), bc(s.v[8 + i]));
  }
#endif
};

struct BQ6_K {  // ql[128] qh[64] scales[16] (int8) d
  static constexpr int kId = kQ6_K, QK = 256, BYTES = 210;
  // value 16j + i: low 4 bits from ql[64(j/8) + 16(j&3) + i] >> 4((j&7)/4), high 2 from qh[32(j/8) + 16(j&1) + i]
  // >> 2((j&7)/2)
  static int lo_byte(int j) { return 64 * (j >> 3) + 16 * (j & 3); }
  static int lo_shift(int j) { return 4 * ((j & 7) >> 2); }
  static int hi_byte(int j) { return 128 + 32 * (j >> 3) + 16 * (j & 1); }
  static int hi_shift(int j) { return 2 * ((j & 7) >> 1); }
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b + 208);
    for (int j = 0; j < 16; ++j) {
      const float dl = d * float(int8_t(b[192 + j]));
      for (int i = 0; i < 16; ++i) {
        const int q = ((b[lo_byte(j) + i] >> lo_shift(j)) & 15) | (((b[hi_byte(j) + i] >> hi_shift(j)) & 3) << 4);
        y[16 * j + i] = dl * float(q - 32);
      }
    }
  }
#ifdef MTP_AVX512
  struct St { float dl[16]; };
  static St prep(const uint8_t* b) {
    St s;
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    _mm512_storeu_ps(s.dl, _mm512_mul_ps(bc(f16_at(b + 208)), cvt(sc)));
    return s;
  }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    const __m128i lo = field8(ld16(b + lo_byte(j)), lo_shift(j), 15);
    const __m128i hi = _mm_slli_epi16(field8(ld16(b + hi_byte(j)), hi_shift(j), 3), 4);
    return _mm512_mul_ps(bc(s.dl[j]), widen_s(_mm_sub_epi8(_mm_or_si128(lo, hi), set8(32))));
  }
#endif
};

struct BIQ4_NL {
  static constexpr int kId = kIQ4_NL, QK = 32, BYTES = 18;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b);
    for (int i = 0; i < 16; ++i) {
      y[i] = d * kIQ4Values[b[2 + i] & 15];
      y[16 + i] = d * kIQ4Values[b[2 + i] >> 4];
    }
  }
#ifdef MTP_AVX512
  struct St { __m512 d; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b))}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) { return _mm512_mul_ps(s.d, iq4(nib8(b + 2, j))); }
#endif
};

struct BIQ4_XS {  // d scales_h (u16) scales_l[4] qs[128]
  static constexpr int kId = kIQ4_XS, QK = 256, BYTES = 136;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b);
    for (int i = 0; i < 8; ++i) {
      const float dl = d * float(iq4xs_scale(b, i));
      for (int t = 0; t < 16; ++t) {
        y[32 * i + t] = dl * kIQ4Values[b[8 + 16 * i + t] & 15];
        y[32 * i + 16 + t] = dl * kIQ4Values[b[8 + 16 * i + t] >> 4];
      }
    }
  }
#ifdef MTP_AVX512
  struct St { float d[8]; };
  static St prep(const uint8_t* b) {
    St s;
    const float d = f16_at(b);
    for (int i = 0; i < 8; ++i) s.d[i] = d * float(iq4xs_scale(b, i));
    return s;
  }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    return _mm512_mul_ps(bc(s.d[j >> 1]), iq4(nib8(b + 8 + 16 * (j >> 1), j & 1)));
  }
#endif
};

struct BTQ2_0 {  // qs[64] d
  static constexpr int kId = kTQ2_0, QK = 256, BYTES = 66;
  static void deq(const uint8_t* b, float* y) {
    const float d = f16_at(b + 64);
    for (int j = 0; j < 16; ++j)
      for (int i = 0; i < 16; ++i) y[16 * j + i] = d * float(((b[q2_byte(j) + i] >> q2_shift(j)) & 3) - 1);
  }
#ifdef MTP_AVX512
  struct St { __m512 d; };
  static St prep(const uint8_t* b) { return {bc(f16_at(b + 64))}; }
  static __m512 chunk(const St& s, const uint8_t* b, int j) {
    return _mm512_mul_ps(s.d, widen_s(_mm_sub_epi8(field8(ld16(b + q2_byte(j)), q2_shift(j), 3), set8(1))));
  }
#endif
};

struct QInfo { int id, qk, bytes; };
constexpr QInfo kQTypes[] = {
    {BQ4_0::kId, BQ4_0::QK, BQ4_0::BYTES}, {BQ4_1::kId, BQ4_1::QK, BQ4_1::BYTES},
    {BQ5_0::kId, BQ5_0::QK, BQ5_0::BYTES}, {BQ5_1::kId, BQ5_1::QK, BQ5_1::BYTES},
    {BQ8_0::kId, BQ8_0::QK, BQ8_0::BYTES}, {BQ2_K::kId, BQ2_K::QK, BQ2_K::BYTES},
    {BQ3_K::kId, BQ3_K::QK, BQ3_K::BYTES}, {BQ4_K::kId, BQ4_K::QK, BQ4_K::BYTES},
    {BQ5_K::kId, BQ5_K::QK, BQ5_K::BYTES}, {BQ6_K::kId, BQ6_K::QK, BQ6_K::BYTES},
    {BIQ4_NL::kId, BIQ4_NL::QK, BIQ4_NL::BYTES}, {BIQ4_XS::kId, BIQ4_XS::QK, BIQ4_XS::BYTES},
    {BTQ2_0::kId, BTQ2_0::QK, BTQ2_0::BYTES},
};

inline const QInfo* qinfo(int id) {
  for (const QInfo& q : kQTypes)
    if (q.id == id) return &q;
  return nullptr;
}

#ifdef MTP_AVX512
constexpr int kPrefetchRows = 16;

template <int WT>
inline __m512 load16(const void* w, int64_t i) {
  if (WT == kF32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
  if (WT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int WT>
inline __m512 load16(const void* w, int64_t i, __mmask16 m) {
  if (WT == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + i);
  __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
  if (WT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 lane_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

// trans=0: rows k..k+KU-1 of w times columns [n0, n1) of MB rows, accumulated into y (a block stays in L1). KU rows
// of w are streamed at once (contiguous runs, prefetch-friendly) and each y vector is loaded and stored once
// per KU FMAs; every output is still one FMA chain in k order.
template <int WT, int MB, int KU, int PF>
inline void rows_kn(const float* const* xr, const void* w, int64_t k, int64_t N, int64_t n0, int64_t n1,
                    float* const* yr) {
  float xs[MB][KU];
  for (int r = 0; r < MB; ++r)
    for (int u = 0; u < KU; ++u) xs[r][u] = xr[r][k + u];
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 m = lane_mask(n1 - n);
    __m512 wv[KU];
    for (int u = 0; u < KU; ++u) wv[u] = load16<WT>(w, (k + u) * N + n, m);
    if (PF)  // the same columns PF rows further down: a small matrix is over before the hardware catches on
      for (int u = 0; u < KU; ++u)
        _mm_prefetch(static_cast<const char*>(w) + ((k + u + PF) * N + n) * (WT == kF32 ? 4 : 2), _MM_HINT_T0);
    for (int r = 0; r < MB; ++r) {
      __m512 a = _mm512_maskz_loadu_ps(m, yr[r] + n);
      for (int u = 0; u < KU; ++u) a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r][u]), wv[u], a);
      _mm512_mask_storeu_ps(yr[r] + n, m, a);
    }
  }
}

template <int WT, int MB>
void block_kn(const float* const* xr, const void* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
              float* const* yr) {
  for (int r = 0; r < MB; ++r) std::memset(yr[r] + n0, 0, (n1 - n0) * sizeof(float));
  int64_t k = 0;
  for (; k + 8 + kPrefetchRows <= K; k += 8) rows_kn<WT, MB, 8, kPrefetchRows>(xr, w, k, N, n0, n1, yr);
  for (; k + 8 <= K; k += 8) rows_kn<WT, MB, 8, 0>(xr, w, k, N, n0, n1, yr);
  for (; k < K; ++k) rows_kn<WT, MB, 1, 0>(xr, w, k, N, n0, n1, yr);
}

// trans=1: output columns n..n+NN-1 = dot(x[r, :], w[n, :]) with 16 lanes over k, NN columns x MB rows at once
// (independent FMA chains hide the FMA latency; the lane split and its reduction do not depend on NN or MB).
template <int WT, int MB, int NN>
void cols_nk(const float* const* xr, const void* w, int64_t K, int64_t n, float* const* yr) {
  __m512 acc[MB][NN];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_setzero_ps();
  auto step = [&](int64_t k, auto full) {
    const __mmask16 m = full ? __mmask16(0xffff) : lane_mask(K - k);
    __m512 wv[NN];
    for (int c = 0; c < NN; ++c) wv[c] = full ? load16<WT>(w, (n + c) * K + k) : load16<WT>(w, (n + c) * K + k, m);
    for (int r = 0; r < MB; ++r) {
      const __m512 xv = full ? _mm512_loadu_ps(xr[r] + k) : _mm512_maskz_loadu_ps(m, xr[r] + k);
      for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, std::true_type{});  // unmasked loads (masked ones cost extra uops)
  if (k < K) step(k, std::false_type{});
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) yr[r][n + c] = _mm512_reduce_add_ps(acc[r][c]);
}
#endif

// trans=0 work item: a block of columns, N / threads wide (at least 256): a thread streams long runs of each row
// (runs shorter than a 4 KiB page restart the hardware prefetcher at every row: measured ~2x slower).
constexpr int64_t kMinTileCols = 256;
// trans=1 with at most this many rows of x per matrix: one weight row at a time, so that each thread reads one
// sequential stream. On the machine this was tuned on (2-core EPYC VM), reading 2-4 rows side by side ran at
// 9-17 GB/s against 25-33 GB/s for one (benchmarks/qlinear_speed.py, F16 and Q8_0 at 1024 x 1024); past it the
// FMAs bound the time and 4 columns x 4 rows at a time reuse each load more.
constexpr int64_t kFewRows = 4;
constexpr int64_t kColsPerItem = 64;  // trans=1 work item: 64 output columns

template <int WT>
void run_tile_kn(const float* const* xr, int64_t nr, const void* w, int64_t K, int64_t N, int64_t n0,
                 int64_t cols, float* const* yr) {
  const int64_t n1 = std::min(N, n0 + cols);
#ifdef MTP_AVX512
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) block_kn<WT, 4>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 3) block_kn<WT, 3>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 2) block_kn<WT, 2>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 1) block_kn<WT, 1>(xr + r, w, K, N, n0, n1, yr + r);
#else
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[r][k] * load1<WT>(w, k * N + n);
      yr[r][n] = s;
    }
#endif
}

template <int WT>
void run_cols_nk(const float* const* xr, int64_t nr, const void* w, int64_t K, int64_t n0, int64_t n1,
                 float* const* yr) {
#ifdef MTP_AVX512
  int64_t n = n0;
  for (; nr > kFewRows && n + 4 <= n1; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) cols_nk<WT, 4, 4>(xr + r, w, K, n, yr + r);
    for (; r < nr; ++r) cols_nk<WT, 1, 4>(xr + r, w, K, n, yr + r);
  }
  for (; n < n1; ++n) {  // up to 4 rows of x (a decode, a verify): one weight row at a time (kFewRows)
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) cols_nk<WT, 4, 1>(xr + r, w, K, n, yr + r);
    if (nr - r == 3) cols_nk<WT, 3, 1>(xr + r, w, K, n, yr + r);
    if (nr - r == 2) cols_nk<WT, 2, 1>(xr + r, w, K, n, yr + r);
    if (nr - r == 1) cols_nk<WT, 1, 1>(xr + r, w, K, n, yr + r);
  }
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < nr; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[r][k] * load1<WT>(w, n * K + k);
      yr[r][n] = s;
    }
#endif
}

// ---- trans=1 with a quantized W: rows of w are GGUF rows of rb bytes (K / T::QK blocks) ----------------------
#ifdef MTP_AVX512
// As cols_nk: NN columns x MB rows, lanes over k; each 16 values are dequantized in registers (once per MB rows)
// and go into the same FMA chains, in the same order, as cols_nk's loads of the dequantized f32 matrix.
template <class T, int MB, int NN>
void cols_q(const float* const* xr, const uint8_t* w, int64_t K, int64_t rb, int64_t n, float* const* yr) {
  __m512 acc[MB][NN];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t nb = K / T::QK;
  for (int64_t ib = 0; ib < nb; ++ib) {
    const uint8_t* blk[NN];
    typename T::St st[NN];
    for (int c = 0; c < NN; ++c) {
      blk[c] = w + (n + c) * rb + ib * T::BYTES;
      st[c] = T::prep(blk[c]);
      // the same block NN rows on (the next columns): rows of a few KiB are too short for the hardware
      // prefetcher to pick up each in time (measured: 1.5-2x the GB/s of a stack larger than the caches)
      for (int o = 0; o < T::BYTES; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk[c] + NN * rb + o), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int j = 0; j < T::QK / 16; ++j) {
      __m512 wv[NN];
      for (int c = 0; c < NN; ++c) wv[c] = T::chunk(st[c], blk[c], j);
      for (int r = 0; r < MB; ++r) {
        const __m512 xv = _mm512_loadu_ps(xr[r] + ib * T::QK + 16 * j);
        for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) yr[r][n + c] = _mm512_reduce_add_ps(acc[r][c]);
}

#endif

// Items of columns [n0, n1) for nr rows. With AVX-512, 4 columns x 4 rows at a time, dequantizing in registers
// once per 4 rows: measured faster at every M (1..64) than dequantizing 4 columns once into an f32 scratch and
// running cols_nk on it (whose bits it would equal).
template <class T>
void run_cols_q(const float* const* xr, int64_t nr, const uint8_t* w, int64_t K, int64_t rb, int64_t n0,
                int64_t n1, float* const* yr) {
#ifdef MTP_AVX512
  int64_t n = n0;
  for (; nr > kFewRows && n + 4 <= n1; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) cols_q<T, 4, 4>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 3) cols_q<T, 3, 4>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 2) cols_q<T, 2, 4>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 1) cols_q<T, 1, 4>(xr + r, w, K, rb, n, yr + r);
  }
  for (; n < n1; ++n) {  // up to 4 rows of x: one GGUF row at a time (kFewRows)
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) cols_q<T, 4, 1>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 3) cols_q<T, 3, 1>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 2) cols_q<T, 2, 1>(xr + r, w, K, rb, n, yr + r);
    if (nr - r == 1) cols_q<T, 1, 1>(xr + r, w, K, rb, n, yr + r);
  }
#else
  thread_local std::vector<float> row;
  row.resize(K);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t ib = 0; ib < K / T::QK; ++ib) T::deq(w + n * rb + ib * T::BYTES, row.data() + ib * T::QK);
    for (int64_t r = 0; r < nr; ++r) {  // as run_cols_nk's scalar loop
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[r][k] * row[k];
      yr[r][n] = s;
    }
  }
#endif
}

// One call's work: rows grouped by expert; items = (group, column block), split over threads.
constexpr int kQuant = 3;  // Job::wt of a quantized W (Job::qt: its ggml type)

struct Job {
  void (*fn)(const void*, int64_t) = nullptr;  // a generic job (attention): item i is fn(ctx, i)
  const void* ctx = nullptr;
  int wt = 0, qt = 0;
  bool trans = false;
  int64_t K = 0, N = 0, rb = 0, cols_per_item = 0, items_per_group = 0, n_items = 0, n_chunks = 0;
  std::vector<const void*> group_w;  // expert matrix of each group
  std::vector<int64_t> group_start;  // offsets into rows (size groups + 1)
  std::vector<const float*> xr;      // row pointers of x, grouped by expert
  std::vector<float*> yr;            // row pointers of y, same order
  std::atomic<int64_t> next{0}, done{0};

  template <int WT>
  void item(int64_t i) {
    const int64_t g = i / items_per_group, blk = i % items_per_group;
    const int64_t r0 = group_start[g], nr = group_start[g + 1] - r0;
    if (trans) {
      const int64_t n0 = blk * kColsPerItem, n1 = std::min(N, n0 + kColsPerItem);
      run_cols_nk<WT>(xr.data() + r0, nr, group_w[g], K, n0, n1, yr.data() + r0);
    } else {
      run_tile_kn<WT>(xr.data() + r0, nr, group_w[g], K, N, blk * cols_per_item, cols_per_item, yr.data() + r0);
    }
  }

  template <class T>
  void qitem(int64_t i) {  // always trans=1
    const int64_t g = i / items_per_group, blk = i % items_per_group;
    const int64_t r0 = group_start[g], nr = group_start[g + 1] - r0;
    const int64_t n0 = blk * kColsPerItem, n1 = std::min(N, n0 + kColsPerItem);
    run_cols_q<T>(xr.data() + r0, nr, static_cast<const uint8_t*>(group_w[g]), K, rb, n0, n1, yr.data() + r0);
  }

  void qitem(int64_t i) {
    switch (qt) {
      case kQ4_0: return qitem<BQ4_0>(i);
      case kQ4_1: return qitem<BQ4_1>(i);
      case kQ5_0: return qitem<BQ5_0>(i);
      case kQ5_1: return qitem<BQ5_1>(i);
      case kQ8_0: return qitem<BQ8_0>(i);
      case kQ2_K: return qitem<BQ2_K>(i);
      case kQ3_K: return qitem<BQ3_K>(i);
      case kQ4_K: return qitem<BQ4_K>(i);
      case kQ5_K: return qitem<BQ5_K>(i);
      case kQ6_K: return qitem<BQ6_K>(i);
      case kIQ4_NL: return qitem<BIQ4_NL>(i);
      case kIQ4_XS: return qitem<BIQ4_XS>(i);
      case kTQ2_0: return qitem<BTQ2_0>(i);
    }
  }

  void chunk(int64_t c) {
    const int64_t i0 = c * n_items / n_chunks, i1 = (c + 1) * n_items / n_chunks;
    for (int64_t i = i0; i < i1; ++i) {
      if (fn) fn(ctx, i);
      else if (wt == kF32) item<kF32>(i);
      else if (wt == kF16) item<kF16>(i);
      else if (wt == kBF16) item<kBF16>(i);
      else qitem(i);
    }
  }

  void work() {  // grab chunks until none is left
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      chunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void cpu_relax() {
#ifdef MTP_AVX512
  _mm_pause();
#endif
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && std::atoi(v) > 0 ? std::atoi(v) : fallback;
}

// Workers that spin for a while after each job (llama.cpp's threadpool polls the same way): a decode step
// is ~100 small matmuls separated by short XLA ops, and waking a sleeping thread for each (tens of us) costs
// more than the matmul. After MTP_JAX_SPIN_US (default 1000) without work they sleep on a condition variable.
//
// Jobs live in two slots owned by the pool, so a worker that wakes late never touches freed memory: it
// registers on the slot (`active`), then works only if the slot still holds the job it was woken for; the
// caller retires a slot (gen = 0) and waits for `active` to drain before refilling it. The caller waits
// only for the chunks, never for idle workers, and takes chunks itself, so a descheduled worker delays a
// call by at most one chunk.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers live as long as the process
    return *pool;
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Fills a job slot (fill(job) sets everything but the counters) and runs it on the caller and the workers.
  // A second caller while a job runs (XLA may run independent ops at once) works alone on its own job.
  template <typename Fill>
  void run(Fill fill, int64_t n_chunks) {
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n_chunks <= 1) {
      Job job;
      fill(job);
      job.n_chunks = std::min<int64_t>(n_chunks, 1);
      job.work();
      return;
    }
    const uint64_t g = ++last_gen_;
    Slot& slot = slots_[g & 1];
    slot.gen.store(0);  // retire: late workers that register from now on skip it
    while (slot.active.load() != 0) cpu_relax();
    Job& job = slot.job;
    fill(job);
    job.n_chunks = n_chunks;
    job.next.store(0);
    job.done.store(0);
    slot.gen.store(g);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.store(g);
    }
    if (sleepers_.load() > 0) cv_.notify_all();
    job.work();
    while (job.done.load(std::memory_order_acquire) < n_chunks) cpu_relax();
  }

 private:
  struct Slot {
    Job job;
    std::atomic<uint64_t> gen{0};
    std::atomic<int> active{0};
  };

  Pool() : spin_(std::chrono::microseconds(env_int("MTP_JAX_SPIN_US", 1000))) {
    const int n = std::min<int>(env_int("MTP_JAX_THREADS", 1 << 20), std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
    for (auto& t : workers_) t.detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      uint64_t g;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        cpu_relax();
        if (std::chrono::steady_clock::now() - t0 > spin_) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = g;
      Slot& slot = slots_[g & 1];
      slot.active.fetch_add(1);
      if (slot.gen.load() == g) slot.job.work();
      slot.active.fetch_sub(1);
    }
  }

  std::vector<std::thread> workers_;
  std::chrono::steady_clock::duration spin_;
  std::mutex submit_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  uint64_t last_gen_ = 0;  // guarded by submit_
  Slot slots_[2];
  std::atomic<int> sleepers_{0};
};

ffi::Error LinearImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> eids, ffi::ResultBuffer<ffi::F32> y,
                      bool trans, int32_t qtype) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4) return ffi::Error::InvalidArgument("mtp_linear: x must be 2-D, w 4-D");
  const int64_t M = xd[0], K = xd[1], L = wd[0], E = wd[1];
  const int64_t N = trans ? wd[2] : wd[3];
  if (eids.element_count() != static_cast<size_t>(M))
    return ffi::Error::InvalidArgument("mtp_linear: one expert id per row");
  int wt, float_id;
  switch (w.element_type()) {
    case ffi::DataType::F32: wt = kF32, float_id = 0; break;
    case ffi::DataType::F16: wt = kF16, float_id = 1; break;
    case ffi::DataType::BF16: wt = kBF16, float_id = 30; break;
    case ffi::DataType::U8: wt = kQuant, float_id = -1; break;
    default: return ffi::Error::InvalidArgument("mtp_linear: weights must be f32, f16, bf16 or u8 (quantized)");
  }
  int64_t row_bytes = 0, mat_bytes;  // bytes of one GGUF row (quantized), of one expert matrix
  if (wt == kQuant) {
    const QInfo* q = qinfo(qtype);
    if (!q)
      return ffi::Error::InvalidArgument("mtp_linear: u8 weights need qtype = a supported ggml type id, not " +
                                         std::to_string(qtype));
    if (!trans) return ffi::Error::InvalidArgument("mtp_linear: quantized weights are [L, E, N, row_bytes] (trans=1)");
    row_bytes = wd[3];
    if (row_bytes % q->bytes || row_bytes / q->bytes * q->qk != K)
      return ffi::Error::InvalidArgument("mtp_linear: row of " + std::to_string(row_bytes) + " bytes of ggml type " +
                                         std::to_string(qtype) + " does not hold K = " + std::to_string(K) + " values");
    mat_bytes = N * row_bytes;
  } else {
    if (qtype != 0 && qtype != float_id)
      return ffi::Error::InvalidArgument("mtp_linear: qtype " + std::to_string(qtype) + " needs u8 weights");
    if ((trans ? wd[3] : wd[2]) != K) return ffi::Error::InvalidArgument("mtp_linear: inner dimensions differ");
    mat_bytes = K * N * (wt == kF32 ? 4 : 2);
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t li = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);  // XLA's dynamic-index clamping
  const char* wl = static_cast<const char*>(w.untyped_data()) + li * E * mat_bytes;

  // rows grouped by expert (a stable counting sort): each distinct expert's matrix is read once
  std::vector<int64_t> count(E + 1, 0);
  const int32_t* ids = eids.typed_data();
  auto eid = [&](int64_t m) { return std::clamp<int64_t>(ids[m], 0, E - 1); };
  for (int64_t m = 0; m < M; ++m) ++count[eid(m) + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  int64_t groups = 0;
  for (int64_t e = 0; e < E; ++e) groups += count[e + 1] > count[e];
  // enough weight bytes per thread (32 KiB) to pay for handing it work
  Pool& pool = Pool::get();
  const int64_t bytes = groups * mat_bytes;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.threads(), bytes >> 15));
  const int64_t split = (N + threads - 1) / threads;
  const int64_t per_item = trans ? kColsPerItem : std::min(N, std::max(kMinTileCols, (split + 15) / 16 * 16));
  const int64_t items_per_group = (N + per_item - 1) / per_item;
  auto fill = [&](Job& job) {
    job.fn = nullptr;
    job.wt = wt;
    job.qt = qtype;
    job.rb = row_bytes;
    job.trans = trans;
    job.K = K;
    job.N = N;
    job.cols_per_item = per_item;
    job.items_per_group = items_per_group;
    job.n_items = groups * items_per_group;
    std::vector<int64_t> pos(count.begin(), count.end() - 1);
    job.xr.resize(M);
    job.yr.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t p = pos[eid(m)]++;
      job.xr[p] = x.typed_data() + m * K;
      job.yr[p] = y->typed_data() + m * N;
    }
    job.group_w.clear();
    job.group_start.assign(1, 0);
    for (int64_t e = 0; e < E; ++e)
      if (count[e + 1] > count[e]) {
        job.group_w.push_back(wl + e * mat_bytes);
        job.group_start.push_back(count[e + 1]);
      }
  };
  // up to 4 chunks per thread so that the caller can take over the work of a worker the OS has descheduled
  pool.run(fill, threads == 1 ? 1 : std::min<int64_t>(groups * items_per_group, 4 * threads));
  return ffi::Error::Success();
}

// ---- attention over one layer of a KV cache, read in place (decode and verify) ------------------------------
// out[b, t, k, g, :] = sum_j softmax_j(scale * q[b, t, k, g, :] . K_j) V_j over the slots j < S with
// p - window < j <= p, p = lengths[b] + t (window 0: no lower bound), K_j, V_j = k/v_stack[layer, b, j, k, :]
// (f32, f16 or bf16, or q8_0 / q4_0 blocks dequantized entry by entry: Side; slot = position, or with `ring`
// slot = position mod S, kvcache.write_block: a ring of S >= window + T - 1 slots holds every position a query
// sees, and the positions j < p - S + 1 are gone).
// XLA:CPU copied each layer's dynamic slice of the stacks into a transposed layout before its two dots and ran
// ~10 more small ops per layer (benchmarks/decode.py's docstring).
// Numerics: the dots are 16-lane f32 sums reduced in a fixed order, exp is Cephes' expf polynomial (~1 ulp),
// probabilities are e_j / sum, the output a sequential f32 sum over j: a query's result depends only on its
// own inputs, never on T, B or the thread count, so a verify of K+1 tokens attends as K+1 decodes do.

inline float dot16(const float* a, const float* b, int64_t n) {
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += a[i + l] * b[i + l];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w; w >>= 1)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0] + tail;
}

inline float exp_cephes(float x) {  // x <= 0 here (scores minus their max)
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return y * two_n;
}

// One side (K or V) of the cache: a float stack [L, B, S, K, H] (kind kAttFloat, element type wt) or ggml blocks
// of 32 values along H (kvquant: q [L, B, S, K, H/32 * qbytes], d [L, B, S, K, H/32] f16 scales).
enum AttKind { kAttFloat = 0, kAttQ8_0 = 1, kAttQ4_0 = 2 };
struct Side {
  const void* q;
  const uint16_t* d;
  int kind, wt;
};

inline void load_row(int wt, const void* base, int64_t off, int64_t n, float* dst) {  // n values from base[off]
  if (wt == kF32) {
    std::memcpy(dst, static_cast<const float*>(base) + off, n * 4);
  } else if (wt == kF16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load1<kF16>(base, off + i);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = load1<kBF16>(base, off + i);
  }
}

// Entry r (= ((layer * B + b) * S + slot) * K + head) of a side as H floats: a quantized entry dequantized as
// kvquant.dequantize does it (the integer as f32, times the f16 scale as f32; q4_0: nibble - 8, low nibbles first).
inline void load_entry(const Side& s, int64_t r, int64_t H, float* dst) {
  if (s.kind == kAttFloat) return load_row(s.wt, s.q, r * H, H, dst);
  const int64_t nb = H / 32;
  for (int64_t i = 0; i < nb; ++i) {
    const float d = half_to_float(s.d[r * nb + i]);
    float* o = dst + 32 * i;
    if (s.kind == kAttQ8_0) {
      const int8_t* q = static_cast<const int8_t*>(s.q) + (r * nb + i) * 32;
      for (int l = 0; l < 32; ++l) o[l] = static_cast<float>(q[l]) * d;
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(s.q) + (r * nb + i) * 16;
      for (int l = 0; l < 16; ++l) {
        o[l] = static_cast<float>((q[l] & 15) - 8) * d;
        o[l + 16] = static_cast<float>((q[l] >> 4) - 8) * d;
      }
    }
  }
}

struct Attend {
  const float* q;
  Side k, v;
  const int32_t* lengths;
  float* out;
  int64_t B, T, S, K, G, H, layer, window;
  float scale;
  bool ring;

  // rows b, KV head k: all T*G queries of the head share each K/V row read
  void item(int64_t i) const {
    const int64_t b = i / K, kh = i % K, TG = T * G, W = S + T;  // W >= the positions of all T queries
    thread_local std::vector<float> buf;
    buf.resize(TG * W + H);  // scores of the T*G queries by position - j0, then one K or V row
    float *sc = buf.data(), *row = sc + TG * W;
    const int64_t len = lengths[b];
    // query t sees positions lo(t)..hi(t)
    auto hi = [&](int64_t t) { return ring ? len + t : std::min<int64_t>(S - 1, len + t); };
    auto lo = [&](int64_t t) {
      const int64_t a = window > 0 ? std::max<int64_t>(0, len + t - window + 1) : int64_t(0);
      return ring ? std::max(a, hi(t) - S + 1) : a;
    };
    const int64_t j0 = lo(0), j1 = hi(T - 1);
    auto at = [&](int64_t j) { return ((layer * B + b) * S + (ring ? j % S : j)) * K + kh; };  // entry of position j
    auto qv = [&](int64_t t, int64_t g) { return q + (((b * T + t) * K + kh) * G + g) * H; };
    for (int64_t j = j0; j <= j1; ++j) {
      load_entry(k, at(j), H, row);
      for (int64_t t = 0; t < T; ++t) {
        if (j < lo(t) || j > hi(t)) continue;
        for (int64_t g = 0; g < G; ++g) sc[(t * G + g) * W + j - j0] = dot16(qv(t, g), row, H) * scale;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t a = lo(t) - j0, z = hi(t) - j0;
      for (int64_t g = 0; g < G; ++g) {
        float* s = sc + (t * G + g) * W;
        float m = -INFINITY;
        for (int64_t j = a; j <= z; ++j) m = std::max(m, s[j]);
        float sum = 0;
        for (int64_t j = a; j <= z; ++j) sum += (s[j] = exp_cephes(s[j] - m));
        for (int64_t j = a; j <= z; ++j) s[j] /= sum;
        float* o = out + (((b * T + t) * K + kh) * G + g) * H;
        std::fill(o, o + H, 0.0f);
      }
    }
    for (int64_t j = j0; j <= j1; ++j) {
      load_entry(v, at(j), H, row);
      for (int64_t t = 0; t < T; ++t) {
        if (j < lo(t) || j > hi(t)) continue;
        for (int64_t g = 0; g < G; ++g) {
          const float p = sc[(t * G + g) * W + j - j0];
          float* o = out + (((b * T + t) * K + kh) * G + g) * H;
          for (int64_t h = 0; h < H; ++h) o[h] += p * row[h];
        }
      }
    }
  }
  static void run(const void* self, int64_t i) { static_cast<const Attend*>(self)->item(i); }
};

// A side's buffers -> Side, or an error message: q is [L, B, S, K, H] floats, or with kind q8_0 / q4_0 the
// blocks [L, B, S, K, H/32 * (32 | 16)] beside their scales d [L, B, S, K, H/32] f16.
const char* side_of(ffi::AnyBuffer& q, ffi::AnyBuffer& d, int32_t kind, const int64_t* dims, Side& out) {
  auto qd = q.dimensions();
  if (qd.size() != 5) return "mtp_attend: a stack must be [L, B, S, K, .]";
  for (int a = 0; a < 4; ++a)
    if (qd[a] != dims[a]) return "mtp_attend: the K and V stacks differ in [L, B, S, K]";
  const int64_t H = dims[4];
  out.q = q.untyped_data();
  out.kind = kind;
  if (kind == kAttFloat) {
    if (qd[4] != H) return "mtp_attend: q and a float stack differ in H";
    switch (q.element_type()) {
      case ffi::DataType::F32: out.wt = kF32; return nullptr;
      case ffi::DataType::F16: out.wt = kF16; return nullptr;
      case ffi::DataType::BF16: out.wt = kBF16; return nullptr;
      default: return "mtp_attend: float stacks must be f32, f16 or bf16";
    }
  }
  if (kind != kAttQ8_0 && kind != kAttQ4_0) return "mtp_attend: unknown cache kind";
  auto dd = d.dimensions();
  const int64_t nb = H / 32;
  if (H % 32 || dd.size() != 5 || dd[4] != nb || qd[4] != nb * (kind == kAttQ8_0 ? 32 : 16) ||
      d.element_type() != ffi::DataType::F16 ||
      q.element_type() != (kind == kAttQ8_0 ? ffi::DataType::S8 : ffi::DataType::U8))
    return "mtp_attend: a q8_0 / q4_0 stack must hold H/32 blocks per entry and their f16 scales";
  for (int a = 0; a < 4; ++a)
    if (dd[a] != dims[a]) return "mtp_attend: blocks and scales differ in [L, B, S, K]";
  out.d = static_cast<const uint16_t*>(d.untyped_data());
  return nullptr;
}

ffi::Error AttendImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer ks, ffi::AnyBuffer vs, ffi::AnyBuffer kd,
                      ffi::AnyBuffer vd, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> lengths,
                      ffi::ResultBuffer<ffi::F32> out, float scale, int32_t window, bool ring, int32_t k_kind,
                      int32_t v_kind) {
  auto qd = q.dimensions(), kdims = ks.dimensions();
  if (qd.size() != 5 || kdims.size() != 5)
    return ffi::Error::InvalidArgument("mtp_attend: q must be [B, T, K, G, H], the stacks [L, B, S, K, .]");
  const int64_t B = qd[0], T = qd[1], K = qd[2], G = qd[3], H = qd[4], L = kdims[0], S = kdims[2];
  if (kdims[1] != B || kdims[3] != K || lengths.element_count() != static_cast<size_t>(B))
    return ffi::Error::InvalidArgument("mtp_attend: q, the stacks and lengths do not match");
  const int64_t dims[5] = {L, B, S, K, H};
  Side k{}, v{};
  if (const char* e = side_of(ks, kd, k_kind, dims, k)) return ffi::Error::InvalidArgument(e);
  if (const char* e = side_of(vs, vd, v_kind, dims, v)) return ffi::Error::InvalidArgument(e);
  if (B * T * K * G * H == 0 || S == 0) return ffi::Error::Success();
  Attend a{q.typed_data(), k, v, lengths.typed_data(), out->typed_data(),
           B, T, S, K, G, H, std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1), window, scale, ring};
  // worth handing out when there are several heads' rows with enough work each (~16K multiply-adds)
  Pool& pool = Pool::get();
  const int64_t items = B * K, work = T * G * S * H;
  const int64_t chunks = work < (1 << 14) ? 1 : std::min<int64_t>(items, 4 * pool.threads());
  pool.run([&](Job& job) { job.fn = Attend::run; job.ctx = &a; job.n_items = items; }, chunks);
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpLinear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans")
                                  .Attr<int32_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpAttend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Attr<bool>("ring")
                                  .Attr<int32_t>("k_kind")
                                  .Attr<int32_t>("v_kind"));
