// depthserve::quant_linear(Tensor x, Tensor qw, int ggml_type) -> Tensor
// depthserve::dequantize(Tensor qw, int ggml_type, ScalarType dtype) -> Tensor
//
// Weight-only quantized linears on llama.cpp's block formats (kernels/quant.py is the contract and the oracle):
// qw is uint8 [N, K / 32 * bb], each row K / 32 blocks of bb bytes exactly as a GGUF file stores them:
//   Q8_0 (ggml type 8, 34 bytes): fp16 d, 32 int8 q            w = d * q
//   Q4_0 (ggml type 2, 18 bytes): fp16 d, 16 bytes of nibbles  w = d * (q - 8)
//   Q4_1 (ggml type 3, 20 bytes): fp16 d, fp16 m, 16 nibbles   w = d * q + m
// (byte j of the nibbles: weight j low, weight j + 16 high). y[M, N] = x[M, K] @ dequantize(qw)^T, x fp32 or
// bf16 (any strides), fp32 accumulation, y in x's dtype rounded once.
//
// How (small M: decode, M <= 64; bound by reading the weight once):
// - every weight byte is read from memory once per call, for all M rows of x; x is converted once to fp32
//   rows 64-byte aligned (used in place when it already is);
// - a block of 32 quants is expanded in registers to the fp32 weights *exactly* as dequantize computes them
//   (d * q: one rounding; Q4_1 d * q then + m: two, no fma), then fma'd against x. So the linear is an fp32
//   GEMV on the oracle's weights: with fp32 x it equals small_m_linear(x, dequantize(qw)) bit for bit on the
//   same ISA (same lane split and reduction), and a row's result does not depend on M or the thread split.
//   Scaling the weights before the fma (rather than scaling a per-block dot product by d afterwards, with
//   Q4_1's m * sum(x) from precomputed block sums of x) costs the same at M = 1 and less at M > 1, where
//   each expanded weight vector feeds MB rows of x with one fma each;
// - AVX-512 Q4_x: the 16 possible values of a block (d * (i - 8) or d * i + m) are built in one register and
//   the nibbles index it (vpermps): 2 lookups per 32 weights instead of convert + scale per vector;
// - register tiles: R1 = 8 weight rows at M == 1, R x MB = 4 x 4 (weight rows x x rows) at M <= 4, 2 x 8 up
//   to M = 64 (AVX-512), one pass over x per 8 rows, each on a block of weight rows that the first pass reads
//   from memory and the later ones from L2, re-expanding the quants in registers (cheaper than a round trip
//   through fp32 scratch: measured 1.1-1.3x); above M = 64 a chunk of rows is expanded once into per-thread
//   fp32 scratch and the tiles run on that. A full AVX-512 tile reduces its 16 accumulators side by side and
//   rounds to bf16 in vector (one at a time they cost ~1/3 of a tile at K = 576);
// - while a tile streams, the tile two ahead is prefetched (rows of a few hundred bytes: the hardware
//   prefetcher alone reaches ~0.2 of the bandwidth here);
// - at::parallel_for over output rows, one contiguous chunk per thread; a call under ~96 KB of weight per
//   thread stays on the caller's thread.
// Measured (loadtest/bench_quant.py -> loadtest/results/quant.json: SmolLM2-135M's linears, weights from DRAM,
// 2 threads on a 2-core Zen 5 shared with other work, read roofline 49 GB/s), per decode step against bf16
// small_m_linear on the same weights: at M = 1 Q8_0 streams 0.75 of the roofline (1.9x), Q4_0 / Q4_1 0.63
// (3.0x / 2.75x): the 4-bit formats are bound by the expansion (~35 G weights/s per core), not by memory;
// at M = 8 1.45-1.5x; at M = 32 1.12-1.18x (down, K = 1536: 1.03-1.10x).
// Not used: AVX-512 VNNI / AVX-VNNI. Their integer dot products need x quantized to int8 (llama.cpp's way);
// here x stays fp32/bf16, never quantized, so the products are fp32 FMAs.
// Vector paths chosen at compile time (-march=native): AVX-512F(+F16C), AVX2+FMA+F16C, a scalar fallback.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "avx512.h"
#include "common.h"
#include "fused.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

