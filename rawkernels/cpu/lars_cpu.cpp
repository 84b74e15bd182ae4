// The native CPU backend: the LARS step of lars_kernels.cu for the host.
//
// The per-element update, the rounding rules and the per-tensor coefficients
// come from lars_math.h, the header the CUDA kernels use; this file only walks
// the memory. cupylars/native.py compiles it with the system C++ compiler for
// the host's instruction set and calls lars_cpu_step through ctypes, with the
// same tensor and block tables the CUDA launcher builds (cupylars/plan.py).
//
// One step over a list of tensors is three phases, as on the GPU:
//   stats     each chunk's float64 dot products g.g, p.p, m.m, g.p, g.m, p.m
//             (reads p, g, m: 12 B per element with float32 state);
//   finalize  per tensor: the partials summed in chunk order, the non-finite
//             policy, the percentile history, gamma, r, ||u||, s, the counter;
//             (exact)  only for tensors whose ||u|| the dot products cannot
//             resolve (u nearly cancels): ||u|| summed over the u the update
//             applies, and s set again from it (reads p, g, m once more);
//   update    p and m rewritten (reads p, g, m, writes p, m: 20 B per element).
// 32 B per element in all: the norms must cover the whole tensor before any
// element changes, so p, g and m are read twice. The phases run per group of
// consecutive tensors that fits in the cache (see "the schedule" below), so that
// the second read comes from the cache.
//
// Determinism: chunks are fixed (a multiple of the 256-element 8-bit block),
// each chunk is summed by one thread in a fixed lane order and the chunks of a
// tensor are summed in their order, so the result does not depend on how many
// threads run or which thread takes which chunk.
//
// Threads: a small pool of std::threads, woken once per step, that sleep on a
// condition variable between steps and while they wait for a group's finalize (no
// spinning while the caller's framework works); the calling thread takes part. Where
// torch runs on OpenMP, one parallel region on torch's OpenMP threads instead (see
// "torch's OpenMP threads" below; never in a forked child). Each thread walks its own
// contiguous range of a group's chunks, then helps with the others'. Each call brings its
// own scratch (partials, coefficients), so calls from several Python threads may run at
// once (the pool serialises them). A forked child gets a fresh pool (pool() below).
#define LARS_HOST_ONLY
#include "../lars_math.h"

#include <dlfcn.h>
#include <pthread.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstddef>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(__FLT16_MAX__)
#error "the native CPU backend needs the compiler's _Float16 type (GCC >= 12 or Clang >= 15 on x86-64 or AArch64)"
#endif

#define LARS_EXPORT extern "C" __attribute__((visibility("default")))

namespace lars_cpu {
using namespace lars;

// ---- storage formats ------------------------------------------------------------------
// _Float16 conversions are IEEE round to nearest even (one F16C instruction for
// 8 elements where the host has it); bfloat16 uses the shared integer rounding.
template <int F>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static float load(T x) { return x; }
  static T store(float v) { return v; }
};
template <>
struct Elem<kF16> {
  using T = _Float16;
  static float load(T x) { return static_cast<float>(x); }
  static T store(float v) { return static_cast<_Float16>(v); }
};
template <>
struct Elem<kBF16> {
  using T = unsigned short;
  static float load(T x) { return bf16_to_float(x); }
  static T store(float v) { return bf16_bits(v); }
};

template <typename T>
inline T* address(const long long* row, int field) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row[field]));
}

// ---- the 8-bit code book ---------------------------------------------------------------
// The shared rounding rule (code_between) makes the code a non-decreasing step
// function of x: code(x) is the number of thresholds T[i] below x, T[i] being
// the largest float whose code is i. The thresholds are found once, from the
// rule itself, by bisection over the floats of each bracket. The top 16 bits
// of a float32 (sign, exponent, 7 mantissa bits) order the floats of one sign:
// a key. Magnitude keys below the smallest threshold's or above the largest one's
// hold no threshold, so they are clamped to those two (the dynamic map: 2,817 keys a
// sign, a 6 KiB table that stays in L1), and a table by clamped key gives the code of
// its smallest value. At most `extra` thresholds lie inside one key's range (computed
// here, one for the dynamic map): that many compares reach the exact code. The codes
// are those of the reference and of the GPU's tree search, in two loads and a compare
// per element.
struct CodeIndex {
  alignas(64) float book[256];
  alignas(64) float threshold[256];  // threshold[i]: the largest x with code i (threshold[255] = +inf)
  // book and threshold as four planes of bytes (plane q: byte q of each float), for
  // the 64-at-a-time lookups of ByteTable.
  alignas(64) unsigned char book_bytes[4][256];
  alignas(64) unsigned char threshold_bytes[4][256];
  int key_lo, key_hi, span;           // magnitude keys are clamped to [key_lo, key_hi]
  unsigned char base[2 * 32768];      // by table_index: the code of the clamped key's smallest value
  int extra;
};

// The base entry of x: sign * span + (clamped magnitude key - key_lo). NaN is not
// ordered: callers code it as 255 before or after.
inline int table_index(const CodeIndex& ix, unsigned bits) {
  const int key = static_cast<int>((bits >> 16) & 0x7fffu);
  return (bits >> 31 ? ix.span : 0) + std::min(std::max(key, ix.key_lo), ix.key_hi) - ix.key_lo;
}

inline int code_by_search(const float* book, float x) {  // the rule, by brute force
  if (x != x || x >= book[255]) return 255;
  if (x < book[0]) return 0;
  int lo = 0;
  for (int i = 1; i < 255; ++i)
    if (book[i] <= x) lo = i;
  return code_between(book, lo, x);
}

// Floats in value order as integers (so that bisection over the integers walks the floats).
inline int ordered(float x) {
  const int i = static_cast<int>(float_bits(x));
  return i >= 0 ? i : static_cast<int>(0x80000000u - static_cast<unsigned>(i));
}
inline float from_ordered(int i) {
  return bits_float(i >= 0 ? static_cast<unsigned>(i) : 0x80000000u - static_cast<unsigned>(i));
}

