// CPU stand-in for CUDA's <cuda_fp16.h>: __half and __half2 with the same
// layout, conversions and (commonly used) intrinsics, rounded exactly as the
// GPU rounds. Conversions of NaN give CUDA's canonical NaN (0x7fff / 0x7fffffff).
#ifndef CUPYLARS_CUDA_FP16_H
#define CUPYLARS_CUDA_FP16_H

#include "cupylars_float16_common.h"

struct __half_raw {
  unsigned short x;
};

struct __half2_raw {
  unsigned short x, y;
};

namespace cupylars_emu {
// IEEE binary16 for Storage16 / Pair16 (cupylars_float16_common.h).
struct HalfCodec {
  using raw = __half_raw;
  using raw2 = __half2_raw;
  static unsigned short encode(float f) { return float_to_half_rn(f); }
  static float decode(unsigned short bits) { return half_to_float(bits); }
};
}  // namespace cupylars_emu

// The class body is Storage16, shared with __nv_bfloat16; only the assignment from
// the raw struct is declared here, so that it returns __half&.
struct __align__(2) __half : ::cupylars_emu::storage16::Storage16<::cupylars_emu::HalfCodec> {
  using Storage16::Storage16;
  __half& operator=(const __half_raw& r) {
    __x = r.x;
    return *this;
  }
};

struct __align__(4) __half2 : ::cupylars_emu::storage16::Pair16<__half, ::cupylars_emu::HalfCodec> {
  using Pair16::Pair16;
};

typedef __half half;
typedef __half2 half2;
typedef __half2 __nv_half2;
typedef __half2 nv_half2;

namespace cupylars_emu {
template <>
struct Float16Traits<__half> : Storage16Traits<__half, HalfCodec> {};
template <>
struct Float16PairTraits<__half2> {
  static constexpr bool value = true;
  using element = __half;
};
template <>
struct ExtraTypeCode<__half> : std::integral_constant<int, kHalf> {};
}  // namespace cupylars_emu

// ---- conversions ------------------------------------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half_rz(float f) { return __half(__half_raw{::cupylars_emu::float_to_half_rz(f)}); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __double2half(double d) { return __half(d); }
inline __half __int2half_rn(int v) { return __half(v); }
inline __half __uint2half_rn(unsigned v) { return __half(v); }
inline __half __short2half_rn(short v) { return __half(v); }
inline __half __ushort2half_rn(unsigned short v) { return __half(v); }
inline __half __ll2half_rn(long long v) { return __half(v); }
inline __half __ull2half_rn(unsigned long long v) { return __half(v); }
inline int __half2int_rz(__half h) { return static_cast<int>(h); }
inline int __half2int_rn(__half h) { return ::cupylars_emu::saturate_to<int>(nearbyintf(__half2float(h))); }
inline unsigned __half2uint_rz(__half h) { return static_cast<unsigned>(h); }
inline short __half2short_rz(__half h) { return static_cast<short>(h); }
inline unsigned short __half2ushort_rz(__half h) { return static_cast<unsigned short>(h); }
inline long long __half2ll_rz(__half h) { return static_cast<long long>(h); }
inline unsigned long long __half2ull_rz(__half h) { return static_cast<unsigned long long>(h); }

inline __half __ushort_as_half(unsigned short b) { return __half(__half_raw{b}); }
inline unsigned short __half_as_ushort(__half h) { return static_cast<__half_raw>(h).x; }
inline __half __short_as_half(short b) { return __ushort_as_half(static_cast<unsigned short>(b)); }
inline short __half_as_short(__half h) { return static_cast<short>(__half_as_ushort(h)); }

inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half2 __float2half2_rn(float f) { return __half2(__half(f), __half(f)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float22half2_rn(float2 f) { return __half2(__half(f.x), __half(f.y)); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }

CUPYLARS_EMU_FLOAT16_INTRINSICS(__half, __half2)

#define CUDART_INF_FP16 __ushort_as_half((unsigned short)0x7C00U)
#define CUDART_NAN_FP16 __ushort_as_half((unsigned short)0x7FFFU)
#define CUDART_MIN_DENORM_FP16 __ushort_as_half((unsigned short)0x0001U)
#define CUDART_MAX_NORMAL_FP16 __ushort_as_half((unsigned short)0x7BFFU)
#define CUDART_NEG_ZERO_FP16 __ushort_as_half((unsigned short)0x8000U)
#define CUDART_ZERO_FP16 __ushort_as_half((unsigned short)0x0000U)
#define CUDART_ONE_FP16 __ushort_as_half((unsigned short)0x3C00U)

#endif  // CUPYLARS_CUDA_FP16_H
