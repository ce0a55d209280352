// y[M, N] = x[M, K] @ W for float32, W prepacked in column panels of LANES: panel p holds
// W[:, p*LANES:(p+1)*LANES] as K contiguous rows of LANES floats. Each group of panels (4 with AVX-512, 2
// with AVX2) streams from memory once while every row of x consumes it, 6 rows a sweep (the panels then in
// L2). For the few rows of an endpoint's one-text batch the weights' bytes bound the time, and contiguous
// panels stream faster than a row-major [K, N]; for many rows the register blocking keeps up with the FMA
// units.
// Panels are shared out in chunks between the calling thread and helpers: for a few rows the kernel's own
// spinning threads, else XLA's intra-op thread pool.
#include <immintrin.h>

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#endif
#include <unistd.h>

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
// Panels a sweep: 4 x 6 = 24 accumulators of AVX-512's 32 registers (11-12% faster than 2 at 1-512 rows,
// bench/RESULTS.md), 2 x 6 of AVX2's 16.
constexpr int kGroupPanels = kLanes == 16 ? 4 : 2;
constexpr int kChunkPanels = 4;  // panels a thread takes at a time (an even number: pairs)

// Columns a panel holds; a packed kernel's N is a multiple of twice this.
extern "C" int flaxsst_packed_dot_lanes() { return kLanes; }

