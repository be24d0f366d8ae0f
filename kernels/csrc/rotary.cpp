// rotary (semantics: kernels/reference.py): the half-rotation rotary of q and k, in place, in one pass.
// The reference rotates in fp32 and rounds once to the tensors' dtype; so does this.
#include <torch/library.h>

#include "common.h"
#include "fused.h"

namespace depthserve {
namespace {

// Rotate `heads` heads of one row in place: x[i], x[i + half] -> (x1 c - x2 s, x2 c + x1 s).
template <typename T>
inline void rotate_row(T* x, int64_t heads, int64_t head_stride, int64_t half, const float* c, const float* s) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x1 = x + h * head_stride;
    T* x2 = x1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_f(x1[i]), b = to_f(x2[i]);
      const float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
      x1[i] = from_f<T>(ac - bs);
      x2[i] = from_f<T>(bc + as);
    }
  }
}

void check_heads(const at::Tensor& x, const char* name, int64_t rows, int64_t hd) {
  check_rows(x, 3, name);
  check_float_kind(x, name);
  TORCH_CHECK(x.size(0) == rows, "depthserve: ", name, " has ", x.size(0), " rows, cos has ", rows);
  TORCH_CHECK(x.size(2) == hd, "depthserve: ", name, " has head dim ", x.size(2), ", cos/sin give ", hd);
}

// q [T, H, hd], k [T, KV, hd] (any row and head strides, contiguous head dim); cos, sin [T, 1, hd/2] or
// [T, hd/2] fp32 with a contiguous last dim.
void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(cos.dim() == sin.dim() && (cos.dim() == 2 || cos.dim() == 3), "depthserve: cos/sin must be 2-D or 3-D");
  TORCH_CHECK(cos.sizes() == sin.sizes(), "depthserve: cos and sin must have one shape");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu(), "depthserve: cos/sin must be on the CPU");
  TORCH_CHECK(cos.dim() == 2 || cos.size(1) == 1, "depthserve: cos/sin must broadcast over heads");
  const int64_t half = cos.size(-1), rows = cos.size(0);
  TORCH_CHECK(cos.stride(-1) == 1 && sin.stride(-1) == 1, "depthserve: cos/sin must be contiguous in the last dim");
  check_heads(q, "q", rows, 2 * half);
  check_heads(k, "k", rows, 2 * half);
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "depthserve: q and k must share a dtype");
  const int64_t hq = q.size(1), hk = k.size(1);
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sc = cos.stride(0), ss = sin.stride(0);
  const float* cp = ptr<const float>(cos);
  const float* sp = ptr<const float>(sin);
  with_type(kind_of(q), [&](auto tq) {
    using T = decltype(tq);
    T* qp = ptr<T>(q);
    T* kp = ptr<T>(k);
    for_rows(rows, 2 * half * (hq + hk), [=](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_row(qp + t * sq0, hq, sq1, half, cp + t * sc, sp + t * ss);
        rotate_row(kp + t * sk0, hk, sk1, half, cp + t * sc, sp + t * ss);
      }
    });
  });
}

}  // namespace

void fused::rotary_rows(Kind kind, void* q, int64_t sq0, int64_t sq1, int64_t hq, void* k, int64_t sk0, int64_t sk1,
                        int64_t hk, int64_t half, const float* cos, int64_t sc, const float* sin, int64_t ss,
                        int64_t rows) {
  with_type(kind, [&](auto tq) {
    using T = decltype(tq);
    for (int64_t t = 0; t < rows; ++t) {  // decode rows: far below a thread's fork
      rotate_row(static_cast<T*>(q) + t * sq0, hq, sq1, half, cos + t * sc, sin + t * ss);
      rotate_row(static_cast<T*>(k) + t * sk0, hk, sk1, half, cos + t * sc, sin + t * ss);
    }
  });
}
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def("rotary(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("rotary", &depthserve::rotary);
}
