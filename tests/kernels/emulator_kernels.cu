// Small kernels that exercise the CPU emulator (tests/test_emulator.py).
// Plain CUDA C++: they also compile with `nvcc -arch=sm_80 -cubin`.
#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FULL_MASK 0xffffffffu

// ---- built-in variables and indexing ------------------------------------------------------------

// Every thread writes its threadIdx, blockIdx, blockDim and gridDim (12 ints)
// at its global linear index.
extern "C" __global__ void record_builtins(int* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned global = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  int* o = out + 12 * global;
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
  o[6] = blockDim.x;
  o[7] = blockDim.y;
  o[8] = blockDim.z;
  o[9] = gridDim.x;
  o[10] = gridDim.y;
  o[11] = gridDim.z;
}

// out = 2 * in + x - y over a width x height image, 2-D grid of 2-D blocks.
extern "C" __global__ void affine_2d(const float* __restrict__ in, float* __restrict__ out, int width,
                                     int height) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x < width && y < height) out[y * width + x] = 2.0f * in[y * width + x] + x - y;
}

// ---- block reduction through shared memory ------------------------------------------------------

// One partial sum per block; blockDim.x a power of two <= 256.
extern "C" __global__ void block_sum_shared(const float* in, float* partial, int n) {
  __shared__ float buf[256];
  const unsigned tid = threadIdx.x;
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += blockDim.x * gridDim.x) v += in[i];
  buf[tid] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) buf[tid] += buf[tid + s];
    __syncthreads();
  }
  if (tid == 0) partial[blockIdx.x] = buf[0];
}

