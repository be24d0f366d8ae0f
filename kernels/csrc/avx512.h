// bf16 <-> fp32 on 16 AVX-512 lanes, shared by the kernels' AVX-512 paths (quant.cpp, quant_int8.cpp, linear.cpp,
// decode_attention.cpp). Rounds as common.h's from_f<bf16_t> does (nearest even, NaN -> 0x7fc0), so a vector
// path stores what the scalar one would.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

namespace depthserve {

// 16 bf16 at p (unaligned) widened to fp32: exact (the bits shifted into the high half)
inline __m512 bf16x16_load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 fp32 lanes rounded to bf16 bits
inline __m256i bf16x16_round(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0)));
}

}  // namespace depthserve
#endif
