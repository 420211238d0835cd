// effc_native::window_attention: the same arguments and result as the reference op
// effc::window_attention (compiler/ops/window_attention.py, whose docstring defines the pattern), computed
// flash-style: only the keys a query's pattern can allow are visited, a chunk at a time, with an online
// (running max, running sum) softmax, so the work is O(S * keys allowed) and the memory O(S).
//
// Layout of the computation. The queries of one (batch, head) are cut into tiles of L lanes (AVX-512: 32,
// AVX2 and portable: 16); a tile's lanes are queries p0, p0 + qs, ... with qs = dilation when the band is
// dilated (so a tile only meets keys of its residue in the band) and 1 otherwise. The tile's queries are
// transposed into Qt [D, L] (pre-scaled by scale * log2 e, so the softmax runs in base 2), which puts the
// queries in the vector lanes: keys and values are read in place, one broadcast element at a time, and
// the score tile is S^T [chunk keys, L]. The per-query max and sum of the softmax are then lane-wise
// (vertical) operations, and the output is kept transposed too, O^T [Dv, L], updated by P @ V with the
// value elements broadcast. Micro-kernels: scores 8 keys x 32 queries (AVX-512) or 6 x 16 (AVX2) per
// register block over D; P @ V 8 (6) value columns x the tile's queries per register block over the
// chunk's keys. exp2 is a degree-6 polynomial with exponent scaling (~1e-7 relative).
//
// Which keys a tile visits, as disjoint passes (each key at most once per query):
//   main     the band range [p_min - (w-1)d, p_max] (causal) or +-(w-1)d around the tile, same residue,
//            merged with the keys of the layout blocks some lane's row enables; a key in global_tokens is
//            masked out here, as it is its own pass; allowed = (band | layout) & causal & key_valid.
//   globals  the global key positions; allowed = causal & key_valid.
//   dense    a query that is itself global sees every key: such rows get their own tiles (packed from
//            the global positions) over all keys (j <= p causal), allowed = causal & key_valid; regular
//            tiles skip writing those rows.
// Inside a visited chunk the rule is applied exactly as a bit mask of lanes per key (band and causal are
// lane intervals); a chunk that is provably allowed in full (the common band interior) skips the mask.
//
// The SIMD path is picked at run time (target attributes, not -march). The library has one setting for
// it, effc_native::nf4_kernel_isa (nf4_linear.cpp): this kernel asks it on each call, so forcing
// "scalar"/"avx2"/"avx512" there forces it here too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EFFC_X86 1
#endif

namespace {

constexpr int kMaxLanes = 32;  // queries per tile at most (the bits of a key's lane mask)
constexpr int kChunk = 64;     // keys per online-softmax step: the score tile is kChunk x lanes
constexpr int kPad = 8;        // score micro-kernels read whole groups of keys (up to 8)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kLog2e = 1.442695040888963407359924681001892137;

// 2^f for |f| <= 1/2: a degree-6 polynomial fitted for relative error (1.9e-9 in exact arithmetic; in float
// the Horner evaluation's rounding dominates, < 1e-7 relative).
constexpr float kC1 = 0x1.62e430p-1f, kC2 = 0x1.ebfbdap-3f, kC3 = 0x1.c6aed4p-5f, kC4 = 0x1.3b2db4p-7f,
                kC5 = 0x1.5f457ap-10f, kC6 = 0x1.41d85cp-13f;

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
#ifdef EFFC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

// The library's SIMD setting: effc_native::nf4_kernel_isa("") names it (same detection as here).
int library_isa() {
  static const int best = detect_isa();
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("effc_native::nf4_kernel_isa", ""));
  if (!op) return best;
  torch::jit::Stack stack;
  stack.emplace_back(std::string());
  op->callBoxed(&stack);
  const std::string name = stack.back().toStringRef();
  const int isa = name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : kScalar;
  return std::min(isa, best);
}

// ---- the problem, its tiles, per-thread buffers -------------------------------------------------

struct Problem {
  const float *q, *k, *v;
  float* out;
  int64_t B, N, S, T, D, Dv, KV, rep;
  const bool* valid = nullptr;  // key_valid [B or 1, T]
  int64_t valid_stride = 0;     // 0 when one row serves every batch
  int64_t window, dilation, span;  // span: (window - 1) * dilation, the band's reach on one side
  bool causal;
  int64_t qs;  // query stride inside a regular tile
  std::vector<int32_t> globals;     // global_tokens in [0, T), sorted, unique
  std::vector<uint8_t> is_global;   // [T], empty without global tokens
  const bool* layout = nullptr;
  int64_t block = 1, layout_cols = 0;
  float qscale;  // scale * log2(e)
};

struct Tile {
  bool dense;   // rows that are global tokens: every key
  int nq;       // live lanes
  int64_t p0;   // regular: lane k sits at p0 + k * qs
  int32_t pos[kMaxLanes];  // every tile: the lanes' positions, ascending
};

enum Pass : int { kMain = 0, kGlobals = 1, kDense = 2 };

// Keys [begin, end) of a chunk that reach the same halves of the lanes (pv).
struct Run {
  int begin, end, live;
};

