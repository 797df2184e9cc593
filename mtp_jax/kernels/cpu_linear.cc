// mtp_jax CPU kernel: y[M, N] (f32) = x[M, K] (f32) @ W, W an f32 / f16 / bf16 matrix read IN PLACE out of a
// stack w[L, E, K, N] (or [L, E, N, K] with trans=1) at layer `layer` and, per row m, expert `eids[m]`.
//
// Why: XLA:CPU runs f16/bf16 dots at ~0.6 GB/s (it converts operands and calls Eigen), and a dynamic slice or
// gather of a layer's or an expert's weights is materialized as a copy before every dot. Decoding is
// bound by reading the weights once, so the kernel reads each needed expert matrix exactly once per call,
// converts 16 values per instruction, and splits the output columns over spinning worker threads.
//
// Numerics: every output is a sequential f32 FMA chain over k (trans=0) or a fixed 16-lane split of k
// reduced in a fixed order (trans=1), so a row's result does not depend on M or on the other rows: a
// verify of K+1 tokens gives bit-identical logits to K+1 single-token decodes.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define MTP_AVX512 1
#endif

namespace ffi = xla::ffi;

namespace {

enum WType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int WT>
inline float load1(const void* w, int64_t i) {
  if (WT == kF32) return static_cast<const float*>(w)[i];
  uint16_t h = static_cast<const uint16_t*>(w)[i];
  if (WT == kF16) return half_to_float(h);
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef MTP_AVX512
constexpr int kPrefetchRows = 16;

template <int WT>
inline __m512 load16(const void* w, int64_t i, __mmask16 m) {
  if (WT == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + i);
  __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
  if (WT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 lane_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

// trans=0: rows k..k+KU-1 of w times columns [n0, n1) of MB rows, accumulated into y (a block stays in L1). KU rows
// of w are streamed at once (contiguous runs, prefetch-friendly) and each y vector is loaded and stored once
// per KU FMAs; every output is still one FMA chain in k order.
template <int WT, int MB, int KU, int PF>
inline void rows_kn(const float* const* xr, const void* w, int64_t k, int64_t N, int64_t n0, int64_t n1,
                    float* const* yr) {
  float xs[MB][KU];
  for (int r = 0; r < MB; ++r)
    for (int u = 0; u < KU; ++u) xs[r][u] = xr[r][k + u];
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 m = lane_mask(n1 - n);
    __m512 wv[KU];
    for (int u = 0; u < KU; ++u) wv[u] = load16<WT>(w, (k + u) * N + n, m);
    if (PF)  // the same columns PF rows further down: a small matrix is over before the hardware catches on
      for (int u = 0; u < KU; ++u)
        _mm_prefetch(static_cast<const char*>(w) + ((k + u + PF) * N + n) * (WT == kF32 ? 4 : 2), _MM_HINT_T0);
    for (int r = 0; r < MB; ++r) {
      __m512 a = _mm512_maskz_loadu_ps(m, yr[r] + n);
      for (int u = 0; u < KU; ++u) a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r][u]), wv[u], a);
      _mm512_mask_storeu_ps(yr[r] + n, m, a);
    }
  }
}

template <int WT, int MB>
void block_kn(const float* const* xr, const void* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
              float* const* yr) {
  for (int r = 0; r < MB; ++r) std::memset(yr[r] + n0, 0, (n1 - n0) * sizeof(float));
  int64_t k = 0;
  for (; k + 8 + kPrefetchRows <= K; k += 8) rows_kn<WT, MB, 8, kPrefetchRows>(xr, w, k, N, n0, n1, yr);
  for (; k + 8 <= K; k += 8) rows_kn<WT, MB, 8, 0>(xr, w, k, N, n0, n1, yr);
  for (; k < K; ++k) rows_kn<WT, MB, 1, 0>(xr, w, k, N, n0, n1, yr);
}

// trans=1: output columns n..n+NN-1 = dot(x[r, :], w[n, :]) with 16 lanes over k, NN columns x MB rows at once
// (independent FMA chains hide the FMA latency; the lane split and its reduction do not depend on NN or MB).
template <int WT, int MB, int NN>
void cols_nk(const float* const* xr, const void* w, int64_t K, int64_t n, float* const* yr) {
  __m512 acc[MB][NN];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = lane_mask(K - k);
    __m512 wv[NN];
    for (int c = 0; c < NN; ++c) wv[c] = load16<WT>(w, (n + c) * K + k, m);
    for (int r = 0; r < MB; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr[r] + k);
      for (int c = 0; c < NN; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NN; ++c) yr[r][n + c] = _mm512_reduce_add_ps(acc[r][c]);
}
#endif

