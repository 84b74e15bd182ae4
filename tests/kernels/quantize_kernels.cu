// The 8-bit code search and tile quantization of rawkernels/lars_common.cuh on
// their own, for tests/test_quantization_thresholds.py (through the emulator).
#include "lars_common.cuh"

// out[i] = nearest_code(x[i]), with the code table (quantization.code_table())
// in shared memory as the update kernels hold it. 256 threads a block.
extern "C" __global__ void codes_of(const float* table, const float* x, unsigned char* out, long long n) {
  __shared__ lars::CodeBook cb;
  const lars::CodeBookShare share = lars::load_code_book(table, true);
  lars::store_code_book(cb, share, true);
  __syncthreads();
  for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n; i += 256LL * gridDim.x)
    out[i] = lars::nearest_code(cb, x[i]);
}

// quantize_tile over whole 256-element blocks of m, one warp a block, each lane
// holding the two quads [4l, 4l+4) and [128+4l, 128+4l+4) as the update kernels do.
extern "C" __global__ void quantize_tiles(const float* table, const float* m, unsigned char* codes,
                                          float* absmax, long long tiles) {
  __shared__ lars::CodeBook cb;
  const lars::CodeBookShare share = lars::load_code_book(table, true);
  lars::store_code_book(cb, share, true);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (long long t = blockIdx.x * 8LL + (threadIdx.x >> 5); t < tiles; t += 8LL * gridDim.x) {
    float v[8];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) v[4 * h + k] = m[t * 256 + h * 128 + 4 * lane + k];
    unsigned char c[8];
    const float a = lars::quantize_tile(cb, v, c);
    if (lane == 0) absmax[t] = a;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) codes[t * 256 + h * 128 + 4 * lane + k] = c[4 * h + k];
  }
}
