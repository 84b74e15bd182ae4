// CPU stand-in for the CUDA device environment, so that unmodified .cu/.cuh
// kernel sources compile with g++ and run on the CPU (cupylars/_emulator.py).
//
// This header is force-included (g++ -include) ahead of the kernel sources and
// this folder is first on the include path, so <cuda_fp16.h>, <cuda_bf16.h>,
// <cuda_runtime.h> and <assert.h> resolve to the CPU versions next to it.
//
// Execution model
//   * The CUDA threads of a block are fibers on one OS thread (created with
//     makecontext, switched with _setjmp/_longjmp). A fiber runs until it
//     reaches a barrier (__syncthreads, __syncwarp, a warp shuffle/vote, ...),
//     a spin-wait hint (failed atomicCAS, __nanosleep) or the end of the
//     kernel; then the scheduler resumes the next fiber. Warp collectives are
//     computed by the scheduler once every lane named in the mask has arrived.
//   * Blocks run one after another. Optionally several OS threads take blocks
//     from a shared counter, each with its own fibers; __shared__ variables are
//     thread_local, hence private to the block an OS thread is running.
//   * Barriers follow CUDA's rules: exited threads do not take part. When no
//     fiber can run and no barrier can complete, the launch fails with a
//     deadlock report instead of hanging. Lanes named in one warp collective
//     must all make the same call with the same mask (else an error, where
//     the GPU's behaviour is undefined); a shuffle reading a lane that does not
//     take part returns all-ones bits (NaN / -1) rather than stale data.
//   * Lanes do not run in lockstep: __activemask() reports the lanes that reach
//     it before the rest of their warp blocks elsewhere or exits.
//   * A failing assert(), __trap() or deadlock ends the launch; the message is
//     handed back to Python, which raises it.
//
// Limits (see also cupylars/_emulator.py)
//   * Each fiber has a fixed stack (64 KiB by default) with a guard page below
//     it: a kernel overflowing it dies with SIGSEGV (Python's faulthandler then
//     points at the launch); raise the emulator's stack_size if that happens.
//   * Spin-waiting on another block never succeeds (blocks run one at a time);
//     it is reported as a livelock when the spin uses atomicCAS/__nanosleep,
//     and hangs when it polls plain or volatile memory.
//   * `extern __shared__` arrays get their storage from the generated launch
//     code (one buffer per distinct name, kDynamicSharedBytes long).
//   * Floating point is IEEE with no contraction (-ffp-contract=off): a*b+c
//     is never fused here; cupylars compiles with NVRTC's --fmad=false, so the
//     GPU does not fuse either, and both run the fmaf() the sources write.
//   * Subnormals flush to zero, as CuPy's -ftz=true makes them do on the GPU:
//     each OS thread of a launch sets FTZ and DAZ (x86-64 MXCSR) or FZ
//     (AArch64 FPCR) and restores the caller's bits afterwards. The CPU flag
//     also flushes float64 subnormals (< 2.2e-308), which the GPU keeps.
//     Other architectures run without flushing; the module reports it
//     (cupylars_emu_flushes_subnormals) so that tests can skip.
#ifndef CUPYLARS_CUDA_CPU_SHIM_H
#define CUPYLARS_CUDA_CPU_SHIM_H

#ifndef __cplusplus
#error "the CUDA CPU shim needs C++ (g++ -std=c++17)"
#endif

// Fortified longjmp refuses to jump to another stack, which is exactly what
// switching between fibers does.
#undef _FORTIFY_SOURCE

// All system headers come before the CUDA qualifier macros below: libstdc++
// spells some GCC attributes as __noinline__, which must not be redefined yet.
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cassert>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <math.h>
#include <mutex>
#include <new>
#include <stdexcept>
#include <stdint.h>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- what the sources see of the compiler ----------------------------------------------
// Device code paths are taken as if NVRTC compiled for sm_80; a -D on the
// command line (the emulator's `defines`) wins.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDACC_RTC__
#define __CUDACC_RTC__ 1
#endif
#define CUPYLARS_CPU_EMULATOR 1

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// __restrict__ is a g++ keyword already.
//
// __shared__ storage is per block. Blocks run one at a time on each OS thread
// and all fibers of a block share that OS thread, so thread_local storage is
// exactly "one copy per running block". (At block scope thread_local implies
// static; CUDA forbids initialisers on __shared__, so the one-time
// initialisation of a static is never relied upon.) Without `static`, an
// `extern __shared__ T name[];` declaration stays valid: the emulator defines
// `name` (see kDynamicSharedBytes).
#define __shared__ thread_local

#if defined(__has_builtin)
#if !__has_builtin(__builtin_assume)
#define __builtin_assume(x) ((void)0)
#endif
#endif

// ---- vector types -------------------------------------------------------------------------
// Same members, sizes and alignments as CUDA's vector_types.h.
#define CUPYLARS_EMU_VEC1(T, name, A)                           \
  struct __attribute__((aligned(A))) name {                     \
    T x;                                                        \
  };                                                            \
  inline name make_##name(T x) { return name{x}; }
