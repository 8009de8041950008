// ATen driver of the CPU lookup-table scans: argument checks, LUT quantization, work split over
// threads, run-time ISA dispatch and the final top-k merge. The per-block arithmetic lives in
// scan_{scalar,avx2,avx512}.cpp (see scan_kernels.h for why those files take raw pointers only).
//
// lut_topk, 4-bit (K = 16): per query, LUT[m, :] is shifted by min_m and scaled by one factor
//   scale = min(255 / max_m range_m, (65535 - M) / sum_m range_m)
// then rounded to uint8, so each entry fits a byte and every class's sum of M rounded entries
// (<= sum_m (range_m * scale + 1/2)) fits uint16. Returned values are the exact de-quantization
//   value = float(sum) * (1 / scale) + (sum_m min_m + bias[n])      (float32, no fma)
// which is within M / (2 * scale) (+ float rounding) of the exact float score.
// A table whose range is set by a few codewords (e.g. those a huge-norm row took) leaves the
// typical entries a few of the 256 levels: each subspace's *trimmed* range (4th largest minus 4th
// smallest of its 16 entries, blind to up to 3 extreme codewords a side) is measured in steps, and
// when the median over ~16 evenly spaced subspaces is below kMinMedianLevels the query is scanned with exact float sums
// instead (score4, then a stable sort: same (value desc, index asc) order, exact values), never
// silently coarse.
// The top-k is kept per query and per thread while scanning (topk.h), never as a (B, N) matrix;
// for k >= 24 the SIMD kernels use two passes (block maxima, then only the ~k blocks that can
// hold a winner, read back from the pass-1 sums kept in scratch, or re-scanned when B * nblocks
// is too large to keep them: see block_bound in topk.h).
// lut_topk, 8-bit (K = 256) and lut_score: exact float sums, subspaces added in order 0..M-1.
// compute_lut: LUT[b, m, j] = <q_m, C_m[j]>, float32 (the per-call step before every scan);
// power-of-two dsub <= 16 reads the codebooks in place (pairwise-summed dot products), other dsub
// through a transposed copy.
//
// Kernel set: AVX-512 (F/BW/VL/DQ), else AVX2+FMA, else scalar, from __builtin_cpu_supports.
// TORCHAQ_FORCE_SCALAR=1 or TORCHAQ_CPU_ISA=scalar|avx2|avx512 override it; both are read at
// every call. All kernel sets return bit-identical results.
#include "scan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <vector>

#include "lut_quantize.h"
#include "scan_generic.h"
#include "scan_kernels.h"
#include "topk.h"
#include "topk_merge.h"

