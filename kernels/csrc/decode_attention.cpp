// depthserve::decode_attention: attention of the decode rows (one query each) over their paged KV context,
// reading every K/V row in place through the block table (no gather copy of the context per layer).
//
//   out = decode_attention(q [B, H, hd], k_cache [S, KV, hd], v_cache [S, KV, hd], block_table [B, nb] long,
//                          context_lens [B] int32, block_size, scale) -> [B, H, hd] in q's dtype
//
// Position t of row b lives in slot block_table[b, t / block_size] * block_size + t % block_size; positions
// [0, context_lens[b]) are attended (this step's token included, already written). GQA: query head h reads kv
// head h / (H / KV). fp32 and bf16 (q and caches of one dtype); everything is computed in fp32 and the result
// is cast once, as SDPA's CPU kernels do. Any strides (the head dim's included).
//
// The work item is (row, context partition), all heads. The context is walked in tiles of kTile positions;
// within a tile one KV head at a time, its G = H / KV query heads together (up to Isa::NG per pass), so each
// K/V element is loaded, and converted from bf16, once per pass and used by every head of the pass:
//   1. scores s[g][t] = q_g . k_t of the whole tile, NT positions at a time (NG x NT register accumulators,
//      reduced by one horizontal-add tree per head);
//   2. one online-softmax step per head and tile (running max m, sum l): a vectorised 2^x over the tile's
//      scores (the query is pre-scaled by log2 e, so scores are in log2 units), and one rescale of the
//      unnormalised output acc per tile rather than per position (none while the max stands);
//   3. acc[g] = acc[g] * corr_g + sum_t p[g][t] v_t, NG heads x DV vectors of acc in registers.
// K/V rows are read straight from the cache when their head dim is contiguous and a multiple of the vector
// width; otherwise a tile's rows are first copied into zero-padded fp32 rows (any head-dim stride, and the
// kernels never read past a row). The next tile's rows are prefetched while a tile is computed (Ahead), and
// the last tile of a work item prefetches the first of the thread's next item.
//
// Cost: a position is 2 x H x hd multiply-adds (SmolLM2, H 9 x hd 64: 144 8-wide FMAs, ~26 ns at 2.8 GHz and
// 2 FMAs a cycle, or 72 16-wide ones) for 2 x KV x hd elements read. With the context in L1/L2 the op is bound
// by its FMAs (about 44-65 ns a position on the Zen 3 this was tuned on, 1 thread; ~23 ns with AVX-512 on a
// Zen 5); read from DRAM, as 30 layers' caches are at long contexts, fp32 is bound by the memory (a position is
// 1.5 KB) and bf16 by both.
//
// Threads: the work is one pass on the calling thread when it is small (an OpenMP region costs several µs, as
// much as a short context's whole attention). Otherwise contexts are cut into partitions so that there are
// about 8 items per thread (none shorter than kMinPartition): at batch 1 the context is split, and the
// partitions are merged afterwards by their (m, l, acc) (flash-decoding split-K); with many rows none is. The
// threads take items dynamically, longest rows first, so that mixed context lengths balance.
// at::parallel_for is OpenMP in this torch build and its parallel region is compiled into this file, so build
// with -fopenmp in the compile AND link flags (the extension then uses torch's own libgomp). Without it the op
// still works, on one thread; the compiler says so below.
//
// ISA: one vector ISA chosen at compile time (Isa below, as in linear.cpp): AVX-512 (16 lanes, 32 registers:
// 3 heads x 8 positions per score call, hd 64 in one accumulate pass), else AVX2 (8 lanes, 16 registers:
// 3 x 4), else a scalar Isa of the AVX2 shape. On a Zen 5 (full-width AVX-512, 2 cores shared with other work;
// SmolLM2's shape, bf16, batch 32, context 256, 1 thread) the AVX-512 kernels take the op from ~355 to ~195 µs
// with one cache hot in L2/L3 (--layers 1; the AVX2 kernels take ~260 µs built for x86-64-v3, ~355 in a
// -march=native build) and, with the next item's first tile prefetched, from ~580 to ~330 µs with 30 layers'
// caches read from DRAM (--layers 30, where the misses decide; 2 threads: ~300 to ~200 µs); batch 1, context
// 2048, 30 layers: ~120 to ~90 µs (2 threads: ~90 to ~45 µs):
//   python -m loadtest.bench_decode_attention --batch 32 --context 256 --dtype bfloat16 --threads 1 --layers 30
// vdpbf16ps for bf16 q . k (exact products, no conversion of K) was ~10% faster hot but ~10% slower from DRAM.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("depthserve decode_attention: built without -fopenmp, at::parallel_for runs on one thread")
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "avx512.h"
#include "common.h"
#include "fused.h"

