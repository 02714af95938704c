// jaxsft: a float32 matmul that XLA calls on the CPU (an XLA FFI handler), done by the process's BLAS,
// and the attention of jaxsft/model/attention.py fused over its query blocks on the same BLAS.
// jaxsft/model/blas.py compiles this file once per machine and hands it the BLAS's cblas_sgemm.
//
// The BLAS runs single-threaded; the handler cuts the work into pieces and runs them on XLA's
// own intra-op threads. A BLAS with threads of its own would put 2x the threads on the cores
// while XLA runs other work beside the call, and OpenBLAS's idle threads spin: 24% of a train
// step's cycles went to its `blas_thread_server` (bench/NOTES.md, round 6).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// cblas_sgemm with 64-bit integers (OpenBLAS as numpy bundles it) or 32-bit (a system libopenblas).
typedef void (*Sgemm64)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                        int64_t, float, float*, int64_t);
typedef void (*Sgemm32)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                        int32_t, float, float*, int32_t);

static void* g_sgemm = nullptr;
static bool g_ilp64 = true;

extern "C" void jaxsft_set_sgemm(void* sgemm, int ilp64) {
  g_sgemm = sgemm;
  g_ilp64 = ilp64 != 0;
}

using Matrices = ffi::Buffer<ffi::F32>;  // rank >= 2: [..., rows, columns], the leading axes a batch

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

// c = op(a) @ op(b) + beta * c, row-major, on this thread.
static void Gemm1(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  int ta_ = ta ? kTrans : kNoTrans, tb_ = tb ? kTrans : kNoTrans;
  if (g_ilp64) {
    reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, ta_, tb_, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  } else {
    reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, ta_, tb_, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  }
}

// fn(i) for i in [0, n) on XLA's threads and this one; returns when all are done. Any thread may
// take the next unclaimed i, so the caller never waits on a task that has not started (no deadlock
// however busy XLA's pool is).
struct Tasks {
  std::function<void(int64_t)> fn;
  int64_t n;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      fn(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mutex);
        all_done.notify_all();
      }
    }
  }
};

static void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  if (n <= 0) return;
  auto tasks = std::make_shared<Tasks>();
  tasks->fn = std::move(fn), tasks->n = n;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(n, threads); ++t) pool.Schedule([tasks] { tasks->Work(); });
  tasks->Work();
  std::unique_lock<std::mutex> lock(tasks->mutex);
  tasks->all_done.wait(lock, [&] { return tasks->done.load() == tasks->n; });
}

// One batch of matmuls cut into pieces: row blocks of C for a single matmul, runs of batch
// entries otherwise.
struct Job {
  const float *a, *b;
  float* c;
  int64_t batch, m, n, k, lda, ldb;
  bool trans_a, trans_b;
  int64_t pieces;

  void Piece(int64_t i) const {
    if (batch == 1) {  // rows [row0, row0 + rows) of C; of op(a): columns of a when transposed
      int64_t row0 = m * i / pieces, rows = m * (i + 1) / pieces - row0;
      Gemm1(trans_a, trans_b, rows, n, k, trans_a ? a + row0 : a + row0 * lda, lda, b, ldb, 0.0f, c + row0 * n, n);
      return;
    }
    for (int64_t z = batch * i / pieces; z < batch * (i + 1) / pieces; ++z) {
      Gemm1(trans_a, trans_b, m, n, k, a + z * m * k, lda, b + z * k * n, ldb, 0.0f, c + z * m * n, n);
    }
  }
};

