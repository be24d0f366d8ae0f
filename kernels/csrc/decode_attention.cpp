// depthserve::decode_attention: attention of the decode rows (one query each) over their paged KV context,
// reading every K/V row in place through the block table (no gather copy of the context per layer).
//
//   out = decode_attention(q [B, H, hd], k_cache [S, KV, hd], v_cache [S, KV, hd], block_table [B, nb] long,
//                          context_lens [B] int32, block_size, scale) -> [B, H, hd] in q's dtype
//
// Position t of row b lives in slot block_table[b, t / block_size] * block_size + t % block_size; positions
// [0, context_lens[b]) are attended (this step's token included, already written). GQA: query head h reads kv
// head h / (H / KV). fp32 and bf16 (q and caches of one dtype); everything is computed in fp32 and the result
// is cast once, as SDPA's CPU kernels do.
//
// The work item is (row, context partition), all heads. The context is walked in chunks of kChunk positions;
// within a chunk one KV head at a time with its G = H / KV query heads together, so each K/V row is read
// from memory once per group, and a chunk's rows of all heads (one contiguous stretch of each block) are
// read once, while they sit in L1. Each query head keeps an online softmax (running max m, sum l,
// unnormalised output acc). Contexts are cut into partitions so that there are about 8 items per thread
// (none shorter than kMinPartition): at batch 1 the context is split, and the partitions are merged
// afterwards by their (m, l, acc) (flash-decoding split-K); with many rows none is. The threads take items
// dynamically, longest rows first, so that mixed context lengths balance.
//
// Threads: at::parallel_for is OpenMP in this torch build and its parallel region is compiled into this
// file, so build with -fopenmp in the compile AND link flags (the extension then uses torch's own libgomp,
// loaded under the same soname). Without it the op still works, on one thread; the compiler says so below.
//
// Vectorised over hd with at::vec::Vectorized<float> (any hd: a masked tail). The capability macros are set
// here from the compiler's target (-march=native) under a namespace of our own, so this file does not clash
// with ATen's own per-capability copies, nor with another file of the extension built without them.

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY depthserve_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY depthserve_avx2
#else
#define CPU_CAPABILITY depthserve_default
#endif
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("depthserve decode_attention: built without -fopenmp, at::parallel_for runs on one thread")
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kChunk = 32;          // context positions per online-softmax step
constexpr int64_t kMinPartition = 64;   // split-K: no partition shorter than this many positions
constexpr int64_t kSerialWork = 1 << 15;  // below this many q.k multiply-adds, one thread does it all
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// fp32 copies of n elements (bf16: the bits shifted into a float's high half; gcc vectorises this loop).
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);  // round to nearest even
}

inline float hsum(Vec x) { return at::vec::vec_reduce_all<float>([](Vec u, Vec v) { return u + v; }, x); }

// s[r] = a . b[r][0:n] for R rows at once (R independent FMA chains); a is zero-padded to a multiple of kW.
template <int R>
inline void dots(const float* a, const float* const* b, int64_t n, float* s) {
  Vec c[R];
  for (int r = 0; r < R; ++r) c[r] = Vec(0.f);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) {
    const Vec av = Vec::loadu(a + d);
    for (int r = 0; r < R; ++r) c[r] = at::vec::fmadd(av, Vec::loadu(b[r] + d), c[r]);
  }
  if (d < n) {  // odd head dims: a masked load of the row's tail
    const Vec av = Vec::loadu(a + d);
    for (int r = 0; r < R; ++r) c[r] = at::vec::fmadd(av, Vec::loadu(b[r] + d, n - d), c[r]);
  }
  for (int r = 0; r < R; ++r) s[r] = hsum(c[r]);
}

// acc[0:n] = acc * corr + sum_j p[j] * v[j][0:n], a block of R vectors of acc in registers at a time.
template <int R>
inline int64_t accumulate(float* acc, float corr, const float* p, const float* const* v, int64_t rows, int64_t d,
                          int64_t n) {
  const Vec cv(corr);
  for (; d + R * kW <= n; d += R * kW) {
    Vec a[R];
    for (int r = 0; r < R; ++r) a[r] = Vec::loadu(acc + d + r * kW) * cv;
    for (int64_t j = 0; j < rows; ++j) {
      const Vec pj(p[j]);
      const float* vj = v[j] + d;
      for (int r = 0; r < R; ++r) a[r] = at::vec::fmadd(pj, Vec::loadu(vj + r * kW), a[r]);
    }
    for (int r = 0; r < R; ++r) a[r].store(acc + d + r * kW);
  }
  return d;
}