#define CUPYLARS_EMU_VEC2(T, name, A)                           \
  struct __attribute__((aligned(A))) name {                     \
    T x, y;                                                     \
  };                                                            \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define CUPYLARS_EMU_VEC3(T, name, A)                           \
  struct __attribute__((aligned(A))) name {                     \
    T x, y, z;                                                  \
  };                                                            \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define CUPYLARS_EMU_VEC4(T, name, A)                           \
  struct __attribute__((aligned(A))) name {                     \
    T x, y, z, w;                                               \
  };                                                            \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#define CUPYLARS_EMU_VECS(T, prefix, A1, A2, A4) \
  CUPYLARS_EMU_VEC1(T, prefix##1, A1)            \
  CUPYLARS_EMU_VEC2(T, prefix##2, A2)            \
  CUPYLARS_EMU_VEC3(T, prefix##3, A1)            \
  CUPYLARS_EMU_VEC4(T, prefix##4, A4)

CUPYLARS_EMU_VECS(signed char, char, 1, 2, 4)
CUPYLARS_EMU_VECS(unsigned char, uchar, 1, 2, 4)
CUPYLARS_EMU_VECS(short, short, 2, 4, 8)
CUPYLARS_EMU_VECS(unsigned short, ushort, 2, 4, 8)
CUPYLARS_EMU_VECS(int, int, 4, 8, 16)
CUPYLARS_EMU_VECS(unsigned int, uint, 4, 8, 16)
CUPYLARS_EMU_VECS(long, long, sizeof(long), 2 * sizeof(long), 16)
CUPYLARS_EMU_VECS(unsigned long, ulong, sizeof(long), 2 * sizeof(long), 16)
CUPYLARS_EMU_VECS(long long, longlong, 8, 16, 16)
CUPYLARS_EMU_VECS(unsigned long long, ulonglong, 8, 16, 16)
CUPYLARS_EMU_VECS(float, float, 4, 8, 16)
CUPYLARS_EMU_VECS(double, double, 8, 16, 16)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

namespace cupylars_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;
// Storage of each `extern __shared__` array: the most dynamic shared memory a
// block may request on current GPUs (227 KiB on sm_90).
constexpr std::size_t kDynamicSharedBytes = 227 * 1024;
// Passes over a block in which every runnable fiber only spun (failed atomicCAS,
// __nanosleep) before the launch is declared a livelock. With several OS
// threads the spin may wait for another OS thread's block, so the spinning must
// also have lasted kMaxIdleSeconds.
constexpr unsigned kMaxIdlePasses = 1u << 16;
constexpr double kMaxIdleSeconds = 10.0;
// Bumped whenever the launch/signature entry points change.
constexpr int kAbiVersion = 2;

enum class State : unsigned char { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

// The warp-level collectives. All of them are a barrier of the lanes named in
// the mask; the scheduler computes every lane's result before any lane resumes.
enum class WarpOp : unsigned char {
  kSyncWarp,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kMatchAll,
  kReduceAdd,
  kReduceMinU,
  kReduceMaxU,
  kReduceMinI,
  kReduceMaxI,
  kReduceAnd,
  kReduceOr,
  kReduceXor,
  kActiveMask,  // not a barrier in CUDA: see release_warps
};

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncWarp: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kMatchAll: return "__match_all_sync";
    case WarpOp::kReduceAdd: return "__reduce_add_sync";
    case WarpOp::kReduceMinU:
    case WarpOp::kReduceMinI: return "__reduce_min_sync";
    case WarpOp::kReduceMaxU:
    case WarpOp::kReduceMaxI: return "__reduce_max_sync";
    case WarpOp::kReduceAnd: return "__reduce_and_sync";
    case WarpOp::kReduceOr: return "__reduce_or_sync";
    case WarpOp::kReduceXor: return "__reduce_xor_sync";
    case WarpOp::kActiveMask: return "__activemask";
  }
  return "?";
}

struct Worker;

// One CUDA thread.
struct Fiber {
  // The built-in variables, read through the threadIdx/... macros.
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned tid;   // linear index in the block
  unsigned lane;  // tid % 32
  unsigned warp;  // tid / 32
  State state;
  bool spun;  // came back to the scheduler from a spin-wait hint, not a barrier
  // What the fiber waits at and what it brings (filled in before switching).
  WarpOp op;
  unsigned mask;
  int arg_b;                 // shuffle source lane / delta / lane mask
  int arg_c;                 // shuffle clamp and segment mask, as PTX packs them
  unsigned long long value;  // the contributed value (bit pattern) or predicate
  int pred;                  // __syncthreads_count/and/or predicate; __match_all_sync output
  const char* barrier;       // name of the block barrier, for deadlock reports
  unsigned long long result;
  Worker* worker;
  ucontext_t context;  // the fiber's start: its stack and entry point
  jmp_buf jump;        // where the fiber stopped, once started
  bool started;
};

// State shared by every OS thread of one launch.
struct Launch {
  void (*invoke)(void*) = nullptr;  // runs the kernel once, for the current fiber
  void* closure = nullptr;
  dim3 grid, block;
  unsigned threads_per_block = 0;
  unsigned long long num_blocks = 0;
  std::size_t stack_size = 0;
  bool reverse = false;  // resume fibers from the highest thread index down
  unsigned workers = 1;  // OS threads sharing the blocks
  std::atomic<unsigned long long> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;

  // The first error wins; later ones (other OS threads) are dropped.
  void report(const char* message) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error.empty()) error = message;
    failed.store(true);
  }
};

// One OS thread's part of a launch: its fibers and scheduler context.
struct Worker {
  Launch* launch;
  Fiber* fibers;
  jmp_buf scheduler;
  bool aborted;
};

// The fiber running on this OS thread (null outside kernel code).
inline thread_local Fiber* tl_current = nullptr;

inline Fiber& current() { return *tl_current; }

// ---- ending a launch from inside a kernel ----------------------------------------------
inline int format_where(char* out, std::size_t size, const Fiber& f) {
  return std::snprintf(out, size, " [block (%u,%u,%u), thread (%u,%u,%u)]", f.block_idx.x, f.block_idx.y,
                       f.block_idx.z, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
}

// Records the error for the whole launch and leaves the fiber for good. Only
// fixed-size buffers live on the fiber stack here: it is abandoned, never unwound.
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* format, ...) {
  char message[1024];
  va_list args;
  va_start(args, format);
  int used = std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  Fiber* f = tl_current;
  if (f == nullptr) {  // not inside a launch: nothing to hand the error to
    std::fprintf(stderr, "cupylars emulator: %s\n", message);
    std::abort();
  }
  if (used >= 0 && static_cast<std::size_t>(used) < sizeof(message))
    format_where(message + used, sizeof(message) - used, *f);
  f->worker->launch->report(message);
  f->worker->aborted = true;
  f->state = State::kDone;
  _longjmp(f->worker->scheduler, 1);  // the scheduler never resumes a fiber of an aborted launch
}

// ---- barriers (called from fibers) ---------------------------------------------------------
// Fibers are created with makecontext and entered once with setcontext; after
// that, switches use _setjmp/_longjmp, which (unlike swapcontext) do not save
// and restore the signal mask with a system call on every switch. That makes
// barrier-heavy kernels several times faster. All fibers of a worker share its
// OS thread, so there is no other per-thread state to carry over.
__attribute__((noinline)) inline void switch_to_scheduler(Fiber* f) {
  if (_setjmp(f->jump) == 0) _longjmp(f->worker->scheduler, 1);
}

__attribute__((noinline)) inline void resume(Worker& w, Fiber& f) {
  tl_current = &f;
  if (_setjmp(w.scheduler) == 0) {
    if (f.started) _longjmp(f.jump, 1);
    f.started = true;
    setcontext(&f.context);
  }
  tl_current = nullptr;
}

// Waits until every non-exited thread of the block has arrived; returns the
// number of arrived threads with a true predicate in the low 32 bits and the
// number of arrived threads in the high 32 bits.
inline unsigned long long block_barrier(int pred, const char* name) {
  Fiber* f = tl_current;
  f->pred = pred != 0;
  f->barrier = name;
  f->state = State::kBlockBarrier;
  switch_to_scheduler(f);
  return f->result;
}

inline unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int b = 0,
                                          int c = 0) {
  Fiber* f = tl_current;
  if (((mask >> f->lane) & 1u) == 0)
    fail("%s(mask=0x%08x) called by lane %u, which is not in the mask", op_name(op), mask, f->lane);
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg_b = b;
  f->arg_c = c;
  f->state = State::kWarpBarrier;
  switch_to_scheduler(f);
  return f->result;
}

