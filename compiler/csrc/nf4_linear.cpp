// effc_native::nf4_linear: y = x @ W^T + bias with W in bitsandbytes' NF4 layout (two 4-bit codes per
// byte, element 2j in the high nibble, block-wise absmax, optionally double-quantized), the same
// arguments and result as the reference op effc::nf4_linear (compiler/nf4.py).
//
// The float weight is never materialized. Decode (M <= kGemvRows): each 4-bit code is looked up in the
// 16-entry NF4 table held in vector registers (AVX-512: one vpermps; AVX2: two vpermps and a blend),
// multiplied with x, and the block's absmax (decoded on the fly from its 8-bit code) scales the
// block's partial sum. Prefill: tiles of kTileRows rows are decoded into a per-call buffer and
// multiplied with ATen's GEMM. The SIMD path is chosen at run time from the CPU (target attributes,
// not -march, so the library runs on any x86-64 and anywhere else through the portable loop).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EFFC_X86 1
#endif

namespace {

// NF4 values and bitsandbytes' signed 8-bit dynamic map, exactly (hex floats written from
// effc.formats.nf4.NF4_CODE and DYNAMIC_MAP_SIGNED; tests/passes/test_nf4_native.py checks they agree).
alignas(64) const float kNF4[16] = {
    -0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f, -0x1.9465400000000p-2f,
    -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f, -0x1.74f0e20000000p-4f, 0x0.0p+0f,
    0x1.45f5fe0000000p-4f, 0x1.4995c60000000p-3f, 0x1.f809ba0000000p-3f, 0x1.5a06740000000p-2f,
    0x1.c349700000000p-2f, 0x1.200f560000000p-1f, 0x1.7227660000000p-1f, 0x1.0000000000000p+0f,
};
alignas(64) const float kDynamic[256] = {
    -0x1.fc66660000000p-1f, -0x1.f533340000000p-1f, -0x1.ee00000000000p-1f, -0x1.e6cccc0000000p-1f,
    -0x1.df999a0000000p-1f, -0x1.d866660000000p-1f, -0x1.d133340000000p-1f, -0x1.ca00000000000p-1f,
    -0x1.c2cccc0000000p-1f, -0x1.bb999a0000000p-1f, -0x1.b466660000000p-1f, -0x1.ad33340000000p-1f,
    -0x1.a600000000000p-1f, -0x1.9ecccc0000000p-1f, -0x1.97999a0000000p-1f, -0x1.9066660000000p-1f,
    -0x1.8933340000000p-1f, -0x1.8200000000000p-1f, -0x1.7acccc0000000p-1f, -0x1.73999a0000000p-1f,
    -0x1.6c66680000000p-1f, -0x1.6533340000000p-1f, -0x1.5e00000000000p-1f, -0x1.56cccc0000000p-1f,
    -0x1.4f999a0000000p-1f, -0x1.4866680000000p-1f, -0x1.4133340000000p-1f, -0x1.3a00000000000p-1f,
    -0x1.32cccc0000000p-1f, -0x1.2b999a0000000p-1f, -0x1.2466680000000p-1f, -0x1.1d33340000000p-1f,
    -0x1.1600000000000p-1f, -0x1.0ecccc0000000p-1f, -0x1.0799980000000p-1f, -0x1.0066660000000p-1f,
    -0x1.f266640000000p-2f, -0x1.e400000000000p-2f, -0x1.d599980000000p-2f, -0x1.c733340000000p-2f,
    -0x1.b8cccc0000000p-2f, -0x1.aa66660000000p-2f, -0x1.9c00000000000p-2f, -0x1.8d99980000000p-2f,
    -0x1.7f33340000000p-2f, -0x1.70cccc0000000p-2f, -0x1.6266660000000p-2f, -0x1.5400000000000p-2f,
    -0x1.4599980000000p-2f, -0x1.3733340000000p-2f, -0x1.28cccc0000000p-2f, -0x1.1a66680000000p-2f,
    -0x1.0c00000000000p-2f, -0x1.fb33320000000p-3f, -0x1.de66660000000p-3f, -0x1.c1999a0000000p-3f,
    -0x1.a4cccc0000000p-3f, -0x1.8800000000000p-3f, -0x1.6b33340000000p-3f, -0x1.4e66660000000p-3f,
    -0x1.31999a0000000p-3f, -0x1.14cccc0000000p-3f, -0x1.f000000000000p-4f, -0x1.b666680000000p-4f,
    -0x1.93d70a0000000p-4f, -0x1.8851ee0000000p-4f, -0x1.7cccce0000000p-4f, -0x1.7147ae0000000p-4f,
    -0x1.65c2900000000p-4f, -0x1.5a3d700000000p-4f, -0x1.4eb8540000000p-4f, -0x1.4333340000000p-4f,
    -0x1.37ae140000000p-4f, -0x1.2c28f60000000p-4f, -0x1.20a3d60000000p-4f, -0x1.151eba0000000p-4f,
    -0x1.09999a0000000p-4f, -0x1.fc28f60000000p-5f, -0x1.e51eba0000000p-5f, -0x1.ce147a0000000p-5f,
    -0x1.b70a3e0000000p-5f, -0x1.a000000000000p-5f, -0x1.88f5c20000000p-5f, -0x1.71eb860000000p-5f,
    -0x1.5ae1460000000p-5f, -0x1.43d70a0000000p-5f, -0x1.2cccce0000000p-5f, -0x1.15c2900000000p-5f,
    -0x1.fd70a40000000p-6f, -0x1.cf5c2a0000000p-6f, -0x1.a147ae0000000p-6f, -0x1.7333340000000p-6f,
    -0x1.451eba0000000p-6f, -0x1.170a3e0000000p-6f, -0x1.d1eb860000000p-7f, -0x1.75c2900000000p-7f,
    -0x1.3e76c80000000p-7f, -0x1.2c08300000000p-7f, -0x1.19999a0000000p-7f, -0x1.072b020000000p-7f,
    -0x1.e978d40000000p-8f, -0x1.c49ba60000000p-8f, -0x1.9fbe760000000p-8f, -0x1.7ae1480000000p-8f,
    -0x1.56041a0000000p-8f, -0x1.3126e80000000p-8f, -0x1.0c49ba0000000p-8f, -0x1.ced9140000000p-9f,
    -0x1.851eb80000000p-9f, -0x1.3b645a0000000p-9f, -0x1.e353f80000000p-10f, -0x1.4fdf3a0000000p-10f,
    -0x1.eecbfe0000000p-11f, -0x1.b3d07c0000000p-11f, -0x1.78d5000000000p-11f, -0x1.3dd9820000000p-11f,
    -0x1.02de020000000p-11f, -0x1.8fc5060000000p-12f, -0x1.19ce0a0000000p-12f, -0x1.47ae160000000p-13f,
    -0x1.743e960000000p-14f, -0x1.15df660000000p-14f, -0x1.6f00680000000p-15f, -0x1.64840c0000000p-16f,
    -0x1.040bfe0000000p-17f, -0x1.b435280000000p-19f, -0x1.27476e0000000p-21f, 0x0.0p+0f,
    0x1.27476e0000000p-21f, 0x1.b435280000000p-19f, 0x1.040bfe0000000p-17f, 0x1.64840c0000000p-16f,
    0x1.6f00680000000p-15f, 0x1.15df660000000p-14f, 0x1.743e960000000p-14f, 0x1.47ae160000000p-13f,
    0x1.19ce0a0000000p-12f, 0x1.8fc5060000000p-12f, 0x1.02de020000000p-11f, 0x1.3dd9820000000p-11f,
    0x1.78d5000000000p-11f, 0x1.b3d07c0000000p-11f, 0x1.eecbfe0000000p-11f, 0x1.4fdf3a0000000p-10f,
    0x1.e353f80000000p-10f, 0x1.3b645a0000000p-9f, 0x1.851eb80000000p-9f, 0x1.ced9140000000p-9f,
    0x1.0c49ba0000000p-8f, 0x1.3126e80000000p-8f, 0x1.56041a0000000p-8f, 0x1.7ae1480000000p-8f,
    0x1.9fbe760000000p-8f, 0x1.c49ba60000000p-8f, 0x1.e978d40000000p-8f, 0x1.072b020000000p-7f,
    0x1.19999a0000000p-7f, 0x1.2c08300000000p-7f, 0x1.3e76c80000000p-7f, 0x1.75c2900000000p-7f,
    0x1.d1eb860000000p-7f, 0x1.170a3e0000000p-6f, 0x1.451eba0000000p-6f, 0x1.7333340000000p-6f,
    0x1.a147ae0000000p-6f, 0x1.cf5c2a0000000p-6f, 0x1.fd70a40000000p-6f, 0x1.15c2900000000p-5f,
    0x1.2cccce0000000p-5f, 0x1.43d70a0000000p-5f, 0x1.5ae1460000000p-5f, 0x1.71eb860000000p-5f,
    0x1.88f5c20000000p-5f, 0x1.a000000000000p-5f, 0x1.b70a3e0000000p-5f, 0x1.ce147a0000000p-5f,
    0x1.e51eba0000000p-5f, 0x1.fc28f60000000p-5f, 0x1.09999a0000000p-4f, 0x1.151eba0000000p-4f,
    0x1.20a3d60000000p-4f, 0x1.2c28f60000000p-4f, 0x1.37ae140000000p-4f, 0x1.4333340000000p-4f,
    0x1.4eb8540000000p-4f, 0x1.5a3d700000000p-4f, 0x1.65c2900000000p-4f, 0x1.7147ae0000000p-4f,
    0x1.7cccce0000000p-4f, 0x1.8851ee0000000p-4f, 0x1.93d70a0000000p-4f, 0x1.b666680000000p-4f,
    0x1.f000000000000p-4f, 0x1.14cccc0000000p-3f, 0x1.31999a0000000p-3f, 0x1.4e66660000000p-3f,
    0x1.6b33340000000p-3f, 0x1.8800000000000p-3f, 0x1.a4cccc0000000p-3f, 0x1.c1999a0000000p-3f,
    0x1.de66660000000p-3f, 0x1.fb33320000000p-3f, 0x1.0c00000000000p-2f, 0x1.1a66680000000p-2f,
    0x1.28cccc0000000p-2f, 0x1.3733340000000p-2f, 0x1.4599980000000p-2f, 0x1.5400000000000p-2f,
    0x1.6266660000000p-2f, 0x1.70cccc0000000p-2f, 0x1.7f33340000000p-2f, 0x1.8d99980000000p-2f,
    0x1.9c00000000000p-2f, 0x1.aa66660000000p-2f, 0x1.b8cccc0000000p-2f, 0x1.c733340000000p-2f,
    0x1.d599980000000p-2f, 0x1.e400000000000p-2f, 0x1.f266640000000p-2f, 0x1.0066660000000p-1f,
    0x1.0799980000000p-1f, 0x1.0ecccc0000000p-1f, 0x1.1600000000000p-1f, 0x1.1d33340000000p-1f,
    0x1.2466680000000p-1f, 0x1.2b999a0000000p-1f, 0x1.32cccc0000000p-1f, 0x1.3a00000000000p-1f,
    0x1.4133340000000p-1f, 0x1.4866680000000p-1f, 0x1.4f999a0000000p-1f, 0x1.56cccc0000000p-1f,
    0x1.5e00000000000p-1f, 0x1.6533340000000p-1f, 0x1.6c66680000000p-1f, 0x1.73999a0000000p-1f,
    0x1.7acccc0000000p-1f, 0x1.8200000000000p-1f, 0x1.8933340000000p-1f, 0x1.9066660000000p-1f,
    0x1.97999a0000000p-1f, 0x1.9ecccc0000000p-1f, 0x1.a600000000000p-1f, 0x1.ad33340000000p-1f,
    0x1.b466660000000p-1f, 0x1.bb999a0000000p-1f, 0x1.c2cccc0000000p-1f, 0x1.ca00000000000p-1f,
    0x1.d133340000000p-1f, 0x1.d866660000000p-1f, 0x1.df999a0000000p-1f, 0x1.e6cccc0000000p-1f,
    0x1.ee00000000000p-1f, 0x1.f533340000000p-1f, 0x1.fc66660000000p-1f, 0x1.0000000000000p+0f,
};

constexpr int64_t kGemvRows = 4;     // up to this many rows of x: the register GEMV
constexpr int64_t kTileRows = 128;   // rows of W decoded per GEMM tile in the prefill path

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

int detect_isa() {
#ifdef EFFC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

std::atomic<int> g_isa{detect_isa()};
const int g_best_isa = detect_isa();

// The block absmax: float, or its 8-bit code decoded as bitsandbytes does (two float32 roundings;
// the library is built with -ffp-contract=off so this stays a multiply then an add).
struct Scales {
  const float* absmax = nullptr;  // no double quantization
  const uint8_t* codes = nullptr;
  const float* absmax2 = nullptr;
  float offset = 0.f;
  int64_t dq_block = 256;
  inline float operator[](int64_t i) const {
    if (absmax) return absmax[i];
    float v = kDynamic[codes[i]] * absmax2[i / dq_block];
    return v + offset;
  }
};

// x rows re-ordered inside each chunk of C elements (evens, then odds), so that the high nibbles
// of C/2 bytes meet x[0], x[2], ... and the low nibbles x[1], x[3], ... without a shuffle.
void deinterleave(const float* x, float* out, int64_t K, int64_t C) {
  for (int64_t c = 0; c < K; c += C)
    for (int64_t j = 0; j < C / 2; ++j) {
      out[c + j] = x[c + 2 * j];
      out[c + C / 2 + j] = x[c + 2 * j + 1];
    }
}

// ---- portable ---------------------------------------------------------------------------------

// Rows [n0, n1) for x rows [0, M), any layout (blocks may straddle rows; odd K).
void gemv_scalar(const float* x, int64_t M, int64_t K, const uint8_t* packed, const Scales& s, int64_t block,
                 int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float total = 0.f;
      int64_t i = n * K;
      for (int64_t k = 0; k < K;) {
        const int64_t b = i / block;
        const int64_t stop = std::min<int64_t>(K, k + (b + 1) * block - i);
        float acc = 0.f;
        for (; k < stop; ++k, ++i) {
          const uint8_t byte = packed[i >> 1];
          acc += kNF4[(i & 1) ? (byte & 15) : (byte >> 4)] * xm[k];
        }
        total += acc * s[b];
      }
      y[m * N + n] = total;
    }
}

void dequant_rows_scalar(const uint8_t* packed, const Scales& s, int64_t block, int64_t K, int64_t n0,
                         int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0, i = n * K; k < K; ++k, ++i) {
      const uint8_t byte = packed[i >> 1];
      out[(n - n0) * K + k] = kNF4[(i & 1) ? (byte & 15) : (byte >> 4)] * s[i / block];
    }
}

