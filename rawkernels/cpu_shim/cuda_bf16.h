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
// bfloat16 (the upper half of a float) for Storage16 / Pair16 (cupylars_float16_common.h).
struct BFloat16Codec {
  using raw = __nv_bfloat16_raw;
  using raw2 = __nv_bfloat162_raw;
  static unsigned short encode(float f) { return float_to_bf16_rn(f); }
  static float decode(unsigned short bits) { return bf16_to_float(bits); }
};
}  // namespace cupylars_emu

// The class body is Storage16, shared with __half; only the assignment from
// the raw struct is declared here, so that it returns __nv_bfloat16&.
struct __align__(2) __nv_bfloat16
    : ::cupylars_emu::storage16::Storage16<::cupylars_emu::BFloat16Codec> {
  using Storage16::Storage16;
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
    __x = r.x;
    return *this;
  }
};

struct __align__(4) __nv_bfloat162
    : ::cupylars_emu::storage16::Pair16<__nv_bfloat16, ::cupylars_emu::BFloat16Codec> {
  using Pair16::Pair16;
};

typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace cupylars_emu {
template <>
struct Float16Traits<__nv_bfloat16> : Storage16Traits<__nv_bfloat16, BFloat16Codec> {};
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

CUPYLARS_EMU_FLOAT16_INTRINSICS(__nv_bfloat16, __nv_bfloat162)

#define CUDART_INF_BF16 __ushort_as_bfloat16((unsigned short)0x7F80U)
#define CUDART_NAN_BF16 __ushort_as_bfloat16((unsigned short)0x7FFFU)
#define CUDART_MIN_DENORM_BF16 __ushort_as_bfloat16((unsigned short)0x0001U)
#define CUDART_MAX_NORMAL_BF16 __ushort_as_bfloat16((unsigned short)0x7F7FU)
#define CUDART_NEG_ZERO_BF16 __ushort_as_bfloat16((unsigned short)0x8000U)
#define CUDART_ZERO_BF16 __ushort_as_bfloat16((unsigned short)0x0000U)
#define CUDART_ONE_BF16 __ushort_as_bfloat16((unsigned short)0x3F80U)

#endif  // CUPYLARS_CUDA_BF16_H