// Tuning knobs, settable with -D for experiments (loadtest/bench_quant.py --variant); the defaults are the measured
// choice on a 2-core Zen 4 (AVX-512).
#ifndef DS_QUANT_LIBRARY  // the op namespace: experiments load other builds side by side
#define DS_QUANT_LIBRARY depthserve
#endif
#ifndef DS_QUANT_PF_AHEAD  // the tile whose rows a tile prefetches while it streams its own (1: the next one; 2
#define DS_QUANT_PF_AHEAD 2  // measured 1.1-1.3x ahead of 1 at M=1 on one Zen 5 core, 4 level with 2, none 3x slower)
#endif
#ifndef DS_QUANT_DIRECT_MAX_M  // up to this M the quants are expanded in registers for every pass over x
#define DS_QUANT_DIRECT_MAX_M 64
#endif
#ifndef DS_QUANT_DIRECT_BLOCK_BYTES  // quant bytes of the rows those passes share (from L2 after the first)
#define DS_QUANT_DIRECT_BLOCK_BYTES (128 * 1024)
#endif
#ifndef DS_QUANT_EXPAND_BYTES  // fp32 rows expanded at a time when M > MB
#define DS_QUANT_EXPAND_BYTES (256 * 1024)
#endif
#if defined(__AVX512F__)  // the tile on expanded rows when K is short: weight rows x x rows (more rows of x per
#ifndef DS_QUANT_XR       // weight load; those rows of x must stay in L1)
#define DS_QUANT_XR 2
#endif
#ifndef DS_QUANT_XMB
#define DS_QUANT_XMB 8
#endif
#else  // 16 registers: the R x MB tile throughout
#define DS_QUANT_XR Isa::R
#define DS_QUANT_XMB Isa::MB
#endif
#ifndef DS_QUANT_XMB_BYTES  // the fp32 bytes of XMB rows of x up to which that tile is used (else R x MB)
#define DS_QUANT_XMB_BYTES (24 * 1024)
#endif

namespace depthserve {
namespace {

constexpr int kBlock = 32;  // weights per block, every format
enum Fmt : int { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

// bytes per block of a ggml type, 0 for one we do not take
inline int block_bytes(int64_t type) {
  switch (type) {
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q4_1: return 20;
    default: return 0;
  }
}

inline float half_at(const uint8_t* p) {  // the little-endian fp16 at p
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// ---- one vector ISA, chosen at compile time: NV vectors of W lanes hold one block of 32 weights ----------
#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  static constexpr int W = 16, NV = 2;
  static constexpr int R1 = 8;  // weight rows per tile at M == 1
  static constexpr int R = 4;   // weight rows x ...
  static constexpr int MB = 4;  // ... x rows per tile at M > 1: 16 accumulators + 8 weight vectors of 32
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }

  // sum(a[i]) for 16 vectors at once, each by _mm512_reduce_add_ps's tree (halves of 256, of 128, then lanes 0+2
  // and 1+3, then those two), so the results equal sum()'s bit for bit; out[sum16_lane(i)] = the sum of a[i],
  // stored as T (bf16: rounded as from_f rounds).
  static int sum16_lane(int i) { return 4 * (i % 4) + i / 4; }
  template <typename T>
  static void sum16_to(const V* a, T* out) {
    V c[8], e[4];
    for (int p = 0; p < 8; ++p)  // [lo256 + hi256 of a[2p] | of a[2p+1]]
      c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
    for (int q = 0; q < 4; ++q)  // 128-bit block j: lo128 + hi128 of that, for a[4q + j]
      e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
    const V h = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x44), _mm512_shuffle_ps(e[0], e[1], 0xEE));
    const V i = _mm512_add_ps(_mm512_shuffle_ps(e[2], e[3], 0x44), _mm512_shuffle_ps(e[2], e[3], 0xEE));
    const V j = _mm512_add_ps(_mm512_shuffle_ps(h, i, 0x88), _mm512_shuffle_ps(h, i, 0xDD));  // lane 4b + q: a[4q + b]
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out, j);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16x16_round(j));
    }
  }

  static V half_bcast(const uint8_t* p) {  // the fp16 at p in every lane (a word broadcast, then one convert)
    int16_t h;
    std::memcpy(&h, p, sizeof h);
    return _mm512_cvtph_ps(_mm256_set1_epi16(h));
  }

  template <int F>
  static void expand(const uint8_t* b, V* w) {
    const __m512 d = half_bcast(b);
    if constexpr (F == Q8_0) {
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
      w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
      w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
    } else {
      // the block's 16 possible weights in one register, indexed by the nibbles (vpermps reads 4 index bits)
      const __m512 idx = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512 table;
      if constexpr (F == Q4_0) {
        table = _mm512_mul_ps(d, _mm512_sub_ps(idx, _mm512_set1_ps(8.f)));
      } else {
        table = _mm512_add_ps(_mm512_mul_ps(d, idx), half_bcast(b + 2));
      }
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + bb<F>() - 16));
      const __m512i raw = _mm512_cvtepu8_epi32(q);  // byte j in lane j: low nibble = weight j
      w[0] = _mm512_permutexvar_ps(raw, table);
      w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table);
    }
  }
  template <int F> static constexpr int bb() { return F == Q8_0 ? 34 : F == Q4_0 ? 18 : 20; }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Isa {
  using V = __m256;
  static constexpr int W = 8, NV = 4;
  static constexpr int R1 = 4;  // 4 rows x 4 vectors of a block + 4 accumulators + x of 16 registers
  static constexpr int R = 2;
  static constexpr int MB = 3;  // 6 accumulators + 8 weight vectors + 1 x vector
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {  // linear.cpp's reduction, so fp32 results match small_m_linear's
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  template <int F>
  static void expand(const uint8_t* b, V* w) {
    const __m256 d = _mm256_set1_ps(half_at(b));
    if constexpr (F == Q8_0) {
      for (int v = 0; v < 4; ++v) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v));
        w[v] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
      }
    } else {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + bb<F>() - 16));
      const __m128i mask = _mm_set1_epi8(15);
      __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
      if constexpr (F == Q4_0) {  // q - 8 in the bytes (exact), then sign-extend
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
      }
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int v = 0; v < 4; ++v) {
        const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[v]));
        if constexpr (F == Q4_0) {
          w[v] = _mm256_mul_ps(d, qf);
        } else {
          w[v] = _mm256_add_ps(_mm256_mul_ps(d, qf), _mm256_set1_ps(half_at(b + 2)));
        }
      }
    }
  }
  template <int F> static constexpr int bb() { return F == Q8_0 ? 34 : F == Q4_0 ? 18 : 20; }
};
#else
struct Isa {  // scalar fallback: one lane, 32 "vectors" a block
  using V = float;
  static constexpr int W = 1, NV = 32;
  static constexpr int R1 = 4, R = 2, MB = 2;
  static V zero() { return 0.f; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static float sum(V v) { return v; }

  template <int F>
  static void expand(const uint8_t* b, V* w) {
    const float d = half_at(b);
    if constexpr (F == Q8_0) {
      for (int i = 0; i < 32; ++i) w[i] = d * float(int8_t(b[2 + i]));
    } else {
      const uint8_t* q = b + bb<F>() - 16;
      const float m = F == Q4_1 ? half_at(b + 2) : 0.f;
      for (int i = 0; i < 32; ++i) {
        const int v = i < 16 ? (q[i] & 15) : (q[i - 16] >> 4);
        w[i] = F == Q4_0 ? d * float(v - 8) : d * float(v) + m;
      }
    }
  }
  template <int F> static constexpr int bb() { return F == Q8_0 ? 34 : F == Q4_0 ? 18 : 20; }
};
#endif

using V = Isa::V;
constexpr int W = Isa::W, NV = Isa::NV;
static_assert(W * NV == kBlock);

// Weight rows as blocks of quants: the tile expands block b of row r in registers.
template <int F>
struct Quant {
  const uint8_t* w;  // first row of the tile
  int64_t ld;        // row stride in bytes
  void get(int r, int64_t b, V* out) const { Isa::expand<F>(w + r * ld + b * Isa::bb<F>(), out); }
  const char* row(int r) const { return reinterpret_cast<const char*>(w + r * ld); }
};

// Weight rows already expanded to fp32 (per-thread scratch, M > MB).
struct Plain {
  const float* w;
  int64_t ld;  // row stride in floats
  void get(int r, int64_t b, V* out) const {
    for (int v = 0; v < NV; ++v) out[v] = Isa::load(w + r * ld + b * kBlock + v * W);
  }
};

// R weight rows x MB rows of x over nb blocks: y[m * ldy + r] = sum_k w[r, k] * x[m, k], rounded to T once.
// The sums run in the order of linear.cpp's fp32 tile (W-lane accumulators over k ascending, then one
// reduction), which is what makes the fp32 results equal small_m_linear's on the expanded weights.
// pf: prefetch the next R rows (contiguous after these) at the pace this tile consumes its own.
template <int R, int MB, typename T, typename S>
inline void tile(const S& s, int64_t nb, const float* x, int64_t ldx, T* y, int64_t ldy,
                 [[maybe_unused]] const char* pf, [[maybe_unused]] int64_t pf_step) {
  V acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = Isa::zero();
  for (int64_t b = 0; b < nb; ++b) {
#if defined(__AVX2__) || defined(__AVX512F__)
    if (pf != nullptr) {
      for (int64_t o = 0; o < pf_step; o += 64) _mm_prefetch(pf + b * pf_step + o, _MM_HINT_T0);
    }
#endif
    V w[R][NV];
    for (int r = 0; r < R; ++r) s.get(r, b, w[r]);
    for (int m = 0; m < MB; ++m) {
      const float* xb = x + m * ldx + b * kBlock;
      for (int v = 0; v < NV; ++v) {
        const V xv = Isa::load(xb + v * W);
        for (int r = 0; r < R; ++r) acc[r][m] = Isa::fma(w[r][v], xv, acc[r][m]);
      }
    }
  }
#if defined(__AVX512F__)
  if constexpr (R * MB == 16) {  // a full tile: its 16 reductions side by side (the scalar ones cost ~1/3 at K 576)
    alignas(64) T out[16];
    Isa::sum16_to(&acc[0][0], out);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * ldy + r] = out[Isa::sum16_lane(r * MB + m)];
    return;
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[m * ldy + r] = from_f<T>(Isa::sum(acc[r][m]));
}

// mb <= MB rows of x, mb known at run time
template <int R, int MB, typename T, typename S>
inline void tile_m(int mb, const S& s, int64_t nb, const float* x, int64_t ldx, T* y, int64_t ldy, const char* pf,
                   int64_t pf_step) {
  if constexpr (MB > 1) {
    if (mb < MB) return tile_m<R, MB - 1, T, S>(mb, s, nb, x, ldx, y, ldy, pf, pf_step);
  }
  tile<R, MB, T, S>(s, nb, x, ldx, y, ldy, pf, pf_step);
}

// r < R rows (the last rows of a chunk), r known at run time
template <int R, int MB, typename T, typename S>
inline void tile_rm(int r, int mb, const S& s, int64_t nb, const float* x, int64_t ldx, T* y, int64_t ldy) {
  if constexpr (R > 1) {
    if (r < R) return tile_rm<R - 1, MB, T, S>(r, mb, s, nb, x, ldx, y, ldy);
  }
  tile_m<R, MB, T, S>(mb, s, nb, x, ldx, y, ldy, nullptr, 0);
}

// Rows [0, rows) of one thread's chunk against every row of x: the tiles stream the quants and expand them
// in registers. Used for M <= MB (each weight byte is then touched by one tile).
// M > MB: blocks of rows (DS_QUANT_DIRECT_BLOCK_BYTES of quants) that the first pass over x reads from memory and
// the later ones from L2.
template <int F, int R, int MB, typename T>
void rows_direct(const uint8_t* w, int64_t ldw, int64_t rows, int64_t nb, const float* x, int64_t ldx, int64_t M,
                 T* y, int64_t N) {
  constexpr int bb = Isa::bb<F>();
  const bool contiguous = ldw == nb * bb;  // prefetch the next tile only when it follows this one
  const int64_t block_rows =
      M <= MB ? rows : std::max<int64_t>(1, DS_QUANT_DIRECT_BLOCK_BYTES / (R * std::max<int64_t>(1, nb * bb))) * R;
  for (int64_t n0 = 0; n0 < rows; n0 += block_rows) {
    const int64_t n1 = std::min(rows, n0 + block_rows);
    for (int64_t m = 0; m < M; m += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m));
      int64_t n = n0;
      for (; n + R <= n1; n += R) {
        constexpr int A = DS_QUANT_PF_AHEAD;
        const char* pf = A > 0 && m == 0 && contiguous && n + (A + 1) * R <= rows
                             ? reinterpret_cast<const char*>(w + (n + A * R) * ldw) : nullptr;
        tile_m<R, MB, T>(mb, Quant<F>{w + n * ldw, ldw}, nb, x + m * ldx, ldx, y + m * N + n, N, pf, R * bb);
      }
      if (n < n1) tile_rm<R, MB, T>(static_cast<int>(n1 - n), mb, Quant<F>{w + n * ldw, ldw}, nb, x + m * ldx, ldx,
                                    y + m * N + n, N);
    }
  }
}