#ifdef EFFC_X86
// ---- AVX-512: 32 weights (16 bytes) per step --------------------------------------------------

template <int MB>
__attribute__((target("avx512f"))) void gemv_avx512(const float* xp, int64_t K, const uint8_t* packed,
                                                    const Scales& s, int64_t block, int64_t n0, int64_t n1,
                                                    float* y, int64_t N) {
  const __m512 table = _mm512_load_ps(kNF4);
  const int64_t nb = K / block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = packed + n * K / 2;
    __m512 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512 even[MB], odd[MB];  // two chains per x row: the FMA latency, not the lookups, bounds M=1
      for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_ps();
      for (int64_t c = b * block; c < (b + 1) * block; c += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
        const __m512 lo = _mm512_permutexvar_ps(v, table);  // vpermps reads only the low 4 index bits
        for (int m = 0; m < MB; ++m) {
          even[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * K + c), even[m]);
          odd[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * K + c + 16), odd[m]);
        }
      }
      const __m512 scale = _mm512_set1_ps(s[n * nb + b]);
      for (int m = 0; m < MB; ++m) total[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), scale, total[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = _mm512_reduce_add_ps(total[m]);
  }
}

__attribute__((target("avx512f"))) void dequant_rows_avx512(const uint8_t* packed, const Scales& s,
                                                            int64_t block, int64_t K, int64_t n0, int64_t n1,
                                                            float* out) {
  // Rows come out in the deinterleaved order of 32-element chunks; x is reordered to match.
  const __m512 table = _mm512_load_ps(kNF4);
  const int64_t nb = K / block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = packed + n * K / 2;
    float* o = out + (n - n0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 scale = _mm512_set1_ps(s[n * nb + b]);
      for (int64_t c = b * block; c < (b + 1) * block; c += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
        _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), scale));
        _mm512_storeu_ps(o + c + 16, _mm512_mul_ps(_mm512_permutexvar_ps(v, table), scale));
      }
    }
  }
}

