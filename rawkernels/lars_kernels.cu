// The LARS step as three passes over a list of tensors (docs/kernels.md):
//
//   lars_stats_<fmt>_<reads>   one block per (tensor, chunk): the chunk's partial
//                              dot products g.g, p.p, m.m, g.p, g.m, p.m (float64;
//                              the variant computes those of what it reads)
//   lars_finalize              one block per tensor: reduces its partials in a
//                              fixed order, does the non-finite policy, the
//                              percentile history, gamma, the trust ratio, ||u||
//                              and s, and advances the step counter
//   lars_unorm_exact,          only where max_unorm is on, and only doing work for
//   lars_unorm_finalize        tensors whose ||u|| the dot products cannot resolve:
//                              ||u|| summed from u itself, and s set again
//   lars_update_<fmt>_<state>  one block per (tensor, chunk): d, m, u, p in
//                              registers; 8-bit state is dequantized and
//                              requantized here
//
// The numbering of the steps follows cupylars/reference.py, the specification.
#include "lars_common.cuh"

namespace lars {

// Per-element state access, by state mode. `tile` is the element offset of the
// current 256-element tile (one absmax block for 8-bit state). `fetch` issues a
// quad's loads and returns them as loaded (`Raw`); `widen` turns that into
// float32 m once the loads have landed.
template <int M>
struct State;

template <>
struct State<kNoState> {
  struct Raw {};
  __device__ __forceinline__ State(const long long*, const CodeBook*) {}
  __device__ __forceinline__ Raw fetch(long long, long long, long long, bool) const { return Raw{}; }
  __device__ __forceinline__ void widen(const Raw&, float* out) const { zero_quad(out); }
};

template <>
struct State<kState32> {
  using Raw = Quad<float>;
  float* m;
  __device__ __forceinline__ State(const long long* row, const CodeBook*)
      : m(address<float>(row, kFieldState)) {}
  __device__ __forceinline__ Raw fetch(long long, long long e, long long n, bool vec) const {
    return fetch_quad(static_cast<const float*>(m), e, n, vec);
  }
  __device__ __forceinline__ void widen(const Raw& q, float* out) const { widen_quad(q, out); }
  __device__ __forceinline__ void store(long long e, long long n, bool vec, const float* in) const {
    store_quad(m, e, n, vec, in);
  }
};

template <>
struct State<kState8> {
  struct Raw {
    Codes4 codes;
    float scale;
  };
  unsigned char* codes;
  float* absmax;
  const CodeBook* cb;
  __device__ __forceinline__ State(const long long* row, const CodeBook* book)
      : codes(address<unsigned char>(row, kFieldState)), absmax(address<float>(row, kFieldAbsmax)), cb(book) {}
  __device__ __forceinline__ Raw fetch(long long tile, long long e, long long n, bool vec) const {
    Raw r;
    r.scale = absmax[tile / kQBlock];
    r.codes = fetch_codes(codes, e, n, vec);
    return r;
  }
  // m = map[code] * absmax[block], the float32 product of dequantize_blockwise.
  __device__ __forceinline__ void widen(const Raw& r, float* out) const {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = cb->book[r.codes.v[k]] * r.scale;
  }
};

// One lane's share of a warp tile as loaded: two quads of g, of p when kP, and
// of m when kM (M's raw form: float32, or codes and the block's absmax).
template <int F, int M>
struct TileData {
  using T = typename Storage<F>::T;
  Quad<T> g[2];
  Quad<T> p[2];
  typename State<M>::Raw m[2];
};

template <int F, int M, bool kP, bool kM>
__device__ __forceinline__ TileData<F, M> fetch_tile(const typename Storage<F>::T* g,
                                                            const typename Storage<F>::T* p, const State<M>& state,
                                                            long long tile, long long n, bool vec) {
  TileData<F, M> d;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long e = tile + h * (kTile / 2) + 4 * lane;
    d.g[h] = fetch_quad(g, e, n, vec);
    if constexpr (kP) d.p[h] = fetch_quad(p, e, n, vec);
    if constexpr (kM) d.m[h] = state.fetch(tile, e, n, vec);
  }
  return d;
}