struct Work {
  std::vector<float> qt, o, s;  // Qt [D, L], O^T [Dv, L], S^T [kChunk + kPad, L]
  float m[kMaxLanes], l[kMaxLanes], alpha[kMaxLanes];
  uint32_t mask[kChunk];
  uint8_t live[kChunk];
  Run runs[kChunk];
  const float* rows[kChunk + kPad];
  const float* vrows[kChunk];
  std::vector<int32_t> keys, band, extra;
  // The tile's lanes grouped by layout row block, and the last key block asked for.
  int nseg = 0;
  int64_t seg_rb[kMaxLanes];
  uint32_t seg_bits[kMaxLanes];
  int64_t cached_kb = -1;
  uint32_t cached_bits = 0;
};

inline uint32_t lane_bits(int64_t lo, int64_t hi) {  // lanes lo..hi inclusive
  if (lo > hi) return 0;
  const uint64_t upto = (uint64_t(2) << hi) - 1, below = (uint64_t(1) << lo) - 1;
  return uint32_t(upto & ~below);
}

// ---- micro-kernels ----------------------------------------------------------------------------
// qk: S^T[c][lane] = sum_d K[c][d] * Qt[d][lane] for c < nk (rows[] padded to whole groups). live[c]
//   (nullptr: all 3) says which halves of the lanes key c may reach (bit 0 the low, bit 1 the high half);
//   the scores of a dead half are left unwritten: the mask makes them -inf.
// softmax: masks S^T (nullptr: every lane of every key allowed), folds the chunk into the running max m
//   and sum l, leaves P^T = 2^(S^T - m) in s and the factor the old state must be scaled by in alpha.
// pv: O^T[e][lane] = O^T[e][lane] * alpha[lane] + sum_c V[c][e] * P^T[c][lane], over the runs of keys
//   with live halves (a dead half's P^T is 0: it is skipped, as are the keys no lane may see).
// The halves matter at a band's edges: its first and last keys reach only half of a tile's lanes.


// Portable: plain loops over 16 lanes (the compiler may vectorize them for the baseline ISA).
constexpr int kScalarLanes = 16;

void qk_scalar(const float* qt, int64_t D, const float* const* rows, int nk, const uint8_t* live, float* s) {
  constexpr int L = kScalarLanes;
  for (int c = 0; c < nk; ++c) {
    if (live && !live[c]) continue;
    float acc[L] = {};
    const float* kr = rows[c];
    for (int64_t d = 0; d < D; ++d) {
      const float kv = kr[d];
      for (int i = 0; i < L; ++i) acc[i] += kv * qt[d * L + i];
    }
    std::memcpy(s + c * L, acc, sizeof(acc));
  }
}

void softmax_scalar(float* s, int nk, const uint32_t* mask, float* m, float* l, float* alpha) {
  constexpr int L = kScalarLanes;
  for (int i = 0; i < L; ++i) {
    float mx = kNegInf;
    for (int c = 0; c < nk; ++c) {
      float& x = s[c * L + i];
      if (mask && !((mask[c] >> i) & 1u)) x = kNegInf;
      mx = std::max(mx, x);
    }
    const float mn = std::max(m[i], mx);
    const float base = mn == kNegInf ? 0.f : mn;  // no key yet: -inf - 0, not -inf - -inf
    alpha[i] = std::exp2(m[i] - base);
    float sum = 0.f;
    for (int c = 0; c < nk; ++c) {
      float& x = s[c * L + i];
      x = std::exp2(x - base);
      sum += x;
    }
    l[i] = l[i] * alpha[i] + sum;
    m[i] = mn;
  }
}

void pv_scalar(float* o, int64_t Dv, const float* const* vrows, const Run* runs, int nruns, const float* p,
               const float* alpha) {
  constexpr int L = kScalarLanes;
  for (int64_t e = 0; e < Dv; ++e) {
    float acc[L];
    for (int i = 0; i < L; ++i) acc[i] = o[e * L + i] * alpha[i];
    for (int r = 0; r < nruns; ++r)
      for (int c = runs[r].begin; c < runs[r].end; ++c) {
        const float vv = vrows[c][e];
        for (int i = 0; i < L; ++i) acc[i] += vv * p[c * L + i];
      }
    std::memcpy(o + e * L, acc, sizeof(acc));
  }
}

#ifdef EFFC_X86
// ---- AVX-512: 32 lanes, two registers ------------------------------------------------------------