// Lets the other fibers of the block run (a spin-wait that cannot succeed
// before they do). Outside a launch it does nothing.
inline void spin_yield() {
  Fiber* f = tl_current;
  if (f == nullptr) return;
  f->spun = true;
  switch_to_scheduler(f);
}

inline unsigned alive_lanes(const Worker& w, unsigned warp) {
  const unsigned n = w.launch->threads_per_block;
  unsigned alive = 0;
  for (unsigned l = 0; l < kWarpSize && warp * kWarpSize + l < n; ++l)
    if (w.fibers[warp * kWarpSize + l].state != State::kDone) alive |= 1u << l;
  return alive;
}

template <class T>
inline unsigned long long to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp collectives move trivially copyable values of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(unsigned long long bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

// Packs width into PTX's shfl "c" operand: segment mask in bits 8-12, clamp in 0-4.
inline int shfl_c(int width, bool up) {
  if (width < 1 || width > static_cast<int>(kWarpSize) || (width & (width - 1)) != 0)
    fail("shuffle width %d is not a power of two in [1, 32]", width);
  return ((static_cast<int>(kWarpSize) - width) << 8) | (up ? 0 : 0x1f);
}

// ---- the scheduler -----------------------------------------------------------------------
inline void launch_error(Worker& w, const char* message) {
  w.launch->report(message);
  w.aborted = true;
}

// The source lane of a shuffle, following the PTX definition of shfl.sync
// (which is how CUDA's width argument behaves); -1 keeps the lane's own value.
inline int shfl_source(WarpOp op, int lane, int b, int c) {
  const int bval = b & 31, cval = c & 31, seg = (c >> 8) & 31;
  const int max_lane = (lane & seg) | (cval & ~seg);
  const int min_lane = lane & seg;
  int j = lane;
  bool ok = true;
  switch (op) {
    case WarpOp::kShflUp: j = lane - bval; ok = j >= max_lane; break;
    case WarpOp::kShflDown: j = lane + bval; ok = j <= max_lane; break;
    case WarpOp::kShflXor: j = lane ^ bval; ok = j <= max_lane; break;
    default: j = min_lane | (bval & ~seg); ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}

// The result of lane `l` of a completed collective among the lanes in `group`.
inline unsigned long long collective_result(const Fiber* lanes, unsigned l, unsigned group) {
  const Fiber& me = lanes[l];
  unsigned long long acc = 0;
  switch (me.op) {
    case WarpOp::kSyncWarp: return 0;
    case WarpOp::kShflIdx:
    case WarpOp::kShflUp:
    case WarpOp::kShflDown:
    case WarpOp::kShflXor: {
      const int j = shfl_source(me.op, static_cast<int>(l), me.arg_b, me.arg_c);
      // Reading a lane that does not take part is undefined in CUDA; all-ones
      // bits (NaN, or -1) make such a bug visible instead of plausible.
      return ((group >> j) & 1u) ? lanes[j].value : ~0ull;
    }
    case WarpOp::kBallot:
    case WarpOp::kAny:
    case WarpOp::kAll: {
      unsigned bits = 0;
      for (unsigned m = 0; m < kWarpSize; ++m)
        if (((group >> m) & 1u) && lanes[m].value != 0) bits |= 1u << m;
      if (me.op == WarpOp::kBallot) return bits;
      if (me.op == WarpOp::kAny) return bits != 0;
      return bits == group;
    }
    case WarpOp::kMatchAny:
    case WarpOp::kMatchAll: {
      unsigned same = 0;
      for (unsigned m = 0; m < kWarpSize; ++m)
        if (((group >> m) & 1u) && lanes[m].value == me.value) same |= 1u << m;
      if (me.op == WarpOp::kMatchAny) return same;
      return same == group ? group : 0;
    }
    default: break;
  }
  // The reductions (__reduce_*_sync) work on 32-bit values.
  bool first = true;
  for (unsigned m = 0; m < kWarpSize; ++m) {
    if (((group >> m) & 1u) == 0) continue;
    const unsigned u = static_cast<unsigned>(lanes[m].value);
    const int i = static_cast<int>(u);
    unsigned r = static_cast<unsigned>(acc);
    switch (me.op) {
      case WarpOp::kReduceAdd: r += u; break;
      case WarpOp::kReduceMinU: r = (first || u < r) ? u : r; break;
      case WarpOp::kReduceMaxU: r = (first || u > r) ? u : r; break;
      case WarpOp::kReduceMinI: r = (first || i < static_cast<int>(r)) ? u : r; break;
      case WarpOp::kReduceMaxI: r = (first || i > static_cast<int>(r)) ? u : r; break;
      case WarpOp::kReduceAnd: r = first ? u : (r & u); break;
      case WarpOp::kReduceOr: r |= u; break;
      case WarpOp::kReduceXor: r ^= u; break;
      default: break;
    }
    acc = r;
    first = false;
  }
  return acc;
}

// Completes every warp collective whose named, non-exited lanes have all
// arrived. Returns whether any lane was released.
inline bool release_warps(Worker& w) {
  const unsigned n = w.launch->threads_per_block;
  bool released = false;
  for (unsigned warp = 0; warp * kWarpSize < n; ++warp) {
    Fiber* lanes = w.fibers + warp * kWarpSize;
    const unsigned count = std::min(kWarpSize, n - warp * kWarpSize);
    // waiting: lanes in a collective; converging: lanes in __activemask().
    unsigned alive = 0, waiting = 0, converging = 0, runnable = 0;
    for (unsigned l = 0; l < count; ++l) {
      const State s = lanes[l].state;
      if (s != State::kDone) alive |= 1u << l;
      if (s == State::kRunnable) runnable |= 1u << l;
      if (s == State::kWarpBarrier) (lanes[l].op == WarpOp::kActiveMask ? converging : waiting) |= 1u << l;
    }
    unsigned ready = 0;
    for (unsigned l = 0; l < count; ++l)
      if (((waiting >> l) & 1u) && ((lanes[l].mask & alive) & ~waiting) == 0) ready |= 1u << l;
    if (ready == 0) {
      // The lanes that reached __activemask() while the rest of the warp is
      // blocked elsewhere or has exited are the ones "executing together".
      if (converging != 0 && runnable == 0) {
        for (unsigned l = 0; l < count; ++l)
          if ((converging >> l) & 1u) {
            lanes[l].result = converging;
            lanes[l].state = State::kRunnable;
          }
        released = true;
      }
      continue;
    }
    // CUDA requires every lane named in a mask to make the same call with the
    // same mask; anything else is undefined behaviour on the GPU.
    for (unsigned l = 0; l < count; ++l) {
      if (((ready >> l) & 1u) == 0) continue;
      const unsigned group = lanes[l].mask & alive;
      for (unsigned m = 0; m < count; ++m) {
        if (((group >> m) & 1u) == 0) continue;
        if ((lanes[m].mask & alive) != group || lanes[m].op != lanes[l].op) {
          char message[512];
          std::snprintf(message, sizeof(message),
                        "warp-synchronous calls do not match in block (%u,%u,%u), warp %u: lane %u is in "
                        "%s(mask=0x%08x) while lane %u is in %s(mask=0x%08x); every non-exited lane "
                        "named in a mask must make the same call with the same mask",
                        lanes[l].block_idx.x, lanes[l].block_idx.y, lanes[l].block_idx.z, warp, l,
                        op_name(lanes[l].op), lanes[l].mask, m, op_name(lanes[m].op), lanes[m].mask);
          launch_error(w, message);
          return false;
        }
      }
    }
    for (unsigned l = 0; l < count; ++l)
      if ((ready >> l) & 1u) {
        lanes[l].result = collective_result(lanes, l, lanes[l].mask & alive);
        if (lanes[l].op == WarpOp::kMatchAll) lanes[l].pred = lanes[l].result != 0;
      }
    for (unsigned l = 0; l < count; ++l)
      if ((ready >> l) & 1u) lanes[l].state = State::kRunnable;
    released = true;
  }
  return released;
}

inline void release_block(Worker& w) {
  const unsigned n = w.launch->threads_per_block;
  unsigned long long arrived = 0, count = 0;
  for (unsigned i = 0; i < n; ++i)
    if (w.fibers[i].state == State::kBlockBarrier) {
      ++arrived;
      count += w.fibers[i].pred != 0;
    }
  for (unsigned i = 0; i < n; ++i)
    if (w.fibers[i].state == State::kBlockBarrier) {
      w.fibers[i].result = count | (arrived << 32);
      w.fibers[i].state = State::kRunnable;
    }
}

// Explains why no fiber of the block can go on.
inline void report_deadlock(Worker& w) {
  const unsigned n = w.launch->threads_per_block;
  const Fiber& any = w.fibers[0];
  std::string text;
  char line[512];
  unsigned at_block = 0, exited = 0, first_block = n;
  for (unsigned i = 0; i < n; ++i) {
    if (w.fibers[i].state == State::kBlockBarrier) {
      if (at_block++ == 0) first_block = i;
    }
    if (w.fibers[i].state == State::kDone) ++exited;
  }
  std::snprintf(line, sizeof(line), "deadlock in block (%u,%u,%u): no thread can make progress.",
                any.block_idx.x, any.block_idx.y, any.block_idx.z);
  text += line;
  if (at_block) {
    const Fiber& f = w.fibers[first_block];
    std::snprintf(line, sizeof(line), " %u thread(s) wait at %s (first: thread (%u,%u,%u)).", at_block,
                  f.barrier, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
    text += line;
  }
  unsigned shown = 0;
  for (unsigned warp = 0; warp * kWarpSize < n && shown < 3; ++warp) {
    const Fiber* lanes = w.fibers + warp * kWarpSize;
    const unsigned count = std::min(kWarpSize, n - warp * kWarpSize);
    const unsigned alive = alive_lanes(w, warp);
    unsigned waiting = 0;
    for (unsigned l = 0; l < count; ++l)
      if (lanes[l].state == State::kWarpBarrier) waiting |= 1u << l;
    for (unsigned l = 0; l < count; ++l) {
      if (((waiting >> l) & 1u) == 0) continue;
      const unsigned missing = lanes[l].mask & alive & ~waiting;
      std::snprintf(line, sizeof(line),
                    " Warp %u: lanes 0x%08x wait in %s(mask=0x%08x), for lanes 0x%08x that are elsewhere"
                    " (at a block barrier or in another warp-synchronous call).",
                    warp, waiting, op_name(lanes[l].op), lanes[l].mask, missing);
      text += line;
      ++shown;
      break;
    }
  }
  std::snprintf(line, sizeof(line), " %u of %u thread(s) have exited.", exited, n);
  text += line;
  launch_error(w, text.c_str());
}

// Runs every thread of one block to completion (or to the launch's failure).
inline bool run_block(Worker& w, const uint3& block_idx) {
  Launch& launch = *w.launch;
  const unsigned n = launch.threads_per_block;
  for (unsigned i = 0; i < n; ++i) {
    w.fibers[i].block_idx = block_idx;
    w.fibers[i].state = State::kRunnable;
  }
  unsigned idle_passes = 0;
  std::chrono::steady_clock::time_point idle_since;
  for (;;) {
    bool progressed = false;
    for (unsigned k = 0; k < n; ++k) {
      Fiber& f = w.fibers[launch.reverse ? n - 1 - k : k];
      if (f.state != State::kRunnable) continue;
      f.spun = false;
      resume(w, f);
      if (w.aborted) return false;
      progressed |= !f.spun;
    }
    unsigned done = 0, at_block = 0, runnable = 0;
    for (unsigned i = 0; i < n; ++i) {
      const State s = w.fibers[i].state;
      done += s == State::kDone;
      at_block += s == State::kBlockBarrier;
      runnable += s == State::kRunnable;
    }
    if (done == n) return true;
    if (release_warps(w)) {
      idle_passes = 0;
      continue;
    }
    if (w.aborted) return false;
    if (runnable > 0) {
      idle_passes = progressed ? 0 : idle_passes + 1;
      if (idle_passes == 1) idle_since = std::chrono::steady_clock::now();
      if (idle_passes > kMaxIdlePasses &&
          (launch.workers == 1 || std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_since)
                                          .count() > kMaxIdleSeconds)) {
        char message[512];
        std::snprintf(message, sizeof(message),
                      "livelock in block (%u,%u,%u): %u thread(s) keep spinning (failed atomicCAS or "
                      "__nanosleep) while no other thread makes progress; blocks run one at a time in "
                      "the emulator, so waiting for another block never succeeds",
                      block_idx.x, block_idx.y, block_idx.z, runnable);
        launch_error(w, message);
        return false;
      }
      continue;
    }
    if (at_block > 0 && at_block + done == n) {
      release_block(w);
      idle_passes = 0;
      continue;
    }
    report_deadlock(w);
    return false;
  }
}

// Fiber stacks, kept per OS thread across launches (mapping them is the
// expensive part). Each has an inaccessible guard page below it, so an
// overflow faults instead of silently overwriting a neighbouring stack.
struct StackPool {
  std::vector<char*> stacks;
  std::size_t size = 0;
  std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));

  ~StackPool() { release(); }
  void release() {
    for (char* s : stacks) munmap(s - page, size + page);
    stacks.clear();
  }
  void reserve(unsigned n, std::size_t stack_size) {
    stack_size = (stack_size + page - 1) / page * page;
    if (stack_size != size) {
      release();
      size = stack_size;
    }
    while (stacks.size() < n) {
      void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, page, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + page);
    }
  }
};

