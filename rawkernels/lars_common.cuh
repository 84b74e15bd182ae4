// Shared definitions of the LARS kernels (see docs/kernels.md).
//
// Everything here is plain CUDA C++ that NVRTC compiles for the GPU and the
// CPU shim (rawkernels/cpu_shim) compiles with g++, so the emulated tests run
// exactly this code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lars_math.h"

namespace lars {

// ---- launch geometry ---------------------------------------------------------------
// The Python launcher (cupylars/cuda.py) mirrors these numbers; tests check the
// two agree. (Enumerators rather than constexpr variables: NVRTC would emit
// those as device globals.)
enum Geometry : int {
  kThreads = 256,               // threads of a stats / update block
  kWarps = kThreads / 32,       // warps of a stats / update block
  kTile = 256,                  // elements a warp handles per iteration
  kFinalizeThreads = 128,       // threads of a finalize block (>= kHistory)
  // Occupancy floors for __launch_bounds__: 4 blocks cap the update pass at 64
  // registers a thread; the stats kernels that read m (six float64 accumulators)
  // get 80 (3 blocks), those without m (at most three) 64 (4 blocks): they move
  // the fewest bytes per tile, so they need the most threads to keep ~25 KB per SM
  // of loads in flight (docs/kernels.md, "Bytes in flight").
  kStatsMinBlocks = 3,
  kStatsNoStateMinBlocks = 4,
  kUpdateMinBlocks = 4,
};

static_assert(kTile == kQBlock, "a warp tile must be exactly one quantization block");
static_assert(kTile == 32 * 8, "each lane owns two quads (8 elements) of a tile");
static_assert(kFinalizeThreads >= kHistory, "one finalize thread per history entry");

// ---- how the stats pass accumulates (docs/kernels.md, "float32 partials") -----------------
// 1: each lane sums a tile's 8 products per dot product in float32 (fmaf) and adds
// that partial to its float64 sum once per tile; a lane's tile with a non-finite
// float32 partial or a nonzero element below kStatsF32MinBits (2^-40) is summed in
// float64 instead, exactly as with 0. 0: every product is accumulated in float64.
// Chosen per architecture where float64 runs at 1/64 of the float32 rate (sm_86,
// sm_87, sm_89: the stats pass would be bound by its float64 arithmetic there, not by
// memory); -DLARS_STATS_F32_PARTIALS=0 or =1 forces it (the CPU emulator has no
// __CUDA_ARCH__: tests build it with =1 to run this path).
#ifndef LARS_STATS_F32_PARTIALS
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
#define LARS_STATS_F32_PARTIALS 1
#else
#define LARS_STATS_F32_PARTIALS 0
#endif
#endif

// Every global array a kernel reads or writes through the tables starts here, and its
// elements are reached by indexing: an address aligned to T makes every scalar access of
// the array naturally aligned. The emulator checks that (the launcher refuses misaligned
// arrays; a wrong table would fault on the GPU, whereas the CPU quietly accepts it).
template <typename T>
__device__ __forceinline__ T* address(const long long* row, int field) {
  const unsigned long long at = static_cast<unsigned long long>(row[field]);
#ifdef CUPYLARS_CPU_EMULATOR
  assert(at % alignof(T) == 0 && "a scalar access is not aligned to its size (a misaligned-address fault on the GPU)");
#endif
  return reinterpret_cast<T*>(at);
}

// ---- storage formats -----------------------------------------------------------------
template <int F>
struct Storage;
template <>
struct Storage<kF32> {
  using T = float;
};
template <>
struct Storage<kF16> {
  using T = __half;
};
template <>
struct Storage<kBF16> {
  using T = __nv_bfloat16;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// float32 -> storage format, round to nearest even (bfloat16 through the
// shared integer rounding of lars_math.h, so every backend stores the same bits).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  __nv_bfloat16_raw raw;
  raw.x = bf16_bits(x);
  return __nv_bfloat16(raw);
}

// Four consecutive elements, aligned to their full size so that a quad is
// one 16-byte (float32) or 8-byte (16-bit formats) memory access.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};
struct alignas(4) Codes4 {
  unsigned char v[4];
};

// A vector access must be aligned to its size: on the GPU an unaligned one is a
// fault ("misaligned address"), whereas the CPU would quietly accept it. The
// launcher decides per tensor whether quads are aligned (kFieldVector); the
// emulator checks every such access, so a wrong rule fails the emulated tests
// instead of the first run on a GPU. Emulator only: on the GPU the hardware
// already faults, and the check would cost registers.
template <int kBytes>
__device__ __forceinline__ void check_vector_alignment(const void* at) {
#ifdef CUPYLARS_CPU_EMULATOR
  assert(reinterpret_cast<unsigned long long>(at) % kBytes == 0 &&
         "a vector access is not aligned to its size (a misaligned-address fault on the GPU)");
#else
  (void)at;
#endif
}

__device__ __forceinline__ void zero_quad(float* out) {
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = 0.0f;
}

// Elements [e, e+4) of x in their storage format, as loaded (widening to float32
// is left to widen_quad, so that a prefetched quad holds 2 registers of a 16-bit
// format rather than 4); elements at or past n read as 0. `vec` says the base
// address allows aligned quad accesses.
template <typename T>
__device__ __forceinline__ Quad<T> fetch_quad(const T* x, long long e, long long n, bool vec) {
  Quad<T> q;
  if (vec && e + 4 <= n) {
    check_vector_alignment<sizeof(Quad<T>)>(x + e);
    q = *reinterpret_cast<const Quad<T>*>(x + e);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = (e + k < n) ? x[e + k] : from_float<T>(0.0f);
  }
  return q;
}

template <typename T>
__device__ __forceinline__ void widen_quad(const Quad<T>& q, float* out) {
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = to_float(q.v[k]);
}

// Loads elements [e, e+4) of x as float32 into out; elements at or past n read
// as 0.
template <typename T>
__device__ __forceinline__ void load_quad(const T* x, long long e, long long n, bool vec, float* out) {
  widen_quad(fetch_quad(x, e, n, vec), out);
}

template <typename T>
__device__ __forceinline__ void store_quad(T* x, long long e, long long n, bool vec, const float* in) {
  if (vec && e + 4 <= n) {
    Quad<T> q;
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = from_float<T>(in[k]);
    check_vector_alignment<sizeof(Quad<T>)>(x + e);
    *reinterpret_cast<Quad<T>*>(x + e) = q;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e + k < n) x[e + k] = from_float<T>(in[k]);
  }
}