__attribute__((target("avx512f"))) inline __m512 exp2_512(__m512 x) {
  // Below 2^-126 (a masked score, -inf, among them) the result is 0 by the mask; computing it there
  // instead would underflow, and a float underflow costs a microcode assist per instruction.
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kC6), f, _mm512_set1_ps(kC5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// KG keys x the lane halves in LIVE (bit 0: lanes 0-15, bit 1: lanes 16-31).
template <int KG, int LIVE>
__attribute__((target("avx512f"))) inline void qk_group512(const float* qt, int64_t D, const float* const* rows,
                                                           float* s) {
  __m512 a0[KG], a1[KG];
#pragma GCC unroll 16
  for (int g = 0; g < KG; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 q0 = _mm512_loadu_ps(qt + d * 32), q1 = _mm512_loadu_ps(qt + d * 32 + 16);
#pragma GCC unroll 16
    for (int g = 0; g < KG; ++g) {
      const __m512 kv = _mm512_set1_ps(rows[g][d]);
      if (LIVE & 1) a0[g] = _mm512_fmadd_ps(kv, q0, a0[g]);
      if (LIVE & 2) a1[g] = _mm512_fmadd_ps(kv, q1, a1[g]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < KG; ++g) {
    if (LIVE & 1) _mm512_storeu_ps(s + g * 32, a0[g]);
    if (LIVE & 2) _mm512_storeu_ps(s + g * 32 + 16, a1[g]);
  }
}

template <int KG>
__attribute__((target("avx512f"))) inline void qk_live512(int live, const float* qt, int64_t D,
                                                          const float* const* rows, float* s) {
  if (live == 3)
    qk_group512<KG, 3>(qt, D, rows, s);
  else if (live == 1)
    qk_group512<KG, 1>(qt, D, rows, s);
  else if (live == 2)
    qk_group512<KG, 2>(qt, D, rows, s);
}

__attribute__((target("avx512f"))) void qk_avx512(const float* qt, int64_t D, const float* const* rows, int nk,
                                                  const uint8_t* live, float* s) {
  for (int c = 0; c < nk; c += 8) {
    const int g = std::min(8, nk - c);
    int lv = 3;
    if (live) {
      lv = 0;
      for (int i = 0; i < g; ++i) lv |= live[c + i];
    }
    if (g <= 4)
      qk_live512<4>(lv, qt, D, rows + c, s + c * 32);
    else
      qk_live512<8>(lv, qt, D, rows + c, s + c * 32);
  }
}

__attribute__((target("avx512f"))) void softmax_avx512(float* s, int nk, const uint32_t* mask, float* m, float* l,
                                                       float* alpha) {
  const __m512 ninf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps();
  __m512 mx0 = ninf, mx1 = ninf;
  for (int c = 0; c < nk; ++c) {
    __m512 s0 = _mm512_loadu_ps(s + c * 32), s1 = _mm512_loadu_ps(s + c * 32 + 16);
    if (mask) {
      const uint32_t mk = mask[c];
      s0 = _mm512_mask_mov_ps(ninf, __mmask16(mk & 0xffffu), s0);
      s1 = _mm512_mask_mov_ps(ninf, __mmask16(mk >> 16), s1);
      _mm512_storeu_ps(s + c * 32, s0);
      _mm512_storeu_ps(s + c * 32 + 16, s1);
    }
    mx0 = _mm512_max_ps(mx0, s0);
    mx1 = _mm512_max_ps(mx1, s1);
  }
  const __m512 m0 = _mm512_loadu_ps(m), m1 = _mm512_loadu_ps(m + 16);
  const __m512 n0 = _mm512_max_ps(m0, mx0), n1 = _mm512_max_ps(m1, mx1);
  const __m512 b0 = _mm512_mask_mov_ps(n0, _mm512_cmp_ps_mask(n0, ninf, _CMP_EQ_OQ), zero);
  const __m512 b1 = _mm512_mask_mov_ps(n1, _mm512_cmp_ps_mask(n1, ninf, _CMP_EQ_OQ), zero);
  const __m512 a0 = exp2_512(_mm512_sub_ps(m0, b0)), a1 = exp2_512(_mm512_sub_ps(m1, b1));
  __m512 sum0 = zero, sum1 = zero;
  for (int c = 0; c < nk; ++c) {
    const __m512 p0 = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + c * 32), b0));
    const __m512 p1 = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + c * 32 + 16), b1));
    _mm512_storeu_ps(s + c * 32, p0);
    _mm512_storeu_ps(s + c * 32 + 16, p1);
    sum0 = _mm512_add_ps(sum0, p0);
    sum1 = _mm512_add_ps(sum1, p1);
  }
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), a0, sum0));
  _mm512_storeu_ps(l + 16, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16), a1, sum1));
  _mm512_storeu_ps(m, n0);
  _mm512_storeu_ps(m + 16, n1);
  _mm512_storeu_ps(alpha, a0);
  _mm512_storeu_ps(alpha + 16, a1);
}

template <int E>
__attribute__((target("avx512f"))) inline void pv_group512(float* o, const float* const* vrows, int64_t e0,
                                                           const Run* runs, int nruns, const float* p, __m512 a0,
                                                           __m512 a1) {
  __m512 acc0[E], acc1[E];
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e) {
    acc0[e] = _mm512_mul_ps(_mm512_loadu_ps(o + e * 32), a0);
    acc1[e] = _mm512_mul_ps(_mm512_loadu_ps(o + e * 32 + 16), a1);
  }
  for (int r = 0; r < nruns; ++r) {
    const int live = runs[r].live;
    for (int c = runs[r].begin; c < runs[r].end; ++c) {
      const __m512 p0 = _mm512_loadu_ps(p + c * 32), p1 = _mm512_loadu_ps(p + c * 32 + 16);
      const float* vr = vrows[c] + e0;
      if (live == 3) {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) {
          const __m512 vv = _mm512_set1_ps(vr[e]);
          acc0[e] = _mm512_fmadd_ps(vv, p0, acc0[e]);
          acc1[e] = _mm512_fmadd_ps(vv, p1, acc1[e]);
        }
      } else if (live == 1) {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) acc0[e] = _mm512_fmadd_ps(_mm512_set1_ps(vr[e]), p0, acc0[e]);
      } else {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) acc1[e] = _mm512_fmadd_ps(_mm512_set1_ps(vr[e]), p1, acc1[e]);
      }
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e) {
    _mm512_storeu_ps(o + e * 32, acc0[e]);
    _mm512_storeu_ps(o + e * 32 + 16, acc1[e]);
  }
}

