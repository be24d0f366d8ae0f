// depthserve::decode_layer: one decoder layer of a pure-decode step with few rows, in one call.
//
//   m = decode_layer(x [M, d], weights (w_qkv [(H + 2 KV) hd, d], w_o [d, H hd], w_gate_up [2 f, d],
//                    w_down [d, f]), cos, sin [M, (1,) hd/2] fp32, k_cache, v_cache [S, KV, hd],
//                    slot_mapping [M] int64, block_table [M, nb] int64, context_lens [M] int32, block_size,
//                    scale, norm_weight [d], eps, residual?, partial?, lse1?, xo1?, query?, accumulate) -> [M, d]
//
// x is the layer's normalised input; the result is its MLP output, not yet added to anything (the caller's
// next norm or AttnRes site does that, as on the per-op path). In between, in this order, exactly the per-op
// path's kernels (fused.h): QKV linear, rotary of q and k, K/V into their cache slots, paged decode attention,
// o_proj, then the sublayer glue, then gate_up, silu * up, down. The glue is the model's:
// - standard (residual given): residual += attention output, x2 = rms_norm(residual) * norm_weight;
// - Block AttnRes (partial, lse1, xo1, query given): the Phase-2 site attnres_site(partial, attention output,
//   lse1, xo1, query, norm_weight, eps, accumulate).
// Every intermediate is rounded to the model's dtype where the per-op path rounds it, so the result is the
// per-op path's, bit for bit.
//
// Why: at batch 1 the per-op path makes ~10 op calls per layer (300 a step), each with the Python between
// them, a dispatcher call and a fresh output tensor; here a layer is one call, its intermediates live in
// per-thread scratch buffers reused by every layer and step, and only the result is a new tensor.
// Everything is checked before anything is written (the caches, the residual or partial): a call that raises
// changed nothing, and its caller (kernels/cpu.py) runs the per-op path instead.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>

#include "common.h"
#include "fused.h"

namespace depthserve {
namespace {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

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
      TORCH_CHECK(p != nullptr, "decode_layer: out of memory");
    }
    return static_cast<T*>(p);
  }
  ~Buffer() { std::free(p); }
};

struct Scratch {
  Buffer xf, qkv, attn, a, x2, gu, act;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// rows of x ([M, K] at row stride sx, `kind`) -> fp32 rows at ldx (the layout fused::gemv reads)
void to_f32(Kind kind, const void* x, int64_t sx, int64_t M, int64_t K, float* out, int64_t ldx) {
  with_type(kind, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t m = 0; m < M; ++m) {
      const T* src = static_cast<const T*>(x) + m * sx;
      float* dst = out + m * ldx;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[k]);
    }
  });
}

void check_linear(const at::Tensor& w, int64_t n, int64_t k, const at::Tensor& x, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == n && w.size(1) == k, "decode_layer: ", name, " must be [", n, ", ", k,
              "], got ", w.sizes());
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == x.scalar_type(), "decode_layer: ", name,
              " must be a CPU tensor of x's dtype");
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) >= k, "decode_layer: ", name, " must have unit-stride rows");
}

