// jaxsft: a float32 matmul that XLA calls on the CPU (an XLA FFI handler), done by the process's BLAS.
// jaxsft/model/blas.py compiles this file once per machine and hands it the BLAS's cblas_sgemm.
//
// The BLAS runs single-threaded; the handler cuts the work into pieces and runs them on XLA's
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

using Matrices = ffi::Buffer<ffi::F32>;  // rank >= 2: [..., rows, columns], the leading axes a batch

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

// One batch of matmuls cut into pieces: row blocks of C for a single matmul, runs of batch
// entries otherwise. Any thread may take the next unclaimed piece, so the caller never waits
// on a task that has not started (no deadlock however busy XLA's pool is).
struct Job {
  const float *a, *b;
  float* c;
  int64_t batch, m, n, k, lda, ldb, a_stride, b_stride;  // strides: between batch entries
  bool trans_a, trans_b;
  int64_t pieces;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void Gemm(const float* a0, const float* b0, float* c0, int64_t rows) const {
    int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
    if (g_ilp64) {
      reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, ta, tb, rows, n, k, 1.0f, a0, lda, b0, ldb, 0.0f, c0, n);
    } else {
      reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, ta, tb, rows, n, k, 1.0f, a0, lda, b0, ldb, 0.0f, c0, n);
    }
  }

  void Piece(int64_t i) const {
    if (batch == 1) {  // rows [row0, row0 + rows) of C; of op(a): columns of a when transposed
      int64_t row0 = m * i / pieces, rows = m * (i + 1) / pieces - row0;
      Gemm(trans_a ? a + row0 : a + row0 * lda, b, c + row0 * n, rows);
      return;
    }
    for (int64_t z = batch * i / pieces; z < batch * (i + 1) / pieces; ++z) {
      Gemm(a + z * a_stride, b + z * b_stride, c + z * m * n, m);
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

// c [..., M, N] = op(a) @ op(b) for each leading index, all row-major: a is [..., M, K] ([..., K, M]
// with trans_a), b [..., K, N] ([..., N, K] with trans_b); a, b and c share the leading axes.
// Each operand may be a window of its rows (axis -2): rows [row0, row0 + rows) of every matrix,
// read in place (a slice would be a copy); rows -1 means all of them.
static ffi::Error Sgemm(ffi::ThreadPool pool, Matrices a, Matrices b, ffi::Result<Matrices> c, bool trans_a,
                        bool trans_b, int64_t a_row0, int64_t a_rows, int64_t b_row0, int64_t b_rows) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxsft_sgemm: no BLAS was set");
  auto ad = a.dimensions(), bd = b.dimensions();
  size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank) return ffi::Error::InvalidArgument("jaxsft_sgemm: operands of rank < 2 or unequal");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("jaxsft_sgemm: batch axes differ");
    batch *= ad[i];
  }
  int64_t a_all = ad[rank - 2], ac = ad[rank - 1], b_all = bd[rank - 2], bc = bd[rank - 1];
  int64_t ar = a_rows < 0 ? a_all : a_rows, br = b_rows < 0 ? b_all : b_rows;
  if (a_row0 < 0 || a_row0 + ar > a_all || b_row0 < 0 || b_row0 + br > b_all)
    return ffi::Error::InvalidArgument("jaxsft_sgemm: a row window outside its operand");
  int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac, n = trans_b ? br : bc;
  if ((trans_b ? bc : br) != k) return ffi::Error::InvalidArgument("jaxsft_sgemm: contracting sizes differ");
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; a BLAS may leave c untouched when k is 0
    std::memset(c->typed_data(), 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->a = a.typed_data() + a_row0 * ac, job->b = b.typed_data() + b_row0 * bc, job->c = c->typed_data();
  job->batch = batch, job->m = m, job->n = n, job->k = k, job->lda = ac, job->ldb = bc;
  job->a_stride = a_all * ac, job->b_stride = b_all * bc;
  job->trans_a = trans_a, job->trans_b = trans_b;
  // Pieces of at least 2^21 multiply-adds (~20 us; smaller ones cost more to hand out) and, for
  // one matmul, 64 rows; a batch is cut finer than the threads, as its entries are small.
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t by_size = batch * m * n * k >> 21;
  job->pieces = std::max<int64_t>(1, batch == 1 ? std::min({threads, m / 64, by_size})
                                                : std::min({4 * threads, batch, by_size}));
  for (int64_t t = 1; t < std::min(job->pieces, threads); ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mutex);
  job->all_done.wait(lock, [&] { return job->done.load() == job->pieces; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsftSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrices>()
                                  .Arg<Matrices>()
                                  .Ret<Matrices>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("a_row0")
                                  .Attr<int64_t>("a_rows")
                                  .Attr<int64_t>("b_row0")
                                  .Attr<int64_t>("b_rows"));