__attribute__((target("avx512f"))) void pv_avx512(float* o, int64_t Dv, const float* const* vrows, const Run* runs,
                                                  int nruns, const float* p, const float* alpha) {
  const __m512 a0 = _mm512_loadu_ps(alpha), a1 = _mm512_loadu_ps(alpha + 16);
  int64_t e = 0;
  for (; e + 8 <= Dv; e += 8) pv_group512<8>(o + e * 32, vrows, e, runs, nruns, p, a0, a1);
  float* oe = o + e * 32;
  switch (Dv - e) {
    case 7: pv_group512<7>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 6: pv_group512<6>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 5: pv_group512<5>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 4: pv_group512<4>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 3: pv_group512<3>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 2: pv_group512<2>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 1: pv_group512<1>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    default: break;
  }
}

// ---- AVX2 + FMA: 16 lanes, two registers ---------------------------------------------------------

__attribute__((target("avx2,fma"))) inline __m256 exp2_256(__m256 x) {
  // As exp2_512: below -126 the result is 0 by the mask, never an underflow (a microcode assist).
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kC6), f, _mm256_set1_ps(kC5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

template <int KG, int LIVE>
__attribute__((target("avx2,fma"))) inline void qk_group256(const float* qt, int64_t D, const float* const* rows,
                                                            float* s) {
  __m256 a0[KG], a1[KG];
#pragma GCC unroll 16
  for (int g = 0; g < KG; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * 16), q1 = _mm256_loadu_ps(qt + d * 16 + 8);
#pragma GCC unroll 16
    for (int g = 0; g < KG; ++g) {
      const __m256 kv = _mm256_broadcast_ss(rows[g] + d);
      if (LIVE & 1) a0[g] = _mm256_fmadd_ps(kv, q0, a0[g]);
      if (LIVE & 2) a1[g] = _mm256_fmadd_ps(kv, q1, a1[g]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < KG; ++g) {
    if (LIVE & 1) _mm256_storeu_ps(s + g * 16, a0[g]);
    if (LIVE & 2) _mm256_storeu_ps(s + g * 16 + 8, a1[g]);
  }
}

template <int KG>
__attribute__((target("avx2,fma"))) inline void qk_live256(int live, const float* qt, int64_t D,
                                                           const float* const* rows, float* s) {
  if (live == 3)
    qk_group256<KG, 3>(qt, D, rows, s);
  else if (live == 1)
    qk_group256<KG, 1>(qt, D, rows, s);
  else if (live == 2)
    qk_group256<KG, 2>(qt, D, rows, s);
}

__attribute__((target("avx2,fma"))) void qk_avx2(const float* qt, int64_t D, const float* const* rows, int nk,
                                                 const uint8_t* live, float* s) {
  for (int c = 0; c < nk; c += 6) {
    const int g = std::min(6, nk - c);
    int lv = 3;
    if (live) {
      lv = 0;
      for (int i = 0; i < g; ++i) lv |= live[c + i];
    }
    if (g <= 3)
      qk_live256<3>(lv, qt, D, rows + c, s + c * 16);
    else
      qk_live256<6>(lv, qt, D, rows + c, s + c * 16);
  }
}

__attribute__((target("avx2,fma"))) inline __m256 lanes256(uint32_t bits, __m256i sel) {
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), sel), sel));
}

__attribute__((target("avx2,fma"))) void softmax_avx2(float* s, int nk, const uint32_t* mask, float* m, float* l,
                                                      float* alpha) {
  const __m256 ninf = _mm256_set1_ps(kNegInf), zero = _mm256_setzero_ps();
  const __m256i sel0 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i sel1 = _mm256_slli_epi32(sel0, 8);
  __m256 mx0 = ninf, mx1 = ninf;
  for (int c = 0; c < nk; ++c) {
    __m256 s0 = _mm256_loadu_ps(s + c * 16), s1 = _mm256_loadu_ps(s + c * 16 + 8);
    if (mask) {
      s0 = _mm256_blendv_ps(ninf, s0, lanes256(mask[c], sel0));
      s1 = _mm256_blendv_ps(ninf, s1, lanes256(mask[c], sel1));
      _mm256_storeu_ps(s + c * 16, s0);
      _mm256_storeu_ps(s + c * 16 + 8, s1);
    }
    mx0 = _mm256_max_ps(mx0, s0);
    mx1 = _mm256_max_ps(mx1, s1);
  }
  const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
  const __m256 n0 = _mm256_max_ps(m0, mx0), n1 = _mm256_max_ps(m1, mx1);
  const __m256 b0 = _mm256_blendv_ps(n0, zero, _mm256_cmp_ps(n0, ninf, _CMP_EQ_OQ));
  const __m256 b1 = _mm256_blendv_ps(n1, zero, _mm256_cmp_ps(n1, ninf, _CMP_EQ_OQ));
  const __m256 a0 = exp2_256(_mm256_sub_ps(m0, b0)), a1 = exp2_256(_mm256_sub_ps(m1, b1));
  __m256 sum0 = zero, sum1 = zero;
  for (int c = 0; c < nk; ++c) {
    const __m256 p0 = exp2_256(_mm256_sub_ps(_mm256_loadu_ps(s + c * 16), b0));
    const __m256 p1 = exp2_256(_mm256_sub_ps(_mm256_loadu_ps(s + c * 16 + 8), b1));
    _mm256_storeu_ps(s + c * 16, p0);
    _mm256_storeu_ps(s + c * 16 + 8, p1);
    sum0 = _mm256_add_ps(sum0, p0);
    sum1 = _mm256_add_ps(sum1, p1);
  }
  _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), a0, sum0));
  _mm256_storeu_ps(l + 8, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8), a1, sum1));
  _mm256_storeu_ps(m, n0);
  _mm256_storeu_ps(m + 8, n1);
  _mm256_storeu_ps(alpha, a0);
  _mm256_storeu_ps(alpha + 8, a1);
}

