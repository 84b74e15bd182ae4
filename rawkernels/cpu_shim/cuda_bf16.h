// CPU stand-in for CUDA's <cuda_bf16.h>: __nv_bfloat16 and __nv_bfloat162
// with the same layout, conversions and (commonly used) intrinsics, rounded
// exactly as the GPU rounds. float -> bfloat16 of a NaN gives CUDA's canonical
// NaN 0x7fff; bfloat16 -> float is exact (NaN payloads kept).
#ifndef CUPYLARS_CUDA_BF16_H
#define CUPYLARS_CUDA_BF16_H

#include "cupylars_float16_common.h"

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __nv_bfloat162_raw {
  unsigned short x, y;
};

namespace cupylars_emu {
template <class I>
inline unsigned short integer_to_bf16_rn(I v) {
  return float_to_bf16_rn(round_to_odd_float(static_cast<long double>(v)));
}
}  // namespace cupylars_emu

struct __align__(2) __nv_bfloat16 {
 protected:
  unsigned short __x;

 public:
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
    __x = r.x;
    return *this;
  }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }

  __nv_bfloat16(float f) : __x(::cupylars_emu::float_to_bf16_rn(f)) {}
  __nv_bfloat16(double d) : __x(::cupylars_emu::float_to_bf16_rn(::cupylars_emu::round_to_odd_float(d))) {}
  __nv_bfloat16(short v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(unsigned short v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(int v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(unsigned int v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(long v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(unsigned long v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(long long v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}
  __nv_bfloat16(unsigned long long v) : __x(::cupylars_emu::integer_to_bf16_rn(v)) {}

  operator float() const { return ::cupylars_emu::bf16_to_float(__x); }
  // To integers: round toward zero, saturate, NaN -> 0 (as the GPU converts).
  operator signed char() const { return ::cupylars_emu::saturate_to<signed char>(truncf(float(*this))); }
  operator unsigned char() const { return ::cupylars_emu::saturate_to<unsigned char>(truncf(float(*this))); }
  operator char() const { return ::cupylars_emu::saturate_to<char>(truncf(float(*this))); }
  operator short() const { return ::cupylars_emu::saturate_to<short>(truncf(float(*this))); }
  operator unsigned short() const { return ::cupylars_emu::saturate_to<unsigned short>(truncf(float(*this))); }
  operator int() const { return ::cupylars_emu::saturate_to<int>(truncf(float(*this))); }
  operator unsigned int() const { return ::cupylars_emu::saturate_to<unsigned int>(truncf(float(*this))); }
  operator long() const { return ::cupylars_emu::saturate_to<long>(truncf(float(*this))); }
  operator unsigned long() const { return ::cupylars_emu::saturate_to<unsigned long>(truncf(float(*this))); }
  operator long long() const { return ::cupylars_emu::saturate_to<long long>(truncf(float(*this))); }
  operator unsigned long long() const {
    return ::cupylars_emu::saturate_to<unsigned long long>(truncf(float(*this)));
  }
  operator bool() const { return (__x & 0x7fffu) != 0; }
};

struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
  __nv_bfloat162(const __nv_bfloat162_raw& r) : x(__nv_bfloat16_raw{r.x}), y(__nv_bfloat16_raw{r.y}) {}
  operator __nv_bfloat162_raw() const {
    return __nv_bfloat162_raw{static_cast<__nv_bfloat16_raw>(x).x, static_cast<__nv_bfloat16_raw>(y).x};
  }
};

typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace cupylars_emu {
template <>
struct Float16Traits<__nv_bfloat16> {
  static constexpr bool value = true;
  static unsigned short bits(const __nv_bfloat16& h) { return static_cast<__nv_bfloat16_raw>(h).x; }
  static __nv_bfloat16 from_bits(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
};
template <>
struct Float16PairTraits<__nv_bfloat162> {
  static constexpr bool value = true;
  using element = __nv_bfloat16;
};
template <>
struct ExtraTypeCode<__nv_bfloat16> : std::integral_constant<int, kBFloat16> {};
}  // namespace cupylars_emu

// ---- conversions ------------------------------------------------------------------------------------
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  return __nv_bfloat16(__nv_bfloat16_raw{::cupylars_emu::float_to_bf16_rz(f)});
}
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline __nv_bfloat16 __int2bfloat16_rn(int v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __uint2bfloat16_rn(unsigned v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __short2bfloat16_rn(short v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __ushort2bfloat16_rn(unsigned short v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __ll2bfloat16_rn(long long v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __ull2bfloat16_rn(unsigned long long v) { return __nv_bfloat16(v); }
inline int __bfloat162int_rz(__nv_bfloat16 h) { return static_cast<int>(h); }
inline int __bfloat162int_rn(__nv_bfloat16 h) {
  return ::cupylars_emu::saturate_to<int>(nearbyintf(__bfloat162float(h)));
}
inline unsigned __bfloat162uint_rz(__nv_bfloat16 h) { return static_cast<unsigned>(h); }
inline short __bfloat162short_rz(__nv_bfloat16 h) { return static_cast<short>(h); }
inline unsigned short __bfloat162ushort_rz(__nv_bfloat16 h) { return static_cast<unsigned short>(h); }
inline long long __bfloat162ll_rz(__nv_bfloat16 h) { return static_cast<long long>(h); }
inline unsigned long long __bfloat162ull_rz(__nv_bfloat16 h) { return static_cast<unsigned long long>(h); }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return static_cast<__nv_bfloat16_raw>(h).x; }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return __ushort_as_bfloat16(static_cast<unsigned short>(b)); }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(__bfloat16_as_ushort(h)); }

inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __nv_bfloat162(__nv_bfloat16(f), __nv_bfloat16(f)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) {
  return __nv_bfloat162(__nv_bfloat16(f.x), __nv_bfloat16(f.y));
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x, b.x); }
inline __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.y, b.y); }
inline __nv_bfloat162 __lowhigh2highlow(__nv_bfloat162 h) { return __nv_bfloat162(h.y, h.x); }

CUPYLARS_EMU_FLOAT16_INTRINSICS(__nv_bfloat16, __nv_bfloat162)

#define CUDART_INF_BF16 __ushort_as_bfloat16((unsigned short)0x7F80U)
#define CUDART_NAN_BF16 __ushort_as_bfloat16((unsigned short)0x7FFFU)
#define CUDART_MIN_DENORM_BF16 __ushort_as_bfloat16((unsigned short)0x0001U)
#define CUDART_MAX_NORMAL_BF16 __ushort_as_bfloat16((unsigned short)0x7F7FU)
#define CUDART_NEG_ZERO_BF16 __ushort_as_bfloat16((unsigned short)0x8000U)
#define CUDART_ZERO_BF16 __ushort_as_bfloat16((unsigned short)0x0000U)
#define CUDART_ONE_BF16 __ushort_as_bfloat16((unsigned short)0x3F80U)

#endif  // CUPYLARS_CUDA_BF16_H