// Whether a warp loads its next tile before working on the current one
// (software pipelining: the loads stay in flight during the arithmetic, at the
// cost of one more tile of loaded data in registers). On where it fits within the
// launch bounds without spills (tests/test_kernels_compile.py checks): the
// kernels without m, which also move the fewest bytes per tile. The stats kernels
// that read m reach their 80 registers without it (the 16-bit 8-bit-state one
// spills with it), the update kernels with state their 64; float32 p in the
// update needs 16 more registers a tile for 4 fewer bytes in flight per lane
// than the 16-bit formats would gain.
template <int F, int M, bool kStats>
struct Prefetch {
  static constexpr bool kOn = M == kNoState && (kStats || F != kF32);
};

// The chunk a block works on, decoded from its block-table entry. Every field of
// the tensor row a block needs is read here, in one round of independent loads
// (they depend only on the entry), before anything waits on one of them.
struct Chunk {
  int tensor;            // row in the tensor table
  const long long* row;  // that row
  long long n;           // elements of the tensor
  long long start, end;  // element range of the chunk
  bool vec;              // quads may use full-width accesses
};

__device__ __forceinline__ Chunk chunk_of(const long long* __restrict__ tensors, long long entry, int chunk) {
  Chunk c;
  c.tensor = block_tensor(entry);
  c.row = tensors + static_cast<long long>(c.tensor) * kTensorFields;
  c.n = c.row[kFieldSize];
  c.start = block_chunk(entry) * chunk;
  c.end = min(c.start + static_cast<long long>(chunk), c.n);
  c.vec = c.row[kFieldVector] != 0;
  return c;
}

// ---- pass 1: statistics ---------------------------------------------------------------
// The dot products a stats variant gathers: g.g always; p.p and g.p when it reads
// p (kP); m.m and g.m when it reads m (M != kNoState); p.m when both. A variant
// neither loads nor multiplies what it does not read (the finalize pass leaves
// the missing sums' terms out, and they are written as 0).
template <int M, bool kP>
struct StatsLive {
  static constexpr unsigned kMask = (1u << kGG) | (kP ? (1u << kPP) | (1u << kGP) : 0u) |
                                    (M != kNoState ? (1u << kMM) | (1u << kGM) : 0u) |
                                    (kP && M != kNoState ? (1u << kPM) : 0u);
};

// A lane's 8 elements of a tile into its float64 sums, product by product: float32 x
// float32 is exact in float64, so only the accumulation rounds.
template <bool kP, bool kM>
__device__ __forceinline__ void tile_sums_f64(const float* gv, const float* pv, const float* mv, double* acc) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const double gd = gv[k];
    acc[kGG] = fma(gd, gd, acc[kGG]);
    if constexpr (kP) {
      const double pd = pv[k];
      acc[kPP] = fma(pd, pd, acc[kPP]);
      acc[kGP] = fma(gd, pd, acc[kGP]);
    }
    if constexpr (kM) {
      const double md = mv[k];
      acc[kMM] = fma(md, md, acc[kMM]);
      acc[kGM] = fma(gd, md, acc[kGM]);
      if constexpr (kP) acc[kPM] = fma(static_cast<double>(pv[k]), md, acc[kPM]);
    }
  }
}

#if LARS_STATS_F32_PARTIALS
// float32 partials (LARS_STATS_F32_PARTIALS, docs/kernels.md "float32 partials"): a
// lane's 8 products per dot product summed in float32 by fmaf, then each partial
// added to its float64 sum: one conversion and one float64 add per sum and tile
// instead of 8 float64 fused multiply-adds. Exact conditions, checked per lane and
// tile, else it returns false and the caller sums the tile in float64:
// - every nonzero element has |x| >= 2^-40, so every product, fmaf result and partial
//   is 0 or a multiple of 2^-126: nothing is subnormal, nothing is flushed (-ftz=true
//   on the GPU, FTZ/DAZ in the emulator change nothing), each fmaf rounds relatively;
// - every partial is finite (a NaN or Inf element, or a float32 overflow of a square
//   or a sum, makes one non-finite): such tiles keep float64's range, so g.g is
//   finite exactly when g is, as in the float64 accumulation.
// Key of an element: its bits shifted past the sign, minus 1 (unsigned): +-0 maps to
// the largest key, and otherwise the key grows with |x|.
enum StatsF32Bounds : unsigned {
  kStatsF32MinBits = 0x2B800000u,  // 2^-40 as float32 bits
};