// c [..., M, N] = op(a) @ op(b) for each leading index, all row-major: a is [..., M, K] ([..., K, M]
// with trans_a), b [..., K, N] ([..., N, K] with trans_b); a, b and c share the leading axes.
static ffi::Error Sgemm(ffi::ThreadPool pool, Matrices a, Matrices b, ffi::Result<Matrices> c, bool trans_a,
                        bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxsft_sgemm: no BLAS was set");
  auto ad = a.dimensions(), bd = b.dimensions();
  size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank) return ffi::Error::InvalidArgument("jaxsft_sgemm: operands of rank < 2 or unequal");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("jaxsft_sgemm: batch axes differ");
    batch *= ad[i];
  }
  int64_t ar = ad[rank - 2], ac = ad[rank - 1], br = bd[rank - 2], bc = bd[rank - 1];
  int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac, n = trans_b ? br : bc;
  if ((trans_b ? bc : br) != k) return ffi::Error::InvalidArgument("jaxsft_sgemm: contracting sizes differ");
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; a BLAS may leave c untouched when k is 0
    std::memset(c->typed_data(), 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  Job job{a.typed_data(), b.typed_data(), c->typed_data(), batch, m, n, k, ac, bc, trans_a, trans_b, 1};
  // Pieces of at least 2^21 multiply-adds (~20 us; smaller ones cost more to hand out) and, for
  // one matmul, 64 rows; a batch is cut finer than the threads, as its entries are small.
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t by_size = batch * m * n * k >> 21;
  job.pieces = std::max<int64_t>(1, batch == 1 ? std::min({threads, m / 64, by_size})
                                               : std::min({4 * threads, batch, by_size}));
  ParallelFor(pool, job.pieces, [&job](int64_t i) { job.Piece(i); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsftSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrices>()
                                  .Arg<Matrices>()
                                  .Ret<Matrices>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// ---------------------------------------------------------------------------------------------
// Fused attention (float32): softmax(mask(softcap(q k^T * scale))) v for one (batch row, kv head)
// per task, its query blocks one after another, each block's logits in a buffer that stays in
// the core's cache. The mask is built here: key j < W (a prefix slot) is always seen; else key
// s = j - W is seen by query token t when s <= t, both are in the same segment, and t - s is
// under the window (window <= 0: no window). q is [B, K, X, H] with X = T*G token-major (row x
// is token x / G), k and v [B, K, S, H] with S = W + T, segment ids [B, T]. The forward keeps
// the log-sum-exp of each row; the backward recomputes the probabilities from it (no [X, S]
// tensor is kept between them).

static const float kMaskedLogit = -0.7f * FLT_MAX;  // as attention.py: exp() of it is exactly 0

// exp(x) in a form the compiler vectorises (std::exp is a call per element): Cephes' expf, x = k ln2
// + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^k through the exponent bits; within
// 1 ulp of the correctly rounded exp for x in [-87, 88] (checked every 1e-4), and 0 below -87 (a
// masked logit's exp is exactly 0).
static inline float Exp(float x) {
  float xc = std::min(std::max(x, -87.0f), 88.0f);
  float k = std::nearbyint(xc * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, xc);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

static inline float Tanh(float x) {  // 1 - 2 / (exp(2x) + 1), odd, saturating
  float e = Exp(2.0f * std::min(std::fabs(x), 20.0f));
  return std::copysign(1.0f - 2.0f / (e + 1.0f), x);
}

static const int64_t kBlockRows = 64;  // query rows per block (the last one shorter)

struct AttnDims {
  int64_t b, kv, x, s, h, t, g, w, block;  // block: tokens per query block
  float scale, softcap;
  int32_t window;
};

static ffi::Error Dims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                       ffi::Buffer<ffi::S32>& seg, float scale, float softcap, int32_t window, AttnDims& d) {
  auto qd = q.dimensions(), kd = k.dimensions(), sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || sd.size() != 2 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("jaxsft_attention: q, k, v of rank 4 and segment ids of rank 2");
  d.b = qd[0], d.kv = qd[1], d.x = qd[2], d.h = qd[3], d.s = kd[2], d.t = sd[1];
  if (kd[0] != d.b || kd[1] != d.kv || kd[3] != d.h || sd[0] != d.b || d.t == 0 || d.x % d.t || d.s < d.t)
    return ffi::Error::InvalidArgument("jaxsft_attention: shapes disagree");
  for (size_t i = 0; i < 4; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("jaxsft_attention: k and v differ");
  d.g = d.x / d.t, d.w = d.s - d.t;
  d.block = std::max<int64_t>(1, kBlockRows / d.g);
  d.scale = scale, d.softcap = softcap, d.window = window;
  return ffi::Error::Success();
}

// The row of logits of query token t against keys [0, nk): scaled, soft-capped (chain: the cap's
// derivative, when asked) and masked.
static void Logits(const AttnDims& d, const int32_t* seg, int64_t t, float* row, int64_t nk, float* chain) {
  if (d.softcap > 0) {
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) {
      float th = Tanh(row[j] * d.scale / d.softcap);
      row[j] = d.softcap * th;
      if (chain) chain[j] = 1.0f - th * th;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) row[j] *= d.scale;
  }
  // the keys this query sees: the prefix's W, then its own segment's up to itself within the window
  int64_t first = d.w + std::max<int64_t>(0, d.window > 0 ? t - d.window + 1 : 0), last = d.w + t;
  while (first < last && seg[first - d.w] != seg[t]) ++first;  // segments are contiguous runs
  int64_t end = std::min(last + 1, nk);
  const int32_t own = seg[t], *keys = seg - d.w;
  for (int64_t j = d.w; j < std::min(first, nk); ++j) row[j] = kMaskedLogit;
  for (int64_t j = end; j < nk; ++j) row[j] = kMaskedLogit;
#pragma omp simd
  for (int64_t j = first; j < end; ++j) row[j] = keys[j] == own ? row[j] : kMaskedLogit;
}

static ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> window,
                               ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                               float scale, float softcap) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxsft_attention: no BLAS was set");
  AttnDims d;
  auto err = Dims(q, k, v, seg, scale, softcap, window.typed_data()[0], d);
  if (err.failure()) return err;
  const float *q0 = q.typed_data(), *k0 = k.typed_data(), *v0 = v.typed_data();
  const int32_t* seg0 = seg.typed_data();
  float *o0 = out->typed_data(), *l0 = lse->typed_data();
  ParallelFor(pool, d.b * d.kv, [&](int64_t task) {
    int64_t bi = task / d.kv;
    const float *qt = q0 + task * d.x * d.h, *kt = k0 + task * d.s * d.h, *vt = v0 + task * d.s * d.h;
    const int32_t* sg = seg0 + bi * d.t;
    float *ot = o0 + task * d.x * d.h, *lt = l0 + task * d.x;
    std::vector<float> p(d.block * d.g * d.s);
    for (int64_t t0 = 0; t0 < d.t; t0 += d.block) {
      int64_t t1 = std::min(d.t, t0 + d.block), x0 = t0 * d.g, nx = (t1 - t0) * d.g, nk = d.w + t1;
      Gemm1(false, true, nx, nk, d.h, qt + x0 * d.h, d.h, kt, d.h, 0.0f, p.data(), nk);
      for (int64_t r = 0; r < nx; ++r) {
        float* row = p.data() + r * nk;
        Logits(d, sg, t0 + r / d.g, row, nk, nullptr);
        float mx = kMaskedLogit, sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, row[j]);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < nk; ++j) sum += (row[j] = Exp(row[j] - mx));
        float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j) row[j] *= inv;
        lt[x0 + r] = mx + std::log(sum);
      }
      Gemm1(false, false, nx, d.h, nk, p.data(), nk, vt, d.h, 0.0f, ot + x0 * d.h, d.h);
    }
  });
  return ffi::Error::Success();
}

static ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> window,
                               ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                               ffi::Result<ffi::Buffer<ffi::F32>> d_q, ffi::Result<ffi::Buffer<ffi::F32>> d_k,
                               ffi::Result<ffi::Buffer<ffi::F32>> d_v, float scale, float softcap) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxsft_attention: no BLAS was set");
  AttnDims d;
  auto err = Dims(q, k, v, seg, scale, softcap, window.typed_data()[0], d);
  if (err.failure()) return err;
  const float *q0 = q.typed_data(), *k0 = k.typed_data(), *v0 = v.typed_data();
  const float *o0 = out.typed_data(), *l0 = lse.typed_data(), *do0 = d_out.typed_data();
  const int32_t* seg0 = seg.typed_data();
  float *dq0 = d_q->typed_data(), *dk0 = d_k->typed_data(), *dv0 = d_v->typed_data();
  ParallelFor(pool, d.b * d.kv, [&](int64_t task) {
    int64_t bi = task / d.kv;
    const float *qt = q0 + task * d.x * d.h, *kt = k0 + task * d.s * d.h, *vt = v0 + task * d.s * d.h;
    const float *ot = o0 + task * d.x * d.h, *lt = l0 + task * d.x, *dot = do0 + task * d.x * d.h;
    const int32_t* sg = seg0 + bi * d.t;
    float *dqt = dq0 + task * d.x * d.h, *dkt = dk0 + task * d.s * d.h, *dvt = dv0 + task * d.s * d.h;
    std::memset(dkt, 0, sizeof(float) * d.s * d.h);
    std::memset(dvt, 0, sizeof(float) * d.s * d.h);
    size_t scratch = d.block * d.g * d.s;
    std::vector<float> p(scratch), dp(scratch), chain(d.softcap > 0 ? d.s : 0);  // chain: one row's
    for (int64_t t0 = 0; t0 < d.t; t0 += d.block) {
      int64_t t1 = std::min(d.t, t0 + d.block), x0 = t0 * d.g, nx = (t1 - t0) * d.g, nk = d.w + t1;
      Gemm1(false, true, nx, nk, d.h, qt + x0 * d.h, d.h, kt, d.h, 0.0f, p.data(), nk);
      Gemm1(false, true, nx, nk, d.h, dot + x0 * d.h, d.h, vt, d.h, 0.0f, dp.data(), nk);
      for (int64_t r = 0; r < nx; ++r) {
        float *row = p.data() + r * nk, *drow = dp.data() + r * nk;
        float* crow = d.softcap > 0 ? chain.data() : nullptr;
        Logits(d, sg, t0 + r / d.g, row, nk, crow);
        float l = lt[x0 + r], delta = 0.0f;
        const float *dor = dot + (x0 + r) * d.h, *orow = ot + (x0 + r) * d.h;
#pragma omp simd reduction(+ : delta)
        for (int64_t i = 0; i < d.h; ++i) delta += dor[i] * orow[i];
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j) {
          float prob = Exp(row[j] - l);  // 0 where masked
          row[j] = prob;
          drow[j] = prob * (drow[j] - delta) * d.scale;
        }
        if (crow) {
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) drow[j] *= crow[j];
        }
      }
      Gemm1(false, false, nx, d.h, nk, dp.data(), nk, kt, d.h, 0.0f, dqt + x0 * d.h, d.h);
      Gemm1(true, false, nk, d.h, nx, dp.data(), nk, qt + x0 * d.h, d.h, 1.0f, dkt, d.h);
      Gemm1(true, false, nk, d.h, nx, p.data(), nk, dot + x0 * d.h, d.h, 1.0f, dvt, d.h);
    }
  });
  return ffi::Error::Success();
}

// Both directions take q, k, v, the segment ids and the window first.
static auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsftAttentionFwd, AttentionFwd,
                              AttentionBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsftAttentionBwd, AttentionBwd,
                              AttentionBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
