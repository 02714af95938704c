// jaxsft: a float32 matmul that XLA calls on the CPU (an XLA FFI handler), done by the process's BLAS.
// jaxsft/model/blas.py compiles this file once per machine and hands it the BLAS's cblas_sgemm.
//
// The BLAS runs single-threaded; the handler splits C's rows into pieces and runs them on XLA's
// own intra-op threads. A BLAS with threads of its own would put 2x the threads on the cores
// while XLA runs other work beside the call, and OpenBLAS's idle threads spin: 24% of a train
// step's cycles went to its `blas_thread_server` (bench/NOTES.md, round 6).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

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

using Matrix = ffi::Buffer<ffi::F32, 2>;  // an alias: a comma inside the handler macro would split it

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

// One matmul split into `pieces` row blocks of C. Any thread may take the next unclaimed piece,
// so the caller never waits on a task that has not started (no deadlock however busy the pool).
struct Job {
  const float *a, *b;
  float* c;
  int64_t m, n, k, lda, ldb;
  bool trans_a, trans_b;
  int64_t pieces;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void Piece(int64_t i) {
    int64_t row0 = m * i / pieces, rows = m * (i + 1) / pieces - row0;
    const float* a0 = trans_a ? a + row0 : a + row0 * lda;  // rows of op(a): columns of a when transposed
    float* c0 = c + row0 * n;
    int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
    if (g_ilp64) {
      reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, ta, tb, rows, n, k, 1.0f, a0, lda, b, ldb, 0.0f, c0, n);
    } else {
      reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, ta, tb, rows, n, k, 1.0f, a0, lda, b, ldb, 0.0f, c0, n);
    }
  }

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < pieces;) {
      Piece(i);
      if (done.fetch_add(1) + 1 == pieces) {
        std::lock_guard<std::mutex> lock(mutex);
        all_done.notify_all();
      }
    }
  }
};

// c [M, N] = op(a) @ op(b), all row-major: a is [M, K] ([K, M] with trans_a), b [K, N] ([N, K] with trans_b).
static ffi::Error Sgemm(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> c, bool trans_a,
                        bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxsft_sgemm: no BLAS was set");
  auto ad = a.dimensions(), bd = b.dimensions();
  int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k) return ffi::Error::InvalidArgument("jaxsft_sgemm: contracting sizes differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; a BLAS may leave c untouched when k is 0
    std::memset(c->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->a = a.typed_data(), job->b = b.typed_data(), job->c = c->typed_data();
  job->m = m, job->n = n, job->k = k, job->lda = ad[1], job->ldb = bd[1];
  job->trans_a = trans_a, job->trans_b = trans_b;
  // A piece of at least 64 rows and 2^21 multiply-adds (~20 us): smaller ones cost more to hand out.
  int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  int64_t by_size = (m * n * k) >> 21;
  job->pieces = std::max<int64_t>(1, std::min({threads, m / 64, by_size}));
  for (int64_t t = 1; t < job->pieces; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mutex);
  job->all_done.wait(lock, [&] { return job->done.load() == job->pieces; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsftSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