// ---- AVX2: 16 weights (8 bytes) per step ------------------------------------------------------

__attribute__((target("avx2,fma"))) inline __m256 lookup_avx2(__m256i idx, __m256 t_lo, __m256 t_hi) {
  // vpermps indexes 8 entries (low 3 bits); bit 3 of the code picks the table half via the sign bit.
  const __m256 a = _mm256_permutevar8x32_ps(t_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t_hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MB>
__attribute__((target("avx2,fma"))) void gemv_avx2(const float* xp, int64_t K, const uint8_t* packed,
                                                   const Scales& s, int64_t block, int64_t n0, int64_t n1,
                                                   float* y, int64_t N) {
  const __m256 t_lo = _mm256_load_ps(kNF4), t_hi = _mm256_load_ps(kNF4 + 8);
  const int64_t nb = K / block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = packed + n * K / 2;
    __m256 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 even[MB], odd[MB];
      for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm256_setzero_ps();
      for (int64_t c = b * block; c < (b + 1) * block; c += 16) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
        const __m256 hi = lookup_avx2(_mm256_srli_epi32(v, 4), t_lo, t_hi);
        const __m256 lo = lookup_avx2(v, t_lo, t_hi);  // bits 0-3 of the byte are the low code
        for (int m = 0; m < MB; ++m) {
          even[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp + m * K + c), even[m]);
          odd[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp + m * K + c + 8), odd[m]);
        }
      }
      const __m256 scale = _mm256_set1_ps(s[n * nb + b]);
      for (int m = 0; m < MB; ++m) total[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), scale, total[m]);
    }
    for (int m = 0; m < MB; ++m) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(total[m]), _mm256_extractf128_ps(total[m], 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      y[m * N + n] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
    }
  }
}