template <int E>
__attribute__((target("avx2,fma"))) inline void pv_group256(float* o, const float* const* vrows, int64_t e0,
                                                            const Run* runs, int nruns, const float* p, __m256 a0,
                                                            __m256 a1) {
  __m256 acc0[E], acc1[E];
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e) {
    acc0[e] = _mm256_mul_ps(_mm256_loadu_ps(o + e * 16), a0);
    acc1[e] = _mm256_mul_ps(_mm256_loadu_ps(o + e * 16 + 8), a1);
  }
  for (int r = 0; r < nruns; ++r) {
    const int live = runs[r].live;
    for (int c = runs[r].begin; c < runs[r].end; ++c) {
      const __m256 p0 = _mm256_loadu_ps(p + c * 16), p1 = _mm256_loadu_ps(p + c * 16 + 8);
      const float* vr = vrows[c] + e0;
      if (live == 3) {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) {
          const __m256 vv = _mm256_broadcast_ss(vr + e);
          acc0[e] = _mm256_fmadd_ps(vv, p0, acc0[e]);
          acc1[e] = _mm256_fmadd_ps(vv, p1, acc1[e]);
        }
      } else if (live == 1) {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) acc0[e] = _mm256_fmadd_ps(_mm256_broadcast_ss(vr + e), p0, acc0[e]);
      } else {
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e) acc1[e] = _mm256_fmadd_ps(_mm256_broadcast_ss(vr + e), p1, acc1[e]);
      }
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e) {
    _mm256_storeu_ps(o + e * 16, acc0[e]);
    _mm256_storeu_ps(o + e * 16 + 8, acc1[e]);
  }
}

__attribute__((target("avx2,fma"))) void pv_avx2(float* o, int64_t Dv, const float* const* vrows, const Run* runs,
                                                 int nruns, const float* p, const float* alpha) {
  const __m256 a0 = _mm256_loadu_ps(alpha), a1 = _mm256_loadu_ps(alpha + 8);
  int64_t e = 0;
  for (; e + 6 <= Dv; e += 6) pv_group256<6>(o + e * 16, vrows, e, runs, nruns, p, a0, a1);
  float* oe = o + e * 16;
  switch (Dv - e) {
    case 5: pv_group256<5>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 4: pv_group256<4>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 3: pv_group256<3>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 2: pv_group256<2>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    case 1: pv_group256<1>(oe, vrows, e, runs, nruns, p, a0, a1); break;
    default: break;
  }
}
#endif  // EFFC_X86

struct Kernels {
  int lanes = kScalarLanes;
  void (*qk)(const float*, int64_t, const float* const*, int, const uint8_t*, float*) = qk_scalar;
  void (*softmax)(float*, int, const uint32_t*, float*, float*, float*) = softmax_scalar;
  void (*pv)(float*, int64_t, const float* const*, const Run*, int, const float*, const float*) = pv_scalar;
};

Kernels kernels_for(int isa) {
  Kernels k;
#ifdef EFFC_X86
  if (isa == kAvx512) {
    k.lanes = 32, k.qk = qk_avx512, k.softmax = softmax_avx512, k.pv = pv_avx512;
  } else if (isa == kAvx2) {
    k.lanes = 16, k.qk = qk_avx2, k.softmax = softmax_avx2, k.pv = pv_avx2;
  }
#endif
  return k;
}

// ---- masks: which lanes of a tile may see key j ---------------------------------------------------

inline bool key_valid(const Problem& P, int64_t b, int64_t j) {
  return !P.valid || P.valid[b * P.valid_stride + j];
}

// Lanes of a regular tile whose position lies in [a, b].
inline uint32_t lanes_between(const Problem& P, const Tile& t, int64_t a, int64_t b) {
  if (b < t.p0) return 0;
  const int64_t lo = a <= t.p0 ? 0 : (P.qs == 1 ? a - t.p0 : (a - t.p0 + P.qs - 1) / P.qs);
  const int64_t hi = std::min<int64_t>(t.nq - 1, P.qs == 1 ? b - t.p0 : (b - t.p0) / P.qs);
  return lane_bits(lo, hi);
}

// Lanes at or after key j (causal), any tile (positions ascending).
inline uint32_t lanes_from(const Tile& t, int64_t j) {
  int lo = 0;
  while (lo < t.nq && t.pos[lo] < j) ++lo;
  return lane_bits(lo, t.nq - 1);
}

