// Stand-in for <assert.h> (and, through it, <cassert>): a failing device-side
// assert() ends the emulated launch with an error that Python raises, instead
// of abort()ing the whole process. Like the real header it has no include
// guard: NDEBUG is re-checked at every inclusion.
#include_next <assert.h>

#undef assert
#ifdef NDEBUG
#define assert(expr) (static_cast<void>(0))
#else
[[noreturn]] inline void cupylars_emu_assert_fail(const char* expr, const char* file, unsigned line,
                                                   const char* func);
#define assert(expr) \
  (static_cast<bool>(expr) ? static_cast<void>(0) : cupylars_emu_assert_fail(#expr, __FILE__, __LINE__, __func__))
#endif