namespace torchaq {
namespace cpu {
namespace {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa detected_isa() {
#if defined(TORCHAQ_X86_KERNELS)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

// Read at every call (a getenv is negligible next to a scan), so tests and benchmarks can switch
// paths in-process. TORCHAQ_FORCE_SCALAR=1 wins; TORCHAQ_CPU_ISA=scalar|avx2|avx512 caps the
// choice at what the CPU supports.
Isa current_isa() {
  const char* force = std::getenv("TORCHAQ_FORCE_SCALAR");
  if (force != nullptr && std::strcmp(force, "1") == 0) return Isa::Scalar;
  Isa isa = detected_isa();
  if (const char* want = std::getenv("TORCHAQ_CPU_ISA")) {
    Isa w = isa;
    if (std::strcmp(want, "scalar") == 0) w = Isa::Scalar;
    else if (std::strcmp(want, "avx2") == 0) w = Isa::Avx2;
    else if (std::strcmp(want, "avx512") == 0) w = Isa::Avx512;
    if (int(w) < int(isa)) isa = w;
  }
  return isa;
}

struct Kernels {
  void (*compute_lut)(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
  void (*topk4)(const Topk4Args&, const Task&);
  void (*qscore4)(const Topk4Args&, const Task&);
  void (*topk8)(const FloatScanArgs&, const Task&);
  void (*score4)(const FloatScanArgs&, const Task&);
  void (*score8)(const FloatScanArgs&, const Task&);
};

Kernels kernels_for(Isa isa) {
  switch (isa) {
#if defined(TORCHAQ_X86_KERNELS)
    case Isa::Avx512: return {compute_lut_avx512, topk4_avx512, qscore4_avx512, topk8_avx512, score4_avx512, score8_avx512};
    case Isa::Avx2: return {compute_lut_avx2, topk4_avx2, qscore4_avx2, topk8_avx2, score4_avx2, score8_avx2};
#endif
    default: return {compute_lut_scalar, topk4_scalar, qscore4_scalar, topk8_scalar, score4_scalar, score8_scalar};
  }
}

// Mirrors torchaq.ops.check_lut_scan_args (same messages, ValueError / TypeError).
int64_t check_scan_args(const at::Tensor& lut, const at::Tensor& packed, int64_t num_classes,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(lut.dim() == 3, "lut must be (B, M, K), got shape ", lut.sizes());
  TORCH_CHECK_TYPE(lut.scalar_type() == at::kFloat, "lut must be float32, got ", lut.scalar_type());
  const int64_t K = lut.size(2);
  TORCH_CHECK_VALUE(K == 16 || K == 256, "lut must have K = 16 (4-bit) or 256 (8-bit) entries, got K = ", K);
  const int64_t bits = K == 16 ? 4 : 8;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8 (from torchaq.ops.pack_codes), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == kBlock,
                    "packed must be (ceil(N/32), P, 32) from pack_codes, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(num_classes >= 0 && packed.size(0) == (num_classes + kBlock - 1) / kBlock,
                    "num_classes=", num_classes, " does not match packed with ", packed.size(0), " blocks of ", kBlock);
  const int64_t M = lut.size(1);
  const int64_t width = bits == 4 ? (M + 1) / 2 : M;
  TORCH_CHECK_VALUE(packed.size(1) == width, "packed has ", packed.size(1), " bytes per class but lut has M = ", M,
                    " subspaces of ", bits, " bits (", width, " bytes): mismatched num_subspaces");
  TORCH_CHECK_VALUE(packed.device() == lut.device(), "packed is on ", packed.device(), " but lut is on ",
                    lut.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == num_classes, "bias must have shape (", num_classes,
                      ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == lut.device(), "bias is on ", bias->device(), " but lut is on ", lut.device());
  }
  return bits;
}

// Pass-1 sums of the 4-bit two-pass top-k are kept for pass 2 up to this size (tasks * sub-batch *
// nblocks * 64 bytes: sub-batches of up to 549 queries at V = 30522, 32 at V = 262144, see
// two_pass_sub_batch in topk.h); beyond it pass 2 re-scans its few blocks.
constexpr int64_t kMaxKeptSumsBytes = int64_t(32) << 20;

// Split B queries x nblocks code blocks into a TQ x TB grid of tasks (see split_queries below).
struct Plan {
  int64_t TQ, TB, qchunk, bchunk;
};

Plan make_plan(int64_t B, int64_t nblocks, int64_t P) {
  int64_t T = at::get_num_threads();
  if (B * nblocks * P < (int64_t(1) << 14)) T = 1;  // too little work to pay for threads
  // Queries are split (each task scans every block for its own queries: one selection and one
  // pass 2 per query, no duplicated per-task work) when every thread gets whole groups of four
  // and either the codes sit in the shared cache or there are enough queries that streaming the
  // codes once per thread does not bind; otherwise blocks are split, so the codes come from
  // memory once in all (benchmarks/cpu_scan.py times both regimes: 2-thread rows at V = 30k and
  // V = 256k).
  const bool split_queries = B >= 4 * T && (nblocks * P * kBlock <= (int64_t(8) << 20) || B >= 64 * T);
  const int64_t TB = split_queries ? 1 : std::max<int64_t>(1, std::min<int64_t>(T, nblocks / 4));
  const int64_t TQ = std::max<int64_t>(1, std::min<int64_t>((T + TB - 1) / TB, B));
  int64_t qchunk = (B + TQ - 1) / TQ;
  if (qchunk > 4) qchunk = (qchunk + 3) / 4 * 4;  // whole groups of four queries per task
  const int64_t bchunk = (nblocks + TB - 1) / TB;
  return {(B + qchunk - 1) / qchunk, (nblocks + bchunk - 1) / bchunk, qchunk, bchunk};
}

// Bytes of Task::work for all the tasks of a plan.
int64_t work_bytes(const Plan& plan, int64_t P) { return plan.TQ * plan.TB * plan.qchunk * scratch_bytes_per_query(P); }

// One call's scratch, carved into 64-byte aligned pieces (not zeroed) from a single buffer. Calls
// that need at most kKeep bytes -- batch 1 and other small ones -- reuse a per-thread buffer
// (kept until the thread exits), so the hot path pays no allocation and no zero-fill; larger
// calls own a buffer for the duration of the call.
class Scratch {
 public:
  static constexpr size_t kKeep = size_t(4) << 20;
  // The byte size of every piece, in the order take() will be called.
  explicit Scratch(std::initializer_list<int64_t> sizes) {
    size_t total = 64;
    for (int64_t n : sizes) total += round_up(size_t(n));
    uint8_t* base;
    if (total > kKeep) {
      owned_.reset(new uint8_t[total]);
      base = owned_.get();
    } else {
      thread_local std::unique_ptr<uint8_t[]> kept;
      if (!kept) kept.reset(new uint8_t[kKeep]);
      base = kept.get();
    }
    next_ = base + (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    end_ = base + total;
  }
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(next_);
    next_ += round_up(size_t(count) * sizeof(T));
    TORCH_INTERNAL_ASSERT(next_ <= end_, "torchaq: scratch pieces exceed their declared sizes");
    return p;
  }

