// attnres_site, attnres_phase1 and attnres_mix (semantics: kernels/reference.py, math: docs/attnres.md §4-§5).
// Every tensor may be a strided view of the depth pool: rows use stride(0) (and stride(1) for the pool's
// source / query axis); only the last dim must be contiguous.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fused.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace depthserve {
namespace {

// dot4: the dot products of x with a, b, c and e over d in one pass over x (four independent accumulators);
// dot1: one dot product.
inline void dot4(const float* __restrict x, const float* a, const float* b, const float* c, const float* e,
                 int64_t d, float* out) {
  float s_a = 0.f, s_b = 0.f, s_c = 0.f, s_e = 0.f;
#pragma omp simd reduction(+ : s_a, s_b, s_c, s_e)
  for (int64_t i = 0; i < d; ++i) {
    s_a += x[i] * a[i];
    s_b += x[i] * b[i];
    s_c += x[i] * c[i];
    s_e += x[i] * e[i];
  }
  out[0] = s_a;
  out[1] = s_b;
  out[2] = s_c;
  out[3] = s_e;
}

// dot4 plus x's own sum of squares, in the same pass over x (out[4] = x . x).
inline void dot4_ss(const float* __restrict x, const float* a, const float* b, const float* c, const float* e,
                    int64_t d, float* out) {
  float s_a = 0.f, s_b = 0.f, s_c = 0.f, s_e = 0.f, s_x = 0.f;
#pragma omp simd reduction(+ : s_a, s_b, s_c, s_e, s_x)
  for (int64_t i = 0; i < d; ++i) {
    s_a += x[i] * a[i];
    s_b += x[i] * b[i];
    s_c += x[i] * c[i];
    s_e += x[i] * e[i];
    s_x += x[i] * x[i];
  }
  out[0] = s_a;
  out[1] = s_b;
  out[2] = s_c;
  out[3] = s_e;
  out[4] = s_x;
}

// For four sources a, b, c, e: their dot products with q (out[0..3]) and their sums of squares (out[4..7]),
// in one pass over each.
inline void dot4_own_ss(const float* __restrict q, const float* a, const float* b, const float* c, const float* e,
                        int64_t d, float* out) {
  float s_a = 0.f, s_b = 0.f, s_c = 0.f, s_e = 0.f, n_a = 0.f, n_b = 0.f, n_c = 0.f, n_e = 0.f;
#pragma omp simd reduction(+ : s_a, s_b, s_c, s_e, n_a, n_b, n_c, n_e)
  for (int64_t i = 0; i < d; ++i) {
    s_a += q[i] * a[i];
    s_b += q[i] * b[i];
    s_c += q[i] * c[i];
    s_e += q[i] * e[i];
    n_a += a[i] * a[i];
    n_b += b[i] * b[i];
    n_c += c[i] * c[i];
    n_e += e[i] * e[i];
  }
  out[0] = s_a;
  out[1] = s_b;
  out[2] = s_c;
  out[3] = s_e;
  out[4] = n_a;
  out[5] = n_b;
  out[6] = n_c;
  out[7] = n_e;
}

inline float dot1(const float* __restrict x, const float* __restrict a, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += x[i] * a[i];
  return s;
}

// Phase 1's outputs at prefill sizes: xo ([T, Q, d] fp32, 38 MB at T = 2048, Q = 8, d = 576) is written once
// and read back sublayers later, long after it has left the cache. Ordinary stores first read every line
// they write (read-for-ownership), a third of Phase 1's memory traffic; non-temporal stores skip that read.
// Below this many bytes of xo per call (decode, short chunks) xo stays in cache for the sites that follow,
// so ordinary stores win there.
constexpr int64_t kStreamXoBytes = int64_t(16) << 20;

// dst[0:d] = src[0:d] with non-temporal stores when dst is vector-aligned and d a whole number of vectors
// (true for d % 8 == 0 on a 64-byte-aligned pool), else ordinary stores.
inline void stream_row(float* __restrict dst, const float* __restrict src, int64_t d) {
#if defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && d % 8 == 0) {
    for (int64_t i = 0; i < d; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    return;
  }
#endif
  std::memcpy(dst, src, size_t(d) * sizeof(float));
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// torch.lerp's rounding: w < 0.5 ? start + w * (end - start) : end + (w - 1) * (end - start), as one fma.
struct Lerp {
  float coeff;
  bool small;
  explicit Lerp(float w) : coeff(std::fabs(w) < 0.5f ? w : w - 1.0f), small(std::fabs(w) < 0.5f) {}
};

// partial += delta (Mode 1), partial = delta (Mode 2) or partial as it is (Mode 0); returns through ss and dot
// the new partial's sum of squares and its dot product with the query.
template <int Mode, typename TD>
inline void site_update(float* __restrict p, const TD* __restrict dl, const float* __restrict q, int64_t d,
                        float& ss_out, float& dot_out) {
  float ss = 0.f, dot = 0.f;
#pragma omp simd reduction(+ : ss, dot)
  for (int64_t i = 0; i < d; ++i) {
    float v;
    if constexpr (Mode == 0) {
      v = p[i];
    } else if constexpr (Mode == 1) {
      v = p[i] + to_f(dl[i]);
    } else {
      v = to_f(dl[i]);
    }
    if constexpr (Mode != 0) p[i] = v;
    ss += v * v;
    dot += v * q[i];
  }
  ss_out = ss;
  dot_out = dot;
}

// x = lerp(xo, p, w) and out = rms_norm(x, weight): two passes, x recomputed rather than stored.
template <typename TW>
inline void site_mix_norm(const float* __restrict p, const float* __restrict xo, float w, const TW* __restrict wt,
                          TW* __restrict o, int64_t d, double eps) {
  const Lerp lw(w);
  const float* __restrict base = lw.small ? xo : p;
  const float c = lw.coeff;
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) {
    const float x = std::fma(c, p[i] - xo[i], base[i]);
    ss += x * x;
  }
  const float r = inv_rms(ss, d, eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) o[i] = scale_by(std::fma(c, p[i] - xo[i], base[i]) * r, wt[i]);
}

// One Phase-2 site: partial += delta (or = delta), w = sigmoid(key(partial) . query - lse1),
// x = lerp(xo1, partial, w), out = rms_norm(x, weight).
template <typename TD, typename TW>
void site_rows(float* partial, int64_t sp, const TD* delta, int64_t sd, bool accumulate, const float* lse1,
               int64_t sl, const float* xo1, int64_t sx, const float* q, const TW* w, TW* out, int64_t rows,
               int64_t d, double eps) {
  const int mode = delta == nullptr ? 0 : accumulate ? 1 : 2;
  for_rows(rows, 6 * d, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* p = partial + t * sp;
      const TD* dl = delta == nullptr ? nullptr : delta + t * sd;
      float ss, dot;
      if (mode == 0) {
        site_update<0>(p, dl, q, d, ss, dot);
      } else if (mode == 1) {
        site_update<1>(p, dl, q, d, ss, dot);
      } else {
        site_update<2>(p, dl, q, d, ss, dot);
      }
      const float score = dot * inv_rms(ss, d, eps) - lse1[t * sl];
      site_mix_norm(p, xo1 + t * sx, 1.0f / (1.0f + std::exp(-score)), w, out + t * d, d, eps);
    }
  });
}

