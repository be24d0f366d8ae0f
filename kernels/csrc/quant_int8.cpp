// depthserve::int8_linear(Tensor x, Tensor w8, Tensor d, Tensor mn, int n, int offset) -> Tensor
//
// Quantized linears whose activations are rounded to int8 as well (W8A8), on AVX-512 VNNI integer dot products:
// the compute-bound path for many rows (batched decode, prompt chunks), where quant.cpp's weight-only kernel runs
// fp32 FMAs and a bf16 GEMM multiplies half as many pairs per instruction as vpdpbusd does int8 ones.
// llama.cpp (and vLLM's GGUF kernels) compute every quantized dot product this way; kernels/quant.py
// (quantize_activations, int8_reference_linear) is the contract.
//
// w8 (kernels/quant.py pack_int8, once at load): the weight's quants as uint8 [G, KB, 8, 16, 4] for G = ceil(N / 16)
// groups of 16 output rows and KB = K / 32 blocks: per group and block, 8 vectors of 64 bytes, each 4 consecutive
// inputs of the 16 rows (vpdpbusd's layout: lane j sums 4 products of row j). A quant is stored as u = q + offset:
// offset 128 for Q8_0 and Q4_0 (signed q: vpdpbusd multiplies unsigned by signed bytes), 0 for Q4_1 (q in 0..15).
// d fp32 [G, KB, 16]: the block scales; mn fp32 [G, KB, 16]: Q4_1's block mins (empty otherwise). Padding rows
// are zero.
//
// x [M, K] (fp32 or bf16, any strides): each row's blocks of 32 are rounded to int8 like llama.cpp's Q8_0:
// dx = amax / 127, qx = rint(x * (127 / amax)) (round half to even; 0 where amax is 0), sx = sum(qx). Then
//   y[m, n] = sum over blocks b, in order, of  float(sum_k u qx - offset sx) * (dw dx)   [+ mn * (dx sx): Q4_1]
// with the integer sums exact, dw dx rounded once, each term added by one fma; y in x's dtype, rounded once.
//
// Tiles: 4 rows of x by 3 groups of 16 outputs (12 int32 + 12 fp32 accumulators, 3 weight vectors, a broadcast
// of 4 bytes of x: 28 of 32 registers); a block is 8 vpdpbusd per accumulator and then one convert, one multiply
// and one fma. Threads split the output groups; each runs its tiles over all rows of a chunk of x (x's int8
// rows in L1/L2, the tile's weights in L1 across the row tiles).
// Built only where the compiler targets AVX-512 F/BW/VNNI (the op is then registered; kernels/ops.py uses it when
// it is there). AVX-VNNI's 256-bit form (AVX2 CPUs) is not written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "avx512.h"
#include "common.h"

// Tuning knobs, settable with -D for experiments (other builds load side by side under another op namespace)
#ifndef DS_INT8_LIBRARY
#define DS_INT8_LIBRARY depthserve
#endif
#ifndef DS_INT8_MB
#define DS_INT8_MB 4
#endif
#ifndef DS_INT8_NJ
#define DS_INT8_NJ 3
#endif
#ifndef DS_INT8_ROW_CHUNK
#define DS_INT8_ROW_CHUNK 128
#endif

namespace depthserve {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroupBlockBytes = 512;  // 16 rows x 32 quants
constexpr int MB = DS_INT8_MB, NJ = DS_INT8_NJ;  // the full tile: rows of x x groups of 16 outputs
constexpr int64_t kRowChunk = DS_INT8_ROW_CHUNK;  // rows of x a thread's tiles pass over before moving on

// x's rows as int8 blocks: q [M, K], and per row and block dx, the integer correction -offset * sx, and (Q4_1)
// dx * sx
struct QX {
  const int8_t* q;
  const float* d;
  const int32_t* init;
  const float* dsx;
  int64_t K, KB;
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) { return bf16x16_load(p); }

template <typename T>
void quantize_rows(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t K, int offset, int8_t* q, float* d,
                   int32_t* init, float* dsx) {
  const int64_t KB = K / kBlock;
  for_rows(M, K, [&](int64_t m0, int64_t m1) {
    alignas(64) T tmp[kBlock];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < KB; ++b) {
        const T* src = x + m * s0 + b * kBlock * s1;
        if (s1 != 1) {
          for (int64_t i = 0; i < kBlock; ++i) tmp[i] = src[i * s1];
          src = tmp;
        }
        const __m512 v0 = load16(src), v1 = load16(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // MXCSR: nearest even
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        int8_t* dst = q + m * K + b * kBlock;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(q1));
        const int32_t sx = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        const float dx = amax / 127.f;
        d[m * KB + b] = dx;
        init[m * KB + b] = -offset * sx;
        if (dsx != nullptr) dsx[m * KB + b] = dx * float(sx);
      }
    }
  });
}