template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  int64_t q_sb, q_sh;
  const scalar_t* k;
  const scalar_t* v;
  int64_t k_ss, k_sh, v_ss, v_sh;
  const int64_t* table;  // [B, nb] contiguous
  int64_t nb;
  const int32_t* lens;
  int64_t H, KV, G, hd, hdp, bs;
  float scale;
};

// Per-thread scratch: the online-softmax state of every query head of one row, one chunk's scores and rows.
struct Scratch {
  std::vector<float> qf, acc, s, m, l, kbuf, vbuf;
  std::vector<const float*> kr, vr;
  Scratch(int64_t H, int64_t hdp, bool convert)
      : qf(H * hdp), acc(H * hdp), s(kChunk), m(H), l(H), kbuf(convert ? kChunk * hdp : 0),
        vbuf(convert ? kChunk * hdp : 0), kr(kChunk), vr(kChunk) {}
};

// Row pointers of positions [t0, t0 + n) of `row`'s context for kv head `h`: into the cache itself (fp32) or
// into an fp32 copy (other dtypes).
template <typename scalar_t>
inline void rows_of(const Problem<scalar_t>& p, int64_t row, int64_t h, int64_t t0, int64_t n, Scratch& w) {
  const int64_t* blocks = p.table + row * p.nb;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = t0 + i;
    const int64_t slot = blocks[t / p.bs] * p.bs + t % p.bs;
    const scalar_t* kp = p.k + slot * p.k_ss + h * p.k_sh;
    const scalar_t* vp = p.v + slot * p.v_ss + h * p.v_sh;
    if constexpr (std::is_same_v<scalar_t, float>) {
      w.kr[i] = kp;
      w.vr[i] = vp;
    } else {
      float* kd = w.kbuf.data() + i * p.hdp;
      float* vd = w.vbuf.data() + i * p.hdp;
      to_float(kp, kd, p.hd);
      to_float(vp, vd, p.hd);
      w.kr[i] = kd;
      w.vr[i] = vd;
    }
  }
}

// Ask for positions [t0, t0 + n)'s K/V rows ahead of use: the blocks are scattered, so the hardware
// prefetchers lose the stream at every block boundary.
template <typename scalar_t>
inline void prefetch_rows(const Problem<scalar_t>& p, int64_t row, int64_t t0, int64_t n) {
  const int64_t* blocks = p.table + row * p.nb;
  const int64_t bytes = p.hd * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = t0 + i;
    const int64_t slot = blocks[t / p.bs] * p.bs + t % p.bs;
    for (int64_t h = 0; h < p.KV; ++h) {
      const char* kp = reinterpret_cast<const char*>(p.k + slot * p.k_ss + h * p.k_sh);
      const char* vp = reinterpret_cast<const char*>(p.v + slot * p.v_ss + h * p.v_sh);
      for (int64_t off = 0; off < bytes; off += 64) {
        __builtin_prefetch(kp + off);
        __builtin_prefetch(vp + off);
      }
    }
  }
}