inline StackPool& stack_pool() {
  static thread_local StackPool pool;
  return pool;
}

// A fiber runs the kernel once per block for as long as the launch lasts: the
// scheduler marks it runnable again with the next block's index.
inline void fiber_main(unsigned lo, unsigned hi) {
  Fiber* f = reinterpret_cast<Fiber*>((static_cast<std::uintptr_t>(hi) << 32) | lo);
  for (;;) {
    bool threw = false;
    try {
      f->worker->launch->invoke(f->worker->launch->closure);
    } catch (...) {
      threw = true;  // fail() below, outside the handler: it never returns
    }
    if (threw) fail("a C++ exception escaped the kernel");
    f->state = State::kDone;
    switch_to_scheduler(f);
  }
}

// ---- float32 subnormals flush to zero, as on the GPU ------------------------------------------
// CuPy compiles every kernel with -ftz=true: subnormal inputs of float32 arithmetic
// read as zero and subnormal results become zero (sign kept). The CPU does the same
// in hardware once its control register says so. The register is per OS thread, so
// each worker sets it for the launch and puts the caller's bits back (Python and
// NumPy run on the calling thread afterwards). Set before the fibers are created:
// getcontext captures the register and setcontext restores it when a fiber starts.
#if defined(__x86_64__)
constexpr bool kFlushesSubnormals = true;
class FlushSubnormals {
 public:
  FlushSubnormals() : saved_(__builtin_ia32_stmxcsr()) { __builtin_ia32_ldmxcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { __builtin_ia32_ldmxcsr(saved_); }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
  static constexpr unsigned kFtz = 1u << 15;  // flush subnormal results to zero
  static constexpr unsigned kDaz = 1u << 6;   // read subnormal inputs as zero
  unsigned saved_;
};
#elif defined(__aarch64__)
constexpr bool kFlushesSubnormals = true;
class FlushSubnormals {
 public:
  // FZ flushes subnormal inputs and results alike (AArch64 has no separate DAZ).
  // (Inline assembly rather than builtins: g++ and clang++ spell those differently.)
  FlushSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    const unsigned long long flushed = saved_ | kFz;
    asm volatile("msr fpcr, %0" : : "r"(flushed));
  }
  ~FlushSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
  static constexpr unsigned long long kFz = 1ull << 24;
  unsigned long long saved_;
};
#else
// No flush control known here: the module says so (cupylars_emu_flushes_subnormals)
// and results differ from the GPU's where a float32 subnormal occurs.
constexpr bool kFlushesSubnormals = false;
struct FlushSubnormals {};
#endif