__attribute__((target("avx2,fma"))) void dequant_rows_avx2(const uint8_t* packed, const Scales& s, int64_t block,
                                                           int64_t K, int64_t n0, int64_t n1, float* out) {
  const __m256 t_lo = _mm256_load_ps(kNF4), t_hi = _mm256_load_ps(kNF4 + 8);
  const int64_t nb = K / block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = packed + n * K / 2;
    float* o = out + (n - n0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      const __m256 scale = _mm256_set1_ps(s[n * nb + b]);
      for (int64_t c = b * block; c < (b + 1) * block; c += 16) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
        _mm256_storeu_ps(o + c, _mm256_mul_ps(lookup_avx2(_mm256_srli_epi32(v, 4), t_lo, t_hi), scale));
        _mm256_storeu_ps(o + c + 8, _mm256_mul_ps(lookup_avx2(v, t_lo, t_hi), scale));
      }
    }
  }
}
#endif  // EFFC_X86

using Gemv = void (*)(const float*, int64_t, const uint8_t*, const Scales&, int64_t, int64_t, int64_t, float*,
                      int64_t);
using Dequant = void (*)(const uint8_t*, const Scales&, int64_t, int64_t, int64_t, int64_t, float*);

struct Kernels {
  int64_t chunk = 0;  // 0: the portable loops (natural x order)
  Gemv gemv[kGemvRows + 1] = {};
  Dequant dequant = dequant_rows_scalar;
};