at::Tensor attnres_site(const at::Tensor& partial, const std::optional<at::Tensor>& delta, const at::Tensor& lse1,
                        const at::Tensor& xo1, const at::Tensor& query, const at::Tensor& weight, double eps,
                        bool accumulate) {
  check_rows(partial, 2, "partial");
  check_f32(partial, "partial");
  const int64_t rows = partial.size(0), d = partial.size(1);
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) {
    check_rows(*delta, 2, "delta");
    check_float_kind(*delta, "delta");
    TORCH_CHECK(delta->sizes() == partial.sizes(), "depthserve: delta and partial must have one shape");
  }
  TORCH_CHECK(lse1.dim() == 1 && lse1.size(0) == rows && lse1.device().is_cpu(), "depthserve: lse1 must be [T]");
  check_f32(lse1, "lse1");
  check_rows(xo1, 2, "xo1");
  check_f32(xo1, "xo1");
  TORCH_CHECK(xo1.sizes() == partial.sizes(), "depthserve: xo1 and partial must have one shape");
  check_rows(query, 1, "query");
  check_f32(query, "query");
  TORCH_CHECK(query.size(0) == d, "depthserve: query must be [d]");
  check_rows(weight, 1, "weight");
  check_float_kind(weight, "weight");
  TORCH_CHECK(weight.size(0) == d, "depthserve: weight must be [d]");

  at::Tensor out = at::empty({rows, d}, weight.options());
  const Kind dk = has_delta ? kind_of(*delta) : Kind::F32;
  with_type(dk, [&](auto td) {
    using TD = decltype(td);
    with_type(kind_of(weight), [&](auto tw) {
      using TW = decltype(tw);
      site_rows<TD, TW>(ptr<float>(partial), partial.stride(0), has_delta ? ptr<const TD>(*delta) : nullptr,
                        has_delta ? delta->stride(0) : 0, accumulate, ptr<const float>(lse1), lse1.stride(0),
                        ptr<const float>(xo1), xo1.stride(0), ptr<const float>(query), ptr<const TW>(weight),
                        ptr<TW>(out), rows, d, eps);
    });
  });
  return out;
}