// Kept out of run_worker: getcontext "returns twice", which would make the
// compiler pessimise (and warn about) the caller's locals.
__attribute__((noinline)) inline void start_fiber(Fiber& f, char* stack, std::size_t size) {
  if (getcontext(&f.context) != 0) throw std::runtime_error("getcontext failed");
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = size;
  f.context.uc_link = nullptr;
  const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(&f);
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 2, static_cast<unsigned>(address & 0xffffffffu),
              static_cast<unsigned>(address >> 32));
}

inline void run_worker(Launch& launch) {
  const FlushSubnormals flush;  // before start_fiber: the fibers' contexts capture it
  try {
    const unsigned n = launch.threads_per_block;
    StackPool& pool = stack_pool();
    pool.reserve(n, launch.stack_size);
    std::vector<Fiber> fibers(n);
    Worker w{&launch, fibers.data(), {}, false};
    const dim3 b = launch.block;
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fibers[i];
      f.thread_idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
      f.block_dim = launch.block;
      f.grid_dim = launch.grid;
      f.tid = i;
      f.lane = i % kWarpSize;
      f.warp = i / kWarpSize;
      f.worker = &w;
      start_fiber(f, pool.stacks[i], pool.size);
    }
    const dim3 g = launch.grid;
    for (;;) {
      if (launch.failed.load()) break;
      const unsigned long long linear = launch.next_block.fetch_add(1);
      if (linear >= launch.num_blocks) break;
      const uint3 block_idx{static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                            static_cast<unsigned>(linear / (static_cast<unsigned long long>(g.x) * g.y))};
      if (!run_block(w, block_idx)) break;
    }
  } catch (const std::exception& e) {
    char message[256];
    std::snprintf(message, sizeof(message), "emulator could not run the launch: %s", e.what());
    launch.report(message);
  }
}

inline void write_error(char* out, std::size_t size, const char* message) {
  if (out != nullptr && size > 0) std::snprintf(out, size, "%s", message);
}

// config: grid x,y,z, block x,y,z, OS threads, fiber stack bytes, reverse order.
inline int run_grid(const long long* config, void (*invoke)(void*), void* closure, char* error,
                    std::size_t error_size) {
  const long long gx = config[0], gy = config[1], gz = config[2];
  const long long bx = config[3], by = config[4], bz = config[5];
  char message[256];
  if (gx < 1 || gy < 1 || gz < 1 || gx > INT_MAX || gy > 65535 || gz > 65535) {
    std::snprintf(message, sizeof(message), "invalid grid (%lld, %lld, %lld)", gx, gy, gz);
    write_error(error, error_size, message);
    return 2;
  }
  if (bx < 1 || by < 1 || bz < 1 || bx > 1024 || by > 1024 || bz > 64 || bx * by * bz > kMaxBlockThreads) {
    std::snprintf(message, sizeof(message), "invalid block (%lld, %lld, %lld)", bx, by, bz);
    write_error(error, error_size, message);
    return 2;
  }
  Launch launch;
  launch.invoke = invoke;
  launch.closure = closure;
  launch.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  launch.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz));
  launch.threads_per_block = static_cast<unsigned>(bx * by * bz);
  launch.num_blocks = static_cast<unsigned long long>(gx) * gy * gz;
  launch.stack_size = static_cast<std::size_t>(std::max(config[7], 16384LL));
  launch.reverse = config[8] != 0;
  const unsigned long long workers =
      std::min<unsigned long long>(static_cast<unsigned long long>(std::max(config[6], 1LL)), launch.num_blocks);
  launch.workers = static_cast<unsigned>(workers);
  if (workers <= 1) {
    run_worker(launch);
  } else {
    // The calling thread is one of the workers (its fiber stacks stay cached).
    std::vector<std::thread> threads;
    try {
      for (unsigned long long i = 1; i < workers; ++i) threads.emplace_back(run_worker, std::ref(launch));
    } catch (...) {
      launch.report("emulator could not start its worker threads");
    }
    run_worker(launch);
    for (std::thread& t : threads) t.join();
  }
  if (launch.failed.load()) {
    write_error(error, error_size, launch.error.c_str());
    return 1;
  }
  return 0;
}

// ---- kernel entry points (instantiated by the generated code) -----------------------------
// Type codes of the signature descriptor, mirrored in cupylars/_emulator.py.
enum TypeCode : int {
  kOther = 0,
  kSigned = 1,
  kUnsigned = 2,
  kFloating = 3,
  kBool = 4,
  kPointer = 5,
  kHalf = 6,
  kBFloat16 = 7,
  kVoid = 8,
};