// One expanded row block (dequantize's loop): row r of w -> fp32 row of K floats.
template <int F>
inline void expand_row(const uint8_t* w, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b) {
    V v[NV];
    Isa::expand<F>(w + b * Isa::bb<F>(), v);
    for (int i = 0; i < NV; ++i) Isa::store(out + b * kBlock + i * W, v[i]);
  }
}

// Per-thread scratch, 64-byte aligned, kept for the thread's next calls: a fresh allocation per call costs page
// faults (measured ~15% of a 32-row call). Slot 0: the expanded rows of M > MB (worker threads); slot 1: x in
// fp32 (the calling thread).
float* scratch(size_t floats, int slot = 0) {
  thread_local Buffer bufs[2];
  return bufs[slot].get<float>(floats * sizeof(float));
}

constexpr int64_t kExpandBytes = DS_QUANT_EXPAND_BYTES;  // fp32 rows expanded at a time when M > MB

// M > MB: chunks of rows expanded once into fp32 scratch, then the same tiles on it for every MB rows of x.
template <int F, int R, int MB, typename T>
void rows_expanded(const uint8_t* w, int64_t ldw, int64_t rows, int64_t nb, const float* x, int64_t ldx, int64_t M,
                   T* y, int64_t N) {
  const int64_t K = nb * kBlock;
  const int64_t chunk = std::max<int64_t>(1, kExpandBytes / (R * K * int64_t(sizeof(float)))) * R;
  float* buf = scratch(static_cast<size_t>(std::min(chunk, rows) * K));
  for (int64_t n0 = 0; n0 < rows; n0 += chunk) {
    const int64_t cr = std::min(chunk, rows - n0);
    for (int64_t r = 0; r < cr; ++r) expand_row<F>(w + (n0 + r) * ldw, nb, buf + r * K);
    for (int64_t m = 0; m < M; m += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m));
      int64_t n = 0;
      for (; n + R <= cr; n += R) {
        tile_m<R, MB, T>(mb, Plain{buf + n * K, K}, nb, x + m * ldx, ldx, y + m * N + n0 + n, N, nullptr, 0);
      }
      if (n < cr) tile_rm<R, MB, T>(static_cast<int>(cr - n), mb, Plain{buf + n * K, K}, nb, x + m * ldx, ldx,
                                    y + m * N + n0 + n, N);
    }
  }
}