__device__ __forceinline__ unsigned tiny_key(float x) { return (__float_as_uint(x) << 1) - 1u; }

template <bool kP, bool kM>
__device__ __forceinline__ bool tile_sums_f32(const float* gv, const float* pv, const float* mv, double* acc) {
  float s[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) s[j] = 0.0f;
  unsigned low = 0xFFFFFFFFu;  // the smallest key of the lane's elements
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float gk = gv[k];
    low = min(low, tiny_key(gk));
    s[kGG] = fmaf(gk, gk, s[kGG]);
    if constexpr (kP) {
      const float pk = pv[k];
      low = min(low, tiny_key(pk));
      s[kPP] = fmaf(pk, pk, s[kPP]);
      s[kGP] = fmaf(gk, pk, s[kGP]);
    }
    if constexpr (kM) {
      const float mk = mv[k];
      low = min(low, tiny_key(mk));
      s[kMM] = fmaf(mk, mk, s[kMM]);
      s[kGM] = fmaf(gk, mk, s[kGM]);
      if constexpr (kP) s[kPM] = fmaf(pv[k], mk, s[kPM]);
    }
  }
  // NaN and Inf propagate into this sum of magnitudes (one that overflows only sends a
  // finite tile to the float64 path).
  float size = s[kGG];
  if constexpr (kP) size += s[kPP] + fabsf(s[kGP]);
  if constexpr (kM) size += s[kMM] + fabsf(s[kGM]);
  if constexpr (kP && kM) size += fabsf(s[kPM]);
  if (!(size <= 3.4028234663852886e38f) || low < (kStatsF32MinBits << 1) - 1u) return false;
  acc[kGG] += static_cast<double>(s[kGG]);
  if constexpr (kP) {
    acc[kPP] += static_cast<double>(s[kPP]);
    acc[kGP] += static_cast<double>(s[kGP]);
  }
  if constexpr (kM) {
    acc[kMM] += static_cast<double>(s[kMM]);
    acc[kGM] += static_cast<double>(s[kGM]);
    if constexpr (kP) acc[kPM] += static_cast<double>(s[kPM]);
  }
  return true;
}
#endif

// A warp walks its tiles of the chunk (every kWarps-th), 8 elements per lane a
// tile: per lane 2 quads of g (and of p, and of m or its codes) per tile, 16 to 96
// bytes by format and variant, and the next tile's loads are issued before this
// tile's sums (Prefetch), so that a warp keeps loads in flight during its float64
// arithmetic. The sums run in the same order either way.
template <int F, int M, bool kP>
__device__ __forceinline__ void stats_sums(const Chunk& c, const typename Storage<F>::T* __restrict__ g,
                                           const typename Storage<F>::T* __restrict__ p, const State<M>& state,
                                           double* acc) {
  constexpr bool kM = M != kNoState;
  constexpr bool kAhead = Prefetch<F, M, true>::kOn;
  using Data = TileData<F, M>;
  const long long n = c.n, end = c.end;
  const bool vec = c.vec;
  const long long stride = kWarps * kTile;
  long long tile = c.start + (threadIdx.x >> 5) * kTile;
  Data cur{};
  if (kAhead && tile < end) cur = fetch_tile<F, M, kP, kM>(g, p, state, tile, n, vec);
  for (; tile < end; tile += stride) {
    Data next{};
    if constexpr (kAhead) {
      if (tile + stride < end) next = fetch_tile<F, M, kP, kM>(g, p, state, tile + stride, n, vec);
    } else {
      cur = fetch_tile<F, M, kP, kM>(g, p, state, tile, n, vec);
    }
    float gv[8], pv[8], mv[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      widen_quad(cur.g[h], gv + 4 * h);
      if constexpr (kP) widen_quad(cur.p[h], pv + 4 * h);
      if constexpr (kM) state.widen(cur.m[h], mv + 4 * h);
    }
#if LARS_STATS_F32_PARTIALS
    if (tile_sums_f32<kP, kM>(gv, pv, mv, acc)) {
      if constexpr (kAhead) cur = next;
      continue;
    }
#endif
    tile_sums_f64<kP, kM>(gv, pv, mv, acc);
    if constexpr (kAhead) cur = next;
  }
}