// Codes [e, e+4); codes at or past n read as 127 (the code of 0).
__device__ __forceinline__ Codes4 fetch_codes(const unsigned char* c, long long e, long long n, bool vec) {
  Codes4 q;
  if (vec && e + 4 <= n) {
    check_vector_alignment<sizeof(Codes4)>(c + e);
    q = *reinterpret_cast<const Codes4*>(c + e);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = (e + k < n) ? c[e + k] : static_cast<unsigned char>(127);
  }
  return q;
}

__device__ __forceinline__ void store_codes(unsigned char* c, long long e, long long n, bool vec,
                                            const unsigned char* in) {
  if (vec && e + 4 <= n) {
    Codes4 q;
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = in[k];
    check_vector_alignment<sizeof(Codes4)>(c + e);
    *reinterpret_cast<Codes4*>(c + e) = q;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e + k < n) c[e + k] = in[k];
  }
}

// ---- deterministic reductions ---------------------------------------------------------
// A butterfly leaves the same value in every lane (addition is commutative, so
// lanes i and i^o add the same two numbers) and the tree is fixed: the result
// does not depend on scheduling.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums kSums values over the block, in a fixed order; the result is valid in
// thread 0. `scratch` holds kWarpsIn * kSums doubles of shared memory. Sums
// outside the bit mask kLive are known to be 0 in every thread (a stats variant
// that does not read p or m): their 10 shuffles each are left out.
template <int kWarpsIn, unsigned kLive = (1u << kSums) - 1u>
__device__ __forceinline__ void block_sums(double* v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kSums; ++j)
    if ((kLive >> j) & 1u) v[j] = warp_sum(v[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) scratch[warp * kSums + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kSums; ++j) {
      double total = scratch[j];
      for (int w = 1; w < kWarpsIn; ++w) total += scratch[w * kSums + j];
      v[j] = total;
    }
  }
}