// A sweep: R rows of x against P neighbouring panels, P x R accumulators (24 at P=4, R=6): each x value
// loaded once feeds P FMAs, so the loads keep up with the FMA units at any number of rows.
template <int R, int P>
static void Sweep(const float* x, int64_t k_dim, const float* panels, float* y, int64_t n_dim) {
  Vec acc[P][R];
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < R; ++r) acc[q][r] = Zero();
  for (int64_t k = 0; k < k_dim; ++k) {
    Vec w[P];
    for (int q = 0; q < P; ++q) {
      w[q] = Load(panels + q * k_dim * kLanes + kLanes * k);
      _mm_prefetch(reinterpret_cast<const char*>(panels + q * k_dim * kLanes + kLanes * k + 1024), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      Vec xv = Splat(x[r * k_dim + k]);
      for (int q = 0; q < P; ++q) acc[q][r] = Fma(xv, w[q], acc[q][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) Store(y + r * n_dim + q * kLanes, acc[q][r]);
}

// P panels against every row of x, kMaxRows at a time (the panels stay in L2 between sweeps).
template <int P>
static void PanelGroup(const float* x, int64_t m_dim, int64_t k_dim, const float* panels, float* y, int64_t n_dim) {
  for (int64_t m = 0; m < m_dim; m += kMaxRows) {
    const float* xs = x + m * k_dim;
    float* ys = y + m * n_dim;
    switch (std::min<int64_t>(kMaxRows, m_dim - m)) {
      case 1: Sweep<1, P>(xs, k_dim, panels, ys, n_dim); break;
      case 2: Sweep<2, P>(xs, k_dim, panels, ys, n_dim); break;
      case 3: Sweep<3, P>(xs, k_dim, panels, ys, n_dim); break;
      case 4: Sweep<4, P>(xs, k_dim, panels, ys, n_dim); break;
      case 5: Sweep<5, P>(xs, k_dim, panels, ys, n_dim); break;
      default: Sweep<6, P>(xs, k_dim, panels, ys, n_dim); break;
    }
  }
}

// Helper threads of the kernel's own, which spin for a while after each task before they sleep. The dots of
// one forward come tens of microseconds apart and a sleeping pool thread takes about as long to wake, so with
// XLA's pool alone a small dot runs mostly on the calling thread. A helper's spin yields the core to any other
// runnable thread. A task finds a busy helper taken and goes to XLA's pool instead.
constexpr auto kSpin = std::chrono::microseconds(500);

class Helper {
 public:
  Helper() {
    std::thread([this] {
      pthread_setname_np(pthread_self(), "flaxsst-dot");  // as top and /proc name it
      Loop();
    }).detach();
  }

  bool Post(std::function<void()>* task) {  // false: this helper is busy
    bool busy = false;
    if (!busy_.compare_exchange_strong(busy, true, std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> lock(mu_);
    task_.store(task, std::memory_order_release);
    if (sleeping_) wake_.notify_one();
    return true;
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()>* task = Wait();
      (*task)();
      delete task;
      task_.store(nullptr, std::memory_order_relaxed);
      busy_.store(false, std::memory_order_release);
    }
  }

  std::function<void()>* Wait() {
    auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      if (std::function<void()>* task = task_.load(std::memory_order_acquire)) return task;
      _mm_pause();
      if (i % 64 == 0) {
        if (std::chrono::steady_clock::now() > until) break;
        sched_yield();
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    sleeping_ = true;
    wake_.wait(lock, [this] { return task_.load(std::memory_order_acquire) != nullptr; });
    sleeping_ = false;
    return task_.load(std::memory_order_acquire);
  }

  std::atomic<bool> busy_{false};
  std::atomic<std::function<void()>*> task_{nullptr};
  std::mutex mu_;
  std::condition_variable wake_;
  bool sleeping_ = false;
};

// Runs task on `count` threads besides the caller: for a dot of few rows (short: a wake-up would cost as much
// as the work), the kernel's helpers where they are free; else XLA's pool, and then nothing spins.
constexpr int64_t kHelperMaxRows = 32;

static void Share(ffi::ThreadPool& pool, int64_t count, int64_t rows, const std::function<void()>& task) {
  static std::vector<Helper*>* helpers = new std::vector<Helper*>();  // never freed: detached threads use them
  static std::mutex mu;
  static const pid_t owner = getpid();
  bool helped = rows <= kHelperMaxRows && getpid() == owner;  // a forked child has the records, not the threads
  if (helped) {
    std::lock_guard<std::mutex> lock(mu);
    while (static_cast<int64_t>(helpers->size()) < count) helpers->push_back(new Helper());
  }
  for (int64_t i = 0; i < count; ++i) {
    if (helped) {
      auto* copy = new std::function<void()>(task);
      if ((*helpers)[i]->Post(copy)) continue;
      delete copy;
    }
    pool.Schedule(std::function<void()>(task));
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
      for (int64_t p = first; p < last;) {
        const float* panels = w + p * k_dim * kLanes;
        if (kGroupPanels == 4 && p + 4 <= last) {
          PanelGroup<4>(x, m_dim, k_dim, panels, y + p * kLanes, n_dim);
          p += 4;
        } else {
          PanelGroup<2>(x, m_dim, k_dim, panels, y + p * kLanes, n_dim);
          p += 2;
        }
      }
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
  Share(pool, helpers, work->m_dim, [work] { work->Run(); });  // a late helper finds no chunk
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->chunks) _mm_pause();
  return ffi::Error::Success();
}

// int8: y[M, N] = x[M, K] @ W with W quantized per output column (int8 in [-127, 127], w = q * scale[n]) and
// each row of x quantized at run time to 255 unsigned levels with its own scale and zero point (zero exact):
// y[m, n] = (sum_k xq[m, k] q[k, n] - zero[m] * sum_k q[k, n]) * (xscale[m] * scale[n]), summed in int32.
// W is packed in panels of LANES columns as groups of 4 k: panel p holds K/4 blocks of LANES x 4 int8, the
// 4 consecutive k of one column together, as vpdpbusd multiplies and sums them.
#if defined(__AVX512F__) && defined(__AVX512BW__)
using IVec = __m512i;
#if defined(__AVX512VNNI__)
constexpr bool kPairsInt16 = false;  // vpdpbusd sums u8 x s8 products in int32: no overflow
static inline IVec Dot4(IVec acc, IVec x, IVec w) { return _mm512_dpbusd_epi32(acc, x, w); }
#else
constexpr bool kPairsInt16 = true;  // vpmaddubsw sums two u8 x s8 products in int16 (see flaxsst_int8_dot_pairs)
static inline IVec Dot4(IVec acc, IVec x, IVec w) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(x, w), _mm512_set1_epi16(1)));
}
#endif
static inline IVec IZero() { return _mm512_setzero_si512(); }
static inline IVec ILoad(const int8_t* p) { return _mm512_loadu_si512(p); }
static inline IVec Splat4(const uint8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
static inline Vec Dequantize(IVec acc, int32_t zero, const int32_t* sums, Vec scale) {
  IVec centred = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(zero), _mm512_loadu_si512(sums)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(centred), scale);
}
#elif defined(__AVX2__) && !defined(__AVX512F__)
using IVec = __m256i;
#if defined(__AVXVNNI__)
constexpr bool kPairsInt16 = false;
static inline IVec Dot4(IVec acc, IVec x, IVec w) { return _mm256_dpbusd_avx_epi32(acc, x, w); }
#else
constexpr bool kPairsInt16 = true;
static inline IVec Dot4(IVec acc, IVec x, IVec w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
}
#endif
static inline IVec IZero() { return _mm256_setzero_si256(); }
static inline IVec ILoad(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline IVec Splat4(const uint8_t* p) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
static inline Vec Dequantize(IVec acc, int32_t zero, const int32_t* sums, Vec scale) {
  IVec centred = _mm256_sub_epi32(
      acc, _mm256_mullo_epi32(_mm256_set1_epi32(zero), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums))));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(centred), scale);
}
#else
#define FLAXSST_NO_INT8
constexpr bool kPairsInt16 = false;
#endif

