// store_kv (semantics: kernels/reference.py): this step's K and V rows into their slots of the paged caches, in
// one call (the reference makes two index_copy_ calls, each with its own dispatch and checks; at decode the
// copies are a few hundred bytes and the calls are all of the cost). A plain copy: any dtype.
//
// Rows that share a slot (the padded decode batch's pad rows all write the scratch slot) race when the rows
// are split over threads, as in index_copy_ which of them lands is unspecified: only pad rows do that, and
// nothing reads what they write.
#include <torch/library.h>

#include <utility>

#include "common.h"

namespace depthserve {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& cache, const char* name, const char* cache_name,
                int64_t rows) {
  check_rows(x, 3, name);
  check_rows(cache, 3, cache_name);
  TORCH_CHECK(x.scalar_type() == cache.scalar_type(), "depthserve: ", name, " is ", x.scalar_type(), ", ",
              cache_name, " is ", cache.scalar_type());
  TORCH_CHECK(x.size(0) == rows, "depthserve: ", name, " has ", x.size(0), " rows, slot_mapping has ", rows);
  TORCH_CHECK(x.size(1) == cache.size(1) && x.size(2) == cache.size(2), "depthserve: ", name, " rows are ",
              x.sizes().slice(1), ", ", cache_name, " slots are ", cache.sizes().slice(1));
}

// `rows` rows of `heads` heads of `bytes` each, row t into slot slots[t]; one memcpy per row when both sides'
// heads are back to back.
void copy_rows(const char* x, int64_t sx0, int64_t sx1, char* cache, int64_t sc0, int64_t sc1, const int64_t* slots,
               int64_t ss, int64_t rows, int64_t heads, int64_t bytes) {
  const bool whole = heads <= 1 || (sx1 == bytes && sc1 == bytes);
  for_rows(rows, heads * bytes, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const char* src = x + t * sx0;
      char* dst = cache + slots[t * ss] * sc0;
      if (whole) {
        std::memcpy(dst, src, size_t(heads * bytes));
      } else {
        for (int64_t h = 0; h < heads; ++h) std::memcpy(dst + h * sc1, src + h * sx1, size_t(bytes));
      }
    }
  });
}

// k, v [T, KV, hd] (any row and head strides, contiguous head dim: the model's views of its QKV output);
// k_cache, v_cache [num_slots, KV, hd] of their dtype; slot_mapping [T] int64, each in [0, num_slots) (checked
// before anything is written: an out-of-range slot raises, and the wrapper's reference raises index_copy_'s error).
void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong && slot_mapping.device().is_cpu(),
              "depthserve: slot_mapping must be a 1-D int64 CPU tensor");
  const int64_t rows = slot_mapping.size(0);
  check_pair(k, k_cache, "k", "k_cache", rows);
  check_pair(v, v_cache, "v", "v_cache", rows);
  const int64_t* slots = ptr<const int64_t>(slot_mapping);
  const int64_t ss = slot_mapping.stride(0);
  const int64_t limit = std::min(k_cache.size(0), v_cache.size(0));
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t s = slots[t * ss];
    TORCH_CHECK(s >= 0 && s < limit, "depthserve: slot ", s, " of row ", t, " is outside the caches' ", limit,
                " slots");
  }
  for (const auto& [x, cache] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
    const int64_t el = x->element_size();
    copy_rows(static_cast<const char*>(x->data_ptr()), x->stride(0) * el, x->stride(1) * el,
              static_cast<char*>(cache->data_ptr()), cache->stride(0) * el, cache->stride(1) * el, slots, ss, rows,
              x->size(1), x->size(2) * el);
  }
}

}  // namespace
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) {
  m.impl("store_kv", &depthserve::store_kv);
}
