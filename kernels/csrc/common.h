// Shared helpers of depthserve's native CPU ops (kernels/csrc/*.cpp, built by kernels/cpu_ext.py).
//
// Element types: float, or bf16 held as its bit pattern (uint16_t). Every op computes in fp32 and rounds
// to bf16 exactly where kernels/reference.py rounds (round to nearest even, NaN -> 0x7fc0: c10::BFloat16's
// rule). The loops are plain C++ under `#pragma omp simd`, which gcc vectorises for whatever -march the
// build uses (AVX2, AVX-512, NEON): no intrinsics, no at::vec capability macros.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace depthserve {

using bf16_t = uint16_t;  // a bfloat16, as bits

inline float to_f(float v) { return v; }
inline float to_f(bf16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T> inline T from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline bf16_t from_f<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);  // all ones for a NaN
  return bf16_t((r & ~nan) | (0x7fc0u & nan));  // branch-free: gcc vectorises it inside reductions too
}

// to_f(from_f<T>(f)) without narrowing to T: f rounded as from_f rounds it, kept in fp32 for the next step (the
// pack to 16 bits and back costs about as much as the rounding itself in a vectorised loop).
template <typename T> inline float rounded(float f);
template <> inline float rounded<float>(float f) { return f; }
template <> inline float rounded<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const uint32_t nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);
  const uint32_t v = (r & ~nan) | (0x7fc00000u & nan);
  float out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// `y.to(w.dtype) * w` of the reference: in bf16 the normalised value is rounded, the product rounded again.
template <typename TW> inline TW scale_by(float y, TW w) { return from_f<TW>(to_f(from_f<TW>(y)) * to_f(w)); }

// 1 / sqrt(mean(v^2) + eps) from the sum of squares of d values.
inline float inv_rms(float sumsq, int64_t d, double eps) {
  return 1.0f / std::sqrt(sumsq / float(d) + float(eps));
}

// Rows below this much work (elements touched) per call run on the calling thread: at::parallel_for's
// OpenMP fork/join costs more than it saves there (decode steps are almost always below it).
constexpr int64_t kParallelWork = int64_t(1) << 16;

template <typename F> inline void for_rows(int64_t rows, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_row));
  if (rows <= grain) {
    f(int64_t(0), rows);
  } else {
    at::parallel_for(0, rows, grain, f);
  }
}

enum class Kind { F32, BF16, Other };

inline Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kBFloat16: return Kind::BF16;
    default: return Kind::Other;
  }
}

// A CPU tensor of `dim` dims whose last dim is contiguous (every other stride is free).
inline void check_rows(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "depthserve: ", name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.device().is_cpu(), "depthserve: ", name, " must be on the CPU");
  TORCH_CHECK(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, "depthserve: ", name,
              " must be contiguous in its last dim");
}

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "depthserve: ", name, " must be float32, got ", t.scalar_type());
}

inline void check_float_kind(const at::Tensor& t, const char* name) {
  TORCH_CHECK(kind_of(t) != Kind::Other, "depthserve: ", name, " must be float32 or bfloat16, got ",
              t.scalar_type());
}

template <typename T> inline T* ptr(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// Calls f(T{}) with T the element type of a float32 (float) or bfloat16 (bf16_t) tensor.
template <typename F> inline void with_type(Kind k, const F& f) {
  if (k == Kind::F32) {
    f(float{});
  } else {
    f(bf16_t{});
  }
}

// One 64-byte aligned scratch allocation, grown on demand and kept for the thread's next calls.
struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  template <typename T = char>
  T* get(size_t want) {
    if (want > bytes) {
      std::free(p);
      bytes = (want + 63) / 64 * 64;
      p = std::aligned_alloc(64, bytes);
      TORCH_CHECK(p != nullptr, "depthserve: out of memory for a scratch buffer");
    }
    return static_cast<T*>(p);
  }
  ~Buffer() { std::free(p); }
};

// x [M, K] (fp32 or bf16, any strides) as the fp32 rows the GEMV kernels read (unit stride, every row 64-byte
// aligned at a row stride that is a multiple of 16): in place when x already is that, else converted into the
// M * ldx floats that `alloc(count)` returns. Returns the rows and their stride.
template <typename Alloc>
inline std::pair<const float*, int64_t> f32_rows(const at::Tensor& x, Alloc alloc) {
  const int64_t M = x.size(0), K = x.size(1);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1 && aligned(x.const_data_ptr()) &&
      (M == 1 || x.stride(0) % 16 == 0)) {
    return {x.const_data_ptr<float>(), M > 1 ? x.stride(0) : K};
  }
  const int64_t ldx = (K + 15) / 16 * 16;
  float* buf = alloc(static_cast<size_t>(M * ldx));
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  with_type(kind_of(x), [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(x.const_data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      float* dst = buf + m * ldx;
      const T* src = base + m * s0;
      if (s1 == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[k * s1]);
      }
    }
  });
  return {buf, ldx};
}

}  // namespace depthserve