// Specialised by cuda_fp16.h / cuda_bf16.h for their types.
template <class T>
struct ExtraTypeCode : std::integral_constant<int, kOther> {};

template <class T>
constexpr int type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_void<U>::value) return kVoid;
  else if constexpr (std::is_pointer<U>::value) return kPointer;
  else if constexpr (std::is_same<U, bool>::value) return kBool;
  else if constexpr (std::is_integral<U>::value) return std::is_signed<U>::value ? kSigned : kUnsigned;
  else if constexpr (std::is_floating_point<U>::value) return kFloating;
  else return ExtraTypeCode<U>::value;
}

template <class T>
constexpr int size_of() {
  if constexpr (std::is_void<T>::value) return 0;
  else return static_cast<int>(sizeof(T));
}

template <class T>
constexpr int align_of() {
  if constexpr (std::is_void<T>::value) return 1;
  else return static_cast<int>(alignof(T));
}

// Per parameter: type code, size, and for pointers the pointee's code, size and alignment.
constexpr int kSignatureFields = 5;

template <class T>
inline void describe(int* out) {
  using U = std::remove_cv_t<T>;
  out[0] = type_code<U>();
  out[1] = size_of<U>();
  if constexpr (std::is_pointer<U>::value) {
    using P = std::remove_cv_t<std::remove_pointer_t<U>>;
    out[2] = type_code<P>();
    out[3] = size_of<P>();
    out[4] = align_of<P>();
  } else {
    out[2] = out[3] = out[4] = 0;
  }
}

template <class... A>
int kernel_signature(void (*)(A...), int* out, int capacity) noexcept {
  constexpr int n = static_cast<int>(sizeof...(A));
  if (out != nullptr && capacity >= n * kSignatureFields) {
    int i = 0;
    ((describe<A>(out + kSignatureFields * i++)), ...);
  }
  return n;
}

template <class T>
inline T load_argument(void* slot) {
  static_assert(std::is_trivially_copyable<T>::value, "kernel parameters must be trivially copyable");
  T value;
  std::memcpy(static_cast<void*>(&value), slot, sizeof(T));
  return value;
}

template <class... A, std::size_t... I>
inline std::tuple<std::remove_cv_t<A>...> load_arguments(void** argv, std::index_sequence<I...>) {
  return std::tuple<std::remove_cv_t<A>...>(load_argument<std::remove_cv_t<A>>(argv[I])...);
}

template <class... A>
int launch_kernel(void (*kernel)(A...), const long long* config, void** argv, int nargs, char* error,
                  std::size_t error_size) noexcept {
  try {
    if (nargs != static_cast<int>(sizeof...(A))) {
      char message[128];
      std::snprintf(message, sizeof(message), "kernel takes %d argument(s), got %d",
                    static_cast<int>(sizeof...(A)), nargs);
      write_error(error, error_size, message);
      return 2;
    }
    struct Closure {
      void (*kernel)(A...);
      std::tuple<std::remove_cv_t<A>...> args;
    };
    Closure closure{kernel, load_arguments<A...>(argv, std::index_sequence_for<A...>{})};
    auto invoke = [](void* p) {
      Closure* c = static_cast<Closure*>(p);
      std::apply(c->kernel, c->args);
    };
    return run_grid(config, invoke, &closure, error, error_size);
  } catch (const std::exception& e) {
    write_error(error, error_size, e.what());
    return 3;
  }
}

// ---- IEEE helpers for the 16-bit float types --------------------------------------------------
template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(static_cast<void*>(&to), &from, sizeof(To));
  return to;
}