#if defined(FLAXSST_NO_INT8)
constexpr int kLevels = 0;
#else
constexpr int kLevels = 255;
#endif

// The levels a row of x is quantized to (255), 0 where no int8 kernel runs.
extern "C" int flaxsst_int8_dot_levels() { return kLevels; }

// 1 where vpmaddubsw sums two products, of k = 2i and 2i + 1, in int16 (saturating): the weights' levels then
// keep 255 * (the positive levels' sum of each such pair, or the negative ones') within int16, which
// flaxsst.int8.quantize_kernel(pairs=True) does by scaling each column to its largest pair's sum of one sign.
extern "C" int flaxsst_int8_dot_pairs() { return kPairsInt16 ? 1 : 0; }

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
// AMX-INT8: a 2x2 block of 16x16 int32 tiles, rows of x (u8) against a pair of panels (s8), 64 k a step.
// A panel of 16 columns is already a B tile's layout: K/4 rows of 16 columns x 4 k. Linux grants the tile
// registers to a process that asks (arch_prctl); the tile configuration is loaded by each thread that runs.
// With 32 rows or fewer the tiles of x and y hold only the rows there are: a tile's load and product take
// time in proportion to its rows, and one 18-row sentence costs 16 + 2 rows, not 32.
#define FLAXSST_AMX
constexpr int kAmxMinRows = 8;  // fewer rows run vpdpbusd, as fast there: the weights' bytes bound both

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static bool AmxUsable() {  // once a process: the kernel's permission, and FLAXSST_INT8_AMX=0 turns it off
  static const bool usable = [] {
    const char* setting = std::getenv("FLAXSST_INT8_AMX");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}
#endif

// Whether this kernel multiplies int8 with AMX tiles in this process (for batches of 8 rows or more).
extern "C" int flaxsst_int8_dot_amx() {
#ifdef FLAXSST_AMX
  return AmxUsable() ? 1 : 0;
#else
  return 0;
#endif
}

#ifndef FLAXSST_NO_INT8
#if defined(__AVX512F__)
static inline Vec VMin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
static inline Vec VMax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
// kLanes values of x as clamp(rint(x * inverse) + z, 0, levels), stored as bytes (inverse = 1 / scale: a
// product instead of a division per value)
constexpr int kLevelsBlock = 16;  // values Levels quantizes at once
static inline void Levels(const float* x, float inverse, int32_t z, uint8_t* q) {
  __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inverse))),
                               _mm512_set1_epi32(z));
  v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_setzero_si512()), _mm512_set1_epi32(kLevels));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
}
#else
static inline Vec VMin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
static inline Vec VMax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
// 32 values at once: AVX2 has no int32 -> int8 store, so four vectors narrow together by saturating packs (which
// clamp to [0, 255], the levels) and one dword permutation puts the 128-bit lanes' bytes back in order
constexpr int kLevelsBlock = 32;
static inline void Levels(const float* x, float inverse, int32_t z, uint8_t* q) {
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i zero = _mm256_set1_epi32(z);
  __m256i v[4];
  for (int i = 0; i < 4; ++i)
    v[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), scale)), zero);
  __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
}
#endif

