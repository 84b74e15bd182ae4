// The LARS step as three passes over a list of tensors (docs/kernels.md):
//
//   lars_stats_<fmt>_<state>   one block per (tensor, chunk): the chunk's partial
//                              dot products g.g, p.p, m.m, g.p, g.m, p.m (float64)
//   lars_finalize              one block per tensor: reduces its partials in a
//                              fixed order, does the non-finite policy, the
//                              percentile history, gamma, the trust ratio, ||u||
//                              and s, and advances the step counter
//   lars_update_<fmt>_<state>  one block per (tensor, chunk): d, m, u, p in
//                              registers; 8-bit state is dequantized and
//                              requantized here
//
// The numbering of the steps follows cupylars/reference.py, the specification.
#include "lars_common.cuh"

namespace lars {

// Per-element state access, by state mode. `tile` is the element offset of the
// current 256-element tile (one absmax block for 8-bit state).
template <int M>
struct State;

template <>
struct State<kNoState> {
  __device__ __forceinline__ State(const long long*, const CodeBook*) {}
  __device__ __forceinline__ void load(long long, long long, long long, bool, float* out) const {
    zero_quad(out);
  }
};

template <>
struct State<kState32> {
  float* m;
  __device__ __forceinline__ State(const long long* row, const CodeBook*)
      : m(address<float>(row, kFieldState)) {}
  __device__ __forceinline__ void load(long long, long long e, long long n, bool vec, float* out) const {
    load_quad(static_cast<const float*>(m), e, n, vec, out);
  }
  __device__ __forceinline__ void store(long long e, long long n, bool vec, const float* in) const {
    store_quad(m, e, n, vec, in);
  }
};

template <>
struct State<kState8> {
  unsigned char* codes;
  float* absmax;
  const CodeBook* cb;
  __device__ __forceinline__ State(const long long* row, const CodeBook* book)
      : codes(address<unsigned char>(row, kFieldState)), absmax(address<float>(row, kFieldAbsmax)), cb(book) {}
  // m = map[code] * absmax[block], the float32 product of dequantize_blockwise.
  __device__ __forceinline__ void load(long long tile, long long e, long long n, bool vec, float* out) const {
    const float scale = absmax[tile / kQBlock];
    unsigned char c[4];
    load_codes(codes, e, n, vec, c);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = cb->book[c[k]] * scale;
  }
};

// The chunk a block works on, decoded from the block table.
struct Chunk {
  int tensor;            // row in the tensor table
  const long long* row;  // that row
  long long n;           // elements of the tensor
  long long start, end;  // element range of the chunk
  bool vec;              // quads may use full-width accesses
};

__device__ __forceinline__ Chunk chunk_of(const long long* __restrict__ tensors,
                                          const long long* __restrict__ blocks, long long b, int chunk) {
  Chunk c;
  const long long entry = blocks[b];
  c.tensor = block_tensor(entry);
  c.row = tensors + static_cast<long long>(c.tensor) * kTensorFields;
  c.n = c.row[kFieldSize];
  c.start = block_chunk(entry) * chunk;
  c.end = min(c.start + static_cast<long long>(chunk), c.n);
  c.vec = c.row[kFieldVector] != 0;
  return c;
}

// ---- pass 1: statistics ---------------------------------------------------------------
template <int F, int M>
__device__ __forceinline__ void stats_body(const long long* __restrict__ tensors,
                                           const long long* __restrict__ blocks, int block_offset, int chunk,
                                           int need_p, const CodeBook* cb, double* __restrict__ partials) {
  using T = typename Storage<F>::T;
  __shared__ double scratch[kWarps * kSums];
  const long long b = static_cast<long long>(block_offset) + blockIdx.x;
  const Chunk c = chunk_of(tensors, blocks, b, chunk);
  const long long* row = c.row;
  const long long n = c.n, start = c.start, end = c.end;
  const bool vec = c.vec;
  const T* __restrict__ g = address<const T>(row, kFieldGrad);
  const T* __restrict__ p = address<const T>(row, kFieldParam);
  // The old m enters ||u|| only from the second applied step on (m = d at t == 1),
  // and is absent until the momentum arrays exist.
  bool use_m = false;
  if (M != kNoState) use_m = row[kFieldState] != 0 && *address<const long long>(row, kFieldStep) >= 1;
  const State<M> state(row, cb);

  double acc[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) acc[j] = 0.0;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (long long tile = start + warp * kTile; tile < end; tile += kWarps * kTile) {
    float gv[8], pv[8], mv[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long e = tile + h * (kTile / 2) + 4 * lane;
      load_quad(g, e, n, vec, gv + 4 * h);
      if (need_p) {
        load_quad(p, e, n, vec, pv + 4 * h);
      } else {
        zero_quad(pv + 4 * h);
      }
      if (use_m) {
        state.load(tile, e, n, vec, mv + 4 * h);
      } else {
        zero_quad(mv + 4 * h);
      }
    }
    // float32 x float32 is exact in float64: only the accumulation rounds.
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const double gd = gv[k], pd = pv[k], md = mv[k];
      acc[kGG] = fma(gd, gd, acc[kGG]);
      acc[kPP] = fma(pd, pd, acc[kPP]);
      acc[kMM] = fma(md, md, acc[kMM]);
      acc[kGP] = fma(gd, pd, acc[kGP]);
      acc[kGM] = fma(gd, md, acc[kGM]);
      acc[kPM] = fma(pd, md, acc[kPM]);
    }
  }
  block_sums<kWarps>(acc, scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) partials[b * kSums + j] = acc[j];
  }
}