void build_index(CodeIndex& ix, const float* map) {
  std::memcpy(ix.book, map, sizeof ix.book);
  for (int i = 0; i < 255; ++i) {  // code(book[i]) == i and code(book[i+1]) == i + 1
    int lo = ordered(map[i]), hi = ordered(map[i + 1]);
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      (code_by_search(ix.book, from_ordered(mid)) <= i ? lo : hi) = mid;
    }
    ix.threshold[i] = from_ordered(lo);
  }
  ix.threshold[255] = bits_float(0x7f800000u);  // +inf: nothing lies above code 255
  for (int i = 0; i < 256; ++i)
    for (int q = 0; q < 4; ++q) {
      ix.book_bytes[q][i] = static_cast<unsigned char>(float_bits(ix.book[i]) >> (8 * q));
      ix.threshold_bytes[q][i] = static_cast<unsigned char>(float_bits(ix.threshold[i]) >> (8 * q));
    }
  // The magnitude keys that hold thresholds (NaN thresholds, of a map with NaNs, hold none).
  ix.key_lo = 0x7f7f, ix.key_hi = 0;
  for (int i = 0; i < 255; ++i) {
    if (ix.threshold[i] != ix.threshold[i]) continue;
    const int key = static_cast<int>((float_bits(ix.threshold[i]) >> 16) & 0x7fffu);
    ix.key_lo = std::min(ix.key_lo, key), ix.key_hi = std::max(ix.key_hi, key + 1);
  }
  ix.key_hi = std::min(std::max(ix.key_hi, ix.key_lo), 0x7f7f);  // +inf and NaN keys clamp below
  ix.span = ix.key_hi - ix.key_lo + 1;
  ix.extra = 0;
  for (int sign = 0; sign < 2; ++sign)
    for (int c = 0; c < ix.span; ++c) {
      // The magnitudes of entry c: from the first float of its key (0 for the lowest) to the
      // last of its key (+inf for the highest); negative entries count down.
      const int key = ix.key_lo + c;
      const float small = c == 0 ? 0.0f : bits_float(static_cast<unsigned>(key) << 16);
      const float large =
          c == ix.span - 1 ? bits_float(0x7f800000u) : bits_float((static_cast<unsigned>(key) << 16) | 0xffffu);
      const float a = sign ? -large : small, b = sign ? -small : large;
      const int code_a = code_by_search(ix.book, a), code_b = code_by_search(ix.book, b);
      ix.base[sign * ix.span + c] = static_cast<unsigned char>(code_a);
      ix.extra = std::max(ix.extra, code_b - code_a);
    }
}

inline unsigned char nearest_code(const CodeIndex& ix, float x) {
  if (x != x) return 255;  // NaN sorts after every value (numpy's searchsorted)
  int code = ix.base[table_index(ix, float_bits(x))];
  for (int k = 0; k < ix.extra; ++k) code += x > ix.threshold[code] ? 1 : 0;
  return static_cast<unsigned char>(code);
}

// ---- table lookups in registers -----------------------------------------------------------
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define LARS_VBMI 1
#else
#define LARS_VBMI 0
#endif
// The codec's lookups (book[code], threshold[code]) as vector permutes rather than loads:
// gathers were slower than scalar loads on the AMD Zen 4 host this was measured on.
#if LARS_VBMI
// 64 lookups in a 256-entry float table, one byte plane at a time (vpermi2b takes 128
// entries per instruction, bit 7 of the code picks the half), the four planes then
// interleaved into floats. The interleave works within 128-bit lanes, so the codes are
// first put in the order that makes the floats come out in element order.
struct ByteTable {
  __m512i plane[4][4];
  explicit ByteTable(const unsigned char (&bytes)[4][256]) {
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 4; ++r) plane[q][r] = _mm512_load_si512(bytes[q] + 64 * r);
  }
  // out[j] holds the floats of elements 16 j .. 16 j + 15, as bits.
  void at(__m512i codes, __m512i (&out)[4]) const {
    // Byte 16 L + 4 j + s (128-bit lane L) ends up as float s of lane L of out[j]: element 16 j + 4 L + s.
    const __m512i order = _mm512_set_epi8(63, 62, 61, 60, 47, 46, 45, 44, 31, 30, 29, 28, 15, 14, 13, 12,  //
                                          59, 58, 57, 56, 43, 42, 41, 40, 27, 26, 25, 24, 11, 10, 9, 8,    //
                                          55, 54, 53, 52, 39, 38, 37, 36, 23, 22, 21, 20, 7, 6, 5, 4,      //
                                          51, 50, 49, 48, 35, 34, 33, 32, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i c = _mm512_permutexvar_epi8(order, codes);
    const __mmask64 upper = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int q = 0; q < 4; ++q)
      b[q] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(plane[q][0], c, plane[q][1]),
                                    _mm512_permutex2var_epi8(plane[q][2], c, plane[q][3]));
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_unpacklo_epi16(lo01, lo23);
    out[1] = _mm512_unpackhi_epi16(lo01, lo23);
    out[2] = _mm512_unpacklo_epi16(hi01, hi23);
    out[3] = _mm512_unpackhi_epi16(hi01, hi23);
  }
};
#endif
#if defined(__AVX512F__)
// 16 lookups in a 256-entry float table held in 16 registers: eight vpermt2ps (32 entries
// each) and blends on bits 5, 6 and 7 of the code.
struct FloatTable {
  __m512 reg[16];
  explicit FloatTable(const float* t) {
    for (int r = 0; r < 16; ++r) reg[r] = _mm512_load_ps(t + 16 * r);
  }
  template <int kFrom = 0, int kCount = 16>
  __m512 at(__m512i i) const {
    if constexpr (kCount == 2) {
      return _mm512_permutex2var_ps(reg[kFrom], i, reg[kFrom + 1]);
    } else {
      const __mmask16 upper = _mm512_test_epi32_mask(i, _mm512_set1_epi32(8 * kCount));
      return _mm512_mask_blend_ps(upper, at<kFrom, kCount / 2>(i), at<kFrom + kCount / 2, kCount / 2>(i));
    }
  }
};
#endif

