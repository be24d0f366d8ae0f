// depthserve::small_m_linear(Tensor x, Tensor w) -> Tensor
//
// y[M, N] = x[M, K] @ w[N, K]^T for the small M of decode, w in plain row-major layout (any row stride),
// fp32 or bf16 (x has w's dtype, any strides). Accumulates in fp32; the output has x's dtype, rounded once.
//
// At small M a linear is bound by reading the weight once from memory, so the kernel is built around
// that stream:
// - every weight row is read from memory exactly once per call, for all M rows of x: a block of rows
//   (DS_GEMV_BLOCK_BYTES) is streamed by the first pass over x and re-read from L2 by the others;
// - x is converted once to fp32 into a small 64-byte-aligned buffer (an aligned fp32 x is used in place);
//   it stays in L1/L2 while the weight streams past it;
// - bf16 -> fp32 is a zero-extend and a 16-bit shift, fused into the weight load;
// - register tiles: R1 = 8 rows at M == 1 (8 independent accumulators), R x MB = 3 x 4 above (each weight
//   vector loaded and converted once per 4 rows of x, each x vector once per 3 weight rows);
// - while a tile streams, the next tile is prefetched when the rows are contiguous (always for M > 1, for
//   short tiles at M == 1): rows of a few KB are too short for the hardware prefetcher to ramp up;
// - the output rows are split into one big contiguous chunk per thread (at::parallel_for); a call too
//   small to pay for waking a thread runs on the caller's thread.
// Measured with loadtest/bench_gemv.py on a 2-core Zen 3 (AVX2): bf16 at M=1 streams at ~0.75-0.9 of the
// read bandwidth (torch.mv: ~0.6); past M ~ 8 the FMAs (M per weight element) bound it, not memory.
//
// Any K (the tail past the last full vector is summed in scalar) and any N (the last rows use a smaller
// tile). Vector paths: AVX-512F, AVX2+FMA, chosen at compile time (-march=native); a scalar fallback
// elsewhere. Needs -fopenmp at compile time for the threads (without it at::parallel_for runs the whole
// range on the caller's thread: correct, one core); GOMP symbols resolve against torch's libgomp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "avx512.h"
#include "fused.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace depthserve {
namespace {

using bf16 = c10::BFloat16;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }

// ---- one vector ISA, chosen at compile time -----------------------------------------------------------
// The AVX2 tile sizes and the prefetch limit can be set with -D for experiments (bench_gemv.py --variant).
#ifndef DS_GEMV_R1
#define DS_GEMV_R1 8
#endif
#ifndef DS_GEMV_R
#define DS_GEMV_R 3
#endif
#ifndef DS_GEMV_MB
#define DS_GEMV_MB 4
#endif
#ifndef DS_GEMV_LIBRARY  // the op namespace: experiments load several builds side by side
#define DS_GEMV_LIBRARY depthserve
#endif
#ifndef DS_GEMV_BLOCK_BYTES  // weight rows re-read from L2 by the passes over x when M > MB
#define DS_GEMV_BLOCK_BYTES (128 * 1024)
#endif
#ifndef DS_GEMV_PREFETCH_AHEAD
#define DS_GEMV_PREFETCH_AHEAD 1
#endif
#ifndef DS_GEMV_PREFETCH_HINT
#define DS_GEMV_PREFETCH_HINT _MM_HINT_T0
#endif
#ifndef DS_GEMV_PREFETCH_TILE_BYTES
#define DS_GEMV_PREFETCH_TILE_BYTES (16 * 1024)
#endif