// ---- pass 3: the update ------------------------------------------------------------------
template <int F, int M>
__device__ __forceinline__ void update_body(const long long* __restrict__ tensors,
                                            const long long* __restrict__ blocks, int block_offset, int chunk,
                                            const TensorCoef* __restrict__ coefs, float lam, float mu,
                                            float damp_keep, int nesterov, const CodeBook* cb) {
  using T = typename Storage<F>::T;
  // Blocks run in reverse order: the stats pass ended on the last chunks, which
  // may still sit in L2, so the update starts there.
  const long long b = static_cast<long long>(block_offset) + (gridDim.x - 1 - blockIdx.x);
  const Chunk c = chunk_of(tensors, blocks, b, chunk);
  const TensorCoef cf = coefs[c.tensor];
  if (cf.flags & kCoefSkip) return;  // block-uniform: the whole tensor keeps p and state
  const bool first = (cf.flags & kCoefFirst) != 0;
  const long long* row = c.row;
  const long long n = c.n, start = c.start, end = c.end;
  const bool vec = c.vec;
  T* __restrict__ p = address<T>(row, kFieldParam);
  const T* __restrict__ g = address<const T>(row, kFieldGrad);
  const State<M> state(row, cb);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (long long tile = start + warp * kTile; tile < end; tile += kWarps * kTile) {
    float pv[8], gv[8], mv[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long e = tile + h * (kTile / 2) + 4 * lane;
      load_quad(static_cast<const T*>(p), e, n, vec, pv + 4 * h);
      load_quad(g, e, n, vec, gv + 4 * h);
      if (M != kNoState && !first) {
        state.load(tile, e, n, vec, mv + 4 * h);
      } else {
        zero_quad(mv + 4 * h);
      }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k)
      pv[k] = step_element<M != kNoState>(cf, lam, mu, damp_keep, nesterov, first, pv[k], gv[k], mv[k]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long e = tile + h * (kTile / 2) + 4 * lane;
      store_quad(p, e, n, vec, pv + 4 * h);
      if constexpr (M == kState32) state.store(e, n, vec, mv + 4 * h);
    }
    if constexpr (M == kState8) {
      // Elements past the end quantize as the zero padding of quantize_blockwise.
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (tile + h * (kTile / 2) + 4 * lane + k >= n) mv[4 * h + k] = 0.0f;
      unsigned char codes[8];
      const float absmax = quantize_tile(*cb, mv, codes);
      if (lane == 0) state.absmax[tile / kQBlock] = absmax;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store_codes(state.codes, tile + h * (kTile / 2) + 4 * lane, n, vec, codes + 4 * h);
    }
  }
}

