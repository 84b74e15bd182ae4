// Parts shared by the CPU stand-ins of <cuda_fp16.h> and <cuda_bf16.h>.
//
// Arithmetic on a 16-bit float is done in float and rounded once to 16 bits.
// That is the correctly rounded result for + - * / and sqrt (float carries
// more than twice the 16-bit precision plus two bits), which is what the GPU's
// native half/bfloat16 instructions return. Fused multiply-add rounds through
// round-to-odd to keep its single rounding.
#ifndef CUPYLARS_FLOAT16_COMMON_H
#define CUPYLARS_FLOAT16_COMMON_H

#include "cuda_cpu_shim.h"

namespace cupylars_emu {

template <class T>
using EnableFloat16 = std::enable_if_t<Float16Traits<T>::value, int>;

// Specialised for __half2 / __nv_bfloat162: `element` names the scalar type.
template <class T>
struct Float16PairTraits {
  static constexpr bool value = false;
};

template <class T>
using EnableFloat16Pair = std::enable_if_t<Float16PairTraits<T>::value, int>;

template <class T>
inline T fma16(T a, T b, T c) {
  const double r = fma16_round_to_odd(static_cast<float>(a), static_cast<float>(b), static_cast<float>(c));
  return T(round_to_odd_float(r));
}

}  // namespace cupylars_emu

