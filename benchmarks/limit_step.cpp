// The least work any two-pass LARS step with float32 momentum can do, as the yardstick of
// benchmarks/cpu_step.py: per tensor, the six dot products of g, p and m in float64 over
// fixed chunks, the coefficient with max_unorm, then m = mu m + g + wd p and p -= lr s m.
// One tensor at a time, its norms and its update back to back (OpenMP). No percentile
// history, trust ratio, 8-bit state or storage formats.
#include <cmath>

constexpr long long kChunk = 16384;

extern "C" void limit_step(int count, float* const* ps, const float* const* gs, float* const* ms,
                           const long long* sizes, double* partials, double lr, double mu, double wd,
                           double max_unorm, int threads) {
  const float fmu = static_cast<float>(mu), fwd = static_cast<float>(wd);
  float lrs = 0.0f;
#pragma omp parallel num_threads(threads)
  for (int t = 0; t < count; ++t) {
    float* __restrict__ p = ps[t];
    float* __restrict__ m = ms[t];
    const float* __restrict__ g = gs[t];
    const long long n = sizes[t], chunks = (n + kChunk - 1) / kChunk;
#pragma omp for schedule(static)
    for (long long c = 0; c < chunks; ++c) {
      double gg = 0, pp = 0, mm = 0, gp = 0, gm = 0, pm = 0;
      const long long end = c * kChunk + kChunk < n ? c * kChunk + kChunk : n;
#pragma omp simd reduction(+ : gg, pp, mm, gp, gm, pm)
      for (long long i = c * kChunk; i < end; ++i) {
        const double gd = g[i], pd = p[i], md = m[i];
        gg += gd * gd, pp += pd * pd, mm += md * md, gp += gd * pd, gm += gd * md, pm += pd * md;
      }
      double* out = partials + 6 * c;
      out[0] = gg, out[1] = pp, out[2] = mm, out[3] = gp, out[4] = gm, out[5] = pm;
    }
#pragma omp single
    {
      double s[6] = {0, 0, 0, 0, 0, 0};
      for (long long c = 0; c < chunks; ++c)
        for (int j = 0; j < 6; ++j) s[j] += partials[6 * c + j];
      // u = mu m + g + wd p
      const double uu = mu * mu * s[2] + s[0] + wd * wd * s[1] + 2 * (mu * s[4] + wd * s[3] + mu * wd * s[5]);
      const double u = std::sqrt(uu > 0 ? uu : 0), cap = max_unorm * std::sqrt(s[1]);
      lrs = static_cast<float>(lr * (u > cap && cap > 0 ? cap / u : 1.0));
    }
#pragma omp for schedule(static)
    for (long long i = 0; i < n; ++i) {
      const float mi = fmu * m[i] + g[i] + fwd * p[i];
      m[i] = mi;
      p[i] -= lrs * mi;
    }
  }
}