// ---- pass 2: per-tensor finalize ------------------------------------------------------------
__device__ __forceinline__ void finalize_body(const long long* __restrict__ tensors,
                                              const double* __restrict__ partials, TensorCoef* __restrict__ coefs,
                                              double lr, const double* lr_f64, const float* lr_f32,
                                              double momentum, double dampening, double weight_decay,
                                              double trust_coefficient, double eps, double max_unorm,
                                              int percentile, int switches, int policy) {
  __shared__ double scratch[(kFinalizeThreads / 32) * kSums];
  __shared__ double totals[kSums];
  __shared__ float hist[kHistory];
  __shared__ float clip_sq;
  __shared__ long long step_before;
  __shared__ int skip;

  const int ti = blockIdx.x;
  const long long* row = tensors + static_cast<long long>(ti) * kTensorFields;
  const long long first_block = row[kFieldFirstBlock];
  const long long num_blocks = row[kFieldNumBlocks];

  // Each thread sums a fixed, strided subset of the tensor's partials in
  // ascending order; block_sums combines them along a fixed tree.
  double acc[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) acc[j] = 0.0;
  for (long long k = threadIdx.x; k < num_blocks; k += kFinalizeThreads) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) acc[j] += partials[(first_block + k) * kSums + j];
  }
  block_sums<kFinalizeThreads / 32>(acc, scratch);

  long long* step_count = address<long long>(row, kFieldStep);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) totals[j] = acc[j];
    step_before = *step_count;
    // g.g in float64 of float32 squares cannot overflow, so it is finite
    // exactly when every element of g is.
    const bool finite = isfinite(acc[kGG]);
    skip = (policy == kPolicySkip && !finite) ? 1 : 0;
    if (skip) {
      long long* skip_count = address<long long>(row, kFieldSkip);
      *skip_count += 1;
      TensorCoef cf = {1.0f, 1.0f, 0.0f, kCoefSkip};
      coefs[ti] = cf;
    }
  }
  __syncthreads();
  if (skip) return;  // p, m, history and step_count stay as they were

  const long long t = step_before + 1;
  const double g_norm = sqrt(totals[kGG]);
  double gamma = 1.0;

  // 1. percentile clipping: record ||g||^2, then compare with the percentile.
  if (switches & kSwitchPercentile) {
    float* history = address<float>(row, kFieldHistory);
    const float entry = static_cast<float>(g_norm * g_norm);
    const int slot = static_cast<int>(t % kHistory);
    const bool never_recorded = history[0] < 0.0f;  // read by all before anyone writes
    const int i = static_cast<int>(threadIdx.x);  // this thread's history entry
    float h = 0.0f;
    if (i < kHistory) h = (never_recorded || i == slot) ? entry : history[i];
    __syncthreads();
    if (i < kHistory) {
      hist[i] = h;
      history[i] = h;
    }
    __syncthreads();
    if (i < kHistory) {
      int rank = 0;
      for (int j = 0; j < kHistory; ++j) rank += sorts_before(hist[j], j, h, i) ? 1 : 0;
      if (rank == percentile) clip_sq = h;
    }
    __syncthreads();
    if (threadIdx.x == 0) gamma = percentile_gamma(hist[slot], clip_sq);
  }
  if (threadIdx.x != 0) return;

  // A learning rate in device memory (a capturable optimizer's lr tensor) is read here, at
  // run time, so that a replayed CUDA graph sees the value it holds now; the by-value lr is
  // the one recorded at launch (or capture). Only this thread reads lr (trust_clip and lr*s).
  const double lr_now = lr_f64 != nullptr ? *lr_f64 : (lr_f32 != nullptr ? static_cast<double>(*lr_f32) : lr);
  const StepConfig config = {lr_now, momentum, dampening, weight_decay, trust_coefficient, eps, max_unorm,
                             switches};
  coefs[ti] = step_coef(totals, t, gamma, config);
  *step_count = t;
}

}  // namespace lars