#ifndef DS_ATTN_LIBRARY  // the op namespace: experiments load several builds side by side
#define DS_ATTN_LIBRARY depthserve
#endif

namespace depthserve {
namespace {

// Cephes' exp2f polynomial for 2^f, |f| <= 1/2, highest power first (Horner): both vector Isas' exp2_nonpos
constexpr float kExp2Poly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                               5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};

#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  static constexpr int W = 16;  // fp32 lanes
  static constexpr int NG = 3;  // query heads per pass
  static constexpr int NT = 8;  // positions per score call: 3 x 8 accumulators + 3 q + 1 k = 28 of 32 registers
  static constexpr int DV = 4;  // acc vectors per head in registers (hd 64 in one go): 3 x 4 + 3 p + 1 v = 16
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16_t* p) { return bf16x16_load(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V pin(V x) {  // as the AVX2 one; "v": any of the 32 registers ("x" is only the first 16)
    asm("" : "+v"(x));
    return x;
  }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // out[0..8) = the lane sums of c[0..8): a transposing tree (each step adds two vectors' halves, so 8 rows
  // take 16 shuffles and 8 adds, where reducing each row alone would take 8 x 8)
  static void sums(const V* c, float* out) {
    V h[4], q[2];
    for (int i = 0; i < 4; ++i)  // 128-bit quarters: [a0+a2, a1+a3, b0+b2, b1+b3]
      h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xee));
    for (int i = 0; i < 2; ++i)  // quarter j: row 4i + j's 4 partial sums
      q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xdd));
    // quarter j: [r_j 0+1, r_j 2+3, r_4+j 0+1, r_4+j 2+3], then [r_j, r_j, r_4+j, r_4+j]
    V x = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], 0x88), _mm512_shuffle_ps(q[0], q[1], 0xdd));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xb1));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, x)));
  }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float hmax(V x) { return _mm512_reduce_max_ps(x); }
  static float hsum(V x) { return _mm512_reduce_add_ps(x); }
  // the AVX2 exp2_nonpos, 16 lanes (the same steps, so the same results)
  static V exp2_nonpos(V x) {
    const V lo = _mm512_set1_ps(-126.f);
    const V xc = _mm512_max_ps(x, lo);
    const V k = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(xc, k);
    V y = _mm512_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 7; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2Poly[i]));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), y, _mm512_castsi512_ps(e));
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Isa {
  using V = __m256;
  static constexpr int W = 8;   // fp32 lanes
  static constexpr int NG = 3;  // query heads per pass
  static constexpr int NT = 4;  // positions per score call: 3 x 4 accumulators + 3 q + 1 k = 16 registers
  static constexpr int DV = 4;  // acc vectors per head in registers: 3 x 4 + 3 p + 1 v = 16
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  // x, held in a register: with all 16 in use gcc otherwise re-loads a vector once per FMA that reads it
  // (folded memory operands), which made the score loop load-bound at ~1.7x its FMA time.
  static V pin(V x) {
    asm("" : "+x"(x));
    return x;
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // out[0..4) = the lane sums of c[0..4): one horizontal-add tree for all four
  static void sums(const V* c, float* out) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(c[0], c[1]), _mm256_hadd_ps(c[2], c[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hmax(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float hsum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // 2^x for x <= 0 (scores, in log2 units, minus their running max): x = k + f with |f| <= 1/2, Cephes'
  // exp2f polynomial for 2^f, 2^k built in the exponent bits; within 2 ulp of std::exp2, 0 below -126 (where
  // 2^x leaves the normal floats), NaN stays NaN.
  static V exp2_nonpos(V x) {
    const V lo = _mm256_set1_ps(-126.f);
    const V xc = _mm256_max_ps(x, lo);
    const V k = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(xc, k);
    V y = _mm256_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 7; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const V under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
};
#else
struct Isa {  // one lane, the same tiling
  using V = float;
  static constexpr int W = 1;
  static constexpr int NG = 3;
  static constexpr int NT = 4;
  static constexpr int DV = 4;
  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const bf16_t* p) { return to_f(*p); }
  static void store(float* p, V x) { *p = x; }
  static V pin(V x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static void sums(const V* c, float* out) { std::copy(c, c + NT, out); }
  static V max(V a, V b) { return std::max(a, b); }
  static float hmax(V x) { return x; }
  static float hsum(V x) { return x; }
  static V exp2_nonpos(V x) { return std::exp2(x); }
};
#endif

using V = Isa::V;
constexpr int64_t kW = Isa::W;
constexpr int64_t kPad = std::max<int64_t>(kW, Isa::NT);  // a tile's rows are padded to a multiple of this
constexpr int64_t kTile = 32;              // context positions per online-softmax step (a multiple of kPad)
constexpr int64_t kMinPartition = 64;      // split-K: no partition shorter than this many positions
constexpr int64_t kSerialWork = 1 << 18;   // below this many q.k multiply-adds, one thread does it all
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct Problem {
  const T* q;
  int64_t q_sb, q_sh, q_sd;
  const T* k;
  const T* v;
  int64_t k_ss, k_sh, k_sd, v_ss, v_sh, v_sd;
  const int64_t* table;
  int64_t t_sb, t_sn;  // block_table strides
  const int32_t* lens;
  int64_t H, KV, G, hd, hdp, bs;
  float scale;
  bool copy;  // K/V rows go through zero-padded fp32 copies (hd % kW != 0, or a strided head dim)
};

// 64-byte aligned storage: a 32-byte load that straddles two cache lines costs two (~1.5x on the score loop
// in isolation with 16-byte aligned query rows, as std::vector's may be).
template <typename T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned<U>&) const { return true; }
};
using Floats = std::vector<float, Aligned<float>>;

// Per-thread scratch (thread_local, so that a call allocates nothing once a thread has seen the shape):
// every query head's scaled query and online-softmax state, a pass's scores, and the copied rows.
struct Scratch {
  Floats qf, acc, m, l, kbuf, vbuf;
  alignas(64) float s[Isa::NG * kTile];
  void fit(int64_t H, int64_t hdp, bool copy) {
    if (static_cast<int64_t>(qf.size()) < H * hdp) {
      qf.resize(H * hdp);
      acc.resize(H * hdp);
    }
    if (static_cast<int64_t>(m.size()) < H) {
      m.resize(H);
      l.resize(H);
    }
    if (copy && static_cast<int64_t>(kbuf.size()) < kTile * hdp) {
      kbuf.assign(kTile * hdp, 0.f);  // the padding lanes stay 0
      vbuf.assign(kTile * hdp, 0.f);
    }
  }
};

Scratch& scratch(int64_t H, int64_t hdp, bool copy) {
  thread_local Scratch w;
  w.fit(H, hdp, copy);
  return w;
}

// The next tile's K/V rows of the KV head being worked on, asked for a few at a time while the current tile is
// computed: its K rows along with the scores (NT positions per call), its V rows along with the first pass over
// V (one per position). The blocks are scattered, so the hardware prefetchers lose the stream at every block
// boundary; and a whole tile's prefetches at once (~750 lines in fp32) overflow the miss buffers, most of them
// lost. When the context comes from DRAM (30 layers of caches do not stay in L3) this paced prefetch reads bf16
// ~1.5x faster and keeps fp32 at the bandwidth of plain reads; on a context already in L2 its instructions cost
// ~10% (fp32), ~5% (bf16).
struct Ahead {
  const char* k[kTile];  // slot rows
  const char* v[kTile];
  int64_t n = 0, bytes = 0, koff = 0, voff = 0;  // rows, bytes per row, the KV head's byte offsets
  // gcc deems a function of nothing but __builtin_prefetch free of side effects and drops its calls (the
  // earlier version of this kernel never prefetched): the empty volatile asm keeps them.
  void k_rows(int64_t t) const {
    asm volatile("");
    for (int64_t i = t; i < std::min<int64_t>(t + Isa::NT, n); ++i)
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(k[i] + koff + off);
  }
  void v_row(int64_t i) const {
    asm volatile("");
    if (i < n)
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(v[i] + voff + off);
  }
};

// s[g * kTile + t] = q_g . k_t for NG heads (query rows hdp apart) and Isa::NT positions. Forced inline (as
// is accumulate): called out of line, its set-up per call (zeroing a stack copy of the accumulators) cost ~10%.
template <int NG, typename E>
[[gnu::always_inline]] inline void scores(const float* q, int64_t hdp, const E* const* k, int64_t koff, float* s) {
  constexpr int NT = Isa::NT;
  V c[NG][NT];
  for (int g = 0; g < NG; ++g)
    for (int t = 0; t < NT; ++t) c[g][t] = Isa::zero();
  for (int64_t d = 0; d < hdp; d += kW) {
    V qv[NG];
    for (int g = 0; g < NG; ++g) qv[g] = Isa::pin(Isa::load(q + g * hdp + d));
    for (int t = 0; t < NT; ++t) {
      const V kv = Isa::pin(Isa::load(k[t] + koff + d));
      for (int g = 0; g < NG; ++g) c[g][t] = Isa::fma(qv[g], kv, c[g][t]);
    }
  }
  for (int g = 0; g < NG; ++g) Isa::sums(c[g], s + g * kTile);
}

// acc_g[d, d + DV kW) = acc_g * corr[g] + sum_{t < n} p[g * kTile + t] * v_t[...] for NG heads.
template <int NG, int DV, typename E>
[[gnu::always_inline]] inline void accumulate(float* acc, int64_t hdp, const float* corr, const float* p, const E* const* v,
                       int64_t voff, int64_t n, int64_t d, const Ahead* ahead) {
  V a[NG][DV];
  for (int g = 0; g < NG; ++g) {
    const V c = Isa::set1(corr[g]);
    for (int j = 0; j < DV; ++j) a[g][j] = Isa::mul(Isa::load(acc + g * hdp + d + j * kW), c);
  }
  for (int64_t t = 0; t < n; ++t) {
    if (ahead != nullptr) ahead->v_row(t);
    V pb[NG];
    for (int g = 0; g < NG; ++g) pb[g] = Isa::set1(p[g * kTile + t]);
    const E* vt = v[t] + voff + d;
    for (int j = 0; j < DV; ++j) {
      const V x = Isa::pin(Isa::load(vt + j * kW));
      for (int g = 0; g < NG; ++g) a[g][j] = Isa::fma(pb[g], x, a[g][j]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < DV; ++j) Isa::store(acc + g * hdp + d + j * kW, a[g][j]);
}

// One tile (n positions; k/v hold round_up(n, kPad) row pointers, the extra ones repeating the last real
// row, so their scores repeat a real one and the max over all is the max over the real ones) for the NG query
// heads from qh: scores, the online-softmax step, the weighted sum of V.
template <int NG, typename E>
inline void tile_pass(Scratch& w, int64_t qh, int64_t hdp, const E* const* k, int64_t koff, const E* const* v,
                      int64_t voff, int64_t n, const Ahead* ahead) {
  float* s = w.s;
  const float* q = w.qf.data() + qh * hdp;
  const int64_t np = round_up(n, kPad);
  for (int64_t t = 0; t < np; t += Isa::NT) {
    if (ahead != nullptr) ahead->k_rows(t);
    scores<NG>(q, hdp, k + t, koff, s + t);
  }
  float corr[NG];
  for (int g = 0; g < NG; ++g) {
    float* sg = s + g * kTile;
    V mx = Isa::load(sg);
    for (int64_t t = kW; t < np; t += kW) mx = Isa::max(mx, Isa::load(sg + t));
    const float m_old = w.m[qh + g], m_new = std::max(m_old, Isa::hmax(mx));
    corr[g] = m_new == m_old ? 1.f : std::exp2(m_old - m_new);  // 0 on the first tile (m = -inf)
    const V mv = Isa::set1(m_new);
    std::fill(sg + n, sg + np, kNegInf);  // the repeated rows weigh nothing
    V sum = Isa::zero();
    for (int64_t t = 0; t < np; t += kW) {
      const V e = Isa::exp2_nonpos(Isa::sub(Isa::load(sg + t), mv));
      Isa::store(sg + t, e);
      sum = Isa::add(sum, e);
    }
    w.m[qh + g] = m_new;
    w.l[qh + g] = w.l[qh + g] * corr[g] + Isa::hsum(sum);
  }
  float* acc = w.acc.data() + qh * hdp;
  int64_t d = 0;
  for (; d + Isa::DV * kW <= hdp; d += Isa::DV * kW, ahead = nullptr)
    accumulate<NG, Isa::DV>(acc, hdp, corr, s, v, voff, n, d, ahead);
  for (; d < hdp; d += kW, ahead = nullptr) accumulate<NG, 1>(acc, hdp, corr, s, v, voff, n, d, ahead);
}

// The G query heads of one KV head over one tile, NG at a time (the first pass prefetches).
static_assert(Isa::NG == 3, "tile_group splits a group into passes of 3, then 2 or 1");
template <typename E>
inline void tile_group(Scratch& w, int64_t qh0, int64_t G, int64_t hdp, const E* const* k, int64_t koff,
                       const E* const* v, int64_t voff, int64_t n, const Ahead* ahead) {
  int64_t g = 0;
  for (; g + 3 <= G; g += 3, ahead = nullptr) tile_pass<3>(w, qh0 + g, hdp, k, koff, v, voff, n, ahead);
  if (G - g == 2) tile_pass<2>(w, qh0 + g, hdp, k, koff, v, voff, n, ahead);
  if (G - g == 1) tile_pass<1>(w, qh0 + g, hdp, k, koff, v, voff, n, ahead);
}

// n elements, `stride` apart, in fp32
template <typename T>
inline void copy_row(const T* src, int64_t stride, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i * stride]);
}

// Cache slots of positions [t0, t0 + n) of a row, padded to a multiple of kPad with the last one.
template <typename T>
inline int64_t tile_slots(const Problem<T>& p, const int64_t* blocks, int64_t t0, int64_t n, int64_t* slots) {
  int64_t j = t0 / p.bs, o = t0 % p.bs;
  int64_t base = blocks[j * p.t_sn] * p.bs;
  for (int64_t i = 0; i < n; ++i) {
    slots[i] = base + o;
    if (++o == p.bs && i + 1 < n) {
      o = 0;
      base = blocks[++j * p.t_sn] * p.bs;
    }
  }
  const int64_t np = round_up(n, kPad);
  for (int64_t i = n; i < np; ++i) slots[i] = slots[n - 1];
  return np;
}

// Context positions [begin, end) of a row.
struct Span {
  int64_t row = -1, begin = 0, end = 0;
};

// All H query heads of `row` over context positions [begin, end). Leaves the online-softmax state in w.m, w.l
// and w.acc (per query head, hdp apart, unnormalised). The last tile prefetches the first one of `next` (what
// this thread does next, if anything), or it would come as demand misses, a few at a time.
template <typename T>
void attend(const Problem<T>& p, int64_t row, int64_t begin, int64_t end, Span next, Scratch& w) {
  const int64_t H = p.H, G = p.G, hd = p.hd, hdp = p.hdp;
  const float scale = p.scale * 1.44269504088896341f;  // scores in log2 units: the softmax takes 2^x
  for (int64_t qh = 0; qh < H; ++qh) {  // the scaled queries in fp32, zero-padded
    const T* src = p.q + row * p.q_sb + qh * p.q_sh;
    float* qf = w.qf.data() + qh * hdp;
    if (p.q_sd == 1) {  // the usual case, as a loop gcc vectorises
      for (int64_t d = 0; d < hd; ++d) qf[d] = to_f(src[d]) * scale;
    } else {
      for (int64_t d = 0; d < hd; ++d) qf[d] = to_f(src[d * p.q_sd]) * scale;
    }
    std::fill(qf + hd, qf + hdp, 0.f);
  }
  std::fill(w.acc.begin(), w.acc.begin() + H * hdp, 0.f);
  std::fill(w.m.begin(), w.m.begin() + H, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + H, 0.f);

  const int64_t* blocks = p.table + row * p.t_sb;
  int64_t slots[kTile];
  const T* kr[kTile];
  const T* vr[kTile];
  Ahead ahead;
  ahead.bytes = p.hd * static_cast<int64_t>(sizeof(T));
  int64_t np = tile_slots(p, blocks, begin, std::min(kTile, end - begin), slots);
  for (int64_t i = 0; i < np; ++i) {
    kr[i] = p.k + slots[i] * p.k_ss;
    vr[i] = p.v + slots[i] * p.v_ss;
  }
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const bool last = t0 + n == end;
    ahead.n = !last ? std::min(kTile, end - t0 - n) : next.row >= 0 ? std::min(kTile, next.end - next.begin) : 0;
    if (ahead.n > 0) {
      if (last)
        tile_slots(p, p.table + next.row * p.t_sb, next.begin, ahead.n, slots);
      else
        tile_slots(p, blocks, t0 + n, ahead.n, slots);
      for (int64_t i = 0; i < ahead.n; ++i) {
        ahead.k[i] = reinterpret_cast<const char*>(p.k + slots[i] * p.k_ss);
        ahead.v[i] = reinterpret_cast<const char*>(p.v + slots[i] * p.v_ss);
      }
    }
    for (int64_t h = 0; h < p.KV; ++h) {
      ahead.koff = h * p.k_sh * static_cast<int64_t>(sizeof(T));
      ahead.voff = h * p.v_sh * static_cast<int64_t>(sizeof(T));
      if (!p.copy) {
        tile_group<T>(w, h * G, G, hdp, kr, h * p.k_sh, vr, h * p.v_sh, n, &ahead);
        continue;
      }
      const float* kb[kTile];
      const float* vb[kTile];
      for (int64_t i = 0; i < np; ++i) {
        float* kd = w.kbuf.data() + i * hdp;
        float* vd = w.vbuf.data() + i * hdp;
        copy_row(kr[i] + h * p.k_sh, p.k_sd, kd, hd);
        copy_row(vr[i] + h * p.v_sh, p.v_sd, vd, hd);
        kb[i] = kd;
        vb[i] = vd;
      }
      tile_group<float>(w, h * G, G, hdp, kb, 0, vb, 0, n, &ahead);
    }
    if (last) break;
    np = round_up(ahead.n, kPad);  // the next tile's rows (tile_slots padded them)
    for (int64_t i = 0; i < np; ++i) {
      kr[i] = p.k + slots[i] * p.k_ss;
      vr[i] = p.v + slots[i] * p.v_ss;
    }
  }
}

template <typename T>
inline void write_out(const Problem<T>& p, const Scratch& w, int64_t row, T* out) {
  for (int64_t qh = 0; qh < p.H; ++qh) {
    const float* acc = w.acc.data() + qh * p.hdp;
    const float inv = 1.f / w.l[qh];
    T* o = out + (row * p.H + qh) * p.hd;
    for (int64_t d = 0; d < p.hd; ++d) o[d] = from_f<T>(acc[d] * inv);
  }
}

// One unit of work: every head of `row` over context partition `part`.
struct Item {
  int32_t row, part;
};

// How the context rows are cut: row b has parts[b] partitions of part_len positions (the last one shorter);
// a row with several leaves partials at offset[b] (per query head, per partition) to be merged.
struct Plan {
  int64_t part_len = 0;
  std::vector<int64_t> parts, offset;
  std::vector<Item> items;  // longest rows first, so that the threads finish together
  int64_t n_partials = 0;
};

Plan make_plan(const int32_t* lens, int64_t B, int64_t H, int64_t threads) {
  Plan plan;
  int64_t max_len = 0, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_len = std::max<int64_t>(max_len, lens[b]);
    total += lens[b];
  }
  // About 8 items per thread (taken dynamically, so uneven rows still balance), none shorter than
  // kMinPartition positions: with many rows no row is split, at batch 1 each context is.
  const int64_t want = (total + 8 * threads - 1) / (8 * threads);
  plan.part_len = std::min<int64_t>(max_len, round_up(std::max(kMinPartition, want), kTile));
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lens[x] > lens[y]; });
  plan.parts.assign(B, 1);
  plan.offset.assign(B, -1);
  for (int64_t b = 0; b < B; ++b) {
    plan.parts[b] = (lens[b] + plan.part_len - 1) / plan.part_len;
    if (plan.parts[b] > 1) {
      plan.offset[b] = plan.n_partials;
      plan.n_partials += H * plan.parts[b];
    }
  }
  for (int64_t b : order)
    for (int64_t part = 0; part < plan.parts[b]; ++part)
      plan.items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(part)});
  return plan;
}

