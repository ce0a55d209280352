// y[M, N] = x[M, K] @ W for float32, W prepacked in column panels of LANES: panel p holds
// W[:, p*LANES:(p+1)*LANES] as K contiguous rows of LANES floats. Each pair of panels streams from
// memory once while every row of x consumes it, 6 rows a sweep (the pair then in L2). For the few rows
// of an endpoint's one-text batch the weights' bytes bound the time, and contiguous panels stream
// faster than a row-major [K, N]; for many rows the register blocking keeps up with the FMA units.
// Panels are shared out in chunks between the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
static inline Vec Zero() { return _mm512_setzero_ps(); }
static inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec Splat(float v) { return _mm512_set1_ps(v); }
static inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
using Vec = __m256;
static inline Vec Zero() { return _mm256_setzero_ps(); }
static inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec Splat(float v) { return _mm256_set1_ps(v); }
static inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
#error "packed_dot needs AVX2 and FMA, or AVX-512"
#endif

constexpr int kMaxRows = 6;      // rows a sweep
constexpr int kChunkPanels = 4;  // panels a thread takes at a time (an even number: pairs)

// Columns a panel holds; a packed kernel's N is a multiple of twice this.
extern "C" int flaxsst_packed_dot_lanes() { return kLanes; }

// A sweep: R rows of x against two neighbouring panels, 2R accumulators (12 at R=6): each x value
// loaded once feeds two FMAs, so the loads keep up with the FMA units at any number of rows.
template <int R>
static void Sweep(const float* x, int64_t k_dim, const float* panels, float* y, int64_t n_dim) {
  const float* second = panels + k_dim * kLanes;
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Zero();
  for (int64_t k = 0; k < k_dim; ++k) {
    Vec w0 = Load(panels + kLanes * k), w1 = Load(second + kLanes * k);
    _mm_prefetch(reinterpret_cast<const char*>(panels + kLanes * k + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(second + kLanes * k + 1024), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      Vec xv = Splat(x[r * k_dim + k]);
      acc0[r] = Fma(xv, w0, acc0[r]);
      acc1[r] = Fma(xv, w1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(y + r * n_dim, acc0[r]);
    Store(y + r * n_dim + kLanes, acc1[r]);
  }
}

// Two panels against every row of x, kMaxRows at a time (the panels stay in L2 between sweeps).
static void PanelPair(const float* x, int64_t m_dim, int64_t k_dim, const float* panels, float* y, int64_t n_dim) {
  for (int64_t m = 0; m < m_dim; m += kMaxRows) {
    const float* xs = x + m * k_dim;
    float* ys = y + m * n_dim;
    switch (std::min<int64_t>(kMaxRows, m_dim - m)) {
      case 1: Sweep<1>(xs, k_dim, panels, ys, n_dim); break;
      case 2: Sweep<2>(xs, k_dim, panels, ys, n_dim); break;
      case 3: Sweep<3>(xs, k_dim, panels, ys, n_dim); break;
      case 4: Sweep<4>(xs, k_dim, panels, ys, n_dim); break;
      case 5: Sweep<5>(xs, k_dim, panels, ys, n_dim); break;
      default: Sweep<6>(xs, k_dim, panels, ys, n_dim); break;
    }
  }
}

struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t m_dim, k_dim, n_dim, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  void Run() {  // takes chunks until none are left
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      int64_t first = c * kChunkPanels;
      int64_t last = std::min<int64_t>(first + kChunkPanels, n_dim / kLanes);
      for (int64_t p = first; p < last; p += 2) PanelPair(x, m_dim, k_dim, w + p * k_dim * kLanes, y + p * kLanes, n_dim);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

static ffi::Error PackedDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto w_dims = w.dimensions();
  auto x_dims = x.dimensions();
  if (w_dims.size() != 2 || x_dims.size() == 0 || x_dims.back() != w_dims[0] || w_dims[1] % (2 * kLanes)) {
    return ffi::Error::InvalidArgument("packed_dot: x [..., K] and packed W [K, N] with N a multiple of twice the lanes");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->k_dim = w_dims[0];
  work->n_dim = w_dims[1];
  if (work->k_dim == 0) {  // an empty sum
    std::fill(work->y, work->y + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  work->m_dim = x.element_count() / work->k_dim;
  work->chunks = (work->n_dim / kLanes + kChunkPanels - 1) / kChunkPanels;
  // The calling thread takes part: with it, as many threads as the pool has.
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });  // a late helper finds no chunk
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->chunks) _mm_pause();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxsst_packed_dot, PackedDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