// All H query heads of `row` over context positions [begin, end), chunk by chunk; within a chunk one KV head
// at a time, its G query heads together (the chunk's K/V rows of all heads are one contiguous stretch of each
// block, read once). Leaves the online-softmax state in w.m, w.l and w.acc (per query head, hdp apart,
// unnormalised).
template <typename scalar_t>
void attend(const Problem<scalar_t>& p, int64_t row, int64_t begin, int64_t end, Scratch& w) {
  const int64_t H = p.H, G = p.G, hd = p.hd, hdp = p.hdp;
  for (int64_t qh = 0; qh < H; ++qh) {  // the scaled queries in fp32, zero-padded
    float* qf = w.qf.data() + qh * hdp;
    to_float(p.q + row * p.q_sb + qh * p.q_sh, qf, hd);
    for (int64_t d = 0; d < hd; ++d) qf[d] *= p.scale;
    std::fill(qf + hd, qf + hdp, 0.f);
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  float* s = w.s.data();

  for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int64_t n = std::min(kChunk, end - t0);
    if (t0 + n < end) prefetch_rows(p, row, t0 + n, std::min(kChunk, end - t0 - n));
    for (int64_t h = 0; h < p.KV; ++h) {
      rows_of(p, row, h, t0, n, w);
      for (int64_t qh = h * G; qh < (h + 1) * G; ++qh) {
        const float* qf = w.qf.data() + qh * hdp;
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) dots<4>(qf, w.kr.data() + i, hd, s + i);
        for (; i < n; ++i) dots<1>(qf, w.kr.data() + i, hd, s + i);
        const float cmax = *std::max_element(s, s + n);
        const float m_new = std::max(w.m[qh], cmax);
        const float corr = std::exp(w.m[qh] - m_new);  // 0 on the first chunk (m = -inf)
        w.m[qh] = m_new;
        // p = exp(s - m_new), in place
        Vec sum(0.f);
        const Vec mv(m_new);
        i = 0;
        for (; i + kW <= n; i += kW) {
          Vec e = (Vec::loadu(s + i) - mv).exp_u20();
          e.store(s + i);
          sum = sum + e;
        }
        float l_chunk = hsum(sum);
        for (; i < n; ++i) {
          s[i] = std::exp(s[i] - m_new);
          l_chunk += s[i];
        }
        w.l[qh] = w.l[qh] * corr + l_chunk;
        // acc = acc * corr + sum_i p_i v_i: 4, then 1 register blocks of acc at a time, then a masked tail
        float* acc = w.acc.data() + qh * hdp;
        int64_t d = accumulate<4>(acc, corr, s, w.vr.data(), n, 0, hd);
        d = accumulate<1>(acc, corr, s, w.vr.data(), n, d, hd);
        if (d < hd) {
          const int64_t r = hd - d;
          Vec a = Vec::loadu(acc + d) * Vec(corr);
          for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(s[j]), Vec::loadu(w.vr[j] + d, r), a);
          a.store(acc + d);
        }
      }
    }
  }
}

// One unit of work: every head of `row` over context partition `part`.
struct Item {
  int32_t row, part;
};

// How the context rows are cut: row b has parts[b] partitions of part_len positions (the last one shorter);
// a row with several leaves partials at offset[b] (per query head, per partition) to be merged.
struct Plan {
  int64_t part_len = 0;
  std::vector<int64_t> parts, offset;
  std::vector<Item> items;  // longest rows first, so that the threads finish together
  int64_t n_partials = 0;
  int64_t threads = 1;
};

Plan make_plan(const int32_t* lens, int64_t B, int64_t H, int64_t hd) {
  Plan plan;
  int64_t max_len = 0, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_len = std::max<int64_t>(max_len, lens[b]);
    total += lens[b];
  }
  const int64_t threads = std::max(1, at::get_num_threads());
  plan.threads = total * H * hd < kSerialWork ? 1 : threads;
  // About 8 items per thread (taken dynamically, so uneven rows still balance), none shorter than
  // kMinPartition positions: with many rows no row is split, at batch 1 each context is.
  plan.part_len = max_len;
  if (plan.threads > 1) {
    const int64_t want = (total + 8 * threads - 1) / (8 * threads);
    plan.part_len = std::min(max_len, round_up(std::max(kMinPartition, want), kChunk));
  }
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lens[x] > lens[y]; });
  plan.parts.assign(B, 1);
  plan.offset.assign(B, -1);
  for (int64_t b = 0; b < B; ++b) {
    plan.parts[b] = (lens[b] + plan.part_len - 1) / plan.part_len;
    if (plan.parts[b] > 1) {
      plan.offset[b] = plan.n_partials;
      plan.n_partials += H * plan.parts[b];
    }
  }
  for (int64_t b : order)
    for (int64_t part = 0; part < plan.parts[b]; ++part)
      plan.items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(part)});
  return plan;
}