// nearest_code over n values, when one compare suffices (as it does for the dynamic map):
// the code of the key, then one compare with the threshold above it. The table lookups
// are scalar loads (the empty asm keeps the compiler from turning them into gathers,
// which were slower); with AVX-512 VBMI the table indices are computed and the threshold
// compares done 16 and 64 at a time. The codes equal the rule's for every float32 in
// [-1, 1], the range of m / absmax, and for a sweep of all others
// (tests/test_cpu_schedule.py, through lars_cpu_nearest_codes, for this host's build and
// for builds without AVX-512 VBMI and without AVX-512).
inline void nearest_codes(const CodeIndex& ix, const float* x, int n, unsigned char* out) {
  if (ix.extra != 1) {
    for (int k = 0; k < n; ++k) out[k] = nearest_code(ix, x[k]);
    return;
  }
  int k = 0;
#if LARS_VBMI
  // Three passes over the n values: table indices (vector), codes of the keys (scalar
  // loads), compares (vector). Each pass reads what the one before wrote in full: a vector
  // load of bytes just stored one by one would wait for them (no store-to-load forwarding).
  if (n >= 64 && n <= kQBlock) {
    alignas(64) unsigned short index[kQBlock];
    const __m512i lo = _mm512_set1_epi32(ix.key_lo), hi = _mm512_set1_epi32(ix.key_hi);
    const __m512i magnitude = _mm512_set1_epi32(0x7fff), span = _mm512_set1_epi32(ix.span);
    for (int j = 0; j + 16 <= n; j += 16) {
      const __m512i bits = _mm512_loadu_si512(x + j);
      const __m512i key = _mm512_and_si512(_mm512_srli_epi32(bits, 16), magnitude);
      __m512i i = _mm512_sub_epi32(_mm512_min_epi32(_mm512_max_epi32(key, lo), hi), lo);
      i = _mm512_mask_add_epi32(i, _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512()), i, span);
      _mm256_store_si256(reinterpret_cast<__m256i*>(index + j), _mm512_cvtepi32_epi16(i));
    }
    const int whole = n / 64 * 64;
    for (int j = 0; j < whole; ++j) {
      int code = ix.base[index[j]];
      asm("" : "+r"(code));
      out[j] = static_cast<unsigned char>(code);
    }
    const ByteTable threshold(ix.threshold_bytes);
    for (; k < whole; k += 64) {
      const __m512i codes = _mm512_loadu_si512(out + k);
      __m512i above[4];
      threshold.at(codes, above);
      __mmask64 up = 0, nan = 0;
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_loadu_ps(x + k + 16 * j);
        up |= static_cast<__mmask64>(_mm512_cmp_ps_mask(v, _mm512_castsi512_ps(above[j]), _CMP_GT_OQ)) << (16 * j);
        nan |= static_cast<__mmask64>(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) << (16 * j);
      }
      const __m512i coded = _mm512_mask_add_epi8(codes, up, codes, _mm512_set1_epi8(1));
      _mm512_storeu_si512(out + k, _mm512_mask_mov_epi8(coded, nan, _mm512_set1_epi8(-1)));
    }
  }
#endif
  for (; k < n; ++k) {
    int code = ix.base[table_index(ix, float_bits(x[k]))];
    asm("" : "+r"(code));
    code += x[k] > ix.threshold[code] ? 1 : 0;
    out[k] = static_cast<unsigned char>(x[k] != x[k] ? 255 : code);
  }
}

// book[code] * scale for n codes.
inline void dequantize(const CodeIndex& ix, const unsigned char* codes, float scale, int n, float* out) {
  int k = 0;
#if LARS_VBMI
  {
    const ByteTable book(ix.book_bytes);
    const __m512 s = _mm512_set1_ps(scale);
    for (; k + 64 <= n; k += 64) {
      __m512i m[4];
      book.at(_mm512_loadu_si512(codes + k), m);
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + k + 16 * j, _mm512_mul_ps(_mm512_castsi512_ps(m[j]), s));
    }
  }
#endif
#if defined(__AVX512F__)
  if (k + 16 <= n) {
    const FloatTable book(ix.book);
    const __m512 s = _mm512_set1_ps(scale);
    for (; k + 16 <= n; k += 16) {
      const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)));
      _mm512_storeu_ps(out + k, _mm512_mul_ps(book.at(i), s));
    }
  }
#endif
  for (; k < n; ++k) out[k] = ix.book[codes[k]] * scale;
}

// ---- the thread pool ---------------------------------------------------------------------
class Pool {
 public:
  // Runs body(i) for i in [0, n) on up to `threads` threads (the caller is one); the
  // indices are handed out as threads arrive, so a worker that wakes late holds up nobody.
  void parallel_for(long long n, int threads, const std::function<void(long long)>& body) {
    threads = static_cast<int>(std::min<long long>(threads, n));
    if (threads <= 1) {
      for (long long i = 0; i < n; ++i) body(i);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one parallel region at a time
    std::atomic<long long> next{0};
    const std::function<void()> drain = [&] {
      for (long long i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i);
    };
    {
      std::unique_lock<std::mutex> lock(mutex_);
      grow(threads - 1);
      job_ = &drain;
      helpers_ = threads - 1;
      pending_ = helpers_;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void grow(int wanted) {
    while (static_cast<int>(workers_.size()) < wanted) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { work(index); });
      workers_.back().detach();
    }
  }

  void work(int index) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void()>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= helpers_) continue;  // not needed this time
        job = job_;
      }
      (*job)();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void()>* job_ = nullptr;
  int helpers_ = 0, pending_ = 0;
  unsigned long long generation_ = 0;
};

// The process's pool. Never destroyed: detached workers outlive static destructors.
//
// A forked child has only the thread that called fork. The parent's pool is no use to
// it: its workers are gone, its condition variables still count them as waiters, and
// its mutexes may be held by a thread that does not exist in the child (one that was
// inside parallel_for). The child therefore gets a fresh pool (fresh locks, no workers,
// started on demand) and the old one is abandoned, never locked or destroyed.
std::atomic<Pool*> current_pool{nullptr};

void fresh_pool_after_fork() { current_pool.store(new Pool, std::memory_order_release); }

Pool& pool() {
  static const bool registered = [] {
    current_pool.store(new Pool, std::memory_order_release);
    return pthread_atfork(nullptr, nullptr, &fresh_pool_after_fork) == 0;
  }();
  (void)registered;
  return *current_pool.load(std::memory_order_acquire);
}

// ---- torch's OpenMP threads ----------------------------------------------------------------
// Torch's CPU ops run on libgomp's threads, which (libgomp's default) spin for a while after
// each parallel region. A step on our own pool right after a torch op shares the cores with
// them: a 10M-element step took 11.1 ms right after a torch matmul against 8.7 ms after a
// pause (docs/benchmarks.md). So where the caller allows it (cupylars/cpu.py: torch is
// imported, runs on OpenMP, and this is not a forked child), a multi-threaded step runs as one
// parallel region on the already loaded libgomp (GOMP_parallel, what `#pragma omp parallel`
// compiles to): the threads torch's own ops use, nothing loaded. (libgomp gives a calling
// thread without a team one of its own, as it does for torch's ops from that thread.)
// Never in a forked child: libgomp's threads do not survive fork, and a region there hangs
// (torch's own ops too); our pool is fork-safe (pool() above).
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned);
  int (*thread_num)();
};
std::atomic<bool> openmp_allowed{false}, forked_child{false};
const bool fork_watched = pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); }) == 0;