#if defined(__AVX512F__)
struct Isa {  // compiles (-march=skylake-avx512) but has not run: no AVX-512 machine was at hand
  using V = __m512;
  static constexpr int W = 16;  // fp32 lanes
  static constexpr int R1 = 8;  // weight rows per tile when M == 1: 8 independent accumulators
  static constexpr int R = 4;   // weight rows per tile when M > 1 ...
  static constexpr int MB = 4;  // ... times x rows: 16 accumulators + 4 weight vectors of 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) { return bf16x16_load(reinterpret_cast<const uint16_t*>(p)); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Isa {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int R1 = DS_GEMV_R1;  // 8 rows at M == 1: fp32 ~10% ahead of 4 (bf16 level), 12 slower
  static constexpr int R = DS_GEMV_R;    // 3 x 4: 12 accumulators + 3 weight vectors + 1 x vector of 16
  static constexpr int MB = DS_GEMV_MB;  // registers; ~15% ahead of 4 x 2 in cache, level with 2 x 4
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Isa {  // scalar fallback: one lane, the same tiling
  using V = float;
  static constexpr int W = 1;
  static constexpr int R1 = 4;
  static constexpr int R = 4;
  static constexpr int MB = 2;
  static V zero() { return 0.f; }
  static V load(const float* p) { return *p; }
  static V load(const bf16* p) { return static_cast<float>(*p); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static float sum(V v) { return v; }
};
#endif

// The rows of w that one call of `tile` covers, and where the results go.
template <typename T>
struct Args {
  const T* w;       // first weight row of the tile
  int64_t ldw;      // weight row stride (elements)
  const float* x;   // first x row of the tile (fp32)
  int64_t ldx;      // x row stride (elements)
  int64_t K;
  T* y;             // y[m0, n0]
  int64_t ldy;      // output row stride (N)
};

// R weight rows x MB rows of x: y[m, r] = sum_k w[r, k] * x[m, k] for r < R, m < MB.
// PF: the tile's rows are contiguous and short; while they stream, prefetch the next tile's R * K
// elements at the same pace (the hardware prefetcher ramps up too slowly on rows of a few cache lines).
template <int R, int MB, bool PF, typename T>
inline void tile(const Args<T>& a) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  V acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = Isa::zero();
  const int64_t K = a.K, kv = K - K % W;
  [[maybe_unused]] const char* next = reinterpret_cast<const char*>(a.w + DS_GEMV_PREFETCH_AHEAD * R * a.ldw);
  for (int64_t k = 0; k < kv; k += W) {
#if defined(__AVX2__) || defined(__AVX512F__)
    if constexpr (PF) {
      constexpr int64_t step = R * W * static_cast<int64_t>(sizeof(T));  // bytes of w consumed per step
      for (int64_t b = 0; b < step; b += 64) _mm_prefetch(next + k * R * static_cast<int64_t>(sizeof(T)) + b,
                                                          DS_GEMV_PREFETCH_HINT);
    }
#endif
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Isa::load(a.w + r * a.ldw + k);
    for (int m = 0; m < MB; ++m) {
      const V xv = Isa::load(a.x + m * a.ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = Isa::fma(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = Isa::sum(acc[r][m]);
      for (int64_t k = kv; k < K; ++k) s += to_float(a.w[r * a.ldw + k]) * a.x[m * a.ldx + k];
      a.y[m * a.ldy + r] = static_cast<T>(s);
    }
  }
}

// A tile of R rows and mb <= MB rows of x, mb known only at run time.
template <int R, int MB, bool PF, typename T>
inline void tile_m(int mb, const Args<T>& a) {
  if constexpr (MB > 1) {
    if (mb < MB) return tile_m<R, MB - 1, PF, T>(mb, a);
  }
  tile<R, MB, PF, T>(a);
}

// The last r < R rows of a block: a tile of r rows, r known only at run time.
template <int R, int MB, typename T>
inline void tile_rm(int r, int mb, const Args<T>& a) {
  if constexpr (R > 1) {
    if (r < R) return tile_rm<R - 1, MB, T>(r, mb, a);
  }
  tile_m<R, MB, false, T>(mb, a);
}

// Weight rows [0, rows) of a block against all M rows of x: MB rows of x at a time, all tiles of the block
// for each. The first pass reads the block from memory (prefetching the next tile when `pf`), the later
// ones from L2; the x rows of a pass stay in L1.
template <int R, int MB, typename T>
void block(bool pf, const T* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t M, int64_t K, T* y,
           int64_t N) {
  for (int64_t m = 0; m < M; m += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m));
    int64_t n = 0;
    for (; n + R <= rows; n += R) {
      const Args<T> a{w + n * ldw, ldw, x + m * ldx, ldx, K, y + m * N + n, N};
      if (pf && m == 0) {
        tile_m<R, MB, true, T>(mb, a);
      } else {
        tile_m<R, MB, false, T>(mb, a);
      }
    }
    if (n < rows) tile_rm<R, MB, T>(static_cast<int>(rows - n), mb, {w + n * ldw, ldw, x + m * ldx, ldx, K,
                                                                     y + m * N + n, N});
  }
}

// A call smaller than this many weight bytes per thread stays on one thread.
constexpr int64_t kMinBytesPerThread = 96 * 1024;

// R rows per tile, MB rows of x per tile.
template <int R, int MB, typename T>
void run(const T* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K, T* y) {
  const int64_t row_bytes = std::max<int64_t>(1, K * static_cast<int64_t>(sizeof(T)));
  // Prefetch the next tile when the rows are contiguous, and at M == 1 only for short tiles: there long
  // rows stream well on the hardware prefetcher alone, which the software prefetch measured to slow down.
  const bool pf = ldw == K && (MB > 1 || R * row_bytes <= DS_GEMV_PREFETCH_TILE_BYTES);
  // rows per block: as many whole tiles as fit DS_GEMV_BLOCK_BYTES (matters only when M > MB)
  const int64_t block_rows = std::max<int64_t>(1, DS_GEMV_BLOCK_BYTES / (R * row_bytes)) * R;
  const int64_t groups = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (R * row_bytes));
  // at::parallel_for gives each thread one contiguous chunk of ceil(groups / threads) tiles (at least
  // `grain`): the weight streams sequentially within every thread.
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t n1 = std::min(N, g1 * R);
    for (int64_t n = g0 * R; n < n1; n += block_rows) {
      block<R, MB, T>(pf, w + n * ldw, ldw, std::min(block_rows, n1 - n), x, ldx, M, K, y + n, N);
    }
  });
}