constexpr int64_t kMinBytesPerThread = 96 * 1024;  // as linear.cpp: below this a call stays on one thread

template <int F, typename T>
void run(const uint8_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K, T* y) {
  const int64_t nb = K / kBlock;
  const int R = M == 1 ? Isa::R1 : Isa::R;
  const int64_t row_bytes = std::max<int64_t>(1, nb * Isa::bb<F>());
  const int64_t groups = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (R * row_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * R, rows = std::min(N, g1 * R) - n0;
    if (rows <= 0) return;
    const uint8_t* wr = w + n0 * ldw;
    if (M == 1) {
      rows_direct<F, Isa::R1, 1, T>(wr, ldw, rows, nb, x, ldx, M, y + n0, N);
    } else if (M <= Isa::MB) {
      rows_direct<F, Isa::R, Isa::MB, T>(wr, ldw, rows, nb, x, ldx, M, y + n0, N);
    } else if (M <= DS_QUANT_DIRECT_MAX_M && DS_QUANT_XMB > Isa::MB) {  // the wide tile expanding in registers
      rows_direct<F, DS_QUANT_XR, DS_QUANT_XMB, T>(wr, ldw, rows, nb, x, ldx, M, y + n0, N);
    } else {
      if (DS_QUANT_XMB * K * int64_t(sizeof(float)) <= DS_QUANT_XMB_BYTES) {
        rows_expanded<F, DS_QUANT_XR, DS_QUANT_XMB, T>(wr, ldw, rows, nb, x, ldx, M, y + n0, N);
      } else {
        rows_expanded<F, Isa::R, Isa::MB, T>(wr, ldw, rows, nb, x, ldx, M, y + n0, N);
      }
    }
  });
}