// Before the first data load a block waits on two rounds of loads: its block-table
// entry (with, for 8-bit state, its share of the code table), then the tensor row.
template <int F, int M, bool kP>
__device__ __forceinline__ void stats_body(const long long* __restrict__ tensors,
                                           const long long* __restrict__ blocks, int block_offset, int chunk,
                                           const float* __restrict__ table, CodeBook* cb,
                                           double* __restrict__ partials) {
  static_assert(kP || M == kNoState, "a stats pass that reads m (max_unorm) also reads p");
  using T = typename Storage<F>::T;
  __shared__ double scratch[kWarps * kSums];
  const long long b = static_cast<long long>(block_offset) + blockIdx.x;
  const long long entry = blocks[b];
  CodeBookShare share{};
  if constexpr (M == kState8) share = load_code_book(table, false);
  const Chunk c = chunk_of(tensors, entry, chunk);
  const T* __restrict__ g = address<const T>(c.row, kFieldGrad);
  const T* __restrict__ p = address<const T>(c.row, kFieldParam);
  const State<M> state(c.row, cb);
  // The old m enters ||u|| only from the second applied step on; at t == 1 the
  // finalize pass gives its sums the weight 0 and leaves them out, so they are
  // gathered whenever the momentum arrays exist (the host knows; a block-uniform
  // branch on the row's address, not a third round to read the step counter).
  const bool has_m = M != kNoState && c.row[kFieldState] != 0;
  if constexpr (M == kState8) {
    store_code_book(*cb, share, false);
    __syncthreads();
  }

  double acc[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) acc[j] = 0.0;
  if constexpr (M == kNoState) {
    stats_sums<F, kNoState, kP>(c, g, p, state, acc);
  } else if (has_m) {
    stats_sums<F, M, kP>(c, g, p, state, acc);
  } else {
    stats_sums<F, kNoState, kP>(c, g, p, State<kNoState>(c.row, nullptr), acc);
  }
  block_sums<kWarps, StatsLive<M, kP>::kMask>(acc, scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) partials[b * kSums + j] = acc[j];
  }
}

template <int F, int M, bool kP>
__device__ __forceinline__ void stats_entry(const long long* tensors, const long long* blocks, int block_offset,
                                            int chunk, const float* table, double* partials) {
  if constexpr (M == kState8) {
    __shared__ CodeBook cb;
    stats_body<F, M, kP>(tensors, blocks, block_offset, chunk, table, &cb, partials);
  } else {
    stats_body<F, M, kP>(tensors, blocks, block_offset, chunk, table, nullptr, partials);
  }
}

