// The math of one LARS step, shared by the CUDA kernels (lars_kernels.cu) and
// the native CPU backend (cpu/lars_cpu.cpp).
//
// Everything here compiles three ways: for the GPU by NVRTC, for the CPU
// emulator by g++ through rawkernels/cpu_shim, and as plain host C++ for the
// native CPU backend (which defines LARS_HOST_ONLY before including this). The
// per-element update, the bfloat16 rounding, the 8-bit rounding rule, the
// percentile rank and the per-tensor coefficients are written once, so the two
// backends execute the same float operations in the same order; only how the
// memory is walked (warps and tiles on the GPU, threads and vector lanes on the
// CPU) differs. The numbering of the steps follows cupylars/reference.py.
#pragma once

#ifdef LARS_HOST_ONLY
#include <cmath>
#include <cstring>
#define LARS_HD inline __attribute__((always_inline))
#else
#define LARS_HD __host__ __device__ __forceinline__
#endif

namespace lars {

// Enumerators rather than constexpr variables: NVRTC would emit those as device globals.
enum MathConstants : int {
  kQBlock = 256,   // elements per 8-bit absmax block
  kHistory = 100,  // percentile-clipping history length
  kSums = 6,       // dot products gathered per chunk
};

// Storage formats of params/grads (cupylars.formats.FORMATS order).
enum Format : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// How the momentum state is stored (or that a pass does not touch it).
enum StateMode : int { kNoState = 0, kState32 = 1, kState8 = 2 };

// Indices into the per-chunk partial sums (and the per-tensor totals).
enum Sum : int { kGG = 0, kPP = 1, kMM = 2, kGP = 3, kGM = 4, kPM = 5 };

// ---- metadata ----------------------------------------------------------------------
// Tensor table: one row of kTensorFields int64 per (non-empty) tensor. Both
// backends read the same rows (cupylars/plan.py builds them).
enum TensorField : int {
  kFieldParam = 0,       // address of p (storage format)
  kFieldGrad = 1,        // address of g (storage format)
  kFieldState = 2,       // address of m (float32) or of the 8-bit codes; 0 = none yet
  kFieldAbsmax = 3,      // address of the absmax array (8-bit state), else 0
  kFieldStep = 4,        // address of step_count (int64)
  kFieldSkip = 5,        // address of skip_count (int64)
  kFieldHistory = 6,     // address of history (float32[100])
  kFieldSize = 7,        // number of elements n
  kFieldFirstBlock = 8,  // index of the tensor's first chunk in the block table
  kFieldNumBlocks = 9,   // number of chunks of the tensor
  kFieldVector = 10,     // 1 when p, g and m allow 16-byte (quad) accesses (GPU)
  kFieldKind = 11,       // format * 3 + state mode (the CPU dispatches on it; the GPU
                         // launches one kernel per kind instead)
  kTensorFields = 12,    // row stride (32-byte aligned rows)
};

// Block table: one int64 per chunk, (tensor row << 32) | chunk index.
LARS_HD int block_tensor(long long entry) { return static_cast<int>(entry >> 32); }
LARS_HD long long block_chunk(long long entry) { return entry & 0xffffffffLL; }

// Per-tensor result of the finalize pass, read by the update pass.
// kCoefExactNorm: the dot products cannot resolve ||u|| (unorm_needs_exact_norm); lrs is
// set again from ||u|| summed over the u the update applies (exact_unorm_coef).
enum CoefFlag : int { kCoefSkip = 1, kCoefFirst = 2, kCoefExactNorm = 4 };
enum CoefLayout : int { kCoefWords = 8 };  // sizeof(TensorCoef) / 4 (cupylars/plan.py COEF_WORDS)
struct TensorCoef {
  float gamma;    // percentile clipping factor (float32, as applied)
  float r;        // trust ratio (float32, as applied)
  float lrs;      // lr * s, the update-norm clipped step size
  int flags;      // CoefFlag bits
  double lr;      // the step's lr, and
  double p_norm;  // ||p||: what exact_unorm_coef needs besides ||u|| and max_unorm
};
static_assert(sizeof(TensorCoef) == 4 * kCoefWords, "TensorCoef has no padding");

// Bits of the finalize pass's `switches` argument.
enum Switch : int {
  kSwitchPercentile = 1,
  kSwitchTrust = 2,
  kSwitchTrustClip = 4,
  kSwitchMomentum = 8,
  kSwitchNesterov = 16,
  kSwitchUnorm = 32,
};
// Non-finite policies (cupylars.config.NONFINITE_POLICIES order).
enum Policy : int { kPolicySkip = 0, kPolicyRaise = 1, kPolicyPropagate = 2 };

// The hyperparameters of one step, as every kernel and the native backend take them: one
// struct, passed by value to the CUDA kernels and by address to lars_cpu_step.
// cupylars/plan.py STEP_CONFIG mirrors it field for field, and plan.step_config fills it
// from a cupylars.config.LarsConfig (tests/test_kernels_compile.py compares the layouts).
// float64 fields first (as LarsConfig holds them), then the int32 ones: no padding inside.
struct StepConfig {
  double lr;                 // the learning rate (lars_finalize may read it from device memory)
  double momentum;           // mu
  double dampening;          // delta
  double weight_decay;       // lambda
  double trust_coefficient;  // eta
  double eps;                // added to the trust ratio's denominator
  double max_unorm;          // the cap on ||u|| / ||p||
  int percentile;            // percentile_clipping, 1..100: the rank that clips ||g||
  int switches;              // Switch bits
  int policy;                // Policy: what a non-finite gradient does
};

// The float32 factors of the per-element update (update_direction), rounded from the
// float64 hyperparameters as the reference rounds them.
struct ElementFactors {
  float lam;   // weight decay
  float mu;    // momentum
  float keep;  // 1 - dampening
  bool nesterov;
};
LARS_HD ElementFactors element_factors(const StepConfig& c) {
  ElementFactors f;
  f.lam = static_cast<float>(c.weight_decay);
  f.mu = static_cast<float>(c.momentum);
  f.keep = static_cast<float>(1.0 - c.dampening);
  f.nesterov = (c.switches & kSwitchNesterov) != 0;
  return f;
}

// What the stats pass reads besides g: p for the trust ratio or the update-norm cap, m for
// the cap with momentum.
LARS_HD bool stats_reads_param(const StepConfig& c) { return (c.switches & (kSwitchTrust | kSwitchUnorm)) != 0; }
LARS_HD bool stats_reads_momentum(const StepConfig& c) {
  return (c.switches & kSwitchMomentum) != 0 && (c.switches & kSwitchUnorm) != 0;
}

// ---- bits --------------------------------------------------------------------------
#ifdef LARS_HOST_ONLY
LARS_HD bool is_finite(double x) { return std::isfinite(x); }
LARS_HD unsigned int float_bits(float x) {
  unsigned int u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
LARS_HD float bits_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
#else
LARS_HD bool is_finite(double x) { return isfinite(x); }
LARS_HD unsigned int float_bits(float x) { return __float_as_uint(x); }
LARS_HD float bits_float(unsigned int u) { return __uint_as_float(u); }
#endif

// float32 -> bfloat16 bits, round to nearest even, exactly as
// cupylars.formats.from_float32 does (a NaN keeps its sign and top payload
// bits, made quiet), so every backend stores the same bits.
LARS_HD unsigned short bf16_bits(float x) {
  const unsigned int bits = float_bits(x);
  const unsigned int rounded =
      (x != x) ? ((bits >> 16) | 0x0040u) : ((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  return static_cast<unsigned short>(rounded);
}
// bfloat16 is the upper half of a float32: widening is exact.
LARS_HD float bf16_to_float(unsigned short bits) { return bits_float(static_cast<unsigned int>(bits) << 16); }

// max that propagates NaN, like numpy's max (fmaxf would drop it).
LARS_HD float nan_max(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return b > a ? b : a;
}

// ---- steps 2-4 and 6: one element ----------------------------------------------------
// u with d = r (gamma g + lam p), m = d (first step) or mu m_old + keep d,
// u = d + mu m (nesterov), m, or d (no momentum). `m` holds m_old on entry
// (ignored on the first step) and the new m on exit. The fused multiply-adds are
// written out so that every backend rounds alike; the exact-norm pass computes
// the same float32 u as the update.
template <bool kMomentum>
LARS_HD float update_direction(const TensorCoef& cf, float lam, float mu, float keep, bool nesterov, bool first,
                               float p, float g, float& m) {
  float d = fmaf(cf.gamma, g, lam * p);  // 2. gamma g + lam p
  d = cf.r * d;                          // 3. trust ratio
  float u = d;
  if (kMomentum) {  // 4. momentum
    m = first ? d : fmaf(mu, m, keep * d);
    u = nesterov ? fmaf(mu, m, d) : m;
  }
  return u;
}

// p -> p - lr s u, u and m as update_direction.
template <bool kMomentum>
LARS_HD float step_element(const TensorCoef& cf, float lam, float mu, float keep, bool nesterov, bool first,
                           float p, float g, float& m) {
  const float u = update_direction<kMomentum>(cf, lam, mu, keep, nesterov, first, p, g, m);
  return fmaf(-cf.lrs, u, p);  // 6. p - lr s u (s from the finalize pass)
}

// ---- 8-bit rounding rule ---------------------------------------------------------------
// cupylars/quantization.py: with lo the largest index with book[lo] <= x (and
// book[lo] <= x < book[lo+1]), the code is lo when x - book[lo] <= book[lo+1] - x
// in float32, else lo + 1. How lo is found differs per backend.
LARS_HD unsigned char code_between(const float* book, int lo, float x) {
  const float below = x - book[lo];
  const float above = book[lo + 1] - x;
  return static_cast<unsigned char>(below <= above ? lo : lo + 1);
}

// ---- step 1: percentile clipping ---------------------------------------------------------
// NaN sorts last, as in numpy.sort; equal values keep their index order, so
// every entry of the history has a distinct rank.
LARS_HD bool sorts_before(float a, int ia, float b, int ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return (!a_nan) || (a_nan && b_nan && ia < ib);
  return a < b || (a == b && ia < ib);
}

// The history entry of applied step t: t % kHistory of t as an unsigned count, so that
// no counter value (a corrupt negative one, one that wrapped) indexes outside the
// history; cupylars/reference.py's history_slot is the same. (The Python layer also
// keeps the counters within 0..2**53.)
LARS_HD int history_slot(long long t) {
  return static_cast<int>(static_cast<unsigned long long>(t) % static_cast<unsigned long long>(kHistory));
}

// gamma = clip / current when the current norm exceeds the percentile's, else 1.
LARS_HD double percentile_gamma(float current_sq, float clip_sq) {
  const double current = sqrt(static_cast<double>(current_sq));
  const double clip = sqrt(static_cast<double>(clip_sq));
  return current > clip ? clip / current : 1.0;
}

// ---- step 5: s, and when the dot products cannot give ||u|| ------------------------------
// s = max_unorm ||p|| / ||u|| when ||p|| > 0 and ||u|| exceeds that, else 1 (reference.unorm_scale).
LARS_HD double unorm_scale(double max_unorm, double p_norm, double u_norm) {
  return (p_norm > 0.0 && u_norm > max_unorm * p_norm) ? max_unorm * p_norm / u_norm : 1.0;
}

// ||u||^2 from dot products is uu = sum of weighted terms whose squared-norm part is
// `diag` = alpha^2 g.g + beta^2 p.p + kappa^2 m.m (docs/kernels.md, "The cap on the update
// norm"). Its error against the norm of the float32 u the update applies is at most
// about 3 x 2^-21 diag (float32 partials of 8 products; float64 sums are far below) plus
// the float32 rounding of u, at most 8 x 2^-24 (|alpha| |g| + |beta| |p| + |kappa| |m|)
// in norm. With uu >= 2^-10 diag both together stay below 2^-10 of ||u||, so the step
// exceeds the cap by at most that. Below it (or negative) uu is noise, and ||u|| is summed
// from u itself, unless even the noise could not reach the cap: then ||u|| < cap and s = 1
// either way (cap^2 >= 2 x 2^-10 diag).
LARS_HD double unorm_exact_ratio() { return 1.0 / 1024.0; }

LARS_HD bool unorm_needs_exact_norm(double uu, double diag, double cap) {
  const double noise = unorm_exact_ratio() * diag;
  return uu < noise && cap * cap < 2.0 * noise;  // false for NaN: it stays NaN, as before
}

// The coefficients of a tensor flagged kCoefExactNorm, from ||u||^2 summed in float64
// over the float32 u of the update (each square is exact in float64).
LARS_HD void exact_unorm_coef(TensorCoef& cf, double uu_exact, double max_unorm) {
  cf.lrs = static_cast<float>(cf.lr * unorm_scale(max_unorm, cf.p_norm, sqrt(uu_exact)));
}

// ---- steps 3 and 5: the factors of one tensor, from its dot products ----------------------
// `totals` are the float64 dot products over the whole tensor before the step;
// `gamma` the unrounded percentile factor; `t` the applied step.
LARS_HD TensorCoef step_coef(const double* totals, long long t, double gamma, const StepConfig& c) {
  const double g_norm = sqrt(totals[kGG]);
  const double p_norm = sqrt(totals[kPP]);
  const float gamma_f = static_cast<float>(gamma);
  const float lam_f = static_cast<float>(c.weight_decay);

  // 3. trust ratio, in float64 with the unrounded gamma as the reference does.
  double r = 1.0;
  if (c.switches & kSwitchTrust) {
    if (p_norm > 0.0 && g_norm > 0.0)
      r = c.trust_coefficient * p_norm / (gamma * g_norm + c.weight_decay * p_norm + c.eps);
    if (c.switches & kSwitchTrustClip) {
      if (c.lr > 0.0) {
        const double q = r / c.lr;
        r = (1.0 < q) ? 1.0 : q;  // Python's min(q, 1.0): a NaN q stays NaN
      } else {
        r = 1.0;
      }
    }
  }
  const float r_f = static_cast<float>(r);

  // 5. ||u|| from dot products: u = alpha g + beta p + kappa m_old, with
  // d = a g + b p the float32 factors as the update applies them.
  const double a = static_cast<double>(r_f) * gamma_f;
  const double bp = static_cast<double>(r_f) * lam_f;
  double alpha = a, beta = bp, kappa = 0.0;
  const bool first = t == 1;
  if (c.switches & kSwitchMomentum) {
    const double mu = static_cast<float>(c.momentum);
    const double keep = static_cast<float>(1.0 - c.dampening);
    const bool nesterov = (c.switches & kSwitchNesterov) != 0;
    double scale_d, scale_m;
    if (first) {  // m = d
      scale_d = nesterov ? 1.0 + mu : 1.0;
      scale_m = 0.0;
    } else {  // m = mu m_old + keep d
      scale_d = nesterov ? 1.0 + mu * keep : keep;
      scale_m = nesterov ? mu * mu : mu;
    }
    alpha = scale_d * a;
    beta = scale_d * bp;
    kappa = scale_m;
  }
  double s = 1.0;
  bool exact = false;
  if (c.switches & kSwitchUnorm) {
    // Terms with a zero weight are left out, so a value that u does not
    // contain (m at t == 1, p without decay) cannot turn the sum into NaN.
    double uu = 0.0, diag = 0.0;
    if (alpha != 0.0) {
      const double term = alpha * alpha * totals[kGG];
      uu += term;
      diag += term;
    }
    if (beta != 0.0) {
      const double term = beta * beta * totals[kPP];
      uu += term;
      diag += term;
    }
    if (kappa != 0.0) {
      const double term = kappa * kappa * totals[kMM];
      uu += term;
      diag += term;
    }
    if (alpha != 0.0 && beta != 0.0) uu += 2.0 * alpha * beta * totals[kGP];
    if (alpha != 0.0 && kappa != 0.0) uu += 2.0 * alpha * kappa * totals[kGM];
    if (beta != 0.0 && kappa != 0.0) uu += 2.0 * beta * kappa * totals[kPM];
    const double u_norm = sqrt(uu < 0.0 ? 0.0 : uu);  // rounding can dip below 0; NaN stays NaN
    s = unorm_scale(c.max_unorm, p_norm, u_norm);
    exact = p_norm > 0.0 && unorm_needs_exact_norm(uu, diag, c.max_unorm * p_norm);
  }

  TensorCoef cf;
  cf.gamma = gamma_f;
  cf.r = r_f;
  cf.lrs = static_cast<float>(c.lr * s);
  cf.flags = (first ? kCoefFirst : 0) | (exact ? kCoefExactNorm : 0);
  cf.lr = c.lr;
  cf.p_norm = p_norm;
  return cf;
}

// ---- pass 2: the finalize of one tensor -----------------------------------------------------
// Written once for both backends: finalize() is the whole per-tensor logic (the non-finite
// policy, the percentile history, gamma, the coefficients and the counters). The one part
// a backend does itself is finding `clip_sq`, the entry of rank c.percentile (sorts_before
// order) of the history as this step records it (recorded_history): the GPU ranks the 100
// entries in parallel, one thread each, before its thread 0 calls finalize()
// (lars_finalize); the CPU selects it with std::nth_element (cpu/lars_cpu.cpp).

// ||g||^2 as the history records it: float32 of the float64 norm, squared.
LARS_HD float history_entry(const double* totals) {
  const double g_norm = sqrt(totals[kGG]);
  return static_cast<float>(g_norm * g_norm);
}

// Entry i of the history after the step records `entry` at `slot`, read from the history
// before it: every entry of a history that never recorded one (its first entry is
// negative) becomes `entry`. finalize() writes the same values.
LARS_HD float recorded_history(const float* history, int i, int slot, float entry) {
  return (history[0] < 0.0f || i == slot) ? entry : history[i];
}

// Whether the step leaves the tensor as it was (the skip policy and a non-finite gradient:
// g.g in float64 of float32 squares cannot overflow, so it is finite exactly when g is).
LARS_HD bool skips_tensor(const double* totals, const StepConfig& c) {
  return c.policy == kPolicySkip && !is_finite(totals[kGG]);
}

// One tensor's coefficients from its dot products `totals`; advances its step counter and
// records ||g||^2 in its history (percentile clipping), or, when the tensor is skipped,
// advances its skip counter and leaves p, m, the history and the step counter as they
// were. `clip_sq` is read only with percentile clipping (see above).
LARS_HD TensorCoef finalize(long long* step_count, long long* skip_count, float* history, const double* totals,
                            float clip_sq, const StepConfig& c) {
  if (skips_tensor(totals, c)) {
    *skip_count += 1;
    TensorCoef skipped = {1.0f, 1.0f, 0.0f, kCoefSkip, 0.0, 0.0};
    return skipped;
  }
  const long long t = *step_count + 1;
  double gamma = 1.0;
  if (c.switches & kSwitchPercentile) {  // 1. record ||g||^2, compare with the percentile
    const float entry = history_entry(totals);
    const int slot = history_slot(t);
    if (history[0] < 0.0f) {  // recorded_history, written
      for (int i = 0; i < kHistory; ++i) history[i] = entry;
    } else {
      history[slot] = entry;
    }
    gamma = percentile_gamma(entry, clip_sq);
  }
  *step_count = t;
  return step_coef(totals, t, gamma, c);
}

}  // namespace lars
