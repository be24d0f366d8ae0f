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
// Each of the 4 linears may instead be weight-only quantized: uint8 [N, K / 32 * bb] rows of ggml blocks
// (kernels/quant.py; Q8_0, Q4_0 or Q4_1, told apart by bytes per block given the linear's K), run by
// fused::qgemv, the loops of depthserve::quant_linear, which is what the per-op path calls for them. A layer may
// mix formats and plain weights.
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
#include <vector>

#include "common.h"
#include "fused.h"

namespace depthserve {
namespace {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

struct Scratch {
  Buffer xf, qkv, attn, a, x2, gu, act, xin, mout;
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

// A linear's weight [n, k]: a plain one of x's dtype, or a quantized one, uint8 [n, k / 32 * bb] of ggml blocks
// (kernels/quant.py). Returns the ggml type of a quantized weight (inferred from the row's byte count, which given
// k is unambiguous: 34, 18 or 20 bytes per block of 32), 0 for a plain one.
int check_linear(const at::Tensor& w, int64_t n, int64_t k, const at::Tensor& x, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), "decode_layer: ", name, " must be a CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == n, "decode_layer: ", name, " must have ", n, " rows ([", n, ", ", k,
              "] or quantized), got ", w.sizes());
  int type = 0;
  if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(k > 0 && k % 32 == 0, "decode_layer: ", name, " is quantized (uint8), but its input size ", k,
                " is not a positive multiple of 32");
    const int64_t blocks = k / 32;
    const int64_t bb = w.size(1) % blocks == 0 ? w.size(1) / blocks : 0;
    for (int t : {8, 2, 3}) {
      if (fused::quant_block_bytes(t) == bb) type = t;
    }
    TORCH_CHECK(type != 0, "decode_layer: ", name, " is quantized (uint8) with rows of ", w.size(1), " bytes; for ",
                blocks, " blocks of 32 inputs they must be ", blocks * 34, " (Q8_0), ", blocks * 18, " (Q4_0) or ",
                blocks * 20, " (Q4_1)");
  } else {
    TORCH_CHECK(w.size(1) == k, "decode_layer: ", name, " must be [", n, ", ", k, "], got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "decode_layer: ", name, " must be of x's dtype (", x.scalar_type(),
                ") or uint8 (quantized), got ", w.scalar_type());
  }
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) >= w.size(1), "decode_layer: ", name, " must have unit-stride rows");
  return type;
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

void check_norm(const at::Tensor& w, const at::Tensor& x) {
  check_rows(w, 1, "norm weight");
  TORCH_CHECK(w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "decode_layer: norm weights must be [d] of x's dtype (the linears read the norms' outputs)");
}

// What every layer of a step shares: the rows, their rotary angles and their places in the paged cache.
struct Step {
  Kind kind;
  int64_t M, d, el;
  const float* cos;
  const float* sin;
  int64_t sc, ss;
  const int64_t* slots;
  int64_t s_stride;
  const int64_t* table;
  int64_t t_sb, t_sn, nb;
  const int32_t* lens;
  int64_t block_size;
  float scale;
  double eps;
};

Step check_step(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_mapping,
                const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size, double scale,
                double eps) {
  check_rows(x, 2, "x");
  check_float_kind(x, "x");
  const int64_t M = x.size(0);
  TORCH_CHECK(cos.sizes() == sin.sizes() && (cos.dim() == 2 || (cos.dim() == 3 && cos.size(1) == 1)) &&
                  cos.size(0) == M,
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
  return Step{kind_of(x), M, x.size(1), x.element_size(), ptr<const float>(cos), ptr<const float>(sin),
              cos.stride(0), sin.stride(0), ptr<const int64_t>(slot_mapping), slot_mapping.stride(0),
              ptr<const int64_t>(block_table), block_table.stride(0), block_table.stride(1), block_table.size(1),
              ptr<const int32_t>(context_lens), block_size, static_cast<float>(scale), eps};
}

// One layer's sizes, from its weights and caches (checked against the step).
struct Layer {
  const at::Tensor* w;  // w_qkv, w_o, w_gate_up, w_down
  int qtype[4];         // each one's ggml type when quantized (uint8), else 0
  const at::Tensor* k_cache;
  const at::Tensor* v_cache;
  int64_t H, KV, hd, nqkv, f;
};

Layer check_layer(const Step& st, const at::Tensor& x, const at::Tensor* w, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, int64_t half) {
  check_rows(k_cache, 3, "k_cache");
  check_rows(v_cache, 3, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == x.scalar_type() &&
                  v_cache.scalar_type() == x.scalar_type(),
              "decode_layer: K and V caches of one shape and x's dtype");
  const int64_t KV = k_cache.size(1), hd = k_cache.size(2), S = k_cache.size(0);
  const int64_t nqkv = w[0].dim() == 2 ? w[0].size(0) : 0;
  TORCH_CHECK(KV > 0 && hd > 0 && hd == 2 * half && nqkv % hd == 0 && nqkv / hd > 2 * KV, "decode_layer: w_qkv rows ",
              nqkv, " are not (H + 2 KV) x hd for KV ", KV, ", hd ", hd, " (cos/sin give hd ", 2 * half, ")");
  const int64_t H = nqkv / hd - 2 * KV, f = w[2].dim() == 2 ? w[2].size(0) / 2 : 0;
  TORCH_CHECK(H % KV == 0, "decode_layer: query heads must be a multiple of KV heads");
  const int q0 = check_linear(w[0], nqkv, st.d, x, "w_qkv");
  const int q1 = check_linear(w[1], st.d, H * hd, x, "w_o");
  const int q2 = check_linear(w[2], 2 * f, st.d, x, "w_gate_up");
  const int q3 = check_linear(w[3], st.d, f, x, "w_down");
  for (int64_t t = 0; t < st.M; ++t) {
    const int64_t s = st.slots[t * st.s_stride];
    TORCH_CHECK(s >= 0 && s < S, "decode_layer: slot ", s, " of row ", t, " is outside the caches' ", S, " slots");
  }
  fused::check_decode_context(k_cache, st.table, st.t_sb, st.t_sn, st.nb, st.lens, st.M, st.block_size);
  return Layer{w, {q0, q1, q2, q3}, &k_cache, &v_cache, H, KV, hd, nqkv, f};
}

// What runs between the attention and the MLP: the standard residual add + norm, or a Phase-2 AttnRes site.
struct Glue {
  const void* norm_w = nullptr;
  void* residual = nullptr;  // standard: [M, d] at stride sr
  int64_t sr = 0;
  float* partial = nullptr;  // AttnRes: fp32 [M, d] at stride sp, lse1 [M] at sl, xo1 [M, d] at sx, query [d]
  int64_t sp = 0;
  const float* lse1 = nullptr;
  int64_t sl = 0;
  const float* xo1 = nullptr;
  int64_t sx = 0;
  const float* query = nullptr;
  bool accumulate = true;
};

// Linear i of a layer on the fp32 rows xf: the plain gemv or the quantized one (the per-op path's small_m_linear
// or quant_linear: the same loops).
void layer_linear(Kind kind, const Layer& l, int i, const float* xf, int64_t ldx, int64_t M, int64_t N, int64_t K,
                  void* y) {
  const at::Tensor& w = l.w[i];
  if (l.qtype[i] != 0) {
    fused::qgemv(l.qtype[i], static_cast<const uint8_t*>(w.data_ptr()), w.stride(0), xf, ldx, M, N, K, kind, y);
  } else {
    fused::gemv(kind, w.data_ptr(), w.stride(0), xf, ldx, M, N, K, y);
  }
}

// The layer (checked): x [M, d] at row stride sx of st.kind -> its MLP output into out [M, d] (contiguous).
void run_layer(const Step& st, const Layer& l, const void* x, int64_t sx, const Glue& g, void* out) {
  const Kind kind = st.kind;
  const int64_t M = st.M, d = st.d, el = st.el, H = l.H, KV = l.KV, hd = l.hd, nqkv = l.nqkv, f = l.f;
  const int64_t nq = H * hd;
  Scratch& s = scratch();
  const int64_t ldx = round16(std::max({d, nq, f}));
  float* xf = s.xf.get<float>(M * ldx * sizeof(float));  // [M, ldx] fp32: the current linear's input
  char* qkv = s.qkv.get(M * nqkv * el);                  // [M, (H + 2 KV) hd]
  char* attn = s.attn.get(M * nq * el);                  // [M, H hd]
  char* a = s.a.get(M * d * el);                         // [M, d] attention output
  char* x2 = s.x2.get(M * d * el);                       // [M, d] the MLP's normalised input
  char* gu = s.gu.get(M * 2 * f * el);                   // [M, 2 f]
  char* act = s.act.get(M * f * el);                     // [M, f]

  to_f32(kind, x, sx, M, d, xf, ldx);
  layer_linear(kind, l, 0, xf, ldx, M, nqkv, d, qkv);
  fused::rotary_rows(kind, qkv, nqkv, hd, H, qkv + nq * el, nqkv, hd, KV, hd / 2, st.cos, st.sc, st.sin, st.ss, M);
  for (int64_t t = 0; t < M; ++t) {  // K and V rows into their slots
    const int64_t slot = st.slots[t * st.s_stride];
    const char* src[2] = {qkv + (t * nqkv + nq) * el, qkv + (t * nqkv + nq + KV * hd) * el};
    const at::Tensor* caches[2] = {l.k_cache, l.v_cache};
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
  fused::decode_attention_rows(kind, qkv, nqkv, hd, *l.k_cache, *l.v_cache, st.table, st.t_sb, st.t_sn, st.lens, M, H,
                               st.block_size, st.scale, attn);
  to_f32(kind, attn, nq, M, nq, xf, ldx);
  layer_linear(kind, l, 1, xf, ldx, M, d, nq, a);
  if (g.residual != nullptr) {
    fused::add_rms_norm_rows(kind, a, d, g.residual, g.sr, kind, g.norm_w, x2, M, d, st.eps);
  } else {
    fused::attnres_site_rows(g.partial, g.sp, kind, a, d, g.accumulate, g.lse1, g.sl, g.xo1, g.sx, g.query, kind,
                             g.norm_w, x2, M, d, st.eps);
  }
  to_f32(kind, x2, d, M, d, xf, ldx);
  layer_linear(kind, l, 2, xf, ldx, M, 2 * f, d, gu);
  fused::silu_mul_rows(kind, gu, 2 * f, act, M, f);
  to_f32(kind, act, f, M, f, xf, ldx);
  layer_linear(kind, l, 3, xf, ldx, M, d, f, out);
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size,
                        double scale, const at::Tensor& norm_weight, double eps,
                        const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& partial,
                        const std::optional<at::Tensor>& lse1, const std::optional<at::Tensor>& xo1,
                        const std::optional<at::Tensor>& query, bool accumulate) {
  // ---- checks: all of them before anything is written ----
  const Step st = check_step(x, cos, sin, slot_mapping, block_table, context_lens, block_size, scale, eps);
  TORCH_CHECK(weights.size() == 4, "decode_layer: weights are (w_qkv, w_o, w_gate_up, w_down)");
  const Layer l = check_layer(st, x, weights.data(), k_cache, v_cache, cos.size(-1));
  check_norm(norm_weight, x);
  Glue g;
  g.norm_w = norm_weight.data_ptr();
  if (residual.has_value() && residual->defined()) {
    check_rows(*residual, 2, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "decode_layer: residual must be [M, d] of x's dtype");
    g.residual = residual->data_ptr();
    g.sr = residual->stride(0);
  } else {
    check_site(partial, 2, "partial");
    check_site(lse1, 1, "lse1", true);
    check_site(xo1, 2, "xo1");
    check_site(query, 1, "query");
    TORCH_CHECK(partial->sizes() == x.sizes() && xo1->sizes() == x.sizes() && lse1->size(0) == st.M &&
                    query->size(0) == st.d,
                "decode_layer: partial, xo1 [M, d], lse1 [M], query [d]");
    g.partial = ptr<float>(*partial);
    g.sp = partial->stride(0);
    g.lse1 = ptr<const float>(*lse1);
    g.sl = lse1->stride(0);
    g.xo1 = ptr<const float>(*xo1);
    g.sx = xo1->stride(0);
    g.query = ptr<const float>(*query);
    g.accumulate = accumulate;
  }
  at::Tensor out(at::detail::empty_cpu({st.M, st.d}, x.options()));
  if (st.M > 0) run_layer(st, l, x.data_ptr(), x.stride(0), g, out.data_ptr());
  return out;
}

// depthserve::decode_layers: every decoder layer of a pure-decode step in one call (the model's loop over
// decode_layer, with the glue before each layer too). h [M, d] is the embedding. Standard (no states): x =
// rms_norm(h) then per layer decode_layer with the residual h, and between layers add_rms_norm(m, h) with the next
// input norm. Block AttnRes (states, keys [M, S, d], lse [M, Q], xo [M, Q, d] fp32, states[:, 0] = the embedding
// already; block_queries [Q, d] per block, site_queries [L, 2, d]): a layer that opens a block adds the pending
// output to the partial, runs Phase 1 and rms_norm(xo[:, its query]); the others the input site; then the layer
// with the Phase-2 site between its sublayers. Returns the last layer's MLP output (not yet added to h / the
// partial: the caller's head does that). norms: (input, post-attention) per layer.
at::Tensor decode_layers(const at::Tensor& h, at::TensorList weights, at::TensorList norms, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slot_mapping, const at::Tensor& block_table,
                         const at::Tensor& context_lens, int64_t block_size, double scale, double eps,
                         const std::optional<at::Tensor>& states, const std::optional<at::Tensor>& keys,
                         const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& xo,
                         at::TensorList block_queries, const std::optional<at::Tensor>& site_queries,
                         int64_t attn_res_block_size) {
  // ---- checks: all of them before anything is written ----
  const Step st = check_step(h, cos, sin, slot_mapping, block_table, context_lens, block_size, scale, eps);
  const int64_t L = static_cast<int64_t>(k_caches.size()), M = st.M, d = st.d;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(v_caches.size()) == L && static_cast<int64_t>(weights.size()) == 4 * L &&
                  static_cast<int64_t>(norms.size()) == 2 * L,
              "decode_layers: 4 weights, 2 norms and a K and V cache per layer");
  std::vector<Layer> layers;
  layers.reserve(L);
  for (int64_t i = 0; i < L; ++i) {
    layers.push_back(check_layer(st, h, weights.data() + 4 * i, k_caches[i], v_caches[i], cos.size(-1)));
    check_norm(norms[2 * i], h);
    check_norm(norms[2 * i + 1], h);
  }
  const bool block = states.has_value() && states->defined();
  int64_t bs = 0, Q = 0;
  if (block) {
    check_site(states, 3, "states");
    check_site(keys, 3, "keys");
    check_site(lse, 2, "lse", true);
    check_site(xo, 3, "xo");
    check_site(site_queries, 3, "site_queries");
    bs = attn_res_block_size;
    Q = 2 * bs;
    const int64_t blocks = (L + bs - 1) / std::max<int64_t>(bs, 1);
    TORCH_CHECK(bs > 0 && states->size(0) == M && states->size(2) == d && keys->sizes() == states->sizes() &&
                    states->size(1) > blocks,
                "decode_layers: states, keys [M, > blocks, d]");
    TORCH_CHECK(lse->size(0) == M && lse->size(1) == Q && xo->size(0) == M && xo->size(1) == Q && xo->size(2) == d,
                "decode_layers: lse [M, 2 block_size], xo [M, 2 block_size, d]");
    TORCH_CHECK(site_queries->size(0) == L && site_queries->size(1) == 2 && site_queries->size(2) == d &&
                    site_queries->is_contiguous(),
                "decode_layers: site_queries [L, 2, d], contiguous");
    TORCH_CHECK(static_cast<int64_t>(block_queries.size()) == blocks, "decode_layers: one query matrix per block");
    for (const auto& q : block_queries) {
      check_rows(q, 2, "block_queries");
      check_f32(q, "block_queries");
      TORCH_CHECK(q.size(0) == Q && q.size(1) == d, "decode_layers: block_queries must be [2 block_size, d]");
    }
  }
  at::Tensor out(at::detail::empty_cpu({M, d}, h.options()));
  if (M == 0) return out;

  // ---- the layers ----
  Scratch& s = scratch();
  char* x = s.xin.get(M * d * st.el);   // [M, d] the next layer's normalised input
  char* m = s.mout.get(M * d * st.el);  // [M, d] the last MLP output
  const Kind kind = st.kind;
  if (!block) {
    fused::rms_norm_rows(kind, h.data_ptr(), h.stride(0), kind, norms[0].data_ptr(), x, M, d, eps);
    for (int64_t i = 0; i < L; ++i) {
      Glue g;
      g.norm_w = norms[2 * i + 1].data_ptr();
      g.residual = h.data_ptr();
      g.sr = h.stride(0);
      void* dst = i + 1 < L ? static_cast<void*>(m) : out.data_ptr();
      run_layer(st, layers[i], x, d, g, dst);
      if (i + 1 < L) {
        fused::add_rms_norm_rows(kind, m, d, h.data_ptr(), h.stride(0), kind, norms[2 * i + 2].data_ptr(), x, M, d,
                                 eps);
      }
    }
    return out;
  }
  float* sp = ptr<float>(*states);
  float* kp = ptr<float>(*keys);
  float* lp = ptr<float>(*lse);
  float* xp = ptr<float>(*xo);
  const int64_t s0 = states->stride(0), s1 = states->stride(1), k0 = keys->stride(0), k1 = keys->stride(1);
  const int64_t l0 = lse->stride(0), l1 = lse->stride(1), x0 = xo->stride(0), x1 = xo->stride(1);
  const float* sq = ptr<const float>(*site_queries);
  int64_t n = 0;  // completed blocks: the partial lives in source n
  for (int64_t i = 0; i < L; ++i) {
    const int64_t j = i % bs, qa = 2 * j, qm = 2 * j + 1;
    const bool opens = j == 0;
    if (opens) {
      if (i > 0) {  // the partial += the pending MLP output, which closes it as block n
        with_type(kind, [&](auto tag) {
          using T = decltype(tag);
          const T* pm = reinterpret_cast<const T*>(m);
          for (int64_t t = 0; t < M; ++t) {
            float* p = sp + t * s0 + n * s1;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) p[k] += to_f(pm[t * d + k]);
          }
        });
      }
      ++n;
      const at::Tensor& bq = block_queries[i / bs];
      fused::attnres_phase1_rows(sp, s0, s1, kp, k0, k1, n, ptr<const float>(bq), bq.stride(0), Q, lp, l0, l1, xp, x0,
                                 x1, M, d, eps);
      fused::rms_norm_rows(Kind::F32, xp + qa * x1, x0, kind, norms[2 * i].data_ptr(), x, M, d, eps);
    } else {
      fused::attnres_site_rows(sp + n * s1, s0, kind, m, d, true, lp + qa * l1, l0, xp + qa * x1, x0,
                               sq + (2 * i) * d, kind, norms[2 * i].data_ptr(), x, M, d, eps);
    }
    Glue g;
    g.norm_w = norms[2 * i + 1].data_ptr();
    g.partial = sp + n * s1;
    g.sp = s0;
    g.lse1 = lp + qm * l1;
    g.sl = l0;
    g.xo1 = xp + qm * x1;
    g.sx = x0;
    g.query = sq + (2 * i + 1) * d;
    g.accumulate = !opens;
    run_layer(st, layers[i], x, d, g, i + 1 < L ? static_cast<void*>(m) : out.data_ptr());
  }
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

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def(
      "decode_layers(Tensor(a!) h, Tensor[] weights, Tensor[] norms, Tensor(b!)[] k_caches, Tensor(c!)[] v_caches, "
      "Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_table, Tensor context_lens, int block_size, "
      "float scale, float eps, Tensor(d!)? states, Tensor(e!)? keys, Tensor(f!)? lse, Tensor(g!)? xo, "
      "Tensor[] block_queries, Tensor? site_queries, int attn_res_block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("decode_layer", &depthserve::decode_layer);
  m.impl("decode_layers", &depthserve::decode_layers);
}