// trans=0 work item: a block of columns, N / threads wide (at least 256): a thread streams long runs of each row
// (runs shorter than a 4 KiB page restart the hardware prefetcher at every row: measured ~2x slower).
constexpr int64_t kMinTileCols = 256;
constexpr int64_t kColsPerItem = 64;  // trans=1 work item: 64 output columns

template <int WT>
void run_tile_kn(const float* const* xr, int64_t nr, const void* w, int64_t K, int64_t N, int64_t n0,
                 int64_t cols, float* const* yr) {
  const int64_t n1 = std::min(N, n0 + cols);
#ifdef MTP_AVX512
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) block_kn<WT, 4>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 3) block_kn<WT, 3>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 2) block_kn<WT, 2>(xr + r, w, K, N, n0, n1, yr + r);
  if (nr - r == 1) block_kn<WT, 1>(xr + r, w, K, N, n0, n1, yr + r);
#else
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[r][k] * load1<WT>(w, k * N + n);
      yr[r][n] = s;
    }
#endif
}

template <int WT>
void run_cols_nk(const float* const* xr, int64_t nr, const void* w, int64_t K, int64_t n0, int64_t n1,
                 float* const* yr) {
#ifdef MTP_AVX512
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) cols_nk<WT, 4, 4>(xr + r, w, K, n, yr + r);
    for (; r < nr; ++r) cols_nk<WT, 1, 4>(xr + r, w, K, n, yr + r);
  }
  for (; n < n1; ++n)
    for (int64_t r = 0; r < nr; ++r) cols_nk<WT, 1, 1>(xr + r, w, K, n, yr + r);
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < nr; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[r][k] * load1<WT>(w, n * K + k);
      yr[r][n] = s;
    }
#endif
}

// One call's work: rows grouped by expert; items = (group, column block), split over threads.
struct Job {
  int wt = 0;
  bool trans = false;
  int64_t K = 0, N = 0, cols_per_item = 0, items_per_group = 0, n_items = 0, n_chunks = 0;
  std::vector<const void*> group_w;  // expert matrix of each group
  std::vector<int64_t> group_start;  // offsets into rows (size groups + 1)
  std::vector<const float*> xr;      // row pointers of x, grouped by expert
  std::vector<float*> yr;            // row pointers of y, same order
  std::atomic<int64_t> next{0}, done{0};

  template <int WT>
  void item(int64_t i) {
    const int64_t g = i / items_per_group, blk = i % items_per_group;
    const int64_t r0 = group_start[g], nr = group_start[g + 1] - r0;
    if (trans) {
      const int64_t n0 = blk * kColsPerItem, n1 = std::min(N, n0 + kColsPerItem);
      run_cols_nk<WT>(xr.data() + r0, nr, group_w[g], K, n0, n1, yr.data() + r0);
    } else {
      run_tile_kn<WT>(xr.data() + r0, nr, group_w[g], K, N, blk * cols_per_item, cols_per_item, yr.data() + r0);
    }
  }

  void chunk(int64_t c) {
    const int64_t i0 = c * n_items / n_chunks, i1 = (c + 1) * n_items / n_chunks;
    for (int64_t i = i0; i < i1; ++i) {
      if (wt == kF32) item<kF32>(i);
      else if (wt == kF16) item<kF16>(i);
      else item<kBF16>(i);
    }
  }