// libgomp's entry points when it is loaded in this process, else null. Looked up until found
// (torch may be imported after the first step); the handle stays open, as libgomp does.
const OpenMP* loaded_openmp() {
  static std::atomic<const OpenMP*> found{nullptr};
  const OpenMP* known = found.load(std::memory_order_acquire);
  if (known != nullptr) return known;
  void* lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);  // never loads it
  if (lib == nullptr) return nullptr;
  using Parallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
  const auto parallel = reinterpret_cast<Parallel>(dlsym(lib, "GOMP_parallel"));
  const auto thread_num = reinterpret_cast<int (*)()>(dlsym(lib, "omp_get_thread_num"));
  if (parallel == nullptr || thread_num == nullptr) return nullptr;
  static const OpenMP entry{parallel, thread_num};
  found.store(&entry, std::memory_order_release);
  return &entry;
}

// The OpenMP threads a step runs on, or null: our pool.
const OpenMP* step_openmp() {
  if (!openmp_allowed.load(std::memory_order_relaxed) || !fork_watched ||
      forked_child.load(std::memory_order_relaxed))
    return nullptr;
  return loaded_openmp();
}

// Runs walk(t), t = 0 .. threads - 1, each on a thread of its own where threads are given;
// a thread that OpenMP does not give, or a pool worker that wakes late, is covered by the
// others, which claim the chunks of every range once their own is done.
template <typename Walk>
void run_threads(int threads, const Walk& walk) {
  const OpenMP* omp = threads > 1 ? step_openmp() : nullptr;
  if (omp == nullptr) {
    pool().parallel_for(threads, threads, [&](long long t) { walk(static_cast<int>(t)); });
    return;
  }
  struct Region {
    const Walk* walk;
    const OpenMP* omp;
  } region{&walk, omp};
  omp->parallel(
      [](void* data) {
        const Region& r = *static_cast<const Region*>(data);
        (*r.walk)(r.omp->thread_num());
      },
      &region, static_cast<unsigned>(threads), 0);
}

// ---- phase 1: the dot products of one chunk --------------------------------------------------
// A 256-element tile at a time: p, g and m as float32 (read in place for float32; 16-bit
// formats widened and 8-bit codes dequantized with the tile's one scale into arrays),
// converted to float64 and summed into eight lanes of accumulators in a fixed order,
// combined by a fixed tree at the end. Lane l holds the elements start + 8j + l, whatever
// vector width the host has, so the result is the same on every machine and for every
// thread count. Past the end of the tensor a tile is zero-filled, which adds exact zeros
// (an accumulator starts at +0 and so is never -0).
constexpr int kLanes = 8;
// The eight lanes as kParts host vectors of float64: one with 512-bit vectors, else two
// (or four) held in registers, so no lane ever moves through memory.
#if defined(__AVX512F__)
constexpr int kParts = 1;
#elif defined(__AVX__)
constexpr int kParts = 2;
#else
constexpr int kParts = 4;
#endif
constexpr int kWidth = kLanes / kParts;  // lanes per host vector
typedef double Lanes __attribute__((vector_size(kWidth * sizeof(double))));
typedef float Lanes32 __attribute__((vector_size(kWidth * sizeof(float))));

// float32 -> float64 is exact. One load-and-convert instruction on x86 (the generic
// vector conversion goes through the stack there: measured, callgrind).
inline Lanes widen(const float* x) {
#if defined(__AVX512F__)
  const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(x));
#elif defined(__AVX__)
  const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x));
#elif defined(__SSE2__)
  const __m128d v = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x))));
#else
  Lanes32 f;
  std::memcpy(&f, x, sizeof f);
  const Lanes v = __builtin_convertvector(f, Lanes);
#endif
  Lanes out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
