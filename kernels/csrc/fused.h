// The raw-pointer entry points of depthserve's native ops that decode_layer.cpp composes into one call per
// decoder layer (no dispatcher, no tensor per op). Each is defined next to its op (linear.cpp, norms.cpp, ...)
// and runs exactly that op's loops, so the fused layer rounds where the per-op path rounds. None checks its
// arguments: decode_layer checks the tensors once before anything is written.
//
// Element types as in common.h: Kind::F32 (float) or Kind::BF16 (bf16 bits).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common.h"

namespace depthserve::fused {

// linear.cpp: y[M, N] = x[M, K] @ w[N, K]^T, w (and y) of `kind`, rows of w unit-stride at ldw; x fp32, every
// row 64-byte aligned at ldx (a multiple of 16). Threads as small_m_linear's.
void gemv(Kind kind, const void* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
          void* y);

// quant.cpp: y[M, N] = x[M, K] @ dequantize(w)^T for w rows of ggml_type blocks (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8),
// unit-stride rows at ldw_bytes; x as gemv takes it (fp32 rows, 64-byte aligned at ldx); y [M, N] contiguous, of
// ykind (rounded once from fp32). K a multiple of 32. Threads as quant_linear's, which calls it.
void qgemv(int ggml_type, const uint8_t* w, int64_t ldw_bytes, const float* x, int64_t ldx, int64_t M, int64_t N,
           int64_t K, Kind ykind, void* y);

// quant.cpp: bytes per block of 32 weights of a ggml type (34, 18, 20), 0 for a type qgemv does not take.
int quant_block_bytes(int64_t ggml_type);

// rotary.cpp: rotate q [rows, hq, 2 half] and k [rows, hk, 2 half] in place (row strides sq0 / sk0, head
// strides sq1 / sk1); cos / sin [rows, half] fp32 at row strides sc / ss.
void rotary_rows(Kind kind, void* q, int64_t sq0, int64_t sq1, int64_t hq, void* k, int64_t sk0, int64_t sk1,
                 int64_t hk, int64_t half, const float* cos, int64_t sc, const float* sin, int64_t ss, int64_t rows);

// silu_mul.cpp: out[rows, f] = silu(gate) * up of gu [rows, 2f] at row stride sg.
void silu_mul_rows(Kind kind, const void* gu, int64_t sg, void* out, int64_t rows, int64_t f);

// norms.cpp: res += x (in res's kind), out = rms_norm(res) * w, out in w's kind (x, res: `kind`).
void add_rms_norm_rows(Kind kind, const void* x, int64_t sx, void* res, int64_t sr, Kind wkind, const void* w,
                       void* out, int64_t rows, int64_t d, double eps);

// attnres.cpp: one Phase-2 site (attnres_site): partial (fp32) += delta (or = delta without `accumulate`),
// out = rms_norm(lerp(xo1, partial, sigmoid(key . q - lse1))) * w, out in w's kind.
void attnres_site_rows(float* partial, int64_t sp, Kind dkind, const void* delta, int64_t sd, bool accumulate,
                       const float* lse1, int64_t sl, const float* xo1, int64_t sx, const float* q, Kind wkind,
                       const void* w, void* out, int64_t rows, int64_t d, double eps);

// norms.cpp: out = rms_norm(x) * w, x of `kind` at row stride sx, out in w's kind.
void rms_norm_rows(Kind kind, const void* x, int64_t sx, Kind wkind, const void* w, void* out, int64_t rows, int64_t d,
                   double eps);

// attnres.cpp: Phase 1 of a block whose first n sources are complete (attnres_phase1): the key of source n-1, then
// for each of nq queries (rows of `queries` at stride q0) its log-sum-exp and mix of the n sources. states/keys
// [rows, S, d] at strides (s0, s1) / (k0, k1); lse [rows, nq] at (l0, l1); xo [rows, nq, d] at (x0, x1).
void attnres_phase1_rows(const float* states, int64_t s0, int64_t s1, float* keys, int64_t k0, int64_t k1, int64_t n,
                         const float* queries, int64_t q0, int64_t nq, float* lse, int64_t l0, int64_t l1, float* xo,
                         int64_t x0, int64_t x1, int64_t rows, int64_t d, double eps);

// decode_attention.cpp: raises unless every row's context [0, lens[b]) lies in the table's blocks and the cache.
void check_decode_context(const at::Tensor& k_cache, const int64_t* table, int64_t t_sb, int64_t t_sn, int64_t nb,
                          const int32_t* lens, int64_t B, int64_t block_size);

// decode_attention.cpp: out [B, H, hd] (contiguous, `kind`) = attention of q [B, H, hd] (row / head strides,
// contiguous head dim) over each row's paged context (checked by check_decode_context).
void decode_attention_rows(Kind kind, const void* q, int64_t q_sb, int64_t q_sh, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const int64_t* table, int64_t t_sb, int64_t t_sn,
                           const int32_t* lens, int64_t B, int64_t H, int64_t block_size, float scale, void* out);

}  // namespace depthserve::fused