template <typename T>
void dispatch(const T* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K, T* y) {
  if (M == 1) {
    run<Isa::R1, 1, T>(w, ldw, x, ldx, M, N, K, y);
  } else {
    run<Isa::R, Isa::MB, T>(w, ldw, x, ldx, M, N, K, y);
  }
}

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_m_linear: x [M, K] and w [N, K]; got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "small_m_linear: x ", x.sizes(), " and w ", w.sizes(), " differ in K");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_m_linear: x is ", x.scalar_type(), ", w is ",
              w.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "small_m_linear: float32 or bfloat16 only; got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_m_linear: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor wc = w;
  if (N > 0 && K > 0 && (w.stride(1) != 1 || w.stride(0) < K)) wc = w.contiguous();  // rows must be unit-stride
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  // x in fp32, unit column stride, every row 64-byte aligned (a misaligned row splits a vector load in two
  // cache lines): in place when it already is, else one small converted copy
  std::unique_ptr<float, decltype(&std::free)> xbuf(nullptr, &std::free);
  const auto [xp, ldx] = f32_rows(x, [&](size_t n) {
    xbuf.reset(static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))));
    TORCH_CHECK(xbuf, "small_m_linear: out of memory");
    return xbuf.get();
  });

  const int64_t ldw = wc.stride(0);
  if (x.scalar_type() == at::kFloat) {
    dispatch<float>(wc.const_data_ptr<float>(), ldw, xp, ldx, M, N, K, y.data_ptr<float>());
  } else {
    dispatch<bf16>(wc.const_data_ptr<bf16>(), ldw, xp, ldx, M, N, K, y.data_ptr<bf16>());
  }
  return y;
}

}  // namespace

namespace fused {
void gemv(Kind kind, const void* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
          void* y) {
  if (kind == Kind::F32) {
    dispatch<float>(static_cast<const float*>(w), ldw, x, ldx, M, N, K, static_cast<float*>(y));
  } else {
    dispatch<bf16>(static_cast<const bf16*>(w), ldw, x, ldx, M, N, K, static_cast<bf16*>(y));
  }
}
}  // namespace fused
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(DS_GEMV_LIBRARY, m) {
  m.def("small_m_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(DS_GEMV_LIBRARY, CPU, m) {
  m.impl("small_m_linear", &depthserve::small_m_linear);
}
