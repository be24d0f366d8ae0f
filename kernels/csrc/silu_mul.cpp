// silu_mul (semantics: kernels/reference.py): SwiGLU's activation, silu(gate) * up of gu = [gate | up], in one
// pass over each row and one output (the reference makes two passes and two tensors). Computes in fp32 and
// rounds where the reference rounds: F.silu's result, then the product (one rounding for each in bf16).
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include "common.h"
#include "fused.h"

namespace depthserve {
namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// e^a, ~1 ulp: Cephes expf (Cody-Waite reduction by n ln2, a degree-5 polynomial on |r| <= ln2 / 2) in plain
// arithmetic, so gcc vectorises it (glibc's vector expf is declared only under -ffast-math; a scalar expf call
// keeps the loop scalar). a is clamped to [-86, 89] first: below, 1 + e^a rounds to 1 all the same; above,
// the result overflows to inf as e^a does (e^89 > FLT_MAX); a NaN becomes one of the two (silu(NaN) is still
// NaN, through x). The clamp compares bits as integers: a float compare is a possible trap under gcc's default
// -ftrapping-math, and gcc then keeps the loop scalar. n = round(a / ln2) by the 1.5 * 2^23 trick (its integer
// sits in the low bits), and 2^n = 2^(n-1) * 2, so that n = 128 (a just below ln FLT_MAX) stays finite.
inline float exp_approx(float a) {
  const uint32_t u = bits_of(a), sign = u & 0x80000000u;
  const uint32_t lim = sign ? 0x42ac0000u : 0x42b20000u;  // 86.f, 89.f
  a = float_of((u & 0x7fffffffu) > lim ? (sign | lim) : u);
  constexpr float kShift = 12582912.f;  // 1.5 * 2^23
  const float t = a * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const float r = (a - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const uint32_t n_bits = bits_of(t) - bits_of(kShift);  // n as a two's complement integer, n in [-124, 128]
  return e * float_of((n_bits + 126u) << 23) * 2.0f;
}

// torch's silu: x / (1 + e^-x).
inline float silu(float x) { return x / (1.0f + exp_approx(-x)); }

// Each element costs a few times a norm's (the exponential, a division): rows weigh this many elements each
// when for_rows decides whether to fork.
constexpr int64_t kWorkPerElement = 4;

template <typename T>
void silu_mul_rows(const T* gu, int64_t sg, T* out, int64_t rows, int64_t f) {
  for_rows(rows, kWorkPerElement * f, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gu + t * sg;
      const T* u = g + f;
      T* o = out + t * f;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) o[i] = from_f<T>(rounded<T>(silu(to_f(g[i]))) * to_f(u[i]));
    }
  });
}

// gu [T, 2f] (any row stride, contiguous last dim), fp32 or bf16 -> [T, f] in gu's dtype. Under tensor
// parallelism gu is this rank's shard [T, 2 f_local], gate rows then up rows: the same split.
at::Tensor silu_mul(const at::Tensor& gu) {
  check_rows(gu, 2, "gu");
  check_float_kind(gu, "gu");
  TORCH_CHECK(gu.size(1) % 2 == 0, "depthserve: gu must have an even last dim (gate | up), got ", gu.size(1));
  const int64_t rows = gu.size(0), f = gu.size(1) / 2;
  // allocated directly, not through the dispatcher (at::empty): one call per MLP, as TensorIterator's outputs are
  at::Tensor out(at::detail::empty_cpu({rows, f}, gu.options()));
  with_type(kind_of(gu), [&](auto tg) {
    using T = decltype(tg);
    silu_mul_rows<T>(ptr<const T>(gu), gu.stride(0), ptr<T>(out), rows, f);
  });
  return out;
}

}  // namespace

void fused::silu_mul_rows(Kind kind, const void* gu, int64_t sg, void* out, int64_t rows, int64_t f) {
  with_type(kind, [&](auto tg) {
    using T = decltype(tg);
    depthserve::silu_mul_rows<T>(static_cast<const T*>(gu), sg, static_cast<T*>(out), rows, f);
  });
}
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def("silu_mul(Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("silu_mul", &depthserve::silu_mul);
}