// n sources per row (the pool's first n), Q queries: key of source n-1, then per query the log-sum-exp of
// its n scores and the softmax-weighted mix of the sources. Relies on the pool's invariant that the keys of
// sources 0..n-2 are key_of(source) (they are not read: the scores come from the sources themselves).
void phase1_rows(const float* states, int64_t s0, int64_t s1, float* keys, int64_t k0, int64_t k1, int64_t n,
                 const float* queries, int64_t q0, int64_t nq, float* lse, int64_t l0, int64_t l1, float* xo,
                 int64_t x0, int64_t x1, int64_t rows, int64_t d, double eps) {
  const bool stream = rows * nq * d * int64_t(sizeof(float)) >= kStreamXoBytes;
  for_rows(rows, 2 * nq * n * d + 2 * d, [=](int64_t begin, int64_t end) {
    std::vector<float> sc(size_t(nq * n));  // scores, then softmax weights, [Q, n]
    std::vector<float> buf(stream ? size_t(d) : 0);  // one xo row, streamed out once complete
    for (int64_t t = begin; t < end; ++t) {
      const float* S = states + t * s0;
      {  // the key of the source that just closed (stored: attnres_mix's output head reads it)
        const float* v = S + (n - 1) * s1;
        float* k = keys + t * k0 + (n - 1) * k1;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) ss += v[i] * v[i];
        const float r = inv_rms(ss, d, eps);
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) k[i] = v[i] * r;
      }
      // scores key_j . q = (source_j . q) * inv_rms(source_j): read from the sources, not the stored keys,
      // so Phase 1 streams the pool's states alone (the keys would double its reads); four queries at a
      // time against one source, its sum of squares in the first pass
      for (int64_t j = 0; j < n; ++j) {
        const float* v = S + j * s1;
        float dots[5];
        float r = 0.f;
        int64_t q = 0;
        for (; q + 4 <= nq; q += 4) {
          const float* a = queries + q * q0;
          if (q == 0) {
            dot4_ss(v, a, a + q0, a + 2 * q0, a + 3 * q0, d, dots);
            r = inv_rms(dots[4], d, eps);
          } else {
            dot4(v, a, a + q0, a + 2 * q0, a + 3 * q0, d, dots);
          }
          for (int u = 0; u < 4; ++u) sc[(q + u) * n + j] = dots[u] * r;
        }
        if (q == 0) r = inv_rms(dot1(v, v, d), d, eps);
        for (; q < nq; ++q) sc[q * n + j] = dot1(v, queries + q * q0, d) * r;
      }
      for (int64_t q = 0; q < nq; ++q) {
        float* s = sc.data() + q * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
        if (!std::isfinite(m)) m = 0.f;  // torch.logsumexp's rule for infinite maxima
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - m);
        const float l = std::log(sum) + m;
        lse[t * l0 + q * l1] = l;
        for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] - l);
        // xo = sum_j p_j * source_j in source order, up to four sources per pass over the row
        float* const dst = xo + t * x0 + q * x1;
        float* __restrict o = stream ? buf.data() : dst;
        const float p0 = s[0];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] = p0 * S[i];
        int64_t j = 1;
        for (; j + 4 <= n; j += 4) {
          const float pa = s[j], pb = s[j + 1], pc = s[j + 2], pd = s[j + 3];
          const float *va = S + j * s1, *vb = va + s1, *vc = vb + s1, *vd = vc + s1;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i)
            o[i] = std::fma(pd, vd[i], std::fma(pc, vc[i], std::fma(pb, vb[i], std::fma(pa, va[i], o[i]))));
        }
        for (; j < n; ++j) {
          const float pj = s[j];
          const float* v = S + j * s1;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] = std::fma(pj, v[i], o[i]);
        }
        if (stream) stream_row(dst, o, d);
      }
    }
    if (stream) stream_fence();
  });
}