  void work() {  // grab chunks until none is left
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      chunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void cpu_relax() {
#ifdef MTP_AVX512
  _mm_pause();
#endif
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && std::atoi(v) > 0 ? std::atoi(v) : fallback;
}

// Workers that spin for a while after each job (llama.cpp's threadpool polls the same way): a decode step
// is ~100 small matmuls separated by short XLA ops, and waking a sleeping thread for each (tens of us) costs
// more than the matmul. After MTP_JAX_SPIN_US (default 1000) without work they sleep on a condition variable.
//
// Jobs live in two slots owned by the pool, so a worker that wakes late never touches freed memory: it
// registers on the slot (`active`), then works only if the slot still holds the job it was woken for; the
// caller retires a slot (gen = 0) and waits for `active` to drain before refilling it. The caller waits
// only for the chunks, never for idle workers, and takes chunks itself, so a descheduled worker delays a
// call by at most one chunk.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers live as long as the process
    return *pool;
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Fills a job slot (fill(job) sets everything but the counters) and runs it on the caller and the workers.
  // A second caller while a job runs (XLA may run independent ops at once) works alone on its own job.
  template <typename Fill>
  void run(Fill fill, int64_t n_chunks) {
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n_chunks <= 1) {
      Job job;
      fill(job);
      job.n_chunks = std::min<int64_t>(n_chunks, 1);
      job.work();
      return;
    }
    const uint64_t g = ++last_gen_;
    Slot& slot = slots_[g & 1];
    slot.gen.store(0);  // retire: late workers that register from now on skip it
    while (slot.active.load() != 0) cpu_relax();
    Job& job = slot.job;
    fill(job);
    job.n_chunks = n_chunks;
    job.next.store(0);
    job.done.store(0);
    slot.gen.store(g);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.store(g);
    }
    if (sleepers_.load() > 0) cv_.notify_all();
    job.work();
    while (job.done.load(std::memory_order_acquire) < n_chunks) cpu_relax();
  }

 private:
  struct Slot {
    Job job;
    std::atomic<uint64_t> gen{0};
    std::atomic<int> active{0};
  };

  Pool() : spin_(std::chrono::microseconds(env_int("MTP_JAX_SPIN_US", 1000))) {
    const int n = std::min<int>(env_int("MTP_JAX_THREADS", 1 << 20), std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
    for (auto& t : workers_) t.detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      uint64_t g;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        cpu_relax();
        if (std::chrono::steady_clock::now() - t0 > spin_) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = g;
      Slot& slot = slots_[g & 1];
      slot.active.fetch_add(1);
      if (slot.gen.load() == g) slot.job.work();
      slot.active.fetch_sub(1);
    }
  }

  std::vector<std::thread> workers_;
  std::chrono::steady_clock::duration spin_;
  std::mutex submit_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  uint64_t last_gen_ = 0;  // guarded by submit_
  Slot slots_[2];
  std::atomic<int> sleepers_{0};
};

ffi::Error LinearImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> eids, ffi::ResultBuffer<ffi::F32> y,
                      bool trans) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4) return ffi::Error::InvalidArgument("mtp_linear: x must be 2-D, w 4-D");
  const int64_t M = xd[0], K = xd[1], L = wd[0], E = wd[1];
  const int64_t N = trans ? wd[2] : wd[3];
  if ((trans ? wd[3] : wd[2]) != K) return ffi::Error::InvalidArgument("mtp_linear: inner dimensions differ");
  if (eids.element_count() != static_cast<size_t>(M))
    return ffi::Error::InvalidArgument("mtp_linear: one expert id per row");
  int wt;
  switch (w.element_type()) {
    case ffi::DataType::F32: wt = kF32; break;
    case ffi::DataType::F16: wt = kF16; break;
    case ffi::DataType::BF16: wt = kBF16; break;
    default: return ffi::Error::InvalidArgument("mtp_linear: weights must be f32, f16 or bf16");
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  const size_t esize = wt == kF32 ? 4 : 2;
  const int64_t li = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);  // XLA's dynamic-index clamping
  const char* wl = static_cast<const char*>(w.untyped_data()) + li * E * K * N * esize;

  // rows grouped by expert (a stable counting sort): each distinct expert's matrix is read once
  std::vector<int64_t> count(E + 1, 0);
  const int32_t* ids = eids.typed_data();
  auto eid = [&](int64_t m) { return std::clamp<int64_t>(ids[m], 0, E - 1); };
  for (int64_t m = 0; m < M; ++m) ++count[eid(m) + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  int64_t groups = 0;
  for (int64_t e = 0; e < E; ++e) groups += count[e + 1] > count[e];
  // enough weight bytes per thread (32 KiB) to pay for handing it work
  Pool& pool = Pool::get();
  const int64_t bytes = groups * K * N * static_cast<int64_t>(esize);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.threads(), bytes >> 15));
  const int64_t split = (N + threads - 1) / threads;
  const int64_t per_item = trans ? kColsPerItem : std::min(N, std::max(kMinTileCols, (split + 15) / 16 * 16));
  const int64_t items_per_group = (N + per_item - 1) / per_item;
  auto fill = [&](Job& job) {
    job.wt = wt;
    job.trans = trans;
    job.K = K;
    job.N = N;
    job.cols_per_item = per_item;
    job.items_per_group = items_per_group;
    job.n_items = groups * items_per_group;
    std::vector<int64_t> pos(count.begin(), count.end() - 1);
    job.xr.resize(M);
    job.yr.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t p = pos[eid(m)]++;
      job.xr[p] = x.typed_data() + m * K;
      job.yr[p] = y->typed_data() + m * N;
    }
    job.group_w.clear();
    job.group_start.assign(1, 0);
    for (int64_t e = 0; e < E; ++e)
      if (count[e + 1] > count[e]) {
        job.group_w.push_back(wl + e * K * N * esize);
        job.group_start.push_back(count[e + 1]);
      }
  };
  // up to 4 chunks per thread so that the caller can take over the work of a worker the OS has descheduled
  pool.run(fill, threads == 1 ? 1 : std::min<int64_t>(groups * items_per_group, 4 * threads));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpLinear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));