Kernels kernels_for(int isa, int64_t K, int64_t block) {
  Kernels k;
#ifdef EFFC_X86
  // The SIMD loops need rows made of whole blocks and blocks made of whole chunks.
  if (isa == kAvx512 && K % block == 0 && block % 32 == 0) {
    k.chunk = 32;
    k.gemv[1] = gemv_avx512<1>, k.gemv[2] = gemv_avx512<2>, k.gemv[3] = gemv_avx512<3>, k.gemv[4] = gemv_avx512<4>;
    k.dequant = dequant_rows_avx512;
  } else if (isa >= kAvx2 && K % block == 0 && block % 16 == 0) {
    k.chunk = 16;
    k.gemv[1] = gemv_avx2<1>, k.gemv[2] = gemv_avx2<2>, k.gemv[3] = gemv_avx2<3>, k.gemv[4] = gemv_avx2<4>;
    k.dequant = dequant_rows_avx2;
  }
#endif
  return k;
}

// x in bfloat16/float16 (nf4.compute_dtype): as the reference op, the weight is dequantized in float32,
// rounded to x's dtype, and multiplied in that dtype by ATen's GEMM, one decoded tile at a time.
at::Tensor nf4_linear_half(const at::Tensor& x, const uint8_t* w, const Scales& s, const Kernels& kn,
                           const std::optional<at::Tensor>& bias, int64_t N, int64_t K, int64_t block) {
  at::Tensor x2 = x.reshape({-1, K});
  if (kn.chunk) {  // the decoded tiles come in deinterleaved chunk order: reorder x's columns to match
    std::vector<int64_t> order(K);
    for (int64_t c = 0; c < K; c += kn.chunk)
      for (int64_t j = 0; j < kn.chunk / 2; ++j) order[c + j] = c + 2 * j, order[c + kn.chunk / 2 + j] = c + 2 * j + 1;
    x2 = x2.index_select(1, at::tensor(order, at::kLong));
  }
  x2 = x2.contiguous();
  at::Tensor y = at::empty({x2.size(0), N}, x2.options());
  at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x2.options().dtype(at::kFloat));
  for (int64_t t0 = 0; t0 < N; t0 += kTileRows) {
    const int64_t t1 = std::min(N, t0 + kTileRows);
    float* td = tile.data_ptr<float>();
    at::parallel_for(t0, t1, 1, [&](int64_t n0, int64_t n1) {
      kn.dequant(w, s, block, K, n0, n1, td + (n0 - t0) * K);
    });
    y.narrow(1, t0, t1 - t0).copy_(at::mm(x2, tile.narrow(0, 0, t1 - t0).to(x2.scalar_type()).t()));
  }
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                      const std::optional<at::Tensor>& bias, int64_t N, int64_t K, int64_t block,
                      int64_t dq_block) {
  TORCH_CHECK(x.size(-1) == K, "nf4_linear: x has ", x.size(-1), " features, the layer takes ", K);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (N * K + 1) / 2,
              "nf4_linear: packed must be uint8 with (N*K+1)/2 bytes");
  TORCH_CHECK(block > 0 && dq_block > 0, "nf4_linear: block sizes must be positive");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "nf4_linear: x must be float32, bfloat16 or float16");
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor a2, off;
  Scales s;
  s.dq_block = dq_block;
  if (absmax2.has_value()) {
    TORCH_CHECK(a.scalar_type() == at::kByte, "nf4_linear: double-quantized absmax codes must be uint8");
    a2 = absmax2->to(at::kFloat).contiguous();
    off = offset.value().to(at::kFloat);
    s.codes = a.data_ptr<uint8_t>();
    s.absmax2 = a2.data_ptr<float>();
    s.offset = off.item<float>();
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "nf4_linear: absmax must be float32");
    s.absmax = a.data_ptr<float>();
  }
  const Kernels kn = kernels_for(g_isa.load(), K, block);
  const uint8_t* w = p.data_ptr<uint8_t>();
  if (x.scalar_type() != at::kFloat) return nf4_linear_half(x, w, s, kn, bias, N, K, block);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());
  const float* xs = x2.data_ptr<float>();
  at::Tensor xp = x2;
  if (kn.chunk) {
    xp = at::empty_like(x2);
    for (int64_t m = 0; m < M; ++m) deinterleave(xs + m * K, xp.data_ptr<float>() + m * K, K, kn.chunk);
  }
  if (M <= kGemvRows) {
    float* yd = y.data_ptr<float>();
    const float* xd = xp.data_ptr<float>();
    // ~16K weights per task: enough work to pay for a thread hand-off.
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
      if (kn.chunk && M > 0)
        kn.gemv[M](xd, K, w, s, block, n0, n1, yd, N);
      else if (M > 0)
        gemv_scalar(xd, M, K, w, s, block, n0, n1, yd, N);
    });
  } else {
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x2.options());
    for (int64_t t0 = 0; t0 < N; t0 += kTileRows) {
      const int64_t t1 = std::min(N, t0 + kTileRows);
      float* td = tile.data_ptr<float>();
      at::parallel_for(t0, t1, 1, [&](int64_t n0, int64_t n1) {
        if (kn.chunk)
          kn.dequant(w, s, block, K, n0, n1, td + (n0 - t0) * K);
        else
          dequant_rows_scalar(w, s, block, K, n0, n1, td + (n0 - t0) * K);
      });
      y.narrow(1, t0, t1 - t0).copy_(at::mm(xp, tile.narrow(0, 0, t1 - t0).t()));
    }
  }
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