void attnres_phase1(const at::Tensor& states, const at::Tensor& keys, int64_t n, const at::Tensor& queries,
                    const at::Tensor& lse, const at::Tensor& xo, double eps) {
  check_rows(states, 3, "states");
  check_f32(states, "states");
  check_rows(keys, 3, "keys");
  check_f32(keys, "keys");
  TORCH_CHECK(keys.sizes() == states.sizes(), "depthserve: keys and states must have one shape");
  const int64_t rows = states.size(0), d = states.size(2);
  TORCH_CHECK(n >= 1 && n <= states.size(1), "depthserve: n must be in [1, ", states.size(1), "], got ", n);
  check_rows(queries, 2, "queries");
  check_f32(queries, "queries");
  TORCH_CHECK(queries.size(1) == d, "depthserve: queries must be [Q, d]");
  const int64_t nq = queries.size(0);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == rows && lse.size(1) == nq && lse.device().is_cpu(),
              "depthserve: lse must be [T, Q]");
  check_f32(lse, "lse");
  check_rows(xo, 3, "xo");
  check_f32(xo, "xo");
  TORCH_CHECK(xo.size(0) == rows && xo.size(1) == nq && xo.size(2) == d, "depthserve: xo must be [T, Q, d]");
  if (rows == 0) return;
  phase1_rows(ptr<const float>(states), states.stride(0), states.stride(1), ptr<float>(keys), keys.stride(0),
              keys.stride(1), n, ptr<const float>(queries), queries.stride(0), nq, ptr<float>(lse), lse.stride(0),
              lse.stride(1), ptr<float>(xo), xo.stride(0), xo.stride(1), rows, d, eps);
}

