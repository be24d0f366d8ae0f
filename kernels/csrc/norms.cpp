// rms_norm and add_rms_norm (semantics: kernels/reference.py). One read of each row into L1, one write.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "fused.h"

namespace depthserve {
namespace {

template <typename TX, typename TW>
void rms_norm_rows(const TX* x, int64_t sx, const TW* w, TW* out, int64_t rows, int64_t d, double eps) {
  for_rows(rows, 2 * d, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const TX* xr = x + t * sx;
      TW* o = out + t * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const float v = to_f(xr[i]);
        ss += v * v;
      }
      const float r = inv_rms(ss, d, eps);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = scale_by(to_f(xr[i]) * r, w[i]);
    }
  });
}

// residual += x (rounded to the residual's dtype), then the rms_norm of the new residual.
template <typename TR, typename TW>
void add_rms_norm_rows(const TR* x, int64_t sx, TR* res, int64_t sr, const TW* w, TW* out, int64_t rows, int64_t d,
                       double eps) {
  for_rows(rows, 3 * d, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const TR* xr = x + t * sx;
      TR* rr = res + t * sr;
      TW* o = out + t * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const TR nv = from_f<TR>(to_f(rr[i]) + to_f(xr[i]));
        rr[i] = nv;
        const float v = to_f(nv);
        ss += v * v;
      }
      const float r = inv_rms(ss, d, eps);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = scale_by(to_f(rr[i]) * r, w[i]);
    }
  });
}

void check_weight(const at::Tensor& weight, int64_t d) {
  check_rows(weight, 1, "weight");
  check_float_kind(weight, "weight");
  TORCH_CHECK(weight.size(0) == d, "depthserve: weight has ", weight.size(0), " elements, rows have ", d);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, 2, "x");
  check_float_kind(x, "x");
  const int64_t rows = x.size(0), d = x.size(1);
  check_weight(weight, d);
  at::Tensor out = at::empty({rows, d}, weight.options());
  with_type(kind_of(x), [&](auto tx) {
    using TX = decltype(tx);
    with_type(kind_of(weight), [&](auto tw) {
      using TW = decltype(tw);
      rms_norm_rows<TX, TW>(ptr<const TX>(x), x.stride(0), ptr<const TW>(weight), ptr<TW>(out), rows, d, eps);
    });
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, 2, "x");
  check_rows(residual, 2, "residual");
  check_float_kind(residual, "residual");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "depthserve: x and residual must share a dtype");
  TORCH_CHECK(x.sizes() == residual.sizes(), "depthserve: x and residual must have one shape");
  const int64_t rows = x.size(0), d = x.size(1);
  check_weight(weight, d);
  at::Tensor out = at::empty({rows, d}, weight.options());
  with_type(kind_of(x), [&](auto tr) {
    using TR = decltype(tr);
    with_type(kind_of(weight), [&](auto tw) {
      using TW = decltype(tw);
      add_rms_norm_rows<TR, TW>(ptr<const TR>(x), x.stride(0), ptr<TR>(residual), residual.stride(0),
                                ptr<const TW>(weight), ptr<TW>(out), rows, d, eps);
    });
  });
  return out;
}

}  // namespace

void fused::rms_norm_rows(Kind kind, const void* x, int64_t sx, Kind wkind, const void* w, void* out, int64_t rows,
                          int64_t d, double eps) {
  with_type(kind, [&](auto tx) {
    using TX = decltype(tx);
    with_type(wkind, [&](auto tw) {
      using TW = decltype(tw);
      depthserve::rms_norm_rows<TX, TW>(static_cast<const TX*>(x), sx, static_cast<const TW*>(w), static_cast<TW*>(out),
                                        rows, d, eps);
    });
  });
}

void fused::add_rms_norm_rows(Kind kind, const void* x, int64_t sx, void* res, int64_t sr, Kind wkind, const void* w,
                              void* out, int64_t rows, int64_t d, double eps) {
  with_type(kind, [&](auto tr) {
    using TR = decltype(tr);
    with_type(wkind, [&](auto tw) {
      using TW = decltype(tw);
      depthserve::add_rms_norm_rows<TR, TW>(static_cast<const TR*>(x), sx, static_cast<TR*>(res), sr, static_cast<const TW*>(w),
                                static_cast<TW*>(out), rows, d, eps);
    });
  });
}
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("rms_norm", &depthserve::rms_norm);
  m.impl("add_rms_norm", &depthserve::add_rms_norm);
}