// ---- pass 3: the update ------------------------------------------------------------------
template <int F, int M>
__device__ __forceinline__ void update_body(const long long* __restrict__ tensors,
                                            const long long* __restrict__ blocks, int block_offset, int chunk,
                                            const TensorCoef* __restrict__ coefs, float lam, float mu,
                                            float damp_keep, int nesterov, const float* __restrict__ table,
                                            CodeBook* cb) {
  using T = typename Storage<F>::T;
  // Blocks run in reverse order: the stats pass ended on the last chunks, which
  // may still sit in L2, so the update starts there.
  const long long b = static_cast<long long>(block_offset) + (gridDim.x - 1 - blockIdx.x);
  // Round 1: the block-table entry (and this thread's share of the code table).
  const long long entry = blocks[b];
  CodeBookShare share{};
  if constexpr (M == kState8) share = load_code_book(table, true);
  // Round 2: the tensor row and the tensor's coefficients, all issued before any
  // is used; the skip decision comes with them.
  const Chunk c = chunk_of(tensors, entry, chunk);
  const TensorCoef cf = coefs[c.tensor];
  T* __restrict__ p = address<T>(c.row, kFieldParam);
  const T* __restrict__ g = address<const T>(c.row, kFieldGrad);
  const State<M> state(c.row, cb);
  if constexpr (M == kState8) {
    store_code_book(*cb, share, true);
    __syncthreads();
  }
  const bool first = (cf.flags & kCoefFirst) != 0;
  // A skipped tensor keeps p and state: its blocks walk an empty range (the
  // flag is block-uniform). A range rather than an early return, so that the
  // compiler has no branch to sink the row's loads behind.
  const long long n = c.n, start = c.start;
  const long long end = (cf.flags & kCoefSkip) ? start : c.end;
  const bool vec = c.vec;

  // The warp's tiles, every kWarps-th of the chunk; with Prefetch the next tile's
  // loads are issued before this tile's arithmetic and stores (they read other
  // elements than this tile writes).
  constexpr bool kAhead = Prefetch<F, M, false>::kOn;
  constexpr bool kM = M != kNoState;
  using Data = TileData<F, M>;
  const int lane = threadIdx.x & 31;
  const long long stride = kWarps * kTile;
  const bool load_m = kM && !first;  // m = d at t == 1: the old m is not read
  // block-uniform: the tile's loads with or without m
  auto fetch = [&](long long at) {
    return load_m ? fetch_tile<F, M, true, kM>(g, p, state, at, n, vec)
                  : fetch_tile<F, M, true, false>(g, p, state, at, n, vec);
  };
  long long tile = start + (threadIdx.x >> 5) * kTile;
  Data cur{};
  if (kAhead && tile < end) cur = fetch(tile);
  for (; tile < end; tile += stride) {
    Data next{};
    if constexpr (kAhead) {
      if (tile + stride < end) next = fetch(tile + stride);
    } else {
      cur = fetch(tile);
    }
    float pv[8], gv[8], mv[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      widen_quad(cur.g[h], gv + 4 * h);
      widen_quad(cur.p[h], pv + 4 * h);
      if (load_m) {
        state.widen(cur.m[h], mv + 4 * h);
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
    if constexpr (kAhead) cur = next;
  }
}

template <int F, int M>
__device__ __forceinline__ void update_entry(const long long* tensors, const long long* blocks, int block_offset,
                                             int chunk, const int* coefs, const float* table,
                                             const StepConfig& config) {
  const TensorCoef* c = reinterpret_cast<const TensorCoef*>(coefs);
  const ElementFactors f = element_factors(config);
  if constexpr (M == kState8) {
    __shared__ CodeBook cb;
    update_body<F, M>(tensors, blocks, block_offset, chunk, c, f.lam, f.mu, f.keep, f.nesterov, table, &cb);
  } else {
    update_body<F, M>(tensors, blocks, block_offset, chunk, c, f.lam, f.mu, f.keep, f.nesterov, table, nullptr);
  }
}

// ---- pass 2b: the exact ||u|| of tensors the dot products cannot resolve -------------------
// Tensors the finalize pass flags kCoefExactNorm (u nearly cancels: lars_math.h,
// unorm_needs_exact_norm) have ||u||^2 summed again from the float32 u their update will
// apply (update_direction, the update's own arithmetic): each block of such a tensor sums
// its chunk's squares (exact in float64) in a fixed order into `exact`; the blocks of
// other tensors return at once. One kernel for every format and state mode, dispatched
// on the row's kind: it rarely has work, and one launch (always made when max_unorm is
// on) keeps the step free of host decisions. lars_unorm_finalize then sets s from it.
template <int F, int M>
__device__ __forceinline__ double exact_unorm_sum(const Chunk& c, const TensorCoef& cf, float lam, float mu,
                                                  float damp_keep, bool nesterov, const float* book) {
  using T = typename Storage<F>::T;
  const T* __restrict__ p = address<const T>(c.row, kFieldParam);
  const T* __restrict__ g = address<const T>(c.row, kFieldGrad);
  const bool first = (cf.flags & kCoefFirst) != 0;
  double acc = 0.0;
  for (long long e = c.start + threadIdx.x; e < c.end; e += kThreads) {
    float m = 0.0f;  // the old m as the update reads it (not at t == 1)
    if constexpr (M == kState32) {
      if (!first) m = address<const float>(c.row, kFieldState)[e];
    } else if constexpr (M == kState8) {
      if (!first)
        m = book[address<const unsigned char>(c.row, kFieldState)[e]] *
            address<const float>(c.row, kFieldAbsmax)[e / kQBlock];
    }
    const double u = update_direction<M != kNoState>(cf, lam, mu, damp_keep, nesterov, first, to_float(p[e]),
                                                      to_float(g[e]), m);
    acc = fma(u, u, acc);
  }
  return acc;
}

__device__ __forceinline__ void exact_unorm_body(const long long* __restrict__ tensors,
                                                 const long long* __restrict__ blocks, int chunk,
                                                 const TensorCoef* __restrict__ coefs,
                                                 const float* __restrict__ table, float lam, float mu,
                                                 float damp_keep, bool nesterov, double* __restrict__ exact) {
  __shared__ double scratch[kWarps * kSums];
  __shared__ float book[256];
  const long long b = blockIdx.x;
  const Chunk c = chunk_of(tensors, blocks[b], chunk);
  const TensorCoef cf = coefs[c.tensor];
  if (!(cf.flags & kCoefExactNorm)) return;  // block-uniform: the usual case ends here
  const int kind = static_cast<int>(c.row[kFieldKind]);
  if (kind % 3 == kState8) {
    book[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
  }
  double v[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) v[j] = 0.0;
  switch (kind) {
#define LARS_EXACT_CASE(FMT, STATE) \
  case FMT * 3 + STATE: v[0] = exact_unorm_sum<FMT, STATE>(c, cf, lam, mu, damp_keep, nesterov, book); break;
    LARS_EXACT_CASE(kF32, kNoState)
    LARS_EXACT_CASE(kF32, kState32)
    LARS_EXACT_CASE(kF32, kState8)
    LARS_EXACT_CASE(kF16, kNoState)
    LARS_EXACT_CASE(kF16, kState32)
    LARS_EXACT_CASE(kF16, kState8)
    LARS_EXACT_CASE(kBF16, kNoState)
    LARS_EXACT_CASE(kBF16, kState32)
    LARS_EXACT_CASE(kBF16, kState8)
#undef LARS_EXACT_CASE
    default: break;
  }
  block_sums<kWarps, 1u>(v, scratch);
  if (threadIdx.x == 0) exact[b] = v[0];
}

// One block per tensor: a flagged tensor's chunk sums in a fixed order, then lr * s again.
__device__ __forceinline__ void exact_unorm_finalize_body(const long long* __restrict__ tensors,
                                                          const double* __restrict__ exact,
                                                          TensorCoef* __restrict__ coefs,
                                                          const StepConfig& config) {
  __shared__ double scratch[(kFinalizeThreads / 32) * kSums];
  const int ti = blockIdx.x;
  TensorCoef cf = coefs[ti];
  if (!(cf.flags & kCoefExactNorm)) return;  // block-uniform
  const long long* row = tensors + static_cast<long long>(ti) * kTensorFields;
  const long long first_block = row[kFieldFirstBlock];
  const long long num_blocks = row[kFieldNumBlocks];
  double v[kSums];
#pragma unroll
  for (int j = 0; j < kSums; ++j) v[j] = 0.0;
  for (long long k = threadIdx.x; k < num_blocks; k += kFinalizeThreads) v[0] += exact[first_block + k];
  block_sums<kFinalizeThreads / 32, 1u>(v, scratch);
  if (threadIdx.x == 0) {
    exact_unorm_coef(cf, v[0], config.max_unorm);
    coefs[ti].lrs = cf.lrs;
  }
}

// ---- pass 2: per-tensor finalize ------------------------------------------------------------
// The per-tensor logic is lars_math.h's finalize(), run by thread 0; the block's threads
// sum the partials and rank the percentile history in parallel first (the part finalize()
// leaves to each backend).
__device__ __forceinline__ void finalize_body(const long long* __restrict__ tensors,
                                              const double* __restrict__ partials, TensorCoef* __restrict__ coefs,
                                              const double* lr_f64, const float* lr_f32, const StepConfig& config) {
  __shared__ double scratch[(kFinalizeThreads / 32) * kSums];
  __shared__ double totals[kSums];
  __shared__ float hist[kHistory];
  __shared__ float clip_sq;

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
    clip_sq = 0.0f;
  }
  __syncthreads();

  // 1. percentile clipping: the rank of each entry of the history as this step records it,
  // one thread per entry (every entry has a distinct rank: sorts_before). Also for a tensor
  // finalize() then skips: the ranks are only read, nothing is written here.
  if (config.switches & kSwitchPercentile) {
    const float* history = address<const float>(row, kFieldHistory);
    const int i = static_cast<int>(threadIdx.x);  // this thread's history entry
    float h = 0.0f;
    if (i < kHistory) {
      h = recorded_history(history, i, history_slot(*step_count + 1), history_entry(totals));
      hist[i] = h;
    }
    __syncthreads();
    if (i < kHistory) {
      int rank = 0;
      for (int j = 0; j < kHistory; ++j) rank += sorts_before(hist[j], j, h, i) ? 1 : 0;
      if (rank == config.percentile) clip_sq = h;
    }
    __syncthreads();  // every read of the history and the counter precedes finalize()'s writes
  }
  if (threadIdx.x != 0) return;

  // A learning rate in device memory (a capturable optimizer's lr tensor) is read here, at
  // run time, so that a replayed CUDA graph sees the value it holds now; the by-value lr is
  // the one recorded at launch (or capture). Only this thread reads lr (trust_clip and lr*s).
  StepConfig c = config;
  if (lr_f64 != nullptr) {
    c.lr = *lr_f64;
  } else if (lr_f32 != nullptr) {
    c.lr = static_cast<double>(*lr_f32);
  }
  coefs[ti] = finalize(step_count, address<long long>(row, kFieldSkip), address<float>(row, kFieldHistory), totals,
                       clip_sq, c);
}

}  // namespace lars

// ---- entry points ----------------------------------------------------------------------------
// extern "C" names (no mangling) for cupy.RawModule and the CPU emulator. Stats
// kernels, by what they read (cupylars/plan.py picks one per call): `gradonly`
// g (no trust ratio, no max_unorm); `nostate` g and p; `state32` and `state8`
// g, p and m (momentum and max_unorm). Update kernels per state mode. `code_table`
// is quantization.code_table() (read by the state8 kernels only).
#define LARS_STATS(FMT_NAME, FMT, NAME, STATE, NEED_P)                                                      \
  extern "C" __global__ void __launch_bounds__(                                                             \
      lars::kThreads, STATE == lars::kNoState ? lars::kStatsNoStateMinBlocks : lars::kStatsMinBlocks)       \
      lars_stats_##FMT_NAME##_##NAME(const long long* tensors, const long long* blocks, int block_offset,    \
                                     int chunk, const float* code_table, double* partials) {               \
    lars::stats_entry<FMT, STATE, NEED_P>(tensors, blocks, block_offset, chunk, code_table, partials);       \
  }