// The tile's lanes grouped by layout row block (positions ascending: runs).
void layout_segments(const Problem& P, const Tile& t, Work& w) {
  w.nseg = 0;
  w.cached_kb = -1;
  if (!P.layout) return;
  for (int k = 0; k < t.nq; ++k) {
    const int64_t rb = t.pos[k] / P.block;
    if (w.nseg == 0 || w.seg_rb[w.nseg - 1] != rb) {
      w.seg_rb[w.nseg] = rb;
      w.seg_bits[w.nseg++] = 0;
    }
    w.seg_bits[w.nseg - 1] |= 1u << k;
  }
}

inline uint32_t layout_lanes(const Problem& P, Work& w, int64_t kb) {
  if (kb != w.cached_kb) {
    uint32_t bits = 0;
    for (int g = 0; g < w.nseg; ++g)
      if (P.layout[w.seg_rb[g] * P.layout_cols + kb]) bits |= w.seg_bits[g];
    w.cached_kb = kb, w.cached_bits = bits;
  }
  return w.cached_bits;
}

uint32_t key_mask(const Problem& P, const Tile& t, Work& w, int pass, int64_t b, int64_t j) {
  const uint32_t live = lane_bits(0, t.nq - 1);
  if (!key_valid(P, b, j)) return 0;
  if (pass == kDense) return P.causal ? lanes_from(t, j) : live;
  if (pass == kGlobals) return P.causal ? lanes_between(P, t, j, INT64_MAX) : live;
  if (!P.is_global.empty() && P.is_global[j]) return 0;  // the globals pass has it
  uint32_t m = 0;
  if (P.window > 0 && (P.qs == 1 || (j - t.p0) % P.qs == 0))
    m = P.causal ? lanes_between(P, t, j, j + P.span) : lanes_between(P, t, j - P.span, j + P.span);
  if (P.layout) m |= layout_lanes(P, w, j / P.block);
  if (P.causal) m &= lanes_between(P, t, j, INT64_MAX);
  return m & live;
}

// Whether every live lane may see every key of the chunk (sorted keys ks[0..nk)).
bool chunk_full(const Problem& P, const Tile& t, Work& w, int pass, int64_t b, const int32_t* ks, int nk) {
  const int64_t ja = ks[0], jb = ks[nk - 1];
  const int64_t pmin = t.pos[0], pmax = t.pos[t.nq - 1];
  if (P.causal && jb > pmin) return false;
  const bool globals = pass == kMain && !P.is_global.empty();
  if (P.valid || globals)
    for (int c = 0; c < nk; ++c)
      if (!key_valid(P, b, ks[c]) || (globals && P.is_global[ks[c]])) return false;
  if (pass != kMain) return true;
  // The band: keys of the chunk lie in [ja, jb], of the tile's residue unless layout keys joined them.
  if (P.window > 0 && (P.qs == 1 || !P.layout) && pmax - ja <= P.span && (P.causal || jb - pmin <= P.span))
    return true;
  if (!P.layout) return false;
  for (int64_t kb = ja / P.block; kb <= jb / P.block; ++kb)
    if (layout_lanes(P, w, kb) != lane_bits(0, t.nq - 1)) return false;
  return true;
}

// ---- a tile ---------------------------------------------------------------------------------------

void run_keys(const Kernels& kn, const Problem& P, const Tile& t, Work& w, int pass, int64_t b, const float* kb,
              const float* vb, const std::vector<int32_t>& keys) {
  const int64_t n = int64_t(keys.size());
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int nk = int(std::min<int64_t>(kChunk, n - c0));
    const int32_t* ks = keys.data() + c0;
    const uint32_t* mask = nullptr;
    if (!chunk_full(P, t, w, pass, b, ks, nk)) {
      uint32_t any = 0;
      if (pass == kMain && P.qs == 1 && !P.layout && !P.valid && P.is_global.empty()) {
        // The plain band (the common case): lanes p0 + k with j <= p0 + k <= j + span (causal) or
        // |p0 + k - j| <= span, an interval per key.
        const int64_t below = P.causal ? 0 : P.span, last = t.nq - 1;
        for (int c = 0; c < nk; ++c) {
          const int64_t j = ks[c] - t.p0;
          any |= w.mask[c] = lane_bits(std::max<int64_t>(0, j - below), std::min<int64_t>(last, j + P.span));
        }
      } else {
        for (int c = 0; c < nk; ++c) any |= w.mask[c] = key_mask(P, t, w, pass, b, ks[c]);
      }
      if (!any) continue;
      mask = w.mask;
    }
    for (int c = 0; c < nk; ++c) {
      w.rows[c] = kb + int64_t(ks[c]) * P.D;
      w.vrows[c] = vb + int64_t(ks[c]) * P.Dv;
    }
    for (int c = nk; c < nk + kPad; ++c) w.rows[c] = w.rows[nk - 1];
    int nruns = 0;
    if (mask) {
      const uint32_t low = lane_bits(0, kn.lanes / 2 - 1), high = lane_bits(kn.lanes / 2, kn.lanes - 1);
      for (int c = 0; c < nk; ++c) {
        const int lv = (mask[c] & low ? 1 : 0) | (mask[c] & high ? 2 : 0);
        w.live[c] = uint8_t(lv);
        if (!lv) continue;
        if (nruns && w.runs[nruns - 1].end == c && w.runs[nruns - 1].live == lv)
          ++w.runs[nruns - 1].end;
        else
          w.runs[nruns++] = Run{c, c + 1, lv};
      }
    } else {
      w.runs[nruns++] = Run{0, nk, 3};
    }
    kn.qk(w.qt.data(), P.D, w.rows, nk, mask ? w.live : nullptr, w.s.data());
    kn.softmax(w.s.data(), nk, mask, w.m, w.l, w.alpha);
    kn.pv(w.o.data(), P.Dv, w.vrows, w.runs, nruns, w.s.data(), w.alpha);
  }
}