 private:
  static size_t round_up(size_t n) { return (n + 63) / 64 * 64; }
  std::unique_ptr<uint8_t[]> owned_;
  uint8_t* next_;
  uint8_t* end_;
};

// Runs fn(task) over the plan's grid, with the running top-k (if any) laid out as topk[bi * B + q].
template <typename Fn>
void run_tasks(const Plan& plan, int64_t B, int64_t nblocks, int64_t P, TopK* topk, uint8_t* work, Fn fn) {
  const int64_t scratch = scratch_bytes_per_query(P);
  const int64_t ntasks = plan.TQ * plan.TB;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t qi = i / plan.TB, bi = i % plan.TB;
      Task t;
      t.q0 = qi * plan.qchunk;
      t.q1 = std::min(B, t.q0 + plan.qchunk);
      t.blk0 = bi * plan.bchunk;
      t.blk1 = std::min(nblocks, t.blk0 + plan.bchunk);
      t.topk = topk != nullptr ? topk + bi * B + t.q0 : nullptr;
      t.work = work + i * plan.qchunk * scratch;
      t.id = i;
      if (t.q0 < t.q1 && t.blk0 < t.blk1) fn(t);
    }
  });
}

}  // namespace

bool all_finite(const float* x, int64_t n) {
  int64_t i = 0;
  bool ok = true;
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7fffffff), max_finite = _mm_set1_epi32(0x7f7fffff);
  __m128i bad[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 4; ++j) {
      const __m128i v = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i + 4 * j)), abs_mask);
      bad[j] = _mm_or_si128(bad[j], _mm_cmpgt_epi32(v, max_finite));
    }
  ok = _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(bad[0], bad[1]), _mm_or_si128(bad[2], bad[3]))) == 0;
#endif
  for (; i < n; ++i) ok = ok && std::isfinite(x[i]);
  return ok;
}

namespace {

// The queries flagged coarse by quantize_lut: exact float scores of every class (lut_score), then a
// stable descending sort, so ties keep ascending class order like the scan kernels. Overwrites
// those queries' rows of values / indices. Costs a (Bc, N) score matrix and a sort: the price of
// a table one uint8 scale cannot resolve, paid only by the queries that have one.
void exact_rows_fallback(const at::Tensor& lut, const at::Tensor& packed, int64_t num_classes,
                         const std::optional<at::Tensor>& bias, const uint8_t* coarse, at::Tensor& values,
                         at::Tensor& indices) {
  const int64_t B = lut.size(0), kk = values.size(1);
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < B; ++b)
    if (coarse[b]) rows.push_back(b);
  if (rows.empty()) return;
  const at::Tensor idx = at::tensor(rows, lut.options().dtype(at::kLong));
  const at::Tensor scores = lut_score_cpu(lut.index_select(0, idx).contiguous(), packed, num_classes, bias);
  auto sorted = at::sort(scores, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  values.index_copy_(0, idx, std::get<0>(sorted).narrow(1, 0, kk));
  indices.index_copy_(0, idx, std::get<1>(sorted).narrow(1, 0, kk));
}

}  // namespace

