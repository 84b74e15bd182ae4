// Parts shared by the CPU stand-ins of <cuda_fp16.h> and <cuda_bf16.h>.
//
// __half and __nv_bfloat16 differ only in how 16 bits encode a float, so both
// are thin types over one class template, Storage16, given a small codec
// (HalfCodec in cuda_fp16.h, BFloat16Codec in cuda_bf16.h); their pair types
// share Pair16 the same way. They stay distinct types, as in CUDA, so that
// overloads on __half and on __nv_bfloat16 keep apart.
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

// A namespace holding nothing but the two base templates: the namespace of a
// base class takes part in argument-dependent lookup for __half & co., and
// this keeps the rest of cupylars_emu out of unqualified calls in kernels.
namespace storage16 {

// The class body CUDA gives __half and __nv_bfloat16: 16 bits of storage,
// converting constructors from float, double and every integer type, and
// conversions back to them, all implicit as in CUDA. Codec provides
//   raw             the CUDA raw struct (__half_raw, __nv_bfloat16_raw),
//   encode(float)   float -> bits, rounded to nearest even, NaN -> 0x7fff,
//   decode(bits)    bits -> float.
// Assignment from the raw struct is declared by each derived type: it returns
// that type, and a base operator= would drag in the base's own copy assignment
// and make `h = 1.0f` ambiguous.
template <class Codec>
struct Storage16 {
 private:
  using Raw = typename Codec::raw;

  // double and integers reach float exactly or rounded to odd, so rounding to
  // 16 bits afterwards is a single rounding of the original value (an integer
  // is exact in long double's 64-bit mantissa).
  static unsigned short encode_double(double d) { return Codec::encode(::cupylars_emu::round_to_odd_float(d)); }
  template <class I>
  static unsigned short encode_integer(I v) {
    return Codec::encode(::cupylars_emu::round_to_odd_float(static_cast<long double>(v)));
  }
  // To integers: round toward zero, saturate, NaN -> 0 (as the GPU converts).
  template <class I>
  I to_integer() const {
    return ::cupylars_emu::saturate_to<I>(truncf(Codec::decode(__x)));
  }

 protected:
  unsigned short __x;  // named as in CUDA's headers

 public:
  Storage16() = default;  // trivial, as CUDA's: usable in __shared__ arrays and unions
  constexpr Storage16(const Raw& r) : __x(r.x) {}
  operator Raw() const { return Raw{__x}; }

  Storage16(float f) : __x(Codec::encode(f)) {}
  Storage16(double d) : __x(encode_double(d)) {}
  Storage16(short v) : __x(encode_integer(v)) {}
  Storage16(unsigned short v) : __x(encode_integer(v)) {}
  Storage16(int v) : __x(encode_integer(v)) {}
  Storage16(unsigned int v) : __x(encode_integer(v)) {}
  Storage16(long v) : __x(encode_integer(v)) {}
  Storage16(unsigned long v) : __x(encode_integer(v)) {}
  Storage16(long long v) : __x(encode_integer(v)) {}
  Storage16(unsigned long long v) : __x(encode_integer(v)) {}

  operator float() const { return Codec::decode(__x); }
  operator signed char() const { return to_integer<signed char>(); }
  operator unsigned char() const { return to_integer<unsigned char>(); }
  operator char() const { return to_integer<char>(); }
  operator short() const { return to_integer<short>(); }
  operator unsigned short() const { return to_integer<unsigned short>(); }
  operator int() const { return to_integer<int>(); }
  operator unsigned int() const { return to_integer<unsigned int>(); }
  operator long() const { return to_integer<long>(); }
  operator unsigned long() const { return to_integer<unsigned long>(); }
  operator long long() const { return to_integer<long long>(); }
  operator unsigned long long() const { return to_integer<unsigned long long>(); }
  // Both formats keep the sign in bit 15: anything but +-0 is true, NaN included.
  operator bool() const { return (__x & 0x7fffu) != 0; }
};

// The body of __half2 / __nv_bfloat162: two Scalars .x, .y and conversions
// from and to the raw pair struct Codec::raw2. The derived type adds the
// 4-byte alignment.
template <class Scalar, class Codec>
struct Pair16 {
 private:
  using Raw = typename Codec::raw;
  using Raw2 = typename Codec::raw2;

 public:
  Scalar x, y;
  Pair16() = default;
  constexpr Pair16(const Scalar& a, const Scalar& b) : x(a), y(b) {}
  Pair16(const Raw2& r) : x(Raw{r.x}), y(Raw{r.y}) {}
  operator Raw2() const { return Raw2{static_cast<Raw>(x).x, static_cast<Raw>(y).x}; }
};

}  // namespace storage16

// What Float16Traits<T> says for a type built on Storage16: its bits, read
// and written through the raw struct.
template <class T, class Codec>
struct Storage16Traits {
  static constexpr bool value = true;
  static unsigned short bits(const T& h) { return static_cast<typename Codec::raw>(h).x; }
  static T from_bits(unsigned short b) { return T(typename Codec::raw{b}); }
};

template <class T>
using EnableFloat16 = std::enable_if_t<Float16Traits<T>::value, int>;

// Specialised for __half2 / __nv_bfloat162: `element` names the scalar type.
template <class T>
struct Float16PairTraits {
  static constexpr bool value = false;
};

template <class T>
using EnableFloat16Pair = std::enable_if_t<Float16PairTraits<T>::value, int>;

// Either a 16-bit float or a pair of them.
template <class T>
using EnableFloat16OrPair = std::enable_if_t<Float16Traits<T>::value || Float16PairTraits<T>::value, int>;

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

// ---- compound assignment, scalars and pairs alike ----------------------------------------------------
template <class T, ::cupylars_emu::EnableFloat16OrPair<T> = 0>
inline T& operator+=(T& a, const T& b) {
  return a = a + b;
}
template <class T, ::cupylars_emu::EnableFloat16OrPair<T> = 0>
inline T& operator-=(T& a, const T& b) {
  return a = a - b;
}
template <class T, ::cupylars_emu::EnableFloat16OrPair<T> = 0>
inline T& operator*=(T& a, const T& b) {
  return a = a * b;
}
template <class T, ::cupylars_emu::EnableFloat16OrPair<T> = 0>
inline T& operator/=(T& a, const T& b) {
  return a = a / b;
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
  /* ordered: false when either is NaN (operator!= is the unordered one) */                                \
  inline bool __hne(T a, T b) { return a == a && b == b && a != b; }                                      \
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
  inline T2 __lowhigh2highlow(T2 a) { return T2(a.y, a.x); }                                             \
  /* atomicAdd as a compare-and-swap loop on the 16/32-bit storage. */                                    \
  inline T atomicAdd(T* address, T v) {                                                                   \
    return ::cupylars_emu::atomic_update(address, [v](T old) { return old + v; });                       \
  }                                                                                                       \
  inline T2 atomicAdd(T2* address, T2 v) {                                                                \
    return ::cupylars_emu::atomic_update(address, [v](T2 old) { return old + v; });                      \
  }

#endif  // CUPYLARS_FLOAT16_COMMON_H