#define LARS_UPDATE(FMT_NAME, FMT, STATE_NAME, STATE)                                                       \
  extern "C" __global__ void __launch_bounds__(lars::kThreads, lars::kUpdateMinBlocks)                      \
      lars_update_##FMT_NAME##_##STATE_NAME(const long long* tensors, const long long* blocks,             \
                                            int block_offset, int chunk, const int* coefs,                 \
                                            const float* code_table, lars::StepConfig config) {             \
    lars::update_entry<FMT, STATE>(tensors, blocks, block_offset, chunk, coefs, code_table, config);        \
  }

#define LARS_FORMAT(FMT_NAME, FMT)                                   \
  LARS_STATS(FMT_NAME, FMT, gradonly, lars::kNoState, false)         \
  LARS_STATS(FMT_NAME, FMT, nostate, lars::kNoState, true)           \
  LARS_STATS(FMT_NAME, FMT, state32, lars::kState32, true)           \
  LARS_STATS(FMT_NAME, FMT, state8, lars::kState8, true)             \
  LARS_UPDATE(FMT_NAME, FMT, nostate, lars::kNoState)                \
  LARS_UPDATE(FMT_NAME, FMT, state32, lars::kState32)                \
  LARS_UPDATE(FMT_NAME, FMT, state8, lars::kState8)