template <typename T>
void qgemv_t(int type, const uint8_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
             T* y) {
  switch (type) {
    case Q8_0: return run<Q8_0, T>(w, ldw, x, ldx, M, N, K, y);
    case Q4_0: return run<Q4_0, T>(w, ldw, x, ldx, M, N, K, y);
    case Q4_1: return run<Q4_1, T>(w, ldw, x, ldx, M, N, K, y);
    default: TORCH_CHECK(false, "qgemv: unknown ggml type ", type);
  }
}

// ---- the ops ------------------------------------------------------------------------------------------

// qw: uint8 [N, K / 32 * bb] on the CPU, unit-stride rows; returns bb (checks the type too)
int check_qweight(const at::Tensor& qw, int64_t type, const char* op) {
  const int bb = block_bytes(type);
  TORCH_CHECK(bb > 0, op, ": ggml_type must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0); got ", type);
  TORCH_CHECK(qw.scalar_type() == at::kByte, op, ": the quantized weight must be uint8, got ", qw.scalar_type());
  TORCH_CHECK(qw.dim() == 2, op, ": the quantized weight must be [N, K / 32 * ", bb, "], got ", qw.sizes());
  TORCH_CHECK(qw.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(qw.size(1) % bb == 0, op, ": a row of ", qw.size(1), " bytes is not a whole number of ", bb,
              "-byte blocks (ggml type ", type, ")");
  return bb;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qw, int64_t ggml_type) {
  const int bb = check_qweight(qw, ggml_type, "quant_linear");
  TORCH_CHECK(x.dim() == 2, "quant_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "quant_linear: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(K % kBlock == 0, "quant_linear: K (", K, ") must be a multiple of ", kBlock);
  TORCH_CHECK(qw.size(1) == K / kBlock * bb, "quant_linear: x has K = ", K, ", so each weight row must be ",
              K / kBlock * bb, " bytes (", K / kBlock, " blocks of ", bb, "); got ", qw.size(1));
  at::Tensor wc = qw;
  if (N > 0 && K > 0 && (qw.stride(1) != 1 || qw.stride(0) < qw.size(1))) wc = qw.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  // x in fp32, unit column stride, rows 64-byte aligned (as small_m_linear takes it)
  const auto [xp, ldx] = f32_rows(x, [](size_t n) { return scratch(n, 1); });
  fused::qgemv(static_cast<int>(ggml_type), wc.const_data_ptr<uint8_t>(), wc.stride(0), xp, ldx, M, N, K,
               kind_of(x), y.data_ptr());
  return y;
}

template <int F, typename T>
void dequant_rows(const uint8_t* w, int64_t ldw, int64_t N, int64_t nb, T* out) {
  const int64_t K = nb * kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(1, nb * Isa::bb<F>()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if constexpr (std::is_same_v<T, float>) {
        expand_row<F>(w + n * ldw, nb, out + n * K);
      } else {
        alignas(64) float tmp[kBlock];
        for (int64_t b = 0; b < nb; ++b) {
          expand_row<F>(w + n * ldw + b * Isa::bb<F>(), 1, tmp);
          T* dst = out + n * K + b * kBlock;
#pragma omp simd
          for (int i = 0; i < kBlock; ++i) dst[i] = from_f<T>(tmp[i]);
        }
      }
    }
  });
}