template <typename scalar_t>
void run(const Problem<scalar_t>& p, const Plan& plan, scalar_t* out) {
  const int64_t H = p.H, hd = p.hd, hdp = p.hdp;
  const bool convert = !std::is_same_v<scalar_t, float>;
  // partials of split rows: running max, sum and unnormalised output per (row, query head, partition)
  std::vector<float> pm(plan.n_partials), pl(plan.n_partials), pacc(plan.n_partials * hdp);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(plan.threads, n_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w(H, hdp, convert);
    std::vector<float> o(hdp);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
      const Item it = plan.items[i];
      const int64_t row = it.row, part = it.part;
      const int64_t begin = part * plan.part_len, end = std::min<int64_t>(begin + plan.part_len, p.lens[row]);
      attend(p, row, begin, end, w);
      for (int64_t qh = 0; qh < H; ++qh) {
        const float* acc = w.acc.data() + qh * hdp;
        if (plan.parts[row] == 1) {  // the whole context: normalise and write the output
          const float inv = 1.f / w.l[qh];
          for (int64_t d = 0; d < hd; ++d) o[d] = acc[d] * inv;
          from_float(o.data(), out + (row * H + qh) * hd, hd);
        } else {
          const int64_t idx = plan.offset[row] + qh * plan.parts[row] + part;
          pm[idx] = w.m[qh];
          pl[idx] = w.l[qh];
          std::memcpy(pacc.data() + idx * hdp, acc, hdp * sizeof(float));
        }
      }
    }
  });
  if (plan.n_partials == 0) return;
  // merge each split row's partitions (tiny next to the attention itself: one thread)
  std::vector<float> o(hdp);
  for (int64_t row = 0; row < static_cast<int64_t>(plan.parts.size()); ++row) {
    const int64_t parts = plan.parts[row];
    if (parts == 1) continue;
    for (int64_t qh = 0; qh < H; ++qh) {
      const int64_t base = plan.offset[row] + qh * parts;
      const float* m = pm.data() + base;
      const float* l = pl.data() + base;
      const float mmax = *std::max_element(m, m + parts);
      std::fill(o.begin(), o.end(), 0.f);
      float lsum = 0.f;
      for (int64_t k = 0; k < parts; ++k) {
        const float wk = std::exp(m[k] - mmax);
        lsum += wk * l[k];
        const float* a = pacc.data() + (base + k) * hdp;
        for (int64_t d = 0; d < hd; ++d) o[d] += wk * a[d];
      }
      const float inv = 1.f / lsum;
      for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
      from_float(o.data(), out + (row * H + qh) * hd, hd);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size,
                            double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "decode_attention: q [B, H, hd] and caches [slots, KV, hd]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode_attention: K and V caches differ in shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "decode_attention: q and the caches must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: float32 or bfloat16 only, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t S = k_cache.size(0), KV = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == hd, "decode_attention: head dims differ");
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "decode_attention: the head dim must be contiguous");
  TORCH_CHECK(block_size > 0, "decode_attention: block_size must be positive");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B, "decode_attention: block_table [B, nb]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, "decode_attention: context_lens [B]");
  TORCH_CHECK(block_table.device().is_cpu() && context_lens.device().is_cpu(),
              "decode_attention: block_table and context_lens must be CPU tensors");
  at::Tensor out = at::empty({B, H, hd}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || hd == 0) return out;

  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor lens_t = context_lens.to(at::kInt).contiguous();
  const int64_t nb = table.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int32_t* lp = lens_t.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // nothing outside the cache is ever read
    const int64_t len = lp[b];
    TORCH_CHECK(len >= 1 && len <= nb * block_size, "decode_attention: context_lens[", b, "] = ", len,
                " outside [1, ", nb * block_size, "]");
    for (int64_t j = 0; j * block_size < len; ++j) {
      const int64_t id = tp[b * nb + j], used = std::min(block_size, len - j * block_size);
      TORCH_CHECK(id >= 0 && id * block_size + used <= S, "decode_attention: block_table[", b, ", ", j,
                  "] = ", id, " outside the cache");
    }
  }

  const int64_t G = H / KV;
  const Plan plan = make_plan(lp, B, H, hd);
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    Problem<scalar_t> p{q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
                        k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                        tp, nb, lp, H, KV, G, hd, round_up(hd, kW), block_size, static_cast<float>(scale)};
    run(p, plan, out.data_ptr<scalar_t>());
  };
  if (q.scalar_type() == at::kFloat) {
    go(float{});
  } else {
    go(c10::BFloat16{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(depthserve, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor context_lens, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthserve, CPU, m) { m.impl("decode_attention", &decode_attention); }