LARS_FORMAT(f32, lars::kF32)
LARS_FORMAT(f16, lars::kF16)
LARS_FORMAT(bf16, lars::kBF16)

extern "C" __global__ void __launch_bounds__(lars::kFinalizeThreads)
    lars_finalize(const long long* tensors, const double* partials, int* coefs, const double* lr_f64,
                  const float* lr_f32, lars::StepConfig config) {
  // lr_f64 / lr_f32: nullptr, or the address of a float64 / float32 lr in device memory that
  // replaces config.lr (at most one is set).
  lars::finalize_body(tensors, partials, reinterpret_cast<lars::TensorCoef*>(coefs), lr_f64, lr_f32, config);
}

// The exact-norm passes (pass 2b above), launched after lars_finalize whenever max_unorm is
// on: lars_unorm_exact over every block (`exact`: one float64 per block), then
// lars_unorm_finalize over every tensor. Both return at once for unflagged tensors.
extern "C" __global__ void __launch_bounds__(lars::kThreads)
    lars_unorm_exact(const long long* tensors, const long long* blocks, int chunk, const int* coefs,
                     const float* code_table, lars::StepConfig config, double* exact) {
  const lars::ElementFactors f = lars::element_factors(config);
  lars::exact_unorm_body(tensors, blocks, chunk, reinterpret_cast<const lars::TensorCoef*>(coefs), code_table, f.lam,
                         f.mu, f.keep, f.nesterov, exact);
}