// One row of x to unsigned levels: scale (hi - lo) / levels over [lo, hi] holding the row and 0, and the zero
// point the level of 0.0; q = clamp(rint(x * (1 / scale)) + zero, 0, levels), 1 / scale rounded to float32.
static void QuantizeRow(const float* x, int64_t k_dim, uint8_t* q, float* scale, int32_t* zero) {
  int64_t k = 0;
  float lo = 0.0f, hi = 0.0f;
  {
    Vec lows = Zero(), highs = Zero();
    for (; k + kLanes <= k_dim; k += kLanes) {
      Vec v = Load(x + k);
      lows = VMin(lows, v);
      highs = VMax(highs, v);
    }
    alignas(64) float l[kLanes], h[kLanes];
    Store(l, lows);
    Store(h, highs);
    for (int j = 0; j < kLanes; ++j) {
      lo = std::min(lo, l[j]);
      hi = std::max(hi, h[j]);
    }
  }
  for (; k < k_dim; ++k) {
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  float s = (hi - lo) / static_cast<float>(kLevels);
  if (!(s > 0.0f)) s = 1.0f;
  int32_t z = std::min<int32_t>(kLevels, std::max<int32_t>(0, static_cast<int32_t>(std::nearbyint(-lo / s))));
  const float inverse = 1.0f / s;
  k = 0;
  // vcvtps2dq rounds to even, as nearbyint
  for (; k + kLevelsBlock <= k_dim; k += kLevelsBlock) Levels(x + k, inverse, z, q + k);
  for (; k < k_dim; ++k) {
    int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inverse)) + z;
    q[k] = static_cast<uint8_t>(std::min<int32_t>(kLevels, std::max<int32_t>(0, v)));
  }
  *scale = s;
  *zero = z;
}

struct Int8Work {
  const float* x;
  const int8_t* w;
  const float* w_scale;
  const int32_t* w_sums;
  float* y;
  int64_t m_dim, k_dim, n_dim, chunks;
  std::unique_ptr<uint8_t[]> xq;
  std::unique_ptr<float[]> x_scale;
  std::unique_ptr<int32_t[]> x_zero;
  std::atomic<int64_t> next_row{0}, rows_done{0};
  std::atomic<int64_t> next{0}, finished{0};

  template <int R>
  void Sweep(int64_t m, int64_t p) {  // rows m..m+R against panels p and p+1
    const int8_t* w0 = w + p * k_dim * kLanes;
    const int8_t* w1 = w0 + k_dim * kLanes;
    const uint8_t* xs = xq.get() + m * k_dim;
    IVec acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = IZero();
    for (int64_t k = 0; k < k_dim; k += 4) {
      IVec a = ILoad(w0 + kLanes * k), b = ILoad(w1 + kLanes * k);
      _mm_prefetch(reinterpret_cast<const char*>(w0 + kLanes * k + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + kLanes * k + 1024), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        IVec xv = Splat4(xs + r * k_dim + k);
        acc0[r] = Dot4(acc0[r], xv, a);
        acc1[r] = Dot4(acc1[r], xv, b);
      }
    }
    for (int half = 0; half < 2; ++half) {
      int64_t n = (p + half) * kLanes;
      Vec column_scale = Load(w_scale + n);
      for (int r = 0; r < R; ++r) {
        Vec scale = Splat(x_scale[m + r]) * column_scale;
        Store(y + (m + r) * n_dim + n, Dequantize(half ? acc1[r] : acc0[r], x_zero[m + r], w_sums + n, scale));
      }
    }
  }

#ifdef FLAXSST_AMX
  bool amx = false;  // rows of xq padded with zeros to a multiple of 16

  void AmxPanelPair(int64_t p) {
    const int8_t* b0 = w + p * k_dim * kLanes;
    const int8_t* b1 = b0 + k_dim * kLanes;
    alignas(64) int32_t c[4][16 * 16];
    int64_t padded = (m_dim + 15) / 16 * 16;
    for (int64_t m = 0; m < padded; m += 32) {
      bool two = m + 16 < padded;
      const uint8_t* a0 = xq.get() + m * k_dim;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < k_dim; k += 64) {
        _tile_loadd(4, a0 + k, k_dim);
        _tile_loadd(6, b0 + kLanes * k, 64);
        _tile_loadd(7, b1 + kLanes * k, 64);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        if (two) {
          _tile_loadd(5, a0 + 16 * k_dim + k, k_dim);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      if (two) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
      }
      for (int half = 0; half < 2; ++half) {
        int64_t n = (p + half) * kLanes;
        Vec column_scale = Load(w_scale + n);
        for (int64_t r = m; r < std::min<int64_t>(m + 32, m_dim); ++r) {
          const int32_t* tile = c[(r - m) / 16 * 2 + half] + (r - m) % 16 * 16;
          Vec scale = Splat(x_scale[r]) * column_scale;
          Store(y + r * n_dim + n, Dequantize(_mm512_load_si512(tile), x_zero[r], w_sums + n, scale));
        }
      }
    }
  }
#endif