// Which SIMD path runs: "" reports it; "auto" picks the best this CPU has; "scalar"/"avx2"/"avx512"
// force one (for tests and comparisons; a path the CPU lacks is refused).
std::string nf4_kernel_isa(const std::string& request) {
  if (!request.empty()) {
    int want = -1;
    if (request == "auto") want = g_best_isa;
    for (int i = 0; i < 3; ++i)
      if (request == kIsaNames[i]) want = i;
    TORCH_CHECK(want >= 0, "nf4_kernel_isa: unknown ISA '", request, "' (auto, scalar, avx2, avx512)");
    TORCH_CHECK(want <= g_best_isa, "nf4_kernel_isa: this CPU cannot run ", request, " (best: ",
                kIsaNames[g_best_isa], ")");
    g_isa.store(want);
  }
  return kIsaNames[g_isa.load()];
}

at::Tensor nf4_tables() {
  return at::cat({at::from_blob(const_cast<float*>(kNF4), {16}, at::kFloat),
                  at::from_blob(const_cast<float*>(kDynamic), {256}, at::kFloat)});
}

}  // namespace

TORCH_LIBRARY(effc_native, m) {
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? offset, Tensor? bias, "
        "int out_features, int in_features, int block, int dq_block) -> Tensor");
  m.def("nf4_kernel_isa(str request) -> str", &nf4_kernel_isa);
  m.def("nf4_tables() -> Tensor", &nf4_tables);
}

TORCH_LIBRARY_IMPL(effc_native, CPU, m) { m.impl("nf4_linear", &nf4_linear); }