inline double lane_tree(const Lanes (&a)[kParts]) {  // ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
  double lane[kLanes];
  std::memcpy(lane, a, sizeof lane);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// The six lane sums of a chunk (those a pass does not need stay zero).
struct LaneSums {
  Lanes gg[kParts], pp[kParts], mm[kParts], gp[kParts], gm[kParts], pm[kParts];
};

// Adds the products of n elements (a multiple of 8) of g, p (kP) and m (kM) to the lanes.
// kPass 0: all of them; 1: g.g, p.p, g.p; 2: m.m, g.m, p.m. With fewer than 512-bit vectors
// a tile takes passes 1 and 2 (its data is in L1), so that the accumulators and the data
// of a pass stay in registers.
template <bool kP, bool kM, int kPass>
inline __attribute__((always_inline)) void add_lanes(const float* __restrict__ g, const float* __restrict__ p,
                                                     const float* __restrict__ m, int n, LaneSums& sums) {
  constexpr bool kGP = kPass != 2, kMM = kM && kPass != 1;
  Lanes gg[kParts], pp[kParts], gp[kParts], mm[kParts], gm[kParts], pm[kParts];
  for (int q = 0; q < kParts; ++q) {
    gg[q] = sums.gg[q], pp[q] = sums.pp[q], gp[q] = sums.gp[q];
    mm[q] = sums.mm[q], gm[q] = sums.gm[q], pm[q] = sums.pm[q];
  }
  for (int i = 0; i < n; i += kLanes) {
    for (int q = 0; q < kParts; ++q) {
      const int at = i + q * kWidth;
      const Lanes gd = widen(g + at);
      const Lanes pd = kP ? widen(p + at) : Lanes{};
      if (kGP) {
        gg[q] += gd * gd;
        if (kP) {
          pp[q] += pd * pd;
          gp[q] += gd * pd;
        }
      }
      if (kMM) {
        const Lanes md = widen(m + at);
        mm[q] += md * md;
        gm[q] += gd * md;
        if (kP) pm[q] += pd * md;
      }
    }
  }
  for (int q = 0; q < kParts; ++q) {
    sums.gg[q] = gg[q], sums.pp[q] = pp[q], sums.gp[q] = gp[q];
    sums.mm[q] = mm[q], sums.gm[q] = gm[q], sums.pm[q] = pm[q];
  }
}

template <bool kP, bool kM>
inline void add_tile(const float* g, const float* p, const float* m, int n, LaneSums& sums) {
  if (kParts == 1 || !kM) {
    add_lanes<kP, kM, 0>(g, p, m, n, sums);
  } else {
    add_lanes<kP, kM, 1>(g, p, m, n, sums);
    add_lanes<kP, kM, 2>(g, p, m, n, sums);
  }
}

template <int F, int M, bool kNeedP>
void stats_chunk(const long long* row, long long start, long long end, const CodeIndex& ix, double* out) {
  using E = Elem<F>;
  using T = typename E::T;
  const T* __restrict__ g = address<const T>(row, kFieldGrad);
  const T* __restrict__ p = address<const T>(row, kFieldParam);
  const float* __restrict__ m32 = address<const float>(row, kFieldState);
  const unsigned char* __restrict__ codes = address<const unsigned char>(row, kFieldState);
  const float* __restrict__ absmax = address<const float>(row, kFieldAbsmax);
  constexpr bool kUseM = M != kNoState;
  LaneSums sums = {};
  alignas(64) float gv[kQBlock], pv[kQBlock], mv[kQBlock];
  for (long long tile = start; tile < end; tile += kQBlock) {
    const int count = static_cast<int>(std::min<long long>(kQBlock, end - tile));
    const float *gt = gv, *pt = pv, *mt = mv;
    if (F == kF32 && count == kQBlock) {  // read in place
      gt = reinterpret_cast<const float*>(g) + tile;
      pt = reinterpret_cast<const float*>(p) + tile;
    } else {
      for (int k = 0; k < count; ++k) gv[k] = E::load(g[tile + k]);
      if (kNeedP)
        for (int k = 0; k < count; ++k) pv[k] = E::load(p[tile + k]);
    }
    if (M == kState32) {
      if (count == kQBlock) {
        mt = m32 + tile;
      } else {
        for (int k = 0; k < count; ++k) mv[k] = m32[tile + k];
      }
    }
    if (M == kState8) {
      const float scale = absmax[tile / kQBlock];
      dequantize(ix, codes + tile, scale, count, mv);
    }
    const int n = (count + kLanes - 1) / kLanes * kLanes;  // zero-filled up to the lanes
    for (int k = count; k < n; ++k) gv[k] = pv[k] = mv[k] = 0.0f;
    add_tile<kNeedP, kUseM>(gt, pt, mt, n, sums);
  }
  out[kGG] = lane_tree(sums.gg), out[kPP] = lane_tree(sums.pp), out[kMM] = lane_tree(sums.mm);
  out[kGP] = lane_tree(sums.gp), out[kGM] = lane_tree(sums.gm), out[kPM] = lane_tree(sums.pm);
}

// ---- phase 3: the update of one chunk ----------------------------------------------------------
template <int F, int M, bool kFirst, bool kNesterov>
void update_chunk(const long long* row, long long start, long long end, const TensorCoef& cf, float lam, float mu,
                  float keep, const CodeIndex& ix) {
  using E = Elem<F>;
  using T = typename E::T;
  T* __restrict__ p = address<T>(row, kFieldParam);
  const T* __restrict__ g = address<const T>(row, kFieldGrad);
  constexpr bool kMomentum = M != kNoState;
  if (M != kState8) {
    float* __restrict__ m = address<float>(row, kFieldState);
    for (long long i = start; i < end; ++i) {
      float mi = (kMomentum && !kFirst) ? m[i] : 0.0f;
      p[i] = E::store(step_element<kMomentum>(cf, lam, mu, keep, kNesterov, kFirst, E::load(p[i]), E::load(g[i]), mi));
      if (kMomentum) m[i] = mi;
    }
    return;
  }
  // 8-bit state, one 256-element block at a time: dequantize, step, requantize.
  unsigned char* __restrict__ codes = address<unsigned char>(row, kFieldState);
  float* __restrict__ absmax = address<float>(row, kFieldAbsmax);
  for (long long tile = start; tile < end; tile += kQBlock) {
    const int count = static_cast<int>(std::min<long long>(kQBlock, end - tile));
    const float scale = absmax[tile / kQBlock];
    alignas(64) float m[kQBlock];
    if (kFirst) {
      for (int k = 0; k < count; ++k) m[k] = 0.0f;
    } else {
      dequantize(ix, codes + tile, scale, count, m);
    }
    for (int k = 0; k < count; ++k) {
      const long long i = tile + k;
      p[i] = E::store(step_element<true>(cf, lam, mu, keep, kNesterov, kFirst, E::load(p[i]), E::load(g[i]), m[k]));
    }
    // The block's absmax (elements past the end are the zero padding of
    // quantize_blockwise). Non-negative floats order as their bit patterns, so an
    // integer max finds it (vectorised), and a NaN, whose pattern lies above every
    // number's, makes it NaN, as numpy's max does.
    unsigned int max_bits = 0;
    for (int k = 0; k < count; ++k) max_bits = std::max(max_bits, float_bits(m[k]) & 0x7fffffffu);
    const float block_max = bits_float(max_bits);
    absmax[tile / kQBlock] = block_max;
    if (block_max == 0.0f) {  // a zero block is all 127 (the map's 0.0)
      std::memset(codes + tile, 127, static_cast<size_t>(count));
      continue;
    }
    const float safe = block_max > 0.0f ? block_max : 1.0f;  // NaN absmax: scale by 1, as the reference
    alignas(64) float x[kQBlock];
    for (int k = 0; k < count; ++k) x[k] = m[k] / safe;
    nearest_codes(ix, x, count, codes + tile);
  }
}

// ---- phase 2b: ||u||^2 of one chunk, from the u the update applies ------------------------------
// For tensors whose ||u|| the dot products cannot resolve (kCoefExactNorm): u element by
// element as update_chunk computes it (update_direction), squared (exact in float64) and
// summed in eight lanes in a fixed order, as stats_chunk sums.
template <int F, int M, bool kFirst, bool kNesterov>
double exact_unorm_chunk(const long long* row, long long start, long long end, const TensorCoef& cf, float lam,
                         float mu, float keep, const CodeIndex& ix) {
  using E = Elem<F>;
  using T = typename E::T;
  const T* __restrict__ p = address<const T>(row, kFieldParam);
  const T* __restrict__ g = address<const T>(row, kFieldGrad);
  const float* __restrict__ m32 = address<const float>(row, kFieldState);
  const unsigned char* __restrict__ codes = address<const unsigned char>(row, kFieldState);
  const float* __restrict__ absmax = address<const float>(row, kFieldAbsmax);
  constexpr bool kMomentum = M != kNoState;
  LaneSums sums = {};
  alignas(64) float uv[kQBlock];
  for (long long tile = start; tile < end; tile += kQBlock) {
    const int count = static_cast<int>(std::min<long long>(kQBlock, end - tile));
    const float scale = M == kState8 ? absmax[tile / kQBlock] : 0.0f;
    for (int k = 0; k < count; ++k) {
      const long long i = tile + k;
      float m = 0.0f;
      if (kMomentum && !kFirst) m = M == kState8 ? ix.book[codes[i]] * scale : m32[i];
      uv[k] = update_direction<kMomentum>(cf, lam, mu, keep, kNesterov, kFirst, E::load(p[i]), E::load(g[i]), m);
    }
    const int n = (count + kLanes - 1) / kLanes * kLanes;  // zero-filled up to the lanes
    for (int k = count; k < n; ++k) uv[k] = 0.0f;
    add_tile<false, false>(uv, nullptr, nullptr, n, sums);
  }
  return lane_tree(sums.gg);
}

// ---- dispatch on (format, state mode) ----------------------------------------------------------
using StatsFn = void (*)(const long long*, long long, long long, const CodeIndex&, double*);
using UpdateFn = void (*)(const long long*, long long, long long, const TensorCoef&, float, float, float,
                          const CodeIndex&);

template <int F, int M>
StatsFn stats_for(bool need_p) {
  return need_p ? &stats_chunk<F, M, true> : &stats_chunk<F, M, false>;
}
template <int F, int M>
UpdateFn update_for(bool first, bool nesterov) {
  if (first) return nesterov ? &update_chunk<F, M, true, true> : &update_chunk<F, M, true, false>;
  return nesterov ? &update_chunk<F, M, false, true> : &update_chunk<F, M, false, false>;
}

using ExactFn = double (*)(const long long*, long long, long long, const TensorCoef&, float, float, float,
                           const CodeIndex&);
template <int F, int M>
ExactFn exact_for(bool first, bool nesterov) {
  if (first) return nesterov ? &exact_unorm_chunk<F, M, true, true> : &exact_unorm_chunk<F, M, true, false>;
  return nesterov ? &exact_unorm_chunk<F, M, false, true> : &exact_unorm_chunk<F, M, false, false>;
}
template <int F>
ExactFn exact_for_mode(int mode, bool first, bool nesterov) {
  switch (mode) {
    case kState32: return exact_for<F, kState32>(first, nesterov);
    case kState8: return exact_for<F, kState8>(first, nesterov);
    default: return exact_for<F, kNoState>(first, nesterov);
  }
}
ExactFn exact_fn(int kind, bool first, bool nesterov) {
  switch (kind / 3) {
    case kF16: return exact_for_mode<kF16>(kind % 3, first, nesterov);
    case kBF16: return exact_for_mode<kBF16>(kind % 3, first, nesterov);
    default: return exact_for_mode<kF32>(kind % 3, first, nesterov);
  }
}

template <int F>
StatsFn stats_for_mode(int mode, bool need_p) {
  switch (mode) {
    case kState32: return stats_for<F, kState32>(need_p);
    case kState8: return stats_for<F, kState8>(need_p);
    default: return stats_for<F, kNoState>(need_p);
  }
}
StatsFn stats_fn(int kind, bool need_p) {
  switch (kind / 3) {
    case kF16: return stats_for_mode<kF16>(kind % 3, need_p);
    case kBF16: return stats_for_mode<kBF16>(kind % 3, need_p);
    default: return stats_for_mode<kF32>(kind % 3, need_p);
  }
}
template <int F>
UpdateFn update_for_mode(int mode, bool first, bool nesterov) {
  switch (mode) {
    case kState32: return update_for<F, kState32>(first, nesterov);
    case kState8: return update_for<F, kState8>(first, nesterov);
    default: return update_for<F, kNoState>(first, nesterov);
  }
}
UpdateFn update_fn(int kind, bool first, bool nesterov) {
  switch (kind / 3) {
    case kF16: return update_for_mode<kF16>(kind % 3, first, nesterov);
    case kBF16: return update_for_mode<kBF16>(kind % 3, first, nesterov);
    default: return update_for_mode<kF32>(kind % 3, first, nesterov);
  }
}

// ---- phase 2: one tensor's coefficients ------------------------------------------------------------
// lars_math.h's finalize(), with the percentile of the history as the step records it found
// here: the entry of rank c.percentile, selected (the GPU ranks every entry instead).
TensorCoef finalize_tensor(const long long* row, const double* totals, const StepConfig& c) {
  float* history = address<float>(row, kFieldHistory);
  float clip_sq = 0.0f;
  if (c.switches & kSwitchPercentile) {
    const int slot = history_slot(*address<const long long>(row, kFieldStep) + 1);
    const float entry = history_entry(totals);
    float recorded[kHistory];
    int order[kHistory];
    for (int i = 0; i < kHistory; ++i) {
      recorded[i] = recorded_history(history, i, slot, entry);
      order[i] = i;
    }
    std::nth_element(order, order + c.percentile, order + kHistory,
                     [&](int a, int b) { return sorts_before(recorded[a], a, recorded[b], b); });
    clip_sq = recorded[order[c.percentile]];
  }
  return finalize(address<long long>(row, kFieldStep), address<long long>(row, kFieldSkip), history, totals,
                  clip_sq, c);
}

CodeIndex& code_index(const float* map) {
  static CodeIndex* ix = nullptr;
  static std::once_flag once;
  std::call_once(once, [&] {
    ix = new CodeIndex;
    build_index(*ix, map);
  });
  return *ix;
}


// ---- the schedule: groups of consecutive tensors that fit in the cache ---------------------------
// The norms must cover a whole tensor before any of its elements changes, so p, g and m
// are read twice. Run over all tensors at once, the phases read every byte from memory
// twice (ResNet-50: ~300 MB each time). Run per group of consecutive tensors whose p, g and
// m fit in the cache, the update reads what the stats phase of the same group just brought
// in: stats -> finalize -> (exact norms) -> update, group after group. A tensor larger than
// the budget is a group of its own. Within a group each thread takes a contiguous range of
// chunks (Claims). The chunks, their lane sums and the
// per-tensor sums in chunk order are those of one big group, so the result is bitwise the
// same for any budget and any thread count (tests/test_cpu_schedule.py).
constexpr long long kDefaultGroupBytes = 4LL << 20;  // when the caller has not said (native.py does)
std::atomic<long long> group_bytes{kDefaultGroupBytes};

// Bytes per element the stats and update phases read: p and g in their format, m as stored.
inline long long element_bytes(int kind) {
  const int format = kind / 3, mode = kind % 3;
  return 2 * (format == kF32 ? 4 : 2) + (mode == kState32 ? 4 : mode == kState8 ? 1 : 0);
}

struct Group {
  int first, end;                     // tensor rows [first, end)
  long long first_block, end_block;  // their chunks (consecutive in the block table)
};

std::vector<Group> make_groups(const long long* tensors, int num_tensors, long long budget) {
  std::vector<Group> groups;
  long long bytes = 0;
  for (int t = 0; t < num_tensors; ++t) {
    const long long* row = tensors + static_cast<long long>(t) * kTensorFields;
    const long long size = row[kFieldSize] * element_bytes(static_cast<int>(row[kFieldKind]));
    const long long end_block = row[kFieldFirstBlock] + row[kFieldNumBlocks];
    if (groups.empty() || bytes + size > budget) {
      groups.push_back(Group{t, t + 1, row[kFieldFirstBlock], end_block});
      bytes = size;
    } else {
      groups.back().end = t + 1;
      groups.back().end_block = end_block;
      bytes += size;
    }
  }
  return groups;
}

// The chunks [0, count) of a phase, as one contiguous range per thread. A thread claims
// from its own range first, so that each walks one long stretch of memory (threads taking
// turns chunk by chunk were slower on a 10M tensor: docs/benchmarks.md), then from the
// others' ranges, so that a thread that is descheduled holds up the rest for at most the
// chunk it is on. Both phases claim forward (an update from the end of each range, where
// the stats phase left data in the cache, was slower with 8-bit state and no faster with
// float32 on the 2-core host measured).
class Claims {
 public:
  void split(long long count, int threads) {
    ranges_ = std::vector<Range>(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      ranges_[t].begin = count * t / threads;
      ranges_[t].end = count * (t + 1) / threads;
      ranges_[t].next.store(ranges_[t].begin, std::memory_order_relaxed);
    }
  }
  // The next chunk for thread `self`, or -1 when every chunk is claimed.
  long long claim(int self) {
    const int threads = static_cast<int>(ranges_.size());
    for (int k = 0; k < threads; ++k) {
      Range& r = ranges_[static_cast<size_t>((self + k) % threads)];
      if (r.next.load(std::memory_order_relaxed) >= r.end) continue;
      const long long i = r.next.fetch_add(1, std::memory_order_relaxed);
      if (i < r.end) return i;
    }
    return -1;
  }

 private:
  struct alignas(64) Range {  // one cache line each: threads claim without sharing one
    std::atomic<long long> next{0};
    long long begin = 0, end = 0;
  };
  std::vector<Range> ranges_;
};

// Where a group stands. Threads claim its chunks by counters; the thread that completes
// the last stats chunk finalizes the group (and the last exact chunk's thread sets the
// exact norms); the others sleep on a condition variable meanwhile (nothing spins).
enum GroupStage : int { kStageStats = 0, kStageExact = 1, kStageReady = 2 };
struct GroupRun {
  Claims stats, update;
  std::atomic<long long> stats_done{0}, exact_next{0}, exact_done{0};
  std::atomic<int> stage{kStageStats};
  std::vector<long long> exact_blocks;  // chunks of the group's flagged tensors, in order
  std::vector<double> chunk_uu;
};

class StageSignal {
 public:
  void publish(std::atomic<int>& stage, int value) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stage.store(value, std::memory_order_release);
    }
    changed_.notify_all();
  }
  void wait(const std::atomic<int>& stage, int value) {
    if (stage.load(std::memory_order_acquire) >= value) return;
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return stage.load(std::memory_order_acquire) >= value; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
};

}  // namespace lars_cpu