// ---- operators of the scalar types ------------------------------------------------------------
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator+(const T& a, const T& b) {
  return T(static_cast<float>(a) + static_cast<float>(b));
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator-(const T& a, const T& b) {
  return T(static_cast<float>(a) - static_cast<float>(b));
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator*(const T& a, const T& b) {
  return T(static_cast<float>(a) * static_cast<float>(b));
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator/(const T& a, const T& b) {
  return T(static_cast<float>(a) / static_cast<float>(b));
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator+=(T& a, const T& b) {
  return a = a + b;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator-=(T& a, const T& b) {
  return a = a - b;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator*=(T& a, const T& b) {
  return a = a * b;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator/=(T& a, const T& b) {
  return a = a / b;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator+(const T& a) {
  return a;
}
// Negation flips the sign bit, NaN included, as the GPU's neg instruction.
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator-(const T& a) {
  using Traits = ::cupylars_emu::Float16Traits<T>;
  return Traits::from_bits(static_cast<unsigned short>(Traits::bits(a) ^ 0x8000u));
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator++(T& a) {
  return a = a + T(1.0f);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T& operator--(T& a) {
  return a = a - T(1.0f);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator++(T& a, int) {
  const T old = a;
  a = a + T(1.0f);
  return old;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline T operator--(T& a, int) {
  const T old = a;
  a = a - T(1.0f);
  return old;
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator==(const T& a, const T& b) {
  return static_cast<float>(a) == static_cast<float>(b);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator!=(const T& a, const T& b) {
  return static_cast<float>(a) != static_cast<float>(b);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator<(const T& a, const T& b) {
  return static_cast<float>(a) < static_cast<float>(b);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator<=(const T& a, const T& b) {
  return static_cast<float>(a) <= static_cast<float>(b);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator>(const T& a, const T& b) {
  return static_cast<float>(a) > static_cast<float>(b);
}
template <class T, ::cupylars_emu::EnableFloat16<T> = 0>
inline bool operator>=(const T& a, const T& b) {
  return static_cast<float>(a) >= static_cast<float>(b);
}

// ---- operators of the pair types (element-wise) ------------------------------------------------------
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P operator+(const P& a, const P& b) {
  return P(a.x + b.x, a.y + b.y);
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P operator-(const P& a, const P& b) {
  return P(a.x - b.x, a.y - b.y);
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P operator*(const P& a, const P& b) {
  return P(a.x * b.x, a.y * b.y);
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P operator/(const P& a, const P& b) {
  return P(a.x / b.x, a.y / b.y);
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P& operator+=(P& a, const P& b) {
  return a = a + b;
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P& operator-=(P& a, const P& b) {
  return a = a - b;
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P& operator*=(P& a, const P& b) {
  return a = a * b;
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P& operator/=(P& a, const P& b) {
  return a = a / b;
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline P operator-(const P& a) {
  return P(-a.x, -a.y);
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline bool operator==(const P& a, const P& b) {
  return a.x == b.x && a.y == b.y;
}
template <class P, ::cupylars_emu::EnableFloat16Pair<P> = 0>
inline bool operator!=(const P& a, const P& b) {
  return !(a == b);
}

// ---- the intrinsics that CUDA overloads for both __half and __nv_bfloat16 -----------------------------
// T is the scalar type, T2 the pair type.
#define CUPYLARS_EMU_FLOAT16_INTRINSICS(T, T2)                                                            \
  inline T __hadd(T a, T b) { return a + b; }                                                             \
  inline T __hsub(T a, T b) { return a - b; }                                                             \
  inline T __hmul(T a, T b) { return a * b; }                                                             \
  inline T __hdiv(T a, T b) { return a / b; }                                                             \
  inline T __hfma(T a, T b, T c) { return ::cupylars_emu::fma16(a, b, c); }                               \
  inline T __hneg(T a) { return -a; }                                                                     \
  inline T __habs(T a) {                                                                                  \
    using Traits = ::cupylars_emu::Float16Traits<T>;                                                      \
    return Traits::from_bits(static_cast<unsigned short>(Traits::bits(a) & 0x7fffu));                     \
  }                                                                                                       \
  /* max/min return the other operand when one is NaN, as fmaxf/fminf. */                                 \
  inline T __hmax(T a, T b) { return T(fmaxf(static_cast<float>(a), static_cast<float>(b))); }            \
  inline T __hmin(T a, T b) { return T(fminf(static_cast<float>(a), static_cast<float>(b))); }            \
  inline bool __heq(T a, T b) { return a == b; }                                                          \
  inline bool __hne(T a, T b) { return a != b; }                                                          \
  inline bool __hlt(T a, T b) { return a < b; }                                                           \
  inline bool __hle(T a, T b) { return a <= b; }                                                          \
  inline bool __hgt(T a, T b) { return a > b; }                                                           \
  inline bool __hge(T a, T b) { return a >= b; }                                                          \
  inline bool __hisnan(T a) { return std::isnan(static_cast<float>(a)); }                                \
  inline int __hisinf(T a) {                                                                              \
    const float f = static_cast<float>(a);                                                                \
    return std::isinf(f) ? (f < 0 ? -1 : 1) : 0;                                                          \
  }                                                                                                       \
  inline T hsqrt(T a) { return T(sqrtf(static_cast<float>(a))); }                                        \
  inline T2 __hadd2(T2 a, T2 b) { return a + b; }                                                         \
  inline T2 __hsub2(T2 a, T2 b) { return a - b; }                                                         \
  inline T2 __hmul2(T2 a, T2 b) { return a * b; }                                                         \
  inline T2 __h2div(T2 a, T2 b) { return a / b; }                                                         \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }       \
  inline T2 __hneg2(T2 a) { return -a; }                                                                  \
  inline T2 __habs2(T2 a) { return T2(__habs(a.x), __habs(a.y)); }                                       \
  inline T2 __hmax2(T2 a, T2 b) { return T2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }                       \
  inline T2 __hmin2(T2 a, T2 b) { return T2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }                       \
  inline float __low2float(T2 a) { return static_cast<float>(a.x); }                                     \
  inline float __high2float(T2 a) { return static_cast<float>(a.y); }                                    \
  /* atomicAdd as a compare-and-swap loop on the 16/32-bit storage. */                                    \
  inline T atomicAdd(T* address, T v) {                                                                   \
    return ::cupylars_emu::atomic_update(address, [v](T old) { return old + v; });                       \
  }                                                                                                       \
  inline T2 atomicAdd(T2* address, T2 v) {                                                                \
    return ::cupylars_emu::atomic_update(address, [v](T2 old) { return old + v; });                      \
  }

#endif  // CUPYLARS_FLOAT16_COMMON_H