template <typename T>
inline void store16(T* y, __m512 v, int64_t valid) {
  const __mmask16 k = valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(y, k, v);
  } else {
    _mm256_mask_storeu_epi16(y, k, bf16x16_round(v));
  }
}

// y[m0 + i, 16 (g0 + j) + l] for i < R, j < J: groups g0.. of the weight against rows m0.. of x
template <int R, int J, bool MIN, typename T>
void tile(const uint8_t* w, const float* d, const float* mn, const QX& x, int64_t m0, int64_t g0, T* y, int64_t ldy,
          int64_t N) {
  const int64_t KB = x.KB, gw = KB * kGroupBlockBytes, gs = KB * 16;  // per-group strides: weight bytes, scales
  const uint8_t* wg = w + g0 * gw;
  const float* dg = d + g0 * gs;
  const float* mg = MIN ? mn + g0 * gs : nullptr;
  __m512 acc[R][J];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    __m512i s[R][J];
    for (int i = 0; i < R; ++i) {
      const __m512i init = _mm512_set1_epi32(x.init[(m0 + i) * KB + b]);
      for (int j = 0; j < J; ++j) s[i][j] = init;
    }
    const uint8_t* wb = wg + b * kGroupBlockBytes;
    const int8_t* xb = x.q + m0 * x.K + b * kBlock;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      __m512i wv[J];
      for (int j = 0; j < J; ++j) wv[j] = _mm512_load_si512(wb + j * gw + k * 64);
      for (int i = 0; i < R; ++i) {
        int32_t x4;
        std::memcpy(&x4, xb + i * x.K + 4 * k, sizeof x4);
        const __m512i xv = _mm512_set1_epi32(x4);
        for (int j = 0; j < J; ++j) s[i][j] = _mm512_dpbusd_epi32(s[i][j], wv[j], xv);
      }
    }
    __m512 dw[J];
    for (int j = 0; j < J; ++j) dw[j] = _mm512_load_ps(dg + j * gs + b * 16);
    for (int i = 0; i < R; ++i) {
      const __m512 dx = _mm512_set1_ps(x.d[(m0 + i) * KB + b]);
      for (int j = 0; j < J; ++j)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][j]), _mm512_mul_ps(dw[j], dx), acc[i][j]);
    }
    if constexpr (MIN) {
      for (int j = 0; j < J; ++j) dw[j] = _mm512_load_ps(mg + j * gs + b * 16);
      for (int i = 0; i < R; ++i) {
        const __m512 dsx = _mm512_set1_ps(x.dsx[(m0 + i) * KB + b]);
        for (int j = 0; j < J; ++j) acc[i][j] = _mm512_fmadd_ps(dw[j], dsx, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) {
      const int64_t n = (g0 + j) * 16;
      store16(y + (m0 + i) * ldy + n, acc[i][j], N - n);
    }
}

// rows m0..m1 of x against groups g0..g0+J: full tiles of MB rows, then one of the R < MB left
template <int J, bool MIN, typename T, int R = MB>
void rows(const uint8_t* w, const float* d, const float* mn, const QX& x, int64_t m0, int64_t m1, int64_t g0, T* y,
          int64_t N) {
  if constexpr (R == MB) {
    for (; m0 + MB <= m1; m0 += MB) tile<MB, J, MIN>(w, d, mn, x, m0, g0, y, N, N);
  }
  if constexpr (R > 1) {
    if (m1 - m0 == R - 1) return tile<R - 1, J, MIN>(w, d, mn, x, m0, g0, y, N, N);
    return rows<J, MIN, T, R - 1>(w, d, mn, x, m0, m1, g0, y, N);
  }
}

// groups g0.. (J of them, or the `left` < NJ at the end)
template <bool MIN, typename T, int J = NJ>
void groups(const uint8_t* w, const float* d, const float* mn, const QX& x, int64_t m0, int64_t m1, int64_t g0,
            int64_t left, T* y, int64_t N) {
  if (J == 1 || left >= J) return rows<J, MIN>(w, d, mn, x, m0, m1, g0, y, N);
  if constexpr (J > 1) groups<MIN, T, J - 1>(w, d, mn, x, m0, m1, g0, left, y, N);
}

template <bool MIN, typename T>
void run(const uint8_t* w, const float* d, const float* mn, const QX& x, int64_t M, int64_t N, T* y) {
  const int64_t G = (N + 15) / 16, tiles = (G + NJ - 1) / NJ;
  // one even share of the tiles per thread (a decode step's linears have 12-64 tiles: a finer grain left one
  // thread a chunk more than the other), unless the call is too small to be worth a fork (vpdpbusd: 64 MACs)
  const int64_t work = M * tiles * NJ * 16 * x.K / 64;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tiles);
  const int64_t grain = work < kParallelWork || threads <= 1 ? tiles : (tiles + threads - 1) / threads;
  const auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
      const int64_t r1 = std::min(M, r0 + kRowChunk);
      for (int64_t t = t0; t < t1; ++t) groups<MIN>(w, d, mn, x, r0, r1, t * NJ, G - t * NJ, y, N);
    }
  };
  if (tiles <= grain) {
    body(0, tiles);
  } else {
    at::parallel_for(0, tiles, grain, body);
  }
}

