// float32 arithmetic on subnormal inputs and results, for the emulator's
// flush-to-zero test (tests/test_emulator.py): CuPy compiles with -ftz=true,
// under which every one of these operations flushes a subnormal input or
// result to a zero of the same sign (mul.ftz, add.ftz, fma.rn.ftz,
// cvt.ftz.f64.f32, setp.ftz).
extern "C" __global__ void float_ops(const float* a, const float* b, const float* c, float* mul, float* add,
                                     float* fused, double* widened, int* positive, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  mul[i] = a[i] * b[i];
  add[i] = a[i] + c[i];
  fused[i] = fmaf(a[i], b[i], c[i]);
  widened[i] = static_cast<double>(a[i]);
  positive[i] = a[i] > 0.0f ? 1 : 0;
}