// ---- 8-bit blockwise quantization -------------------------------------------------------
// The code table in shared memory, copied from the 512 floats of
// quantization.code_table(): `book` the map in ascending order (dequantization
// reads it), and `above` the rounding rule's thresholds as a 1-based array:
// above[j] is the largest float32 whose code is j - 1 (above[0] is never read).
// The rule makes the code a non-decreasing step function of x, so the code of a
// non-NaN x is the number of thresholds below it.
struct CodeBook {
  float book[256];
  float above[256];
};

// One thread's share of the code table: entry threadIdx.x of each half (the
// blocks have exactly 256 threads). Loaded into registers first and stored to
// shared memory later (store_code_book), so that the global loads overlap the
// block's other prologue loads (the block and tensor tables) instead of
// waiting behind a barrier.
struct CodeBookShare {
  float book, above;
};
static_assert(kThreads == 256, "one code-table entry per thread");

__device__ __forceinline__ CodeBookShare load_code_book(const float* __restrict__ table, bool with_thresholds) {
  CodeBookShare s;
  s.book = table[threadIdx.x];
  s.above = with_thresholds ? table[256 + threadIdx.x] : 0.0f;
  return s;
}

// Needs a __syncthreads() before the table is read.
__device__ __forceinline__ void store_code_book(CodeBook& cb, const CodeBookShare& s, bool with_thresholds) {
  cb.book[threadIdx.x] = s.book;
  if (with_thresholds) cb.above[threadIdx.x] = s.above;
}

// The rounding rule of cupylars/quantization.py (lars_math.h `code_between`):
// with lo the largest index with book[lo] <= x, the code is lo when
// x - book[lo] <= book[lo+1] - x in float32, else lo+1; x < book[0] gives 0,
// x >= book[255] and NaN give 255 (NaN sorts after every value in numpy's
// searchsorted). Branch-free: a binary search over the 255 thresholds, each
// step one shared-memory load, a compare and a select whose address depends
// only on the previous step. No data-dependent branch, so the eight searches of
// a lane's elements are independent chains the scheduler interleaves (8 steps x
// about 3 instructions, the 8 loads of a step in flight together) instead of 8
// divergent loops run one after the other. quantization.code_thresholds() finds
// the thresholds with the rule itself; tests/test_quantization_thresholds.py
// checks this search against quantize_blockwise on every float32 near each one.
__device__ __forceinline__ unsigned char nearest_code(const CodeBook& cb, float x) {
  int code = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) code += (x > cb.above[code + step]) ? step : 0;
  return static_cast<unsigned char>(x != x ? 255 : code);  // NaN > t is false for every t
}

// Quantizes the 256 values of one block, spread as 8 per lane over a warp.
// Returns the block's absmax (NaN if any value is NaN), writes the codes.
//
// x = m / absmax stays an IEEE division per element (docs/kernels.md,
// "Numerics"): m * (1 / absmax) can differ from m / absmax in the last bit, and
// a last-bit difference flips the code wherever x sits on a threshold.
__device__ __forceinline__ float quantize_tile(const CodeBook& cb, const float* m, unsigned char* codes) {
  float local = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) local = nan_max(local, fabsf(m[k]));
  const float absmax = warp_nan_max(local);
  // As quantize_blockwise: scale by absmax unless it is not > 0; a zero block is all 127.
  const float safe = absmax > 0.0f ? absmax : 1.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k)
    codes[k] = absmax == 0.0f ? static_cast<unsigned char>(127) : nearest_code(cb, m[k] / safe);
  return absmax;
}

}  // namespace lars