// Rounds x to float "to odd": truncate, then set the last bit if anything was
// lost. Rounding that result to nearest-even at 16 bits equals rounding x
// directly, since float keeps more than two extra bits.
template <class W>
inline float round_to_odd_float(W x) {
  if (std::isnan(x)) return std::numeric_limits<float>::quiet_NaN();
  float f = static_cast<float>(x);
  if (static_cast<W>(f) == x || std::isinf(static_cast<W>(x))) return f;
  if (std::fabs(static_cast<W>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  return bit_cast<float>(bit_cast<std::uint32_t>(f) | 1u);
}

// x = a*b + c, rounded to odd at double precision (a*b is exact: 16-bit inputs).
inline double fma16_round_to_odd(double a, double b, double c) {
  const double p = a * b;
  const double s = p + c;
  if (!std::isfinite(s)) return s;
  const double bp = s - p;
  const double e = (p - (s - bp)) + (c - bp);  // exact: p + c == s + e
  if (e == 0) return s;
  double t = s;
  if ((s > 0) != (e > 0) && s != 0) t = std::nextafter(s, 0.0);
  std::uint64_t bits = bit_cast<std::uint64_t>(t);
  return bit_cast<double>(bits | 1u);
}

inline unsigned short float_to_half_rn(float f) {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;  // NaN: CUDA returns the canonical NaN
  if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {  // normal half: keep 10 mantissa bits, round to nearest even
    ax += 0xfffu + ((ax >> 13) & 1u);
    return static_cast<unsigned short>(sign | ((ax - 0x38000000u) >> 13));
  }
  // Subnormal half (or zero): the ulp of [0.5, 1) is 2^-24, the half subnormal
  // step, so adding 0.5 rounds to the right multiple with the FPU's own RNE.
  const float shifted = bit_cast<float>(ax) + 0.5f;
  return static_cast<unsigned short>(sign | (bit_cast<std::uint32_t>(shifted) - 0x3f000000u));
}

inline unsigned short float_to_half_rz(float f) {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;
  if (ax == 0x7f800000u) return static_cast<unsigned short>(sign | 0x7c00u);
  if (ax >= 0x47800000u) return static_cast<unsigned short>(sign | 0x7bffu);  // finite: largest half
  if (ax >= 0x38800000u) return static_cast<unsigned short>(sign | ((ax - 0x38000000u) >> 13));
  return static_cast<unsigned short>(sign | static_cast<std::uint32_t>(bit_cast<float>(ax) * 16777216.0f));
}

inline float half_to_float(unsigned short h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  // NaN becomes CUDA's canonical float NaN, 0x7fffffff.
  if (exponent == 0x1f) return bit_cast<float>(mantissa ? 0x7fffffffu : (sign | 0x7f800000u));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24, exact
    return sign ? -magnitude : magnitude;
  }
  return bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline unsigned short float_to_bf16_rn(float f) {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical, as CUDA
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline unsigned short float_to_bf16_rz(float f) {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<unsigned short>(x >> 16);
}

inline float bf16_to_float(unsigned short b) { return bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

// float -> integer the way the GPU converts: saturating, NaN gives 0.
template <class I, class F>
inline I saturate_to(F rounded) {
  if (std::isnan(rounded)) return 0;
  if (rounded <= static_cast<F>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (rounded >= static_cast<F>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(rounded);
}

// Marks the 16-bit float types (specialised by cuda_fp16.h / cuda_bf16.h);
// `bits`/`from_bits` reach their storage through the CUDA raw structs.
template <class T>
struct Float16Traits {
  static constexpr bool value = false;
};

}  // namespace cupylars_emu

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cupylars_emu::current().thread_idx))
#define blockIdx (static_cast<const uint3&>(::cupylars_emu::current().block_idx))
#define blockDim (static_cast<const dim3&>(::cupylars_emu::current().block_dim))
#define gridDim (static_cast<const dim3&>(::cupylars_emu::current().grid_dim))

// ---- synchronisation -----------------------------------------------------------------------------
inline void __syncthreads() { ::cupylars_emu::block_barrier(1, "__syncthreads()"); }
inline int __syncthreads_count(int predicate) {
  return static_cast<int>(::cupylars_emu::block_barrier(predicate, "__syncthreads_count()") & 0xffffffffu);
}
inline int __syncthreads_and(int predicate) {
  const unsigned long long r = ::cupylars_emu::block_barrier(predicate, "__syncthreads_and()");
  return (r & 0xffffffffu) == (r >> 32);
}
inline int __syncthreads_or(int predicate) {
  return (::cupylars_emu::block_barrier(predicate, "__syncthreads_or()") & 0xffffffffu) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kSyncWarp, mask, 0);
}
// Fences: one OS thread runs all fibers of a block, so ordering within a block
// is a compiler matter; across OS threads (blocks) a real fence.
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { ::cupylars_emu::spin_yield(); }

// ---- warp shuffles and votes -----------------------------------------------------------------------
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  using namespace ::cupylars_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflIdx, mask, to_bits(var), srcLane, shfl_c(width, false)));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize) {
  using namespace ::cupylars_emu;
  return from_bits<T>(
      warp_collective(WarpOp::kShflUp, mask, to_bits(var), static_cast<int>(delta), shfl_c(width, true)));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize) {
  using namespace ::cupylars_emu;
  return from_bits<T>(
      warp_collective(WarpOp::kShflDown, mask, to_bits(var), static_cast<int>(delta), shfl_c(width, false)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  using namespace ::cupylars_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), laneMask, shfl_c(width, false)));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(
      ::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kBallot, mask, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kAny, mask, predicate != 0));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kAll, mask, predicate != 0));
}
// Fibers do not run in lockstep, so "the lanes executing this call together"
// is approximated by the lanes that reach __activemask() before the rest of
// the warp blocks elsewhere or exits: a converged warp gets all its lanes, a
// divergent branch the lanes that took it.
inline unsigned __activemask() {
  const unsigned lane = ::cupylars_emu::current().lane;
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kActiveMask, 1u << lane, 0));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  using namespace ::cupylars_emu;
  return static_cast<unsigned>(warp_collective(WarpOp::kMatchAny, mask, to_bits(value)));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  using namespace ::cupylars_emu;
  const unsigned r = static_cast<unsigned>(warp_collective(WarpOp::kMatchAll, mask, to_bits(value)));
  *pred = current().pred;
  return r;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceAdd, mask, value));
}
inline int __reduce_add_sync(unsigned mask, int value) {
  return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(value)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceMinU, mask, value));
}
inline int __reduce_min_sync(unsigned mask, int value) {
  return static_cast<int>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceMinI, mask,
                                                          static_cast<unsigned>(value)));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceMaxU, mask, value));
}
inline int __reduce_max_sync(unsigned mask, int value) {
  return static_cast<int>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceMaxI, mask,
                                                          static_cast<unsigned>(value)));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceAnd, mask, value));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceOr, mask, value));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(::cupylars_emu::warp_collective(::cupylars_emu::WarpOp::kReduceXor, mask, value));
}

// ---- errors ----------------------------------------------------------------------------------------
[[noreturn]] inline void __trap() { ::cupylars_emu::fail("__trap() called"); }
[[noreturn]] inline void __brkpt() { ::cupylars_emu::fail("__brkpt() called"); }

[[noreturn]] inline void cupylars_emu_assert_fail(const char* expr, const char* file, unsigned line,
                                                   const char* func) {
  ::cupylars_emu::fail("%s:%u: %s: device-side assertion `%s' failed", file, line, func, expr);
}

// ---- atomics -----------------------------------------------------------------------------------------
// Relaxed, like CUDA's atomics. GCC's __atomic builtins work on plain memory,
// which matters when blocks run on several OS threads.
namespace cupylars_emu {
template <class T, class Op>
inline T atomic_update(T* address, Op op) {
  using Bits = std::conditional_t<sizeof(T) == 2, std::uint16_t,
                                  std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>;
  static_assert(sizeof(T) == sizeof(Bits), "atomic_update works on 2, 4 and 8 byte values");
  Bits* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    const T old = bit_cast<T>(expected);
    const Bits desired = bit_cast<Bits>(static_cast<T>(op(old)));
    if (__atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old;
  }
}

template <class T>
inline T atomic_cas(T* address, T compare, T val) {
  T expected = compare;
  if (!__atomic_compare_exchange_n(address, &expected, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    // A failed CAS is usually a spin-wait: let the other fibers of the block run.
    spin_yield();
  }
  return expected;
}
}  // namespace cupylars_emu

// The overload set follows CUDA's: long long has no atomicAdd/Exch/CAS there.
#define CUPYLARS_EMU_ATOMIC_BITWISE(T)                                                                  \
  inline T atomicMin(T* a, T v) {                                                                      \
    return ::cupylars_emu::atomic_update(a, [v](T old) { return v < old ? v : old; });                 \
  }                                                                                                     \
  inline T atomicMax(T* a, T v) {                                                                      \
    return ::cupylars_emu::atomic_update(a, [v](T old) { return v > old ? v : old; });                 \
  }                                                                                                     \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }                   \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }
#define CUPYLARS_EMU_ATOMIC_ARITHMETIC(T)                                                               \
  CUPYLARS_EMU_ATOMIC_BITWISE(T)                                                                        \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }               \
  inline T atomicCAS(T* a, T compare, T v) { return ::cupylars_emu::atomic_cas(a, compare, v); }