// ---- entry points ----------------------------------------------------------------------------
// extern "C" names (no mangling) for cupy.RawModule and the CPU emulator;
// one stats and one update kernel per (storage format, state mode).
#define LARS_ENTRIES(FMT_NAME, FMT, STATE_NAME, STATE)                                                      \
  extern "C" __global__ void __launch_bounds__(lars::kThreads, lars::kStatsMinBlocks)                       \
      lars_stats_##FMT_NAME##_##STATE_NAME(const long long* tensors, const long long* blocks,              \
                                           int block_offset, int chunk, int need_p, const float* code_map,  \
                                           double* partials) {                                              \
    if constexpr (STATE == lars::kState8) {                                                                 \
      __shared__ lars::CodeBook cb;                                                                         \
      lars::load_code_book(cb, code_map, false);                                                            \
      __syncthreads();                                                                                      \
      lars::stats_body<FMT, STATE>(tensors, blocks, block_offset, chunk, need_p, &cb, partials);            \
    } else {                                                                                                \
      lars::stats_body<FMT, STATE>(tensors, blocks, block_offset, chunk, need_p, nullptr, partials);        \
    }                                                                                                       \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(lars::kThreads, lars::kUpdateMinBlocks)                      \
      lars_update_##FMT_NAME##_##STATE_NAME(const long long* tensors, const long long* blocks,             \
                                            int block_offset, int chunk, const int* coefs,                 \
                                            const float* code_map, float lam, float mu, float damp_keep,    \
                                            int nesterov) {                                                 \
    const lars::TensorCoef* c = reinterpret_cast<const lars::TensorCoef*>(coefs);                           \
    if constexpr (STATE == lars::kState8) {                                                                 \
      __shared__ lars::CodeBook cb;                                                                         \
      lars::load_code_book(cb, code_map, true);                                                             \
      __syncthreads();                                                                                      \
      lars::update_body<FMT, STATE>(tensors, blocks, block_offset, chunk, c, lam, mu, damp_keep, nesterov,  \
                                    &cb);                                                                   \
    } else {                                                                                                \
      lars::update_body<FMT, STATE>(tensors, blocks, block_offset, chunk, c, lam, mu, damp_keep, nesterov,  \
                                    nullptr);                                                               \
    }                                                                                                       \
  }

LARS_ENTRIES(f32, lars::kF32, nostate, lars::kNoState)
LARS_ENTRIES(f32, lars::kF32, state32, lars::kState32)
LARS_ENTRIES(f32, lars::kF32, state8, lars::kState8)
LARS_ENTRIES(f16, lars::kF16, nostate, lars::kNoState)
LARS_ENTRIES(f16, lars::kF16, state32, lars::kState32)
LARS_ENTRIES(f16, lars::kF16, state8, lars::kState8)
LARS_ENTRIES(bf16, lars::kBF16, nostate, lars::kNoState)
LARS_ENTRIES(bf16, lars::kBF16, state32, lars::kState32)
LARS_ENTRIES(bf16, lars::kBF16, state8, lars::kState8)

extern "C" __global__ void __launch_bounds__(lars::kFinalizeThreads)
    lars_finalize(const long long* tensors, const double* partials, int* coefs, double lr, const double* lr_f64,
                  const float* lr_f32, double momentum, double dampening, double weight_decay,
                  double trust_coefficient, double eps, double max_unorm, int percentile, int switches,
                  int policy) {
  // lr_f64 / lr_f32: nullptr, or the address of a float64 / float32 lr in device memory that
  // replaces the by-value lr (at most one is set).
  lars::finalize_body(tensors, partials, reinterpret_cast<lars::TensorCoef*>(coefs), lr, lr_f64, lr_f32, momentum,
                      dampening, weight_decay, trust_coefficient, eps, max_unorm, percentile, switches, policy);
}