// One-shot mix over a row's first n sources (Full AttnRes sites; both modes' output head): source n-1 takes
// delta (Mode 1: +=, 2: =, 0: as it is) and its key; softmax of the n scores (keys 0..n-2 = key_of(source), the
// pool's invariant: scored from the sources); x = sum_j p_j source_j into a
// per-thread buffer; out = rms_norm(x, weight). `rows` (or nullptr: every row) picks the pool rows.
template <int Mode, typename TD, typename TW>
void mix_rows(float* states, int64_t s0, int64_t s1, float* keys, int64_t k0, int64_t k1, int64_t n, const TD* delta,
              int64_t sd, const int64_t* rows, int64_t sr, const float* q, const TW* w, TW* out, int64_t count,
              int64_t d, double eps) {
  for_rows(count, 2 * n * d + 4 * d, [=](int64_t begin, int64_t end) {
    std::vector<float> sc(static_cast<size_t>(n)), xv(static_cast<size_t>(d));  // scores; the mix x
    float* __restrict xb = xv.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = rows == nullptr ? t : rows[t * sr];
      float* S = states + r * s0;
      float* K = keys + r * k0;
      float* v = S + (n - 1) * s1;
      float ss, dot;
      site_update<Mode>(v, delta == nullptr ? nullptr : delta + r * sd, q, d, ss, dot);
      {  // the completed source's key (stored) and its score
        const float rr = inv_rms(ss, d, eps);
        float* __restrict k = K + (n - 1) * k1;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) k[i] = v[i] * rr;
        sc[n - 1] = dot * rr;
      }
      // the other sources' scores, (source . q) * inv_rms(source) (the pool's invariant: their keys are
      // key_of(source), so the stored keys need not be read), four sources at a time
      int64_t j = 0;
      for (; j + 4 <= n - 1; j += 4) {
        const float* a = S + j * s1;
        float r8[8];
        dot4_own_ss(q, a, a + s1, a + 2 * s1, a + 3 * s1, d, r8);
        for (int u = 0; u < 4; ++u) sc[j + u] = r8[u] * inv_rms(r8[4 + u], d, eps);
      }
      for (; j < n - 1; ++j) {
        const float* a = S + j * s1;
        sc[j] = dot1(q, a, d) * inv_rms(dot1(a, a, d), d, eps);
      }
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) m = std::max(m, sc[i]);
      if (!std::isfinite(m)) m = 0.f;
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += (sc[i] = std::exp(sc[i] - m));
      const float inv_sum = 1.0f / sum;
      // x = sum_j p_j * source_j, up to four sources per pass over the row
      const float p0 = sc[0] * inv_sum;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) xb[i] = p0 * S[i];
      j = 1;
      for (; j + 4 <= n; j += 4) {
        const float pa = sc[j] * inv_sum, pb = sc[j + 1] * inv_sum, pc = sc[j + 2] * inv_sum, pd = sc[j + 3] * inv_sum;
        const float *va = S + j * s1, *vb = va + s1, *vc = vb + s1, *vd = vc + s1;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i)
          xb[i] = std::fma(pd, vd[i], std::fma(pc, vc[i], std::fma(pb, vb[i], std::fma(pa, va[i], xb[i]))));
      }
      for (; j < n; ++j) {
        const float pj = sc[j] * inv_sum;
        const float* vj = S + j * s1;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) xb[i] = std::fma(pj, vj[i], xb[i]);
      }
      float xs = 0.f;
#pragma omp simd reduction(+ : xs)
      for (int64_t i = 0; i < d; ++i) xs += xb[i] * xb[i];
      const float rx = inv_rms(xs, d, eps);
      TW* __restrict o = out + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = scale_by(xb[i] * rx, w[i]);
    }
  });
}