extern "C" __global__ void __launch_bounds__(lars::kFinalizeThreads)
    lars_unorm_finalize(const long long* tensors, const double* exact, int* coefs, lars::StepConfig config) {
  lars::exact_unorm_finalize_body(tensors, exact, reinterpret_cast<lars::TensorCoef*>(coefs), config);
}

// ---- gradient addresses recorded into a CUDA graph --------------------------------------
// A step captured over gradients at other addresses than the tensor rows hold (torch's
// whole-network capture: zero_grad(set_to_none=True), then a backward inside the capture
// that allocates .grad from the graph's pool) cannot upload new rows: a host-to-device copy
// inside a capture would re-read its (by then reused) staging buffer at every replay. The
// addresses travel instead by value, as kernel parameters, which a graph node copies at
// capture: each launch rewrites the gradient and quad-access columns of up to
// kGradPatchRows consecutive rows of the batch's graph copy of the tensor rows (never the
// rows eager steps read). The host computes the quad-access bit as plan.Tables.set_grads
// does (the row's base flag and the gradient's alignment), so rows need no extra field.
namespace lars {
enum GradPatchGeometry : int {
  kGradPatchRows = 64,  // rows per launch: one thread each, one 64-bit mask of quad flags
};
struct GradPatch {           // 528 bytes of kernel parameters (the limit is 4 KB)
  long long grad[kGradPatchRows];  // gradient address of rows first .. first + count - 1
  unsigned long long vector;       // bit k: row first + k allows quad (16-byte) accesses
  int first;                       // first row written
  int count;                       // rows written, 1 .. kGradPatchRows
};
// cuda_runtime.GRAD_PATCH mirrors this layout byte for byte (tests/test_kernels_compile.py).
static_assert(sizeof(GradPatch) == 8 * kGradPatchRows + 16, "GradPatch has no padding");
}  // namespace lars

extern "C" __global__ void __launch_bounds__(lars::kGradPatchRows)
    lars_set_grads(long long* tensors, lars::GradPatch patch) {
  const int k = threadIdx.x;
  if (k >= patch.count) return;
  long long* row = tensors + static_cast<long long>(patch.first + k) * lars::kTensorFields;
  row[lars::kFieldGrad] = patch.grad[k];
  row[lars::kFieldVector] = static_cast<long long>((patch.vector >> k) & 1ULL);
}