template <typename T>
void run_parallel(const Problem<T>& p, int64_t B, int64_t threads, T* out) {
  const int64_t H = p.H, hd = p.hd, hdp = p.hdp;
  const Plan plan = make_plan(p.lens, B, H, threads);
  // partials of split rows: running max, sum and unnormalised output per (row, query head, partition)
  std::vector<float> pm(plan.n_partials), pl(plan.n_partials), pacc(plan.n_partials * hdp);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  const auto span = [&](int64_t i) {
    if (i >= n_items) return Span{};
    const Item it = plan.items[i];
    const int64_t begin = it.part * plan.part_len;
    return Span{it.row, begin, std::min<int64_t>(begin + plan.part_len, p.lens[it.row])};
  };
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    Scratch& w = scratch(H, hdp, p.copy);
    for (int64_t i = next.fetch_add(1), j; i < n_items; i = j) {
      j = next.fetch_add(1);  // taken before item i runs, so that i's last tile prefetches j's first
      const Span it = span(i);
      const int64_t row = it.row, part = plan.items[i].part;
      attend(p, row, it.begin, it.end, span(j), w);
      if (plan.parts[row] == 1) {  // the whole context: normalise and write the output
        write_out(p, w, row, out);
        continue;
      }
      for (int64_t qh = 0; qh < H; ++qh) {
        const int64_t idx = plan.offset[row] + qh * plan.parts[row] + part;
        pm[idx] = w.m[qh];
        pl[idx] = w.l[qh];
        std::memcpy(pacc.data() + idx * hdp, w.acc.data() + qh * hdp, hdp * sizeof(float));
      }
    }
  });
  if (plan.n_partials == 0) return;
  // merge each split row's partitions (tiny next to the attention itself: one thread)
  std::vector<float> o(hdp);
  for (int64_t row = 0; row < B; ++row) {
    const int64_t parts = plan.parts[row];
    if (parts == 1) continue;
    for (int64_t qh = 0; qh < H; ++qh) {
      const int64_t base = plan.offset[row] + qh * parts;
      const float* m = pm.data() + base;
      const float* l = pl.data() + base;
      const float mmax = *std::max_element(m, m + parts);
      std::fill(o.begin(), o.end(), 0.f);
      float lsum = 0.f;
      for (int64_t k = 0; k < parts; ++k) {
        const float wk = std::exp2(m[k] - mmax);
        lsum += wk * l[k];
        const float* a = pacc.data() + (base + k) * hdp;
        for (int64_t d = 0; d < hd; ++d) o[d] += wk * a[d];
      }
      const float inv = 1.f / lsum;
      T* dst = out + (row * H + qh) * hd;
      for (int64_t d = 0; d < hd; ++d) dst[d] = from_f<T>(o[d] * inv);
    }
  }
}