// The same through `extern __shared__` memory: each block reverses its slice.
extern "C" __global__ void dynamic_shared_reverse(const float* in, float* out) {
  extern __shared__ float dyn[];
  const unsigned base = blockIdx.x * blockDim.x;
  dyn[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

// ---- warp shuffles and votes ------------------------------------------------------------------

// Warp sums by butterfly (every lane) and by shifting down (lane 0), then the
// block sum by warp 0 alone. blockDim.x is a multiple of 32.
extern "C" __global__ void warp_sums(const float* in, float* xor_out, float* down_out, float* block_out) {
  __shared__ float warp_totals[32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = in[i];
  float x = v, d = v;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(FULL_MASK, d, o);
  xor_out[i] = x;
  if (lane == 0) {
    down_out[blockIdx.x * warps + warp] = d;
    warp_totals[warp] = d;
  }
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? warp_totals[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(FULL_MASK, t, o);
    if (lane == 0) block_out[blockIdx.x] = t;
  }
}

// Each thread records the four shuffle flavours of v = 100 * tid + 1.
extern "C" __global__ void shuffle_modes(int* out, int width, unsigned delta, int src, int lane_mask) {
  const int v = 100 * static_cast<int>(threadIdx.x) + 1;
  int* o = out + 4 * threadIdx.x;
  o[0] = __shfl_sync(FULL_MASK, v, src, width);
  o[1] = __shfl_up_sync(FULL_MASK, v, delta, width);
  o[2] = __shfl_down_sync(FULL_MASK, v, delta, width);
  o[3] = __shfl_xor_sync(FULL_MASK, v, lane_mask, width);
}

// 64-bit values move whole through a shuffle.
extern "C" __global__ void shuffle_wide(const double* in, double* out_d, long long* out_ll) {
  const unsigned lane = threadIdx.x & 31;
  out_d[threadIdx.x] = __shfl_xor_sync(FULL_MASK, in[threadIdx.x], 1);
  const long long w = (static_cast<long long>(threadIdx.x) << 40) | 5;
  out_ll[threadIdx.x] = __shfl_sync(FULL_MASK, w, 31 - lane);
}

// Votes per warp; the last warp may be partial. ballots[warps + w] is the
// ballot of the even lanes only.
extern "C" __global__ void votes(const int* pred, unsigned* ballots, int* any_all, unsigned* active,
                                 unsigned* branch) {
  const unsigned t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const unsigned warps = (blockDim.x + 31) / 32;
  const int p = pred[t];
  const unsigned b = __ballot_sync(FULL_MASK, p);
  const int any = __any_sync(FULL_MASK, p);
  const int all = __all_sync(FULL_MASK, p);
  active[t] = __activemask();  // converged
  if (lane < 8) branch[t] = __activemask();  // diverged
  if (lane == 0) {
    ballots[warp] = b;
    any_all[2 * warp] = any;
    any_all[2 * warp + 1] = all;
  }
  if ((lane & 1) == 0) {
    const unsigned even = __ballot_sync(0x55555555u, p);
    if (lane == 0) ballots[warps + warp] = even;
  }
}

// Warp reductions and matching of sm_80.
extern "C" __global__ void warp_reduce_match(const int* in, int* sums, unsigned* maxima, unsigned* groups) {
  const unsigned t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int v = in[t];
  const int s = __reduce_add_sync(FULL_MASK, v);
  const unsigned m = __reduce_max_sync(FULL_MASK, static_cast<unsigned>(v));
  if (lane == 0) {
    sums[warp] = s;
    maxima[warp] = m;
  }
  groups[t] = __match_any_sync(FULL_MASK, v % 3);
}

// __syncthreads_count / _and / _or of predicate pred[t].
extern "C" __global__ void block_votes(const int* pred, int* out) {
  const int p = pred[threadIdx.x];
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  if (threadIdx.x == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
  }
}

// Threads that returned do not take part in later barriers.
extern "C" __global__ void early_exit_barrier(int* out) {
  __shared__ int s[64];
  if (threadIdx.x >= 40) return;
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[39 - threadIdx.x];
  out[64 + threadIdx.x] = __shfl_xor_sync(FULL_MASK, static_cast<int>(threadIdx.x), 1);
}

// ---- atomics ------------------------------------------------------------------------------------

struct AtomicResults {
  float fsum;
  int imax;
  double dsum;
  unsigned long long usum;
  int imin;
  unsigned bits_or;
  unsigned bits_and;
  int first_writer;
  int winners;
  int exch_slot;
  unsigned wrapped;
  int countdown;
};

extern "C" __global__ void atomics(const int* keys, int n, int* hist, int nbins, AtomicResults* r,
                                   int* exch_trace) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int k = keys[i];
  atomicAdd(&hist[k % nbins], 1);
  atomicAdd(&r->fsum, static_cast<float>(k));
  atomicAdd(&r->dsum, 0.5 * k);
  atomicAdd(&r->usum, static_cast<unsigned long long>(k) << 20);
  atomicMax(&r->imax, k - 500);
  atomicMin(&r->imin, k - 500);
  atomicOr(&r->bits_or, 1u << (k & 31));
  atomicAnd(&r->bits_and, ~(1u << (k & 31)));
  if (atomicCAS(&r->first_writer, -1, i) == -1) atomicAdd(&r->winners, 1);
  exch_trace[i] = atomicExch(&r->exch_slot, i);
  atomicInc(&r->wrapped, 9u);
  atomicSub(&r->countdown, 1);
}

// A spin lock inside each block; the critical section sleeps so that the other
// threads find the lock taken and have to spin.
extern "C" __global__ void spin_lock_counter(int* lock, int* counter) {
  bool done = false;
  while (!done) {
    if (atomicCAS(lock, 0, 1) == 0) {
      const int c = *counter;
      __nanosleep(100);
      *counter = c + 1;
      __threadfence();
      atomicExch(lock, 0);
      done = true;
    }
  }
}

// ---- 16-bit floats ------------------------------------------------------------------------------

extern "C" __global__ void convert_16bit(const float* in, unsigned short* h_bits, float* h_back,
                                         unsigned short* b_bits, float* b_back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half h = __float2half_rn(in[i]);
  h_bits[i] = __half_as_ushort(h);
  h_back[i] = __half2float(h);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
  b_bits[i] = __bfloat16_as_ushort(b);
  b_back[i] = __bfloat162float(b);
}

// Decodes every 16-bit pattern as half and as bfloat16.
extern "C" __global__ void decode_16bit(float* h_out, float* b_out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned short bits = static_cast<unsigned short>(i);
  h_out[i] = __half2float(__ushort_as_half(bits));
  b_out[i] = __bfloat162float(__ushort_as_bfloat16(bits));
}

// Products (and a half fma), rounded once to 16 bits; operands given as bits.
extern "C" __global__ void arith_16bit(const unsigned short* a, const unsigned short* b, const unsigned short* c,
                                       unsigned short* h_mul, unsigned short* h_fma, unsigned short* b_mul, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half ha = __ushort_as_half(a[i]), hb = __ushort_as_half(b[i]), hc = __ushort_as_half(c[i]);
  h_mul[i] = __half_as_ushort(__hmul(ha, hb));
  h_fma[i] = __half_as_ushort(__hfma(ha, hb, hc));
  const __nv_bfloat16 ba = __ushort_as_bfloat16(a[i]), bb = __ushort_as_bfloat16(b[i]);
  b_mul[i] = __bfloat16_as_ushort(ba * bb);
}

// ---- a sample of the wider device API ------------------------------------------------------------

// One warp; lane 0 writes the results (see test_device_api_sample).
extern "C" __global__ void api_surface(float* f, int* i, unsigned long long* u) {
  const unsigned lane = threadIdx.x & 31;
  const float4 q = make_float4(1.0f, 2.0f, 3.0f, 4.0f);
  const float2 p = make_float2(5.0f, 6.0f);
  const int2 ip = make_int2(7, 8);
  const dim3 d(2, 3);
  __half h = __float2half(1.5f);
  h += __float2half(0.25f);
  h = h * __float2half(2.0f);
  const __half2 h2 = __floats2half2_rn(0.5f, -2.0f);
  const float2 squares = __half22float2(__hmul2(h2, h2));
  __nv_bfloat16 b = __float2bfloat16(3.0f);
  b = -b;
  const __nv_bfloat162 b2 = __floats2bfloat162_rn(1.0f, 2.0f);
  const __half neighbour = __shfl_xor_sync(FULL_MASK, h, 1);
  const unsigned ballot = __ballot_sync(FULL_MASK, lane < 5);
  if (lane != 0) return;
  f[0] = q.w + p.y + ip.y + d.x + d.y + d.z;
  f[1] = __half2float(h);
  f[2] = squares.x + squares.y;
  f[3] = __bfloat162float(b) + __low2float(b2) + __high2float(b2);
  f[4] = __half2float(neighbour);
  f[5] = rsqrtf(4.0f);
  f[6] = fminf(1.0f, 2.0f) + 2.0f * fmaxf(1.0f, 2.0f) + 4.0f * min(3.0f, 4.0f) + 8.0f * max(3.0f, 4.0f);
  f[7] = __fmaf_rn(2.0f, 3.0f, 1.0f) + __fdiv_rn(1.0f, 4.0f) + __fsqrt_rn(9.0f);
  f[8] = __saturatef(1.5f) + __saturatef(-1.0f);
  f[9] = __int_as_float(0x3f800000) + __uint_as_float(__float_as_uint(2.0f));
  f[10] = (isfinite(1.0f) ? 1.0f : 0.0f) + (isnan(__int_as_float(0x7fc00000)) ? 2.0f : 0.0f) +
          (isinf(__int_as_float(0x7f800000)) ? 4.0f : 0.0f);
  i[0] = __popc(0xF0F0u) + __clz(1) + __ffs(8);
  i[1] = min(3, -4) + max(3, 5);
  i[2] = 1000 * __float2int_rn(2.5f) + 100 * __float2int_rz(-2.7f) + 10 * __float2int_rd(-2.5f) +
         __float2int_ru(2.1f);
  i[3] = __double2hiint(1.0);
  i[4] = __half2int_rz(__float2half(-3.75f));
  u[0] = __double_as_longlong(1.0);
  u[1] = __brev(1u);
  u[2] = __umul64hi(1ull << 63, 4ull);
  u[3] = __byte_perm(0x33221100u, 0x77665544u, 0x5140u);
  u[4] = __ldg(&u[5]) + 1;
  u[6] = ballot;
  u[7] = clock64() > 0;
}

// ---- argument passing ---------------------------------------------------------------------------

extern "C" __global__ void typed_args(float* out, const double* d, int i, unsigned u, long long ll, float f,
                                      double df, bool flag, const float* const* table, __half h,
                                      const unsigned char* bytes, const float4* quads) {
  out[0] = f + static_cast<float>(df) + i + u + static_cast<float>(ll) + (flag ? 1.0f : 0.0f) + __half2float(h);
  out[1] = static_cast<float>(d[0]);
  out[2] = table[1][1];
  out[3] = bytes[2] + quads[1].w;
}

// ---- failures -----------------------------------------------------------------------------------

// Half the warp waits at a block barrier, the other half at a warp barrier.
extern "C" __global__ void deadlock_mixed_barriers(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

// A full-mask shuffle that half of the warp never reaches.
extern "C" __global__ void deadlock_partial_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Lanes of one warp name different masks.
extern "C" __global__ void mismatched_masks(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : FULL_MASK;
  out[threadIdx.x] = __shfl_sync(mask, static_cast<int>(threadIdx.x), 0);
}

extern "C" __global__ void trap_when(const int* flags) {
  if (flags[blockIdx.x * blockDim.x + threadIdx.x]) __trap();
}

extern "C" __global__ void assert_positive(const float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) assert(x[i] > 0.0f);
}

// Waits for a flag that a later block sets: blocks run one at a time here.
extern "C" __global__ void wait_for_later_block(int* flag) {
  if (blockIdx.x == 1) {
    atomicExch(flag, 1);
    return;
  }
  while (atomicCAS(flag, 1, 1) != 1) {
  }
}

// Needs far more than the default fiber stack.
extern "C" __global__ void big_stack(float* out, int n) {
  volatile float scratch[1 << 16];
  for (int k = 0; k < n; ++k) scratch[k] = static_cast<float>(k);
  out[threadIdx.x] = scratch[n - 1];
}