const char* active_isa() {
  switch (current_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

std::tuple<at::Tensor, at::Tensor> lut_topk_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in,
                                                int64_t num_classes, int64_t k,
                                                const std::optional<at::Tensor>& bias_in) {
  return lut_topk_cpu_impl(lut_in, packed_in, num_classes, k, bias_in, /*sorted=*/true);
}

std::tuple<at::Tensor, at::Tensor> lut_topk_cpu_impl(const at::Tensor& lut_in, const at::Tensor& packed_in,
                                                     int64_t num_classes, int64_t k,
                                                     const std::optional<at::Tensor>& bias_in, bool sorted) {
  const int64_t bits = check_scan_args(lut_in, packed_in, num_classes, bias_in);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(num_classes < (int64_t(1) << 31), "lut_topk: num_classes must be < 2^31, got ", num_classes);
  const int64_t B = lut_in.size(0), M = lut_in.size(1), kk = std::min(k, num_classes);
  at::Tensor values = at::empty({B, kk}, lut_in.options());
  at::Tensor indices = at::empty({B, kk}, lut_in.options().dtype(at::kLong));
  if (B == 0 || kk == 0) return {values, indices};

  const at::Tensor lut = lut_in.contiguous(), packed = packed_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t nblocks = packed.size(0), P = packed.size(1);
  const Kernels kern = kernels_for(current_isa());
  const Plan plan = make_plan(B, nblocks, P);
  const bool four = bits == 4, has_bias = bias.has_value();
  // a nan / inf score has no place in a ranking (and the 4-bit LUT could not be quantized)
  TORCH_CHECK_VALUE(all_finite(lut.const_data_ptr<float>(), lut.numel()),
                    "lut_topk needs finite lut entries (got inf or nan)");
  TORCH_CHECK_VALUE(!has_bias || all_finite(bias->const_data_ptr<float>(), num_classes),
                    "lut_topk needs a finite bias (got inf or nan)");

  // scratch: running top-k buffers, task work, then (4-bit) the quantized LUT, its scales and
  // offsets, the two-pass block maxima and selection scratch, and the kept pass-1 sums (if they fit)
  const int64_t cap = 2 * kk + 2 * kBlock, stride = cap + 16;  // see TopK
  const int64_t ntopk = plan.TB * B, ntasks = plan.TQ * plan.TB;
  const int64_t sums_queries = std::min(plan.qchunk, two_pass_sub_batch(nblocks, P));  // per task (topk.h)
  const bool keep_sums = four && ntasks * sums_queries * nblocks * kBlock * 2 <= kMaxKeptSumsBytes;
  Scratch scratch({ntopk * (stride + cap) * 4, ntopk * (stride + 2 * cap) * 4, ntopk * int64_t(sizeof(TopK)),
                   work_bytes(plan, P), four ? B * 2 * P * 16 : 0, four ? 4 * B : 0, four ? 4 * B : 0,
                   four ? B : 0, four ? B * nblocks * 4 : 0,
                   four ? ntasks * (nblocks + 16) * 4 : 0, keep_sums ? ntasks * sums_queries * nblocks * kBlock * 2 : 0});
  float* keys = scratch.take<float>(ntopk * (stride + cap));
  int32_t* ids = scratch.take<int32_t>(ntopk * (stride + 2 * cap));
  TopK* topk = scratch.take<TopK>(ntopk);
  for (int64_t i = 0; i < ntopk; ++i) {
    float* kp = keys + i * (stride + cap);
    int32_t* ip = ids + i * (stride + 2 * cap);
    new (&topk[i]) TopK{kp, ip, ip + stride, kp + stride, 0, kk, cap, 0.f, 0};
  }
  uint8_t* work = scratch.take<uint8_t>(work_bytes(plan, P));
  float* vals = values.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();

  if (four) {
    uint8_t* qlut = scratch.take<uint8_t>(B * 2 * P * 16);
    float* inv_scale = scratch.take<float>(B);
    float* offset = scratch.take<float>(B);
    uint8_t* coarse = scratch.take<uint8_t>(B);
    quantize_lut(lut, P, qlut, inv_scale, offset, coarse);
    // the kernels read the bias in place; the last block's is zero-padded to a whole block
    const float* bias_ptr = has_bias ? bias->const_data_ptr<float>() : nullptr;
    float bias_tail[kBlock] = {};
    for (int64_t n = (nblocks - 1) * kBlock; has_bias && n < num_classes; ++n) bias_tail[n % kBlock] = bias_ptr[n];
    float* bmax = scratch.take<float>(B * nblocks);
    uint32_t* select = scratch.take<uint32_t>(ntasks * (nblocks + 16));
    uint16_t* bsums = keep_sums ? scratch.take<uint16_t>(ntasks * sums_queries * nblocks * kBlock) : nullptr;
    Topk4Args a{packed.const_data_ptr<uint8_t>(), P, num_classes, qlut, inv_scale, offset, bias_ptr, bias_tail,
                nblocks, bmax, bsums, select, sums_queries, nullptr};
    run_tasks(plan, B, nblocks, P, topk, work, [&](const Task& t) { kern.topk4(a, t); });
    merge_topk(topk, B, plan.TB, kk, vals, idx, [&](int64_t q, float key) {
      // with a bias the key already is the de-quantized score; without, it is the uint16 sum
      return has_bias ? key : key * inv_scale[q] + offset[q];
    }, sorted);
    exact_rows_fallback(lut, packed, num_classes, bias, coarse, values, indices);
  } else {
    FloatScanArgs a{packed.const_data_ptr<uint8_t>(), P, M, num_classes, lut.const_data_ptr<float>(),
                    has_bias ? bias->const_data_ptr<float>() : nullptr, nullptr};
    run_tasks(plan, B, nblocks, P, topk, work, [&](const Task& t) { kern.topk8(a, t); });
    merge_topk(topk, B, plan.TB, kk, vals, idx, [](int64_t, float key) { return key; }, sorted);
  }
  return {values, indices};
}

at::Tensor compute_lut_cpu(const at::Tensor& queries, const at::Tensor& codebooks) {
  // mirrors torchaq.ops._check_compute_lut
  TORCH_CHECK_VALUE(codebooks.dim() == 3, "codebooks must be (M, K, dsub), got shape ", codebooks.sizes());
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries must be (B, d), got shape ", queries.sizes());
  const int64_t M = codebooks.size(0), K = codebooks.size(1), dsub = codebooks.size(2), B = queries.size(0);
  TORCH_CHECK_VALUE(queries.size(1) == M * dsub, "queries have d = ", queries.size(1), " but codebooks cover M * dsub = ",
                    M, " * ", dsub, " = ", M * dsub,
                    " (pad queries with zeros to the quantizer's padded dimension)");
  TORCH_CHECK_TYPE(queries.is_floating_point() && codebooks.is_floating_point(),
                   "queries and codebooks must be floating point, got ", queries.scalar_type(), ", ",
                   codebooks.scalar_type());
  TORCH_CHECK_VALUE(queries.device() == codebooks.device(), "queries are on ", queries.device(), " but codebooks on ",
                    codebooks.device());
  at::Tensor out = at::empty({B, M, K}, queries.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (dsub == 0) return out.zero_();
  const at::Tensor q = queries.to(at::kFloat).contiguous();
  const at::Tensor c = codebooks.to(at::kFloat).contiguous();
  const float* cp = c.const_data_ptr<float>();
  // other dsub: codebooks transposed to (M, dsub, K) so the kernel's inner loop runs over K
  // contiguous entries (a plain loop: a strided ATen copy costs more than the whole LUT at batch 1)
  std::vector<float> ct;
  if (!is_tree_dsub(dsub)) {
    ct.resize(static_cast<size_t>(M * dsub * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < K; ++j)
        for (int64_t t = 0; t < dsub; ++t) ct[size_t((m * dsub + t) * K + j)] = cp[(m * K + j) * dsub + t];
  }
  const Kernels kern = kernels_for(current_isa());
  const float* qp = q.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* ctp = ct.empty() ? nullptr : ct.data();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, M * K * dsub));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { kern.compute_lut(qp, cp, ctp, b0, b1, M, K, dsub, op); });
  return out;
}

