// depthserve::release_openmp_pool() -> int
//
// Frees the calling thread's OpenMP thread pool (OpenMP 5.0 omp_pause_resource_all(omp_pause_soft)); a later
// parallel region on that thread builds a new one. Why: libgomp spins ~300k iterations waiting for work, but only
// ~1000 once it manages more threads than there are CPUs, and every team counts: a server that loaded the model
// on its main thread (one pool) and steps it on an engine thread (a second pool) has 4 managed threads on a
// 2-core machine, so each of a step's ~250 parallel regions woke its worker through a futex. Measured on 2 cores,
// SmolLM2 Q8_0 at 32 streams through AsyncLLMEngine: 887 -> 1068 tokens/s (engine/async_engine.py start()).
// Returns omp_pause_resource_all's result (0: released), or -1 in a build without OpenMP.
#include <torch/library.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cstdint>

namespace depthserve {
namespace {

int64_t release_openmp_pool() {
#if defined(_OPENMP)
  return omp_pause_resource_all(omp_pause_soft);
#else
  return -1;
#endif
}

}  // namespace
}  // namespace depthserve

TORCH_LIBRARY_FRAGMENT(depthserve, m) { m.def("release_openmp_pool() -> int"); }

TORCH_LIBRARY_IMPL(depthserve, CatchAll, m) { m.impl("release_openmp_pool", &depthserve::release_openmp_pool); }