CUPYLARS_EMU_ATOMIC_ARITHMETIC(int)
CUPYLARS_EMU_ATOMIC_ARITHMETIC(unsigned int)
CUPYLARS_EMU_ATOMIC_ARITHMETIC(unsigned long long)
CUPYLARS_EMU_ATOMIC_BITWISE(long long)
#undef CUPYLARS_EMU_ATOMIC_ARITHMETIC
#undef CUPYLARS_EMU_ATOMIC_BITWISE
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  return ::cupylars_emu::atomic_cas(a, compare, v);
}
// atomicInc/atomicDec wrap at `limit` as CUDA defines them.
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return ::cupylars_emu::atomic_update(a, [limit](unsigned old) { return old >= limit ? 0u : old + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return ::cupylars_emu::atomic_update(
      a, [limit](unsigned old) { return (old == 0u || old > limit) ? limit : old - 1u; });
}
inline float atomicAdd(float* a, float v) {
  return ::cupylars_emu::atomic_update(a, [v](float old) { return old + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::cupylars_emu::atomic_update(a, [v](double old) { return old + v; });
}
inline float atomicExch(float* a, float v) {
  return ::cupylars_emu::atomic_update(a, [v](float) { return v; });
}

// ---- memory access hints -----------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// ---- bit reinterpretation and integer intrinsics ------------------------------------------------------
inline unsigned __float_as_uint(float x) { return ::cupylars_emu::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return ::cupylars_emu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return ::cupylars_emu::bit_cast<int>(x); }
inline float __int_as_float(int x) { return ::cupylars_emu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::cupylars_emu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::cupylars_emu::bit_cast<double>(x); }
inline int __double2hiint(double x) { return static_cast<int>(__double_as_longlong(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(__double_as_longlong(x) & 0xffffffffLL); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double(static_cast<long long>((static_cast<unsigned long long>(static_cast<unsigned>(hi))
                                                      << 32) |
                                                     static_cast<unsigned>(lo)));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline int __mul24(int x, int y) {
  return static_cast<int>((static_cast<long long>(x << 8 >> 8) * (y << 8 >> 8)) & 0xffffffffLL);
}
inline unsigned __umul24(unsigned x, unsigned y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return static_cast<int>((static_cast<long long>(x) * y) >> 32); }
inline unsigned __umulhi(unsigned x, unsigned y) {
  return static_cast<unsigned>((static_cast<unsigned long long>(x) * y) >> 32);
}
inline long long __mul64hi(long long x, long long y) {
  return static_cast<long long>((static_cast<__int128>(x) * y) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}
inline int __hadd(int x, int y) { return static_cast<int>((static_cast<long long>(x) + y) >> 1); }
inline int __rhadd(int x, int y) { return static_cast<int>((static_cast<long long>(x) + y + 1) >> 1); }
inline unsigned __uhadd(unsigned x, unsigned y) {
  return static_cast<unsigned>((static_cast<unsigned long long>(x) + y) >> 1);
}
inline unsigned __urhadd(unsigned x, unsigned y) {
  return static_cast<unsigned>((static_cast<unsigned long long>(x) + y + 1) >> 1);
}

// ---- min / max (CUDA's overload set) -------------------------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long min(long a, unsigned long b) { return min(static_cast<unsigned long>(a), b); }
inline unsigned long max(long a, unsigned long b) { return max(static_cast<unsigned long>(a), b); }
inline unsigned long min(unsigned long a, long b) { return min(a, static_cast<unsigned long>(b)); }
inline unsigned long max(unsigned long a, long b) { return max(a, static_cast<unsigned long>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(long long a, unsigned long long b) {
  return min(static_cast<unsigned long long>(a), b);
}
inline unsigned long long max(long long a, unsigned long long b) {
  return max(static_cast<unsigned long long>(a), b);
}
inline unsigned long long min(unsigned long long a, long long b) {
  return min(a, static_cast<unsigned long long>(b));
}
inline unsigned long long max(unsigned long long a, long long b) {
  return max(a, static_cast<unsigned long long>(b));
}
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return fmax(a, static_cast<double>(b)); }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ---- float / double intrinsics ---------------------------------------------------------------------------
// The _rn arithmetic intrinsics are plain IEEE operations here (-ffp-contract=off
// keeps them from being fused). The fast-math approximations (__expf, ...) use
// the accurate libm functions, so they do not match the GPU's bits.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline double rcbrt(double x) { return 1.0 / cbrt(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float fdividef(float x, float y) { return x / y; }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dsub_rn(double x, double y) { return x - y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __ddiv_rn(double x, double y) { return x / y; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }

inline int __float2int_rn(float x) { return ::cupylars_emu::saturate_to<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return ::cupylars_emu::saturate_to<int>(truncf(x)); }
inline int __float2int_rd(float x) { return ::cupylars_emu::saturate_to<int>(floorf(x)); }
inline int __float2int_ru(float x) { return ::cupylars_emu::saturate_to<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return ::cupylars_emu::saturate_to<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return ::cupylars_emu::saturate_to<unsigned>(truncf(x)); }
inline unsigned __float2uint_rd(float x) { return ::cupylars_emu::saturate_to<unsigned>(floorf(x)); }
inline unsigned __float2uint_ru(float x) { return ::cupylars_emu::saturate_to<unsigned>(ceilf(x)); }
inline long long __float2ll_rn(float x) { return ::cupylars_emu::saturate_to<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return ::cupylars_emu::saturate_to<long long>(truncf(x)); }
inline unsigned long long __float2ull_rn(float x) {
  return ::cupylars_emu::saturate_to<unsigned long long>(nearbyintf(x));
}
inline unsigned long long __float2ull_rz(float x) {
  return ::cupylars_emu::saturate_to<unsigned long long>(truncf(x));
}
inline int __double2int_rn(double x) { return ::cupylars_emu::saturate_to<int>(nearbyint(x)); }
inline int __double2int_rz(double x) { return ::cupylars_emu::saturate_to<int>(trunc(x)); }
inline long long __double2ll_rn(double x) { return ::cupylars_emu::saturate_to<long long>(nearbyint(x)); }
inline long long __double2ll_rz(double x) { return ::cupylars_emu::saturate_to<long long>(trunc(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __ull2float_rn(unsigned long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

// ---- timing ---------------------------------------------------------------------------------------------
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---- generated entry points ------------------------------------------------------------------------------
// The emulator's generated translation unit includes the kernel sources and
// then exports each requested kernel with this macro: a launcher that reads the
// arguments with the kernel's own parameter types, and a signature descriptor
// that lets Python check the arguments first.
#define CUPYLARS_EMU_EXPORT_KERNEL(name)                                                                     \
  extern "C" __attribute__((visibility("default"))) int cupylars_launch_##name(                              \
      const long long* config, void** argv, int nargs, char* error, unsigned long error_size) {               \
    return ::cupylars_emu::launch_kernel(&name, config, argv, nargs, error, error_size);                      \
  }                                                                                                           \
  extern "C" __attribute__((visibility("default"))) int cupylars_signature_##name(int* out, int capacity) {  \
    return ::cupylars_emu::kernel_signature(&name, out, capacity);                                            \
  }

#define CUPYLARS_EMU_EXPORT_MODULE()                                                                         \
  extern "C" __attribute__((visibility("default"))) int cupylars_emu_abi_version() {                        \
    return ::cupylars_emu::kAbiVersion;                                                                     \
  }                                                                                                          \
  extern "C" __attribute__((visibility("default"))) int cupylars_emu_flushes_subnormals() {                  \
    return ::cupylars_emu::kFlushesSubnormals ? 1 : 0;                                                      \
  }

#endif  // CUPYLARS_CUDA_CPU_SHIM_H