void attend_tile(const Kernels& kn, const Problem& P, const Tile& t, Work& w, int64_t b, int64_t n) {
  const int L = kn.lanes;
  const int64_t h = n / P.rep, first = P.T - P.S;
  const int64_t pmin = t.pos[0], pmax = t.pos[t.nq - 1];
  if (!t.dense && !P.is_global.empty()) {  // skip a tile whose rows all belong to dense tiles
    bool any = false;
    for (int k = 0; k < t.nq && !any; ++k) any = !P.is_global[t.pos[k]];
    if (!any) return;
  }
  const float* q = P.q + (b * P.N + n) * P.S * P.D;
  const float* kb = P.k + (b * P.KV + h) * P.T * P.D;
  const float* vb = P.v + (b * P.KV + h) * P.T * P.Dv;
  for (int k = 0; k < L; ++k) {
    const float* row = q + (t.pos[std::min(k, t.nq - 1)] - first) * P.D;
    const float sc = k < t.nq ? P.qscale : 0.f;
    for (int64_t d = 0; d < P.D; ++d) w.qt[d * L + k] = row[d] * sc;
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m, w.m + kMaxLanes, kNegInf);
  std::fill(w.l, w.l + kMaxLanes, 0.f);

  if (t.dense) {
    const int64_t last = P.causal ? pmax : P.T - 1;
    w.keys.resize(last + 1);
    for (int64_t j = 0; j <= last; ++j) w.keys[j] = int32_t(j);
    run_keys(kn, P, t, w, kDense, b, kb, vb, w.keys);
  } else {
    layout_segments(P, t, w);
    w.band.clear();
    if (P.window > 0) {
      int64_t lo = pmin - P.span, hi = std::min(P.T - 1, P.causal ? pmax : pmax + P.span);
      const int64_t step = P.qs;
      if (lo < 0) lo += (-lo + step - 1) / step * step;  // the first key >= 0 of the tile's residue
      for (int64_t j = lo; j <= hi; j += step) w.band.push_back(int32_t(j));
    }
    const std::vector<int32_t>* keys = &w.band;
    if (P.layout) {
      w.extra.clear();
      const int64_t last = P.causal ? pmax : P.T - 1;
      for (int64_t kbk = 0; kbk * P.block <= last; ++kbk)
        if (layout_lanes(P, w, kbk))
          for (int64_t j = kbk * P.block; j < std::min(last + 1, (kbk + 1) * P.block); ++j)
            w.extra.push_back(int32_t(j));
      w.keys.clear();
      std::set_union(w.band.begin(), w.band.end(), w.extra.begin(), w.extra.end(), std::back_inserter(w.keys));
      keys = &w.keys;
    }
    run_keys(kn, P, t, w, kMain, b, kb, vb, *keys);
    if (!P.globals.empty()) {
      w.extra.clear();
      for (const int32_t j : P.globals)
        if (!P.causal || j <= pmax) w.extra.push_back(j);
      run_keys(kn, P, t, w, kGlobals, b, kb, vb, w.extra);
    }
  }

  for (int k = 0; k < t.nq; ++k) {
    if (!t.dense && !P.is_global.empty() && P.is_global[t.pos[k]]) continue;  // its dense tile writes it
    float* out = P.out + ((b * P.N + n) * P.S + (t.pos[k] - first)) * P.Dv;
    const float inv = w.l[k] > 0.f ? 1.f / w.l[k] : 0.f;  // no key allowed: 0
    for (int64_t e = 0; e < P.Dv; ++e) out[e] = w.o[e * L + k] * inv;
  }
}

std::vector<Tile> make_tiles(const Problem& P, int L) {
  std::vector<Tile> tiles;
  const int64_t first = P.T - P.S;
  // Query rows that are global tokens: packed into dense tiles (first, as they are the longest).
  std::vector<int32_t> rows;
  for (const int32_t g : P.globals)
    if (g >= first) rows.push_back(g);
  for (size_t r0 = 0; r0 < rows.size(); r0 += L) {
    Tile t{};
    t.dense = true;
    t.nq = int(std::min<size_t>(L, rows.size() - r0));
    for (int k = 0; k < t.nq; ++k) t.pos[k] = rows[r0 + k];
    t.p0 = t.pos[0];
    tiles.push_back(t);
  }
  // Every query, by residue of its position modulo qs, L lanes at a time.
  for (int64_t r = 0; r < P.qs; ++r) {
    int64_t p = first + ((r - first) % P.qs + P.qs) % P.qs;
    while (p < P.T) {
      Tile t{};
      t.dense = false;
      t.p0 = p;
      for (t.nq = 0; t.nq < L && p < P.T; ++t.nq, p += P.qs) t.pos[t.nq] = int32_t(p);
      tiles.push_back(t);
    }
  }
  return tiles;
}

// ---- the op ---------------------------------------------------------------------------------------