at::Tensor lut_score_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in, int64_t num_classes,
                         const std::optional<at::Tensor>& bias_in) {
  const int64_t bits = check_scan_args(lut_in, packed_in, num_classes, bias_in);
  const int64_t B = lut_in.size(0), M = lut_in.size(1);
  at::Tensor out = at::empty({B, num_classes}, lut_in.options());
  if (B == 0 || num_classes == 0) return out;
  const at::Tensor packed = packed_in.contiguous();
  const int64_t nblocks = packed.size(0), P = packed.size(1);
  // 4-bit: pad odd M with a zero table so the kernels read whole packed rows (adds +0.0f)
  const at::Tensor lut =
      bits == 4 && 2 * P != M ? at::constant_pad_nd(lut_in, {0, 0, 0, 2 * P - M}).contiguous() : lut_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const Kernels kern = kernels_for(current_isa());
  FloatScanArgs a{packed.const_data_ptr<uint8_t>(), P, M, num_classes, lut.const_data_ptr<float>(),
                  bias.has_value() ? bias->const_data_ptr<float>() : nullptr, out.data_ptr<float>()};
  const Plan plan = make_plan(B, nblocks, P);
  Scratch scratch({work_bytes(plan, P)});
  run_tasks(plan, B, nblocks, P, nullptr, scratch.take<uint8_t>(work_bytes(plan, P)),
            [&](const Task& t) { bits == 4 ? kern.score4(a, t) : kern.score8(a, t); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lut_score_quantized_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in,
                                                           int64_t num_classes, const std::optional<at::Tensor>& bias_in,
                                                           int64_t columns) {
  const int64_t bits = check_scan_args(lut_in, packed_in, num_classes, bias_in);
  TORCH_CHECK_VALUE(columns >= 0, "columns must be >= 0, got ", columns);
  const int64_t B = lut_in.size(0), width = std::max(columns, num_classes);
  at::Tensor step = at::zeros({B}, lut_in.options());
  // exact sums (8-bit codes), step 0: lut_score's own buffer when no room is asked for
  if (bits != 4 && width == num_classes) return {lut_score_cpu(lut_in, packed_in, num_classes, bias_in), step};
  // one (B, width) buffer: the scores in its first num_classes columns, zeros after (room the caller
  // fills in place, e.g. the sampler's proposal weights)
  at::Tensor out = at::empty({B, width}, lut_in.options());
  if (width > num_classes) out.narrow(1, num_classes, width - num_classes).zero_();
  at::Tensor scores = out.narrow(1, 0, num_classes);
  if (bits != 4) {  // exact sums: step 0
    if (B > 0) scores.copy_(lut_score_cpu(lut_in, packed_in, num_classes, bias_in));
    return {out, step};
  }
  if (B == 0 || num_classes == 0) return {out, step};
  const at::Tensor lut = lut_in.contiguous(), packed = packed_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  TORCH_CHECK_VALUE(all_finite(lut.const_data_ptr<float>(), lut.numel()),
                    "lut_score_quantized needs finite lut entries (got inf or nan)");
  TORCH_CHECK_VALUE(!bias.has_value() || all_finite(bias->const_data_ptr<float>(), num_classes),
                    "lut_score_quantized needs a finite bias (got inf or nan)");
  const int64_t nblocks = packed.size(0), P = packed.size(1);
  const Plan plan = make_plan(B, nblocks, P);
  Scratch scratch({work_bytes(plan, P), B * 2 * P * 16, 4 * B, 4 * B, B});
  uint8_t* work = scratch.take<uint8_t>(work_bytes(plan, P));
  uint8_t* qlut = scratch.take<uint8_t>(B * 2 * P * 16);
  float* inv_scale = scratch.take<float>(B);
  float* offset = scratch.take<float>(B);
  uint8_t* coarse = scratch.take<uint8_t>(B);
  quantize_lut(lut, P, qlut, inv_scale, offset, coarse);
  Topk4Args a{packed.const_data_ptr<uint8_t>(), P, num_classes, qlut, inv_scale, offset,
              bias.has_value() ? bias->const_data_ptr<float>() : nullptr, nullptr, nblocks, nullptr, nullptr,
              nullptr, 0, out.data_ptr<float>(), width};
  const Kernels kern = kernels_for(current_isa());
  run_tasks(plan, B, nblocks, P, nullptr, work, [&](const Task& t) { kern.qscore4(a, t); });
  // a query whose table one uint8 scale cannot resolve gets its exact float scores (step 0)
  std::vector<int64_t> rows;
  float* st = step.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (coarse[b]) rows.push_back(b);
    else st[b] = inv_scale[b];
  }
  if (!rows.empty()) {
    const at::Tensor idx = at::tensor(rows, lut.options().dtype(at::kLong));
    scores.index_copy_(0, idx, lut_score_cpu(lut.index_select(0, idx).contiguous(), packed, num_classes, bias));
  }
  return {out, step};
}

}  // namespace cpu
}  // namespace torchaq