// Whether multi-threaded steps may run on torch's OpenMP threads (see "torch's OpenMP
// threads" above); returns 1 when the next one will, else 0.
LARS_EXPORT int lars_cpu_use_openmp(int allow) {
  lars_cpu::openmp_allowed.store(allow != 0, std::memory_order_relaxed);
  return lars_cpu::step_openmp() != nullptr ? 1 : 0;
}

// Version of the C interface below; cupylars/native.py checks it after loading.
LARS_EXPORT int lars_cpu_abi_version() { return 4; }

// One LARS step over the tensors of `tensors` (num_tensors rows, lars_math.h)
// and their chunks (`blocks`, num_blocks entries). `partials` holds kSums
// doubles per chunk and `coefs` one TensorCoef per tensor: the caller's scratch.
// `step`: the step's hyperparameters, a lars::StepConfig (cupylars/plan.py
// step_config; copied, so any alignment will do).
// Returns 0, or 1 when policy is "raise" and a gradient is non-finite: then
// nothing but the scratch was written (the caller reads the partials to name
// the tensors).
LARS_EXPORT int lars_cpu_step(const long long* tensors, int num_tensors, const long long* blocks,
                              long long num_blocks, long long chunk, double* partials, int* coefs,
                              const float* code_map, const void* step, int threads) {
  using namespace lars_cpu;
  StepConfig config;
  std::memcpy(&config, step, sizeof config);
  const int policy = config.policy;
  const double max_unorm = config.max_unorm;
  const bool need_p = stats_reads_param(config);
  const bool stats_m = stats_reads_momentum(config);
  const bool uses_m = (config.switches & kSwitchMomentum) != 0;
  const ElementFactors factors = element_factors(config);
  const float lam = factors.lam, mu = factors.mu, keep = factors.keep;
  const bool nesterov = factors.nesterov;
  const CodeIndex& ix = code_index(code_map);
  auto row_of = [&](long long b, long long* start, long long* end) {
    const long long entry = blocks[b];
    const long long* row = tensors + static_cast<long long>(block_tensor(entry)) * kTensorFields;
    *start = block_chunk(entry) * chunk;
    *end = std::min(*start + chunk, row[kFieldSize]);
    return row;
  };

  TensorCoef* coef = reinterpret_cast<TensorCoef*>(coefs);

  // "raise" must see every gradient before anything changes: one group.
  const long long budget = policy == kPolicyRaise ? -1 : group_bytes.load(std::memory_order_relaxed);
  const std::vector<Group> groups =
      budget > 0 ? make_groups(tensors, num_tensors, budget)
                 : std::vector<Group>{Group{0, num_tensors, 0, num_blocks}};
  std::vector<GroupRun> runs(groups.size());
  std::vector<double> totals(static_cast<size_t>(num_tensors) * kSums, 0.0);
  std::atomic<bool> failed{false};
  StageSignal signal;

  auto stats_block = [&](long long b) {
    long long start, end;
    const long long* row = row_of(b, &start, &end);
    const int kind = static_cast<int>(row[kFieldKind]);
    const int mode = stats_m ? kind % 3 : kNoState;
    stats_fn(kind - kind % 3 + mode, need_p != 0)(row, start, end, ix, partials + b * kSums);
  };

  // Run by the thread that completes a group's last stats chunk.
  auto finalize_group = [&](const Group& group, GroupRun& run) {
    // Totals in chunk order: the same sums whatever the thread count or the groups.
    for (int t = group.first; t < group.end; ++t) {
      const long long* row = tensors + static_cast<long long>(t) * kTensorFields;
      double* sum = &totals[static_cast<size_t>(t) * kSums];
      for (long long k = 0; k < row[kFieldNumBlocks]; ++k)
        for (int j = 0; j < kSums; ++j) sum[j] += partials[(row[kFieldFirstBlock] + k) * kSums + j];
      if (policy == kPolicyRaise && !std::isfinite(sum[kGG])) {
        failed.store(true, std::memory_order_relaxed);
        signal.publish(run.stage, kStageReady);
        return;
      }
    }
    for (int t = group.first; t < group.end; ++t)
      coef[t] = finalize_tensor(tensors + static_cast<long long>(t) * kTensorFields,
                                &totals[static_cast<size_t>(t) * kSums], config);
    // Tensors whose ||u|| the dot products cannot resolve (lars_math.h, unorm_needs_exact_norm):
    // ||u||^2 summed again over their chunks from the u the update applies, in chunk order.
    for (int t = group.first; t < group.end; ++t) {
      if (!(coef[t].flags & kCoefExactNorm)) continue;
      const long long* row = tensors + static_cast<long long>(t) * kTensorFields;
      for (long long k = 0; k < row[kFieldNumBlocks]; ++k) run.exact_blocks.push_back(row[kFieldFirstBlock] + k);
    }
    run.chunk_uu.resize(run.exact_blocks.size());
    signal.publish(run.stage, run.exact_blocks.empty() ? kStageReady : kStageExact);
  };

  auto exact_block = [&](GroupRun& run, long long i) {
    const long long b = run.exact_blocks[static_cast<size_t>(i)];
    long long start, end;
    const long long* row = row_of(b, &start, &end);
    const TensorCoef& cf = coef[block_tensor(blocks[b])];
    const int kind = static_cast<int>(row[kFieldKind]);
    const int mode = uses_m ? kind % 3 : kNoState;
    run.chunk_uu[static_cast<size_t>(i)] = exact_fn(kind - kind % 3 + mode, (cf.flags & kCoefFirst) != 0,
                                                    nesterov)(row, start, end, cf, lam, mu, keep, ix);
  };

  // Run by the thread that completes a group's last exact chunk: s from ||u||, per tensor.
  auto finish_exact = [&](const Group& group, GroupRun& run) {
    size_t next = 0;  // exact_blocks lists each flagged tensor's chunks together, in order
    for (int t = group.first; t < group.end; ++t) {
      if (!(coef[t].flags & kCoefExactNorm)) continue;
      const long long chunks = tensors[static_cast<long long>(t) * kTensorFields + kFieldNumBlocks];
      double uu = 0.0;
      for (long long k = 0; k < chunks; ++k) uu += run.chunk_uu[next++];
      exact_unorm_coef(coef[t], uu, max_unorm);
    }
    signal.publish(run.stage, kStageReady);
  };

  auto update_block = [&](long long b) {
    long long start, end;
    const long long* row = row_of(b, &start, &end);
    const TensorCoef& cf = coef[block_tensor(blocks[b])];
    if (cf.flags & kCoefSkip) return;
    const int kind = static_cast<int>(row[kFieldKind]);
    const int mode = uses_m ? kind % 3 : kNoState;
    update_fn(kind - kind % 3 + mode, (cf.flags & kCoefFirst) != 0, nesterov)(row, start, end, cf, lam, mu,
                                                                               keep, ix);
  };

  // Claims one stats chunk of group k and runs it (finalizing the group after its last
  // chunk); false when all its chunks are claimed.
  auto stats_one = [&](size_t k, int self) {
    const Group& group = groups[k];
    GroupRun& run = runs[k];
    const long long i = run.stats.claim(self);
    if (i < 0) return false;
    stats_block(group.first_block + i);
    if (run.stats_done.fetch_add(1, std::memory_order_acq_rel) + 1 == group.end_block - group.first_block)
      finalize_group(group, run);
    return true;
  };

  // Every thread walks the groups in order, claiming chunks. A thread that finds a group's
  // stats chunks all claimed but the group not yet finalized (another thread is on its last
  // chunks, or finalizing) takes stats chunks of the next group meanwhile, and sleeps only
  // when there are none: a thread that is descheduled holds up the others for at most the
  // chunk it holds.
  threads = std::max(1, threads);
  for (size_t k = 0; k < groups.size(); ++k) {
    runs[k].stats.split(groups[k].end_block - groups[k].first_block, threads);
    runs[k].update.split(groups[k].end_block - groups[k].first_block, threads);
  }
  auto walk = [&](int self) {
    for (size_t k = 0; k < groups.size(); ++k) {
      const Group& group = groups[k];
      GroupRun& run = runs[k];
      while (stats_one(k, self)) {
      }
      while (run.stage.load(std::memory_order_acquire) < kStageExact && k + 1 < groups.size() &&
             stats_one(k + 1, self)) {
      }
      signal.wait(run.stage, kStageExact);
      if (failed.load(std::memory_order_relaxed)) return;
      const long long exact = static_cast<long long>(run.exact_blocks.size());
      for (long long i; (i = run.exact_next.fetch_add(1, std::memory_order_relaxed)) < exact;) {
        exact_block(run, i);
        if (run.exact_done.fetch_add(1, std::memory_order_acq_rel) + 1 == exact) finish_exact(group, run);
      }
      signal.wait(run.stage, kStageReady);
      for (long long i; (i = run.update.claim(self)) >= 0;) update_block(group.first_block + i);
    }
  };
  run_threads(threads, walk);
  return failed.load() ? 1 : 0;
}