at::Tensor dequantize(const at::Tensor& qw, int64_t ggml_type, at::ScalarType dtype) {
  const int bb = check_qweight(qw, ggml_type, "dequantize");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize: dtype must be float32 or bfloat16, got ",
              dtype);
  const int64_t N = qw.size(0), nb = qw.size(1) / bb;
  at::Tensor wc = qw;
  if (N > 0 && nb > 0 && (qw.stride(1) != 1 || qw.stride(0) < qw.size(1))) wc = qw.contiguous();
  at::Tensor out = at::empty({N, nb * kBlock}, qw.options().dtype(dtype));
  if (N == 0 || nb == 0) return out;
  const uint8_t* w = wc.const_data_ptr<uint8_t>();
  const int64_t ldw = wc.stride(0);
  with_type(dtype == at::kFloat ? Kind::F32 : Kind::BF16, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out.data_ptr());
    switch (ggml_type) {
      case Q8_0: return dequant_rows<Q8_0, T>(w, ldw, N, nb, o);
      case Q4_0: return dequant_rows<Q4_0, T>(w, ldw, N, nb, o);
      default: return dequant_rows<Q4_1, T>(w, ldw, N, nb, o);
    }
  });
  return out;
}

}  // namespace

namespace fused {
void qgemv(int ggml_type, const uint8_t* w, int64_t ldw_bytes, const float* x, int64_t ldx, int64_t M, int64_t N,
           int64_t K, Kind ykind, void* y) {
  if (ykind == Kind::F32) {
    qgemv_t<float>(ggml_type, w, ldw_bytes, x, ldx, M, N, K, static_cast<float*>(y));
  } else {
    qgemv_t<bf16_t>(ggml_type, w, ldw_bytes, x, ldx, M, N, K, static_cast<bf16_t*>(y));
  }
}

int quant_block_bytes(int64_t ggml_type) { return block_bytes(ggml_type); }
}  // namespace fused
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(DS_QUANT_LIBRARY, m) {
  m.def("quant_linear(Tensor x, Tensor qw, int ggml_type) -> Tensor");
  m.def("dequantize(Tensor qw, int ggml_type, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(DS_QUANT_LIBRARY, CPU, m) {
  m.impl("quant_linear", &depthserve::quant_linear);
  m.impl("dequantize", &depthserve::dequantize);
}