  void Run() {  // quantizes rows of x until none are left, waits for the rest, then takes panel chunks
    for (int64_t m; (m = next_row.fetch_add(1, std::memory_order_relaxed)) < m_dim;) {
      QuantizeRow(x + m * k_dim, k_dim, xq.get() + m * k_dim, &x_scale[m], &x_zero[m]);
      rows_done.fetch_add(1, std::memory_order_release);
    }
    while (rows_done.load(std::memory_order_acquire) < m_dim) _mm_pause();
#ifdef FLAXSST_AMX
    if (amx) {
      TileConfig config;
      for (int t = 0; t < 8; ++t) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
      }
      if (m_dim <= 32) {  // one block of rows: the tiles of x and of y hold just its rows
        config.rows[0] = config.rows[1] = config.rows[4] = std::min<int64_t>(16, m_dim);
        if (m_dim > 16) config.rows[2] = config.rows[3] = config.rows[5] = m_dim - 16;
      }
      _tile_loadconfig(&config);
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
        int64_t first = c * kChunkPanels;
        int64_t last = std::min<int64_t>(first + kChunkPanels, n_dim / kLanes);
        for (int64_t p = first; p < last; p += 2) AmxPanelPair(p);
        finished.fetch_add(1, std::memory_order_release);
      }
      _tile_release();
      return;
    }
#endif
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      int64_t first = c * kChunkPanels;
      int64_t last = std::min<int64_t>(first + kChunkPanels, n_dim / kLanes);
      for (int64_t p = first; p < last; p += 2) {
        for (int64_t m = 0; m < m_dim; m += kMaxRows) {
          switch (std::min<int64_t>(kMaxRows, m_dim - m)) {
            case 1: Sweep<1>(m, p); break;
            case 2: Sweep<2>(m, p); break;
            case 3: Sweep<3>(m, p); break;
            case 4: Sweep<4>(m, p); break;
            case 5: Sweep<5>(m, p); break;
            default: Sweep<6>(m, p); break;
          }
        }
      }
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};
#endif

static ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> w_sums, ffi::ResultBuffer<ffi::F32> y) {
#ifdef FLAXSST_NO_INT8
  return ffi::Error::Internal("int8_dot: this kernel was built without AVX2 or AVX-512BW");
#else
  auto w_dims = w.dimensions();
  auto x_dims = x.dimensions();
  if (w_dims.size() != 2 || x_dims.size() == 0 || x_dims.back() != w_dims[0] || w_dims[0] % 4 ||
      w_dims[1] % (2 * kLanes) || w_scale.element_count() != w_dims[1] || w_sums.element_count() != w_dims[1]) {
    return ffi::Error::InvalidArgument(
        "int8_dot: x [..., K], packed int8 W [K, N], scales and sums [N]; K a multiple of 4, N of twice the lanes");
  }
  auto work = std::make_shared<Int8Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->w_scale = w_scale.typed_data();
  work->w_sums = w_sums.typed_data();
  work->y = y->typed_data();
  work->k_dim = w_dims[0];
  work->n_dim = w_dims[1];
  if (work->k_dim == 0) {
    std::fill(work->y, work->y + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  work->m_dim = x.element_count() / work->k_dim;
  int64_t rows = work->m_dim;
#ifdef FLAXSST_AMX
  work->amx = work->m_dim >= kAmxMinRows && work->k_dim % 64 == 0 && AmxUsable();
  if (work->amx) rows = (work->m_dim + 15) / 16 * 16;  // a last tile's missing rows: zeros, never written out
#endif
  work->xq.reset(new uint8_t[rows * work->k_dim]);
  std::memset(work->xq.get() + work->m_dim * work->k_dim, 0, (rows - work->m_dim) * work->k_dim);
  work->x_scale.reset(new float[work->m_dim]);
  work->x_zero.reset(new int32_t[work->m_dim]);
  work->chunks = (work->n_dim / kLanes + kChunkPanels - 1) / kChunkPanels;
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->chunks - 1);
  Share(pool, helpers, work->m_dim, [work] { work->Run(); });
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->chunks) _mm_pause();
  return ffi::Error::Success();
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxsst_int8_dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxsst_packed_dot, PackedDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