// The 8-bit codes of n values of x (code_map: the dynamic map) as the update computes them,
// tests/test_cpu_schedule.py checks them.
LARS_EXPORT void lars_cpu_nearest_codes(const float* code_map, const float* x, long long n, unsigned char* out) {
  const lars_cpu::CodeIndex& ix = lars_cpu::code_index(code_map);
  for (long long at = 0; at < n; at += lars::kQBlock)  // by 8-bit block, as the update
    lars_cpu::nearest_codes(ix, x + at, static_cast<int>(std::min<long long>(lars::kQBlock, n - at)), out + at);
}

// book[code] * absmax[block] for n codes of 8-bit blocks (code_map: the dynamic map) as the
// stats and update phases dequantize them; tests/test_cpu_schedule.py checks them.
LARS_EXPORT void lars_cpu_dequantize(const float* code_map, const unsigned char* codes, const float* absmax,
                                     long long n, float* out) {
  const lars_cpu::CodeIndex& ix = lars_cpu::code_index(code_map);
  for (long long at = 0; at < n; at += lars::kQBlock)
    lars_cpu::dequantize(ix, codes + at, absmax[at / lars::kQBlock],
                         static_cast<int>(std::min<long long>(lars::kQBlock, n - at)), out + at);
}

// The cache budget of a group of tensors (bytes of p, g and m); <= 0: one group. Returns
// the previous budget. cupylars/cpu.py sets it from the host's cache size.
LARS_EXPORT long long lars_cpu_set_group_bytes(long long bytes) {
  return lars_cpu::group_bytes.exchange(bytes);
}