thread_local Buffer x_buf;

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& d, const at::Tensor& mn,
                       int64_t N, int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "int8_linear: x must be a CPU [M, K] tensor, got ", x.sizes());
  check_float_kind(x, "int8_linear: x");
  const int64_t M = x.size(0), K = x.size(1), KB = K / kBlock, G = (N + 15) / 16;
  TORCH_CHECK(K % kBlock == 0, "int8_linear: K (", K, ") must be a multiple of ", kBlock);
  TORCH_CHECK(offset == 0 || offset == 128, "int8_linear: offset must be 0 or 128, got ", offset);
  TORCH_CHECK(w8.scalar_type() == at::kByte && w8.is_contiguous() && w8.numel() == G * KB * kGroupBlockBytes,
              "int8_linear: w8 must be contiguous uint8 of ", G * KB * kGroupBlockBytes, " bytes for N = ", N,
              ", K = ", K, "; got ", w8.scalar_type(), " ", w8.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w8.const_data_ptr()) % 64 == 0, "int8_linear: w8 must be 64-byte aligned");
  const bool has_min = mn.numel() > 0;
  for (const at::Tensor* t : {&d, &mn}) {
    if (t == &mn && !has_min) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == G * KB * 16 &&
                    reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 64 == 0,
                "int8_linear: scales and mins must be contiguous 64-byte aligned float32 of ", G * KB * 16,
                " values; got ", t->scalar_type(), " ", t->sizes());
  }
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  // x's int8 rows and per-block terms, in one scratch allocation of the calling thread (the workers read it)
  const int64_t qbytes = (M * K + 63) / 64 * 64, fbytes = (M * KB * 4 + 63) / 64 * 64;
  char* buf = x_buf.get(static_cast<size_t>(qbytes + 3 * fbytes));
  auto* xq = reinterpret_cast<int8_t*>(buf);
  auto* xd = reinterpret_cast<float*>(buf + qbytes);
  auto* xinit = reinterpret_cast<int32_t*>(buf + qbytes + fbytes);
  float* xdsx = has_min ? reinterpret_cast<float*>(buf + qbytes + 2 * fbytes) : nullptr;
  with_type(kind_of(x), [&](auto tag) {
    using T = decltype(tag);
    quantize_rows(static_cast<const T*>(x.const_data_ptr()), x.stride(0), x.stride(1), M, K, int(offset), xq, xd,
                  xinit, xdsx);
  });
  const QX qx{xq, xd, xinit, xdsx, K, KB};
  const uint8_t* wp = w8.const_data_ptr<uint8_t>();
  const float* dp = d.const_data_ptr<float>();
  const float* mp = has_min ? mn.const_data_ptr<float>() : nullptr;
  with_type(kind_of(x), [&](auto tag) {
    using T = decltype(tag);
    T* yp = static_cast<T*>(y.data_ptr());
    if (has_min) {
      run<true>(wp, dp, mp, qx, M, N, yp);
    } else {
      run<false>(wp, dp, mp, qx, M, N, yp);
    }
  });
  return y;
}

}  // namespace
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(DS_INT8_LIBRARY, m) {
  m.def("int8_linear(Tensor x, Tensor w8, Tensor d, Tensor mn, int n, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(DS_INT8_LIBRARY, CPU, m) { m.impl("int8_linear", &depthserve::int8_linear); }
#endif