at::Tensor window_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& key_valid_t, int64_t window, bool causal,
                            int64_t dilation, at::OptionalIntArrayRef global_tokens, int64_t block,
                            const std::optional<at::Tensor>& layout_t, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "window_attention: query, key, value must be [B, N, S, D], [B, KV, T, D], [B, KV, T, Dv]");
  const int64_t B = query.size(0), N = query.size(1), S = query.size(2), D = query.size(3);
  const int64_t KV = key.size(1), T = key.size(2), Dv = value.size(3);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && key.size(3) == D && value.size(1) == KV &&
                  value.size(2) == T,
              "window_attention: query ", query.sizes(), ", key ", key.sizes(), " and value ", value.sizes(),
              " do not agree");
  TORCH_CHECK(KV > 0 && N % KV == 0, "window_attention: ", N, " query heads cannot share ", KV, " key/value heads");
  TORCH_CHECK(S <= T, "window_attention: the ", S, " queries must be the last of the ", T, " keys");
  TORCH_CHECK(T < (int64_t(1) << 31), "window_attention: too many keys");
  TORCH_CHECK(window >= 0, "window_attention: window must be >= 0");
  TORCH_CHECK(window == 0 || dilation >= 1, "window_attention: dilation must be >= 1");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "window_attention: query must be floating point");
  at::Tensor out = at::empty({B, N, S, Dv}, query.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(dtype);

  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor k = key.to(at::kFloat).contiguous();
  const at::Tensor v = value.to(at::kFloat).contiguous();
  at::Tensor kv_mask, lay;
  Problem P;
  P.q = q.data_ptr<float>(), P.k = k.data_ptr<float>(), P.v = v.data_ptr<float>(), P.out = out.data_ptr<float>();
  P.B = B, P.N = N, P.S = S, P.T = T, P.D = D, P.Dv = Dv, P.KV = KV, P.rep = N / KV;
  if (key_valid_t.has_value()) {
    kv_mask = key_valid_t->to(at::kBool).contiguous();
    TORCH_CHECK(kv_mask.dim() == 2 && kv_mask.size(1) == T && (kv_mask.size(0) == B || kv_mask.size(0) == 1),
                "window_attention: key_valid must be [B, T], got ", kv_mask.sizes());
    P.valid = kv_mask.data_ptr<bool>();
    P.valid_stride = kv_mask.size(0) == 1 ? 0 : T;
  }
  P.window = window, P.causal = causal, P.dilation = window > 0 ? dilation : 1;
  // (window - 1) * dilation, capped beyond every distance (kept a multiple of the dilation).
  P.span = window == 0 ? 0 : (window - 1 > 2 * T / P.dilation ? (2 * T / P.dilation + 1) * P.dilation
                                                               : (window - 1) * P.dilation);
  P.qs = P.dilation;
  if (global_tokens.has_value())
    for (const int64_t g : *global_tokens)
      if (g >= 0 && g < T) P.globals.push_back(int32_t(g));
  std::sort(P.globals.begin(), P.globals.end());
  P.globals.erase(std::unique(P.globals.begin(), P.globals.end()), P.globals.end());
  if (!P.globals.empty()) {
    P.is_global.assign(T, 0);
    for (const int32_t g : P.globals) P.is_global[g] = 1;
  }
  if (layout_t.has_value()) {
    TORCH_CHECK(block >= 1, "window_attention: block must be >= 1 with a layout");
    lay = layout_t->to(at::kBool).contiguous();
    const int64_t blocks = (T - 1) / block + 1;
    TORCH_CHECK(lay.dim() == 2 && lay.size(0) >= blocks && lay.size(1) >= blocks, "window_attention: layout ",
                lay.sizes(), " does not cover ", T, " positions in blocks of ", block);
    P.layout = lay.data_ptr<bool>();
    P.block = block, P.layout_cols = lay.size(1);
  }
  P.qscale = float(scale * kLog2e);

  const Kernels kn = kernels_for(library_isa());
  const std::vector<Tile> tiles = make_tiles(P, kn.lanes);
  const int64_t per_head = int64_t(tiles.size()), tasks = B * N * per_head;
  // Tasks (batch, head, tile) are handed out a few consecutive ones at a time: tiles differ in cost (dense
  // rows, the first rows of a causal band), so a static split would leave a thread idle, and neighbouring
  // tiles of a head share most of their keys, which then stay in the thread's cache.
  const int64_t grab = std::clamp<int64_t>(tasks / (int64_t(at::get_num_threads()) * 16), 1, 8);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Work w;
    w.qt.assign(std::max<int64_t>(D, 1) * kn.lanes, 0.f);
    w.o.assign(std::max<int64_t>(Dv, 1) * kn.lanes, 0.f);
    w.s.assign((kChunk + kPad) * kn.lanes, 0.f);
    for (int64_t first; (first = next.fetch_add(grab, std::memory_order_relaxed)) < tasks;)
      for (int64_t task = first; task < std::min(tasks, first + grab); ++task) {
        const int64_t bn = task / per_head;
        attend_tile(kn, P, tiles[task % per_head], w, bn / N, bn % N);
      }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effc_native, m) {
  m.def("window_attention(Tensor query, Tensor key, Tensor value, Tensor? key_valid, SymInt window, bool causal, "
        "SymInt dilation, SymInt[]? global_tokens, SymInt block, Tensor? layout, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(effc_native, CPU, m) { m.impl("window_attention", &window_attention); }