template <typename T>
void run(const Problem<T>& p, int64_t B, T* out) {
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += p.lens[b];
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  if (threads > 1 && total * p.H * p.hd >= kSerialWork) {
    run_parallel(p, B, threads, out);
    return;
  }
  Scratch& w = scratch(p.H, p.hdp, p.copy);  // one pass per row on this thread: no plan, no partials
  for (int64_t row = 0; row < B; ++row) {
    attend(p, row, 0, p.lens[row], row + 1 < B ? Span{row + 1, 0, p.lens[row + 1]} : Span{}, w);
    write_out(p, w, row, out);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size,
                            double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "decode_attention: q [B, H, hd] and caches [slots, KV, hd]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode_attention: K and V caches differ in shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "decode_attention: q and the caches must have one dtype");
  const Kind kind = kind_of(q);
  TORCH_CHECK(kind != Kind::Other, "decode_attention: float32 or bfloat16 only, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t KV = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == hd, "decode_attention: head dims differ");
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(block_size > 0, "decode_attention: block_size must be positive");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B, "decode_attention: block_table [B, nb]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, "decode_attention: context_lens [B]");
  TORCH_CHECK(block_table.device().is_cpu() && context_lens.device().is_cpu(),
              "decode_attention: block_table and context_lens must be CPU tensors");
  at::Tensor out = at::empty({B, H, hd}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || hd == 0) return out;

  // read in place when already long / int32 (the engine's), converted otherwise
  const at::Tensor table = block_table.scalar_type() == at::kLong ? block_table : block_table.to(at::kLong);
  const at::Tensor lens_t =
      context_lens.scalar_type() == at::kInt && context_lens.is_contiguous() ? context_lens
                                                                              : context_lens.to(at::kInt).contiguous();
  const int64_t nb = table.size(1), t_sb = table.stride(0), t_sn = table.stride(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int32_t* lp = lens_t.data_ptr<int32_t>();
  fused::check_decode_context(k_cache, tp, t_sb, t_sn, nb, lp, B, block_size);  // nothing outside it is read

  with_type(kind, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hdp = round_up(hd, kW);
    const bool copy = hdp != hd || k_cache.stride(2) != 1 || v_cache.stride(2) != 1;
    const Problem<T> p{ptr<const T>(q), q.stride(0), q.stride(1), q.stride(2), ptr<const T>(k_cache),
                       ptr<const T>(v_cache), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                       v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tp, t_sb, t_sn, lp, H, KV, H / KV,
                       hd, hdp, block_size, static_cast<float>(scale), copy};
    run(p, B, ptr<T>(out));
  });
  return out;
}

}  // namespace

void fused::check_decode_context(const at::Tensor& k_cache, const int64_t* table, int64_t t_sb, int64_t t_sn,
                                 int64_t nb, const int32_t* lens, int64_t B, int64_t block_size) {
  const int64_t S = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 1 && len <= nb * block_size, "decode_attention: context_lens[", b, "] = ", len,
                " outside [1, ", nb * block_size, "]");
    for (int64_t j = 0; j * block_size < len; ++j) {
      const int64_t id = table[b * t_sb + j * t_sn], used = std::min(block_size, len - j * block_size);
      TORCH_CHECK(id >= 0 && id * block_size + used <= S, "decode_attention: block_table[", b, ", ", j,
                  "] = ", id, " outside the cache");
    }
  }
}

void fused::decode_attention_rows(Kind kind, const void* q, int64_t q_sb, int64_t q_sh, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const int64_t* table, int64_t t_sb, int64_t t_sn,
                                  const int32_t* lens, int64_t B, int64_t H, int64_t block_size, float scale,
                                  void* out) {
  const int64_t hd = k_cache.size(2), KV = k_cache.size(1);
  with_type(kind, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hdp = round_up(hd, kW);
    const bool copy = hdp != hd || k_cache.stride(2) != 1 || v_cache.stride(2) != 1;
    const Problem<T> p{static_cast<const T*>(q), q_sb, q_sh, 1, ptr<const T>(k_cache), ptr<const T>(v_cache),
                       k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                       v_cache.stride(2), table, t_sb, t_sn, lens, H, KV, H / KV, hd, hdp, block_size, scale, copy};
    run(p, B, static_cast<T*>(out));
  });
}
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(DS_ATTN_LIBRARY, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor context_lens, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(DS_ATTN_LIBRARY, CPU, m) { m.impl("decode_attention", &depthserve::decode_attention); }