// an fp32 CPU tensor of `dim` dims, contiguous in the last unless `strided` (lse1: a column of the [T, Q] pool)
void check_site(const std::optional<at::Tensor>& t, int64_t dim, const char* name, bool strided = false) {
  TORCH_CHECK(t.has_value() && t->defined(), "decode_layer: the AttnRes site needs ", name);
  if (strided) {
    TORCH_CHECK(t->dim() == dim && t->device().is_cpu(), "decode_layer: ", name, " must be a ", dim,
                "-dim CPU tensor");
  } else {
    check_rows(*t, dim, name);
  }
  check_f32(*t, name);
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size,
                        double scale, const at::Tensor& norm_weight, double eps,
                        const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& partial,
                        const std::optional<at::Tensor>& lse1, const std::optional<at::Tensor>& xo1,
                        const std::optional<at::Tensor>& query, bool accumulate) {
  // ---- checks: all of them before anything is written ----
  check_rows(x, 2, "x");
  check_float_kind(x, "x");
  const Kind kind = kind_of(x);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(weights.size() == 4, "decode_layer: weights are (w_qkv, w_o, w_gate_up, w_down)");
  check_rows(k_cache, 3, "k_cache");
  check_rows(v_cache, 3, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == x.scalar_type() &&
                  v_cache.scalar_type() == x.scalar_type(),
              "decode_layer: K and V caches of one shape and x's dtype");
  const int64_t KV = k_cache.size(1), hd = k_cache.size(2), S = k_cache.size(0);
  const int64_t nqkv = weights[0].size(0);
  TORCH_CHECK(KV > 0 && hd > 0 && nqkv % hd == 0 && nqkv / hd > 2 * KV, "decode_layer: w_qkv rows ", nqkv,
              " are not (H + 2 KV) x hd for KV ", KV, ", hd ", hd);
  const int64_t H = nqkv / hd - 2 * KV, f = weights[2].size(0) / 2;
  TORCH_CHECK(H % KV == 0, "decode_layer: query heads must be a multiple of KV heads");
  check_linear(weights[0], nqkv, d, x, "w_qkv");
  check_linear(weights[1], d, H * hd, x, "w_o");
  check_linear(weights[2], 2 * f, d, x, "w_gate_up");
  check_linear(weights[3], d, f, x, "w_down");
  TORCH_CHECK(cos.sizes() == sin.sizes() && (cos.dim() == 2 || (cos.dim() == 3 && cos.size(1) == 1)) &&
                  cos.size(0) == M && cos.size(-1) * 2 == hd,
              "decode_layer: cos/sin must be [M, (1,) hd/2]");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu() && cos.stride(-1) == 1 && sin.stride(-1) == 1,
              "decode_layer: cos/sin must be CPU tensors, contiguous in the last dim");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == M && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.device().is_cpu(),
              "decode_layer: slot_mapping must be [M] int64");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == M && block_table.scalar_type() == at::kLong &&
                  block_table.device().is_cpu(),
              "decode_layer: block_table must be [M, nb] int64");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == M && context_lens.scalar_type() == at::kInt &&
                  context_lens.is_contiguous() && context_lens.device().is_cpu(),
              "decode_layer: context_lens must be [M] int32, contiguous");
  TORCH_CHECK(block_size > 0, "decode_layer: block_size must be positive");
  check_rows(norm_weight, 1, "norm_weight");
  TORCH_CHECK(norm_weight.size(0) == d && norm_weight.scalar_type() == x.scalar_type(),
              "decode_layer: norm_weight must be [d] of x's dtype (the MLP reads the norm's output)");
  const bool standard = residual.has_value() && residual->defined();
  if (standard) {
    check_rows(*residual, 2, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "decode_layer: residual must be [M, d] of x's dtype");
  } else {
    check_site(partial, 2, "partial");
    check_site(lse1, 1, "lse1", true);
    check_site(xo1, 2, "xo1");
    check_site(query, 1, "query");
    TORCH_CHECK(partial->sizes() == x.sizes() && xo1->sizes() == x.sizes() && lse1->size(0) == M &&
                    query->size(0) == d,
                "decode_layer: partial, xo1 [M, d], lse1 [M], query [d]");
  }
  const int64_t* slots = ptr<const int64_t>(slot_mapping);
  const int64_t s_stride = slot_mapping.stride(0);
  for (int64_t t = 0; t < M; ++t) {
    const int64_t s = slots[t * s_stride];
    TORCH_CHECK(s >= 0 && s < S, "decode_layer: slot ", s, " of row ", t, " is outside the caches' ", S, " slots");
  }
  const int64_t* table = ptr<const int64_t>(block_table);
  const int32_t* lens = ptr<const int32_t>(context_lens);
  fused::check_decode_context(k_cache, table, block_table.stride(0), block_table.stride(1), block_table.size(1),
                              lens, M, block_size);

  at::Tensor out(at::detail::empty_cpu({M, d}, x.options()));
  if (M == 0) return out;

  // ---- the layer ----
  const int64_t el = x.element_size(), nq = H * hd;
  Scratch& s = scratch();
  const int64_t ldx = round16(std::max({d, nq, f}));
  float* xf = s.xf.get<float>(M * ldx * sizeof(float));  // [M, ldx] fp32: the current linear's input
  char* qkv = s.qkv.get(M * nqkv * el);                  // [M, (H + 2 KV) hd]
  char* attn = s.attn.get(M * nq * el);                  // [M, H hd]
  char* a = s.a.get(M * d * el);                         // [M, d] attention output
  char* x2 = s.x2.get(M * d * el);                       // [M, d] the MLP's normalised input
  char* gu = s.gu.get(M * 2 * f * el);                   // [M, 2 f]
  char* act = s.act.get(M * f * el);                     // [M, f]
  const auto* w = weights.data();

  to_f32(kind, x.data_ptr(), x.stride(0), M, d, xf, ldx);
  fused::gemv(kind, w[0].data_ptr(), w[0].stride(0), xf, ldx, M, nqkv, d, qkv);
  const int64_t half = hd / 2;
  fused::rotary_rows(kind, qkv, nqkv, hd, H, qkv + nq * el, nqkv, hd, KV, half, ptr<const float>(cos),
                     cos.stride(0), ptr<const float>(sin), sin.stride(0), M);
  for (int64_t t = 0; t < M; ++t) {  // K and V rows into their slots
    const int64_t slot = slots[t * s_stride];
    const char* src[2] = {qkv + (t * nqkv + nq) * el, qkv + (t * nqkv + nq + KV * hd) * el};
    const at::Tensor* caches[2] = {&k_cache, &v_cache};
    for (int c = 0; c < 2; ++c) {
      char* dst = static_cast<char*>(caches[c]->data_ptr()) + slot * caches[c]->stride(0) * el;
      if (caches[c]->stride(1) == hd || KV == 1) {
        std::memcpy(dst, src[c], size_t(KV * hd * el));
      } else {
        for (int64_t h = 0; h < KV; ++h)
          std::memcpy(dst + h * caches[c]->stride(1) * el, src[c] + h * hd * el, size_t(hd * el));
      }
    }
  }
  fused::decode_attention_rows(kind, qkv, nqkv, hd, k_cache, v_cache, table, block_table.stride(0),
                               block_table.stride(1), lens, M, H, block_size, static_cast<float>(scale), attn);
  to_f32(kind, attn, nq, M, nq, xf, ldx);
  fused::gemv(kind, w[1].data_ptr(), w[1].stride(0), xf, ldx, M, d, nq, a);
  if (standard) {
    fused::add_rms_norm_rows(kind, a, d, residual->data_ptr(), residual->stride(0), kind, norm_weight.data_ptr(), x2,
                             M, d, eps);
  } else {
    fused::attnres_site_rows(ptr<float>(*partial), partial->stride(0), kind, a, d, accumulate,
                             ptr<const float>(*lse1), lse1->stride(0), ptr<const float>(*xo1), xo1->stride(0),
                             ptr<const float>(*query), kind, norm_weight.data_ptr(), x2, M, d, eps);
  }
  to_f32(kind, x2, d, M, d, xf, ldx);
  fused::gemv(kind, w[2].data_ptr(), w[2].stride(0), xf, ldx, M, 2 * f, d, gu);
  fused::silu_mul_rows(kind, gu, 2 * f, act, M, f);
  to_f32(kind, act, f, M, f, xf, ldx);
  fused::gemv(kind, w[3].data_ptr(), w[3].stride(0), xf, ldx, M, d, f, out.data_ptr());
  return out;
}

}  // namespace
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def(
      "decode_layer(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_table, Tensor context_lens, int block_size, float scale, Tensor norm_weight, "
      "float eps, Tensor(c!)? residual, Tensor(d!)? partial, Tensor? lse1, Tensor? xo1, Tensor? query, "
      "bool accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) { m.impl("decode_layer", &depthserve::decode_layer); }