at::Tensor attnres_mix(const at::Tensor& states, const at::Tensor& keys, int64_t n, const std::optional<at::Tensor>& delta,
                       const at::Tensor& query, const at::Tensor& weight, double eps, bool accumulate,
                       const std::optional<at::Tensor>& rows) {
  check_rows(states, 3, "states");
  check_f32(states, "states");
  check_rows(keys, 3, "keys");
  check_f32(keys, "keys");
  TORCH_CHECK(keys.sizes() == states.sizes(), "depthserve: keys and states must have one shape");
  const int64_t t_rows = states.size(0), d = states.size(2);
  TORCH_CHECK(n >= 1 && n <= states.size(1), "depthserve: n must be in [1, ", states.size(1), "], got ", n);
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) {
    check_rows(*delta, 2, "delta");
    check_float_kind(*delta, "delta");
    TORCH_CHECK(delta->size(0) == t_rows && delta->size(1) == d, "depthserve: delta must be [T, d]");
  }
  check_rows(query, 1, "query");
  check_f32(query, "query");
  TORCH_CHECK(query.size(0) == d, "depthserve: query must be [d]");
  check_rows(weight, 1, "weight");
  check_float_kind(weight, "weight");
  TORCH_CHECK(weight.size(0) == d, "depthserve: weight must be [d]");
  const bool has_rows = rows.has_value() && rows->defined();
  int64_t count = t_rows;
  if (has_rows) {
    TORCH_CHECK(rows->dim() == 1 && rows->device().is_cpu() && rows->scalar_type() == at::kLong,
                "depthserve: rows must be a CPU int64 [S] tensor");
    count = rows->size(0);
    const int64_t* rp = ptr<const int64_t>(*rows);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = rp[i * rows->stride(0)];
      TORCH_CHECK(r >= 0 && r < t_rows, "depthserve: rows[", i, "] = ", r, " outside [0, ", t_rows, ")");
    }
  }
  at::Tensor out = at::empty({count, d}, weight.options());
  if (count == 0) return out;
  const int mode = !has_delta ? 0 : accumulate ? 1 : 2;
  const Kind dk = has_delta ? kind_of(*delta) : Kind::F32;
  with_type(dk, [&](auto td) {
    using TD = decltype(td);
    with_type(kind_of(weight), [&](auto tw) {
      using TW = decltype(tw);
      auto run = [&](auto mode_tag) {
        constexpr int M = decltype(mode_tag)::value;
        mix_rows<M, TD, TW>(ptr<float>(states), states.stride(0), states.stride(1), ptr<float>(keys), keys.stride(0),
                            keys.stride(1), n, has_delta ? ptr<const TD>(*delta) : nullptr,
                            has_delta ? delta->stride(0) : 0, has_rows ? ptr<const int64_t>(*rows) : nullptr,
                            has_rows ? rows->stride(0) : 0, ptr<const float>(query), ptr<const TW>(weight),
                            ptr<TW>(out), count, d, eps);
      };
      if (mode == 0) {
        run(std::integral_constant<int, 0>{});
      } else if (mode == 1) {
        run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, 2>{});
      }
    });
  });
  return out;
}

}  // namespace

void fused::attnres_phase1_rows(const float* states, int64_t s0, int64_t s1, float* keys, int64_t k0, int64_t k1,
                                int64_t n, const float* queries, int64_t q0, int64_t nq, float* lse, int64_t l0,
                                int64_t l1, float* xo, int64_t x0, int64_t x1, int64_t rows, int64_t d, double eps) {
  phase1_rows(states, s0, s1, keys, k0, k1, n, queries, q0, nq, lse, l0, l1, xo, x0, x1, rows, d, eps);
}

void fused::attnres_site_rows(float* partial, int64_t sp, Kind dkind, const void* delta, int64_t sd, bool accumulate,
                              const float* lse1, int64_t sl, const float* xo1, int64_t sx, const float* q, Kind wkind,
                              const void* w, void* out, int64_t rows, int64_t d, double eps) {
  with_type(dkind, [&](auto td) {
    using TD = decltype(td);
    with_type(wkind, [&](auto tw) {
      using TW = decltype(tw);
      site_rows<TD, TW>(partial, sp, static_cast<const TD*>(delta), sd, accumulate, lse1, sl, xo1, sx, q,
                        static_cast<const TW*>(w), static_cast<TW*>(out), rows, d, eps);
    });
  });
}
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def("attnres_site(Tensor(a!) partial, Tensor? delta, Tensor lse1, Tensor xo1, Tensor query, Tensor weight, "
        "float eps, bool accumulate=True) -> Tensor");
  m.def("attnres_phase1(Tensor states, Tensor(a!) keys, int n, Tensor queries, Tensor(b!) lse, Tensor(c!) xo, "
        "float eps) -> ()");
  m.def("attnres_mix(Tensor(a!) states, Tensor(b!) keys, int n, Tensor? delta, Tensor query, Tensor weight, "
        "float eps, bool accumulate=False, Tensor? rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("attnres_site", &depthserve::attnres_site);
  m.impl("attnres_phase1", &depthserve::attnres_phase1);
  m.impl("attnres_mix", &depthserve::attnres_mix);
}
