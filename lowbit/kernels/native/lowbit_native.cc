// lowbit's native CPU kernels (packed low-bit, GGUF-block and int8 matmuls, paged decode attention),
// called from jitted JAX through the XLA FFI. AVX2+FMA+F16C code is chosen at run time (and, for the
// int8-activation GEMV, AVX-512 VNNI where the CPU has it); a portable scalar path runs elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LOWBIT_X86 1
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWBIT_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Shared helpers: CPU features, scalar conversions, work split over XLA's intra-op thread pool.

bool cpu_has_avx2() {
#ifdef LOWBIT_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#ifdef LOWBIT_X86
  static const bool yes = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

// The highest SIMD level the kernels may use: 2 AVX-512 VNNI, 1 AVX2, 0 the portable code. Lowered by
// lowbit_native_set_simd so that tests can compare the levels on one CPU.
std::atomic<int> simd_limit{2};

bool has_avx2() { return cpu_has_avx2() && simd_limit.load(std::memory_order_relaxed) >= 1; }
bool has_vnni() { return cpu_has_vnni() && simd_limit.load(std::memory_order_relaxed) >= 2; }

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalize the mantissa
      int shift = -1;
      do {
        ++shift;
        mantissa <<= 1;
      } while (!(mantissa & 0x400u));
      bits = sign | (static_cast<uint32_t>(112 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

enum class FloatKind { kF32, kF16, kBF16 };

// A [rows, N] float table (scales or zeros) in f32, f16 or bf16.
struct FloatTable {
  const void* data = nullptr;
  FloatKind kind = FloatKind::kF32;

  float at(int64_t index) const {
    switch (kind) {
      case FloatKind::kF16:
        return half_to_float(static_cast<const uint16_t*>(data)[index]);
      case FloatKind::kBF16:
        return bf16_to_float(static_cast<const uint16_t*>(data)[index]);
      default:
        return static_cast<const float*>(data)[index];
    }
  }
};

// Threads to use: XLA's intra-op pool size, capped by $LOWBIT_NATIVE_THREADS when set (read once).
int64_t thread_limit(ffi::ThreadPool& pool) {
  static const int64_t cap = [] {
    const char* text = std::getenv("LOWBIT_NATIVE_THREADS");
    const long value = text ? std::strtol(text, nullptr, 10) : 0;
    return static_cast<int64_t>(value > 0 ? value : 0);
  }();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return cap > 0 ? std::min(cap, threads) : threads;
}

// Tasks for `bytes` of weights split into `units` pieces: about 32 KiB each (waking a helper costs
// more than reading less than that), at most 8 per thread, at least 1.
int64_t task_count(ffi::ThreadPool& pool, int64_t bytes, int64_t units) {
  const int64_t by_size = std::max<int64_t>(1, bytes / (32 << 10));
  return std::max<int64_t>(1, std::min({units, by_size, 8 * thread_limit(pool)}));
}

// Runs body(task) for task in [0, tasks) on the calling thread and up to (pool threads - 1)
// helpers. Tasks are claimed from a shared counter, so the caller alone can finish all of them:
// no deadlock when the pool is busy, and a helper that starts late finds nothing left to do.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  int64_t threads = std::min<int64_t>(thread_limit(pool), tasks);
  if (threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  const Body* shared_body = &body;
  auto work = [progress, tasks, shared_body]() {
    for (int64_t t; (t = progress->next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      (*shared_body)(t);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < threads; ++i) {
    auto helper = work;
    pool.Schedule(std::move(helper));
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// Packed rows requested this many rows ahead of use. The packed kernels walk a task's columns
// group by group, a pass of one or two strips down a group's rows, N bytes apart: a stride the
// hardware prefetchers did not follow from DRAM (in the model, between other layers' reads). Each
// pass asks for the row kRowsAhead rows on in the order the task reads them, past its last row
// into the next pass's first rows.
constexpr int64_t kRowsAhead = 16;

// Where the pass after one over strips [s, s + width) of group g starts, for a task over strips
// [s0, s1) of `strip` columns: strip s + width of g while inside the task, else strip s0 of group
// g + 1 (nullptr after the last group).
inline const uint8_t* next_pass(const uint8_t* data, int64_t n, int64_t rows_per_group, int64_t groups, int64_t g,
                                int64_t s, int64_t width, int64_t s0, int64_t s1, int64_t strip) {
  if (s + width < s1) return data + g * rows_per_group * n + (s + width) * strip;
  return g + 1 < groups ? data + (g + 1) * rows_per_group * n + s0 * strip : nullptr;
}

// Requests the `bytes` of the pass (at `at`: row 0 of its columns, `rows` rows) kRowsAhead rows after
// its row i, continuing into the next pass at `next` (nullptr: none).
inline void prefetch_ahead(const uint8_t* at, int64_t n, int64_t i, int64_t rows, const uint8_t* next, int64_t bytes) {
  const int64_t ahead = i + kRowsAhead;
  const uint8_t* row = ahead < rows ? at + ahead * n : next ? next + (ahead - rows) * n : nullptr;
  if (row == nullptr) return;
  __builtin_prefetch(row, 0, 3);
  __builtin_prefetch(row + bytes - 1, 0, 3);
}

ffi::Error invalid(const char* message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

bool float_kind(ffi::DataType type, FloatKind* kind) {
  switch (type) {
    case ffi::DataType::F32:
      *kind = FloatKind::kF32;
      return true;
    case ffi::DataType::F16:
      *kind = FloatKind::kF16;
      return true;
    case ffi::DataType::BF16:
      *kind = FloatKind::kBF16;
      return true;
    default:
      return false;
  }
}

// `count` blocks of `block` consecutive floats -> int8 as ggml's q8 rounds activations: per block
// d = max|x| / 127, xq = round-to-nearest-even(x * (1 / d)) clamped to [-127, 127], and the sum of xq.
void quantize_blocks_scalar(const float* x, int64_t count, int64_t block, int8_t* xq, float* xd, int32_t* xqsum) {
  for (int64_t i = 0; i < count; ++i) {
    const float* xb = x + i * block;
    float amax = 0.0f;
    for (int64_t j = 0; j < block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float inverse = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < block; ++j) {
      const int q = static_cast<int>(std::nearbyint(xb[j] * inverse));
      xq[i * block + j] = static_cast<int8_t>(std::min(127, std::max(-127, q)));
      sum += xq[i * block + j];
    }
    xd[i] = d;
    xqsum[i] = sum;
  }
}

#ifdef LOWBIT_X86
// The same arithmetic 8 floats at a time (blocks of a multiple of 8): identical results, since
// _mm256_cvtps_epi32 rounds to nearest even as nearbyint does (the default rounding mode). The scalar
// code's nearbyint is a library call per value (the baseline ISA has no roundss): at K = 1536 that
// cost more than the GEMV.
LOWBIT_AVX2 void quantize_blocks_avx2(const float* x, int64_t count, int64_t block, int8_t* xq, float* xd,
                                      int32_t* xqsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i high = _mm256_set1_epi32(127), low = _mm256_set1_epi32(-127);
  for (int64_t i = 0; i < count; ++i) {
    const float* xb = x + i * block;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t j = 0; j < block; j += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 inverse = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    alignas(32) int32_t q[8];
    for (int64_t j = 0; j < block; j += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j), inverse));
      v = _mm256_max_epi32(low, _mm256_min_epi32(high, v));
      sum = _mm256_add_epi32(sum, v);
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
      for (int t = 0; t < 8; ++t) xq[i * block + j + t] = static_cast<int8_t>(q[t]);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    xd[i] = d;
    xqsum[i] = _mm_cvtsi128_si32(s4);
  }
}
#endif

void quantize_activation_blocks(const float* x, int64_t count, int64_t block, int8_t* xq, float* xd, int32_t* xqsum) {
#ifdef LOWBIT_X86
  if (has_avx2() && block % 8 == 0) return quantize_blocks_avx2(x, count, block, xq, xd, xqsum);
#endif
  quantize_blocks_scalar(x, count, block, xq, xd, xqsum);
}

// ---------------------------------------------------------------------------------------------
// Packed low-bit weights (lowbit.core.packing): data uint8 [rows, N], K-row k of column n in byte
// row k / F at bit offset (k % F) * bits, F = 8 / bits codes per byte. A code u means the value
// q = levels[u] (for integer formats levels[u] = multiplier * u + offset; for the nf4/fp4 code books
// the book's level) and the weight q * scale[g, n] + zero[g, n] for the group g = k / group_size:
//   y[m, n] = sum_g scale[g, n] * sum_{k in g} x[m, k] q[k, n] + zero[g, n] * sum_{k in g} x[m, k].
// Signed q (not u) meets x, so no large sums cancel (as s * (sum x u) + offset * s * sum x would).

struct PackedProblem {
  const float* x;      // [M, kp] activations, zero padded to kp = groups * group_size
  const float* xsum;   // [M, groups] sums of x over each group
  const uint8_t* data; // [rows, N]
  FloatTable scale, zero;
  bool has_zero;
  float offset;        // levels[0]: with unit steps (integer formats) q = u + offset
  const float* levels; // [1 << bits] value of each code
  int64_t m, n, kp, groups, group_size;
  int64_t rows;        // packed rows: the last group holds fewer when group_size does not divide K
  float* y;            // [M, N]
};

// Packed rows of group g (the last group may be partial).
inline int64_t rows_in_group(int64_t rows, int64_t rows_per_group, int64_t g) {
  return std::min(rows_per_group, rows - g * rows_per_group);
}

constexpr int kStrip = 16;  // columns per SIMD strip
constexpr int kRowTile = 4; // activation rows per pass over the weights

template <int BITS>
void packed_columns_scalar(const PackedProblem& p, int64_t n0, int64_t n1) {
  constexpr int F = 8 / BITS;
  constexpr unsigned mask = (1u << BITS) - 1u;
  const int64_t rows_per_group = p.group_size / F;
  for (int64_t m = 0; m < p.m; ++m) {
    const float* xrow = p.x + m * p.kp;
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float dot = 0.0f;
        const uint8_t* w = p.data + g * rows_per_group * p.n + n;
        const float* xg = xrow + g * p.group_size;
        const int64_t group_rows = rows_in_group(p.rows, rows_per_group, g);
        for (int64_t r = 0; r < group_rows; ++r) {
          unsigned byte = w[r * p.n];
          for (int f = 0; f < F; ++f) dot += xg[r * F + f] * p.levels[(byte >> (f * BITS)) & mask];
        }
        total += p.scale.at(g * p.n + n) * dot;
        if (p.has_zero) total += p.zero.at(g * p.n + n) * p.xsum[m * p.groups + g];
      }
      p.y[m * p.n + n] = total;
    }
  }
}

#ifdef LOWBIT_X86
LOWBIT_AVX2 inline __m256 load8(const FloatTable& table, int64_t index) {
  switch (table.kind) {
    case FloatKind::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
          static_cast<const uint16_t*>(table.data) + index)));
    case FloatKind::kBF16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(table.data) + index));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_loadu_ps(static_cast<const float*>(table.data) + index);
  }
}

// Rows [m0, m0 + MT) times the strips [s0, s1), W adjacent strips (16 * W columns, W * 16 bytes of
// each packed row) per pass: 2 * W * MT independent accumulators. Groups outer, so the bytes of one
// group for all strips stay in L1/L2 while the row tile walks across them.
// One group's terms of the output: y[m, n0 + 8h : n0 + 8h + 8] = (the earlier groups' sum, or 0 for the
// first) + scale[g] * sums[m][h] + zero[g] * xsum[m] (asymmetric formats), for MT rows of y from `y`.
template <int MT, int H>
LOWBIT_AVX2 inline void add_group_terms(const FloatTable& scale_table, const FloatTable& zero_table, bool has_zero,
                                        int64_t n, int64_t g, int64_t n0, const __m256 (&sums)[MT][H],
                                        const __m256 (&xsum)[MT], float* y) {
  for (int h = 0; h < H; ++h) {
    const __m256 scale = load8(scale_table, g * n + n0 + 8 * h);
    const __m256 zero = has_zero ? load8(zero_table, g * n + n0 + 8 * h) : _mm256_setzero_ps();
    for (int m = 0; m < MT; ++m) {
      float* out = y + m * n + n0 + 8 * h;
      __m256 value = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
      value = _mm256_fmadd_ps(scale, sums[m][h], value);
      if (has_zero) value = _mm256_fmadd_ps(zero, xsum[m], value);
      _mm256_storeu_ps(out, value);
    }
  }
}

template <int BITS, bool LUT, int MT, int W>
LOWBIT_AVX2 void packed_tile_avx2(const PackedProblem& p, int64_t m0, int64_t s0, int64_t s1) {
  constexpr int F = 8 / BITS;
  const __m128i mask = _mm_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const int64_t rows_per_group = p.group_size / F;
  // code -> q as a float: 4-bit integer codes are offset as integers; 4-bit code books take levels
  // 0-7 or 8-15 by two table permutes and a blend on bit 3; 1- and 2-bit codes index one table.
  const __m256i offset = _mm256_set1_epi32(static_cast<int32_t>(p.offset));
  alignas(32) float values[16] = {};
  for (int i = 0; i < (1 << BITS); ++i) values[i] = p.levels[i];
  const __m256 table = _mm256_load_ps(values);
  const __m256 table_high = _mm256_load_ps(values + 8);
  auto to_q = [&](__m128i u) LOWBIT_AVX2 {
    const __m256i wide = _mm256_cvtepu8_epi32(u);
    if constexpr (BITS == 4 && !LUT) return _mm256_cvtepi32_ps(_mm256_add_epi32(wide, offset));
    if constexpr (BITS == 4 && LUT) {
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table, wide), _mm256_permutevar8x32_ps(table_high, wide),
                              _mm256_castsi256_ps(_mm256_slli_epi32(wide, 28)));
    }
    return _mm256_permutevar8x32_ps(table, wide);
  };
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* xg[MT];
    __m256 xs[MT];
    for (int m = 0; m < MT; ++m) {
      xg[m] = p.x + (m0 + m) * p.kp + g * p.group_size;
      xs[m] = _mm256_set1_ps(p.xsum[(m0 + m) * p.groups + g]);
    }
    for (int64_t s = s0; s + W <= s1; s += W) {
      const int64_t n0 = s * kStrip;
      __m256 acc[MT][2 * W];
      for (int m = 0; m < MT; ++m) {
        for (int h = 0; h < 2 * W; ++h) acc[m][h] = _mm256_setzero_ps();
      }
      const uint8_t* pass = p.data + g * rows_per_group * p.n + n0;
      const uint8_t* next = next_pass(p.data, p.n, rows_per_group, p.groups, g, s, W, s0, s1, kStrip);
      const int64_t group_rows = rows_in_group(p.rows, rows_per_group, g);
      const uint8_t* w = pass;
      for (int64_t r = 0; r < group_rows; ++r, w += p.n) {
        __m128i bytes[W];
        for (int j = 0; j < W; ++j) bytes[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kStrip * j));
        prefetch_ahead(pass, p.n, r, group_rows, next, kStrip * W);
#pragma GCC unroll 8
        for (int f = 0; f < F; ++f) {
          __m256 wq[2 * W];
          for (int j = 0; j < W; ++j) {
            const __m128i u = _mm_and_si128(_mm_srli_epi16(bytes[j], f * BITS), mask);
            wq[2 * j] = to_q(u);
            wq[2 * j + 1] = to_q(_mm_srli_si128(u, 8));
          }
          for (int m = 0; m < MT; ++m) {
            const __m256 xv = _mm256_broadcast_ss(xg[m] + r * F + f);
            for (int h = 0; h < 2 * W; ++h) acc[m][h] = _mm256_fmadd_ps(wq[h], xv, acc[m][h]);
          }
        }
      }
      add_group_terms<MT, 2 * W>(p.scale, p.zero, p.has_zero, p.n, g, n0, acc, xs, p.y + m0 * p.n);
    }
  }
}

// One row tile over strips [s0, s1): W-strip passes, then single strips for the rest.
template <int BITS, bool LUT, int MT, int W>
LOWBIT_AVX2 void packed_rows_avx2(const PackedProblem& p, int64_t m0, int64_t s0, int64_t s1) {
  const int64_t wide_end = s0 + (s1 - s0) / W * W;
  if (wide_end > s0) packed_tile_avx2<BITS, LUT, MT, W>(p, m0, s0, wide_end);
  if constexpr (W > 1) {
    if (wide_end < s1) packed_tile_avx2<BITS, LUT, MT, 1>(p, m0, wide_end, s1);
  }
}

template <int BITS, bool LUT>
LOWBIT_AVX2 void packed_strips_avx2(const PackedProblem& p, int64_t s0, int64_t s1) {
  int64_t m0 = 0;
  for (; m0 + kRowTile <= p.m; m0 += kRowTile) packed_rows_avx2<BITS, LUT, kRowTile, 1>(p, m0, s0, s1);
  switch (p.m - m0) {  // fewer rows: wider passes keep 8 or more accumulators busy
    case 3: packed_rows_avx2<BITS, LUT, 3, 1>(p, m0, s0, s1); break;
    case 2: packed_rows_avx2<BITS, LUT, 2, 2>(p, m0, s0, s1); break;
    case 1: packed_rows_avx2<BITS, LUT, 1, 4>(p, m0, s0, s1); break;
    default: break;
  }
}
#endif

// Whether the levels are levels[0] + u (integer formats): then 4-bit codes need no table.
bool unit_steps(const float* levels, int bits) {
  for (int i = 1; i < (1 << bits); ++i) {
    if (levels[i] != levels[0] + static_cast<float>(i)) return false;
  }
  return true;
}

// Splits the columns over tasks: strips of `strip` columns for the AVX2 code (the last N % strip
// columns go to the scalar code in one more task), single columns for the scalar code.
template <typename Simd, typename Scalar>
void split_columns(ffi::ThreadPool& pool, int64_t n, int64_t weight_bytes, int64_t strip, const Simd& simd_strips,
                   const Scalar& scalar_columns) {
  const bool simd = has_avx2();
  const int64_t units = simd ? n / strip : n;
  const int64_t tail = simd ? units * strip : n;
  const int64_t tasks = task_count(pool, weight_bytes, std::max<int64_t>(units, 1));
  const int64_t per_task = (units + tasks - 1) / tasks;
  parallel_for(pool, tasks + 1, [&](int64_t t) {
    if (t == tasks) {
      if (tail < n) scalar_columns(tail, n);
      return;
    }
    const int64_t u0 = t * per_task, u1 = std::min(units, u0 + per_task);
    if (u0 >= u1) return;
    if (simd) {
      simd_strips(u0, u1);
    } else {
      scalar_columns(u0, u1);
    }
  });
}

template <int BITS>
void packed_matmul_run(ffi::ThreadPool& pool, const PackedProblem& p) {
  const bool lut = BITS == 4 && !unit_steps(p.levels, BITS);
  split_columns(
      pool, p.n, p.rows * p.n, kStrip,
      [&](int64_t s0, int64_t s1) {
#ifdef LOWBIT_X86
        if (lut) {
          packed_strips_avx2<BITS, true>(p, s0, s1);
        } else {
          packed_strips_avx2<BITS, false>(p, s0, s1);
        }
#endif
      },
      [&](int64_t n0, int64_t n1) { packed_columns_scalar<BITS>(p, n0, n1); });
}

// ---------------------------------------------------------------------------------------------
// Int8 activations for integer codes (q = multiplier * u + offset, integers: int4/int2 sym/asym,
// ternary, binary): x is rounded per row and activation block (`block` inputs, dividing the group)
// to xq = round(x / dx) in [-127, 127] with dx = max|x| / 127 (ggml's q8 rounding), and the block's
//   sum_k xq[k] q[k, n] = multiplier * sum_k xq[k] u[k, n] + offset * sum_k xq[k]
// is exact in integers. Then y[m, n] = sum_g scale[g, n] sum_{b in g} dx_b (that sum)
// + zero[g, n] xhatsum[g], with xhatsum the group's sum of the rounded x (dx_b * sum xq): the
// product of the rounded x with the weight, to float rounding.

struct PackedQ8Problem {
  const int8_t* xq;      // [M, kp] rounded activations, zero padded to kp = groups * group_size
  const float* xd;       // [M, kp / block] each block's dx
  const int32_t* xqsum;  // [M, kp / block] each block's sum of xq
  const float* xhatsum;  // [M, groups] each group's sum of dx * xq
  const uint8_t* data;   // [rows, N]
  FloatTable scale, zero;
  bool has_zero;
  int32_t multiplier, offset;
  int64_t m, n, kp, groups, group_size, block, rows;
  float* y;
};

template <int BITS>
void packed_q8_columns_scalar(const PackedQ8Problem& p, int64_t n0, int64_t n1) {
  constexpr int F = 8 / BITS;
  constexpr unsigned mask = (1u << BITS) - 1u;
  const int64_t rows_per_group = p.group_size / F, rows_per_block = p.block / F;
  const int64_t blocks_per_group = p.group_size / p.block, blocks = p.kp / p.block;
  for (int64_t m = 0; m < p.m; ++m) {
    const int8_t* xrow = p.xq + m * p.kp;
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float group_dot = 0.0f;
        for (int64_t j = 0; j < blocks_per_group; ++j) {
          const int64_t b = g * blocks_per_group + j;
          const int64_t r0 = g * rows_per_group + j * rows_per_block;
          const int64_t r1 = std::min(p.rows, r0 + rows_per_block);
          int32_t dot = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const unsigned byte = p.data[r * p.n + n];
            for (int f = 0; f < F; ++f) dot += static_cast<int32_t>((byte >> (f * BITS)) & mask) * xrow[r * F + f];
          }
          const int32_t exact = p.multiplier * dot + p.offset * p.xqsum[m * blocks + b];
          group_dot += p.xd[m * blocks + b] * static_cast<float>(exact);
        }
        total += p.scale.at(g * p.n + n) * group_dot;
        if (p.has_zero) total += p.zero.at(g * p.n + n) * p.xhatsum[m * p.groups + g];
      }
      p.y[m * p.n + n] = total;
    }
  }
}

#ifdef LOWBIT_X86
constexpr int kQ8Strip = 32;  // columns per int8 SIMD strip (one 32-byte load per packed row)
// Activation rows per pass: two keep the int16 sums, codes and broadcasts in the 16 ymm registers
// (four spilled to the stack: as slow per row as one row at a time).
constexpr int kQ8RowTile = 2;

// Where one pass of packed_q8_strip is: MT activation rows from m0, W strips of 32 columns from n0, the
// packed rows [r0, r1) of one activation block inside group rows from `first` (`group_rows` of them,
// their columns at `pass`), the next pass at `next` (for the prefetches).
struct Q8Pass {
  int64_t m0, n0, r0, r1, first, group_rows;
  const uint8_t* pass;
  const uint8_t* next;
};

// One block's integer dots: dot[m][4w + h] = sum over the block's K-rows of xq[m0 + m, k] u[k, n] for the
// columns n = n0 + 32w + 8h .. + 7. Per packed row the codes of K-rows (k, k+1) are split from the byte
// and interleaved into (u[k, n], u[k+1, n]) byte pairs, and _mm256_maddubs_epi16 against the broadcast
// (xq[k], xq[k+1]) gives each column's pair sum in int16, widened to int32 before it can overflow
// (|sum| <= pairs * 2 * max u * 127 <= 32767).
template <int BITS, int MT, int W>
LOWBIT_AVX2 inline void q8_block_dots_avx2(const PackedQ8Problem& p, const Q8Pass& at, __m256i (&dot)[MT][4 * W]) {
  constexpr int F = 8 / BITS, PAIRS = F / 2, MAX_CODE = (1 << BITS) - 1;
  constexpr int64_t kChunkRows = 32767 / (2 * MAX_CODE * 127) / PAIRS;  // 4-bit: 8, 2-bit: 21, 1-bit: 32
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(MAX_CODE));
  for (int64_t c0 = at.r0; c0 < at.r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(at.r1, c0 + kChunkRows);
    __m256i part[MT][2 * W];
    for (int m = 0; m < MT; ++m) {
      for (int h = 0; h < 2 * W; ++h) part[m][h] = _mm256_setzero_si256();
    }
    for (int64_t r = c0; r < c1; ++r) {
      __m256i bytes[W];
      for (int w = 0; w < W; ++w) {
        bytes[w] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.data + r * p.n + at.n0 + kQ8Strip * w));
      }
      prefetch_ahead(at.pass, p.n, r - at.first, at.group_rows, at.next, kQ8Strip * W);
#pragma GCC unroll 4
      for (int i = 0; i < PAIRS; ++i) {
        __m256i xv[MT];
        for (int m = 0; m < MT; ++m) {
          int16_t pair;
          std::memcpy(&pair, p.xq + (at.m0 + m) * p.kp + r * F + 2 * i, sizeof(pair));
          xv[m] = _mm256_set1_epi16(pair);
        }
        for (int w = 0; w < W; ++w) {
          const __m256i even = _mm256_and_si256(_mm256_srli_epi16(bytes[w], 2 * i * BITS), mask);
          const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(bytes[w], (2 * i + 1) * BITS), mask);
          // Per 128-bit lane: columns 0-7 (16-23) in `low`, 8-15 (24-31) in `high`.
          const __m256i low = _mm256_unpacklo_epi8(even, odd), high = _mm256_unpackhi_epi8(even, odd);
          for (int m = 0; m < MT; ++m) {
            part[m][2 * w] = _mm256_add_epi16(part[m][2 * w], _mm256_maddubs_epi16(low, xv[m]));
            part[m][2 * w + 1] = _mm256_add_epi16(part[m][2 * w + 1], _mm256_maddubs_epi16(high, xv[m]));
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      for (int w = 0; w < W; ++w) {
        const __m256i low = part[m][2 * w], high = part[m][2 * w + 1];
        __m256i* d = dot[m] + 4 * w;
        d[0] = _mm256_add_epi32(d[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(low)));
        d[1] = _mm256_add_epi32(d[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(high)));
        d[2] = _mm256_add_epi32(d[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(low, 1)));
        d[3] = _mm256_add_epi32(d[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(high, 1)));
      }
    }
  }
}

// The same dots with AVX-512 VNNI (4- and 2-bit codes) on 256-bit registers: each step takes four
// consecutive K-rows (two packed rows of 4-bit codes, one of 2-bit), gathers each column's four codes
// into one 32-bit lane (byte, then 16-bit interleaves) and _mm256_dpbusd_epi32 adds u[k..k+3] .
// xq[k..k+3] straight to int32 sums: no int16 partial sums to widen, fewer instructions per code. The
// same integers as the AVX2 dots, so y is bit-identical. (A block's odd last 4-bit row meets a zero row.)
template <int BITS, int MT, int W>
LOWBIT_VNNI void q8_block_dots_vnni(const PackedQ8Problem& p, const Q8Pass& at, __m256i (&dot)[MT][4 * W]) {
  static_assert(BITS == 4 || BITS == 2, "VNNI steps take 4-bit or 2-bit codes");
  constexpr int F = 8 / BITS, STEP = 4 / F;  // packed rows per step of four K-rows
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  __m256i quad[MT][4 * W];  // quad[m][4w + h]: columns 32w + 4h + (0..3) and 32w + 16 + 4h + (0..3)
  for (int m = 0; m < MT; ++m) {
    for (int h = 0; h < 4 * W; ++h) quad[m][h] = _mm256_setzero_si256();
  }
  for (int64_t r = at.r0; r < at.r1; r += STEP) {
    __m256i xv[MT];
    for (int m = 0; m < MT; ++m) {  // xq of K-rows r*F .. r*F + 3 (the buffer has 4 bytes of slack)
      int32_t four;
      std::memcpy(&four, p.xq + (at.m0 + m) * p.kp + r * F, sizeof(four));
      xv[m] = _mm256_set1_epi32(four);
    }
    for (int w = 0; w < W; ++w) {
      const uint8_t* row = p.data + r * p.n + at.n0 + kQ8Strip * w;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      __m256i k0, k1, k2, k3;  // the codes of K-rows r*F + (0, 1, 2, 3), one byte per column
      if constexpr (BITS == 4) {
        const __m256i b1 = r + 1 < at.r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p.n))
                                         : _mm256_setzero_si256();
        k0 = _mm256_and_si256(b0, mask);
        k1 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), mask);
        k2 = _mm256_and_si256(b1, mask);
        k3 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), mask);
      } else {
        k0 = _mm256_and_si256(b0, mask);
        k1 = _mm256_and_si256(_mm256_srli_epi16(b0, 2), mask);
        k2 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), mask);
        k3 = _mm256_and_si256(_mm256_srli_epi16(b0, 6), mask);
      }
      const __m256i lo01 = _mm256_unpacklo_epi8(k0, k1), hi01 = _mm256_unpackhi_epi8(k0, k1);
      const __m256i lo23 = _mm256_unpacklo_epi8(k2, k3), hi23 = _mm256_unpackhi_epi8(k2, k3);
      const __m256i q[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                            _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
      for (int m = 0; m < MT; ++m) {
        for (int h = 0; h < 4; ++h) quad[m][4 * w + h] = _mm256_dpbusd_epi32(quad[m][4 * w + h], q[h], xv[m]);
      }
    }
    for (int i = 0; i < STEP && r + i < at.r1; ++i) {
      prefetch_ahead(at.pass, p.n, r + i - at.first, at.group_rows, at.next, kQ8Strip * W);
    }
  }
  for (int m = 0; m < MT; ++m) {  // to the AVX2 dots' column order
    for (int w = 0; w < W; ++w) {
      const __m256i* qd = quad[m] + 4 * w;
      dot[m][4 * w] = _mm256_permute2x128_si256(qd[0], qd[1], 0x20);
      dot[m][4 * w + 1] = _mm256_permute2x128_si256(qd[2], qd[3], 0x20);
      dot[m][4 * w + 2] = _mm256_permute2x128_si256(qd[0], qd[1], 0x31);
      dot[m][4 * w + 3] = _mm256_permute2x128_si256(qd[2], qd[3], 0x31);
    }
  }
}

// MT activation rows times the 32 * W columns at n0, over group g: each block's integer dots (the VNNI
// code is called per block, not inlined: GCC inlines no wider-target callee into this AVX2 code), made exact (multiplier * dot + offset * xqsum) and turned into floats once (times
// dx); then the group adds scale * that + zero * xhatsum to y.
template <int BITS, bool VNNI, int MT, int W>
LOWBIT_AVX2 void packed_q8_strip(const PackedQ8Problem& p, int64_t m0, int64_t n0, int64_t g, const uint8_t* next) {
  constexpr int F = 8 / BITS;
  const __m256i multiplier = _mm256_set1_epi32(p.multiplier);
  const int64_t rows_per_group = p.group_size / F, rows_per_block = p.block / F;
  const int64_t blocks_per_group = p.group_size / p.block, blocks = p.kp / p.block;
  const int64_t first = g * rows_per_group;
  Q8Pass at{m0, n0, 0, 0, first, rows_in_group(p.rows, rows_per_group, g), p.data + first * p.n + n0, next};
  __m256 group_dot[MT][4 * W];
  for (int m = 0; m < MT; ++m) {
    for (int h = 0; h < 4 * W; ++h) group_dot[m][h] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < blocks_per_group; ++j) {
    const int64_t b = g * blocks_per_group + j;
    at.r0 = first + j * rows_per_block;
    at.r1 = std::min(p.rows, at.r0 + rows_per_block);
    __m256i dot[MT][4 * W];
    if constexpr (VNNI) {
      q8_block_dots_vnni<BITS, MT, W>(p, at, dot);
    } else {
      for (int m = 0; m < MT; ++m) {
        for (int h = 0; h < 4 * W; ++h) dot[m][h] = _mm256_setzero_si256();
      }
      q8_block_dots_avx2<BITS, MT, W>(p, at, dot);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      const __m256i offset = _mm256_set1_epi32(p.offset * p.xqsum[i]);
      const __m256 dx = _mm256_set1_ps(p.xd[i]);
      for (int h = 0; h < 4 * W; ++h) {
        const __m256i codes = p.multiplier == 1 ? dot[m][h] : _mm256_mullo_epi32(dot[m][h], multiplier);
        const __m256i exact = _mm256_add_epi32(codes, offset);
        group_dot[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), dx, group_dot[m][h]);
      }
    }
  }
  __m256 xs[MT];
  for (int m = 0; m < MT; ++m) xs[m] = _mm256_set1_ps(p.xhatsum[(m0 + m) * p.groups + g]);
  add_group_terms<MT, 4 * W>(p.scale, p.zero, p.has_zero, p.n, g, n0, group_dot, xs, p.y + m0 * p.n);
}

// One row tile over strips [s0, s1) of 32 columns: groups outer, so each group's packed rows are read
// as contiguous runs across the strips (a strip at a time walks down K with a stride of N bytes, which
// at N = 49152 maps every row to the same cache sets: measured 2.6x slower). One row takes two strips
// per pass (a whole cache line of each packed row, more independent sums).
template <int BITS, bool VNNI, int MT>
LOWBIT_AVX2 void packed_q8_rows(const PackedQ8Problem& p, int64_t m0, int64_t s0, int64_t s1) {
  constexpr int W = MT == 1 ? 2 : 1;
  const int64_t rows_per_group = p.group_size / (8 / BITS);
  auto next = [&](int64_t g, int64_t s, int64_t width) {
    return next_pass(p.data, p.n, rows_per_group, p.groups, g, s, width, s0, s1, kQ8Strip);
  };
  for (int64_t r = 0; r < std::min(kRowsAhead, p.rows); ++r) __builtin_prefetch(p.data + r * p.n + s0 * kQ8Strip, 0, 3);
  for (int64_t g = 0; g < p.groups; ++g) {
    int64_t s = s0;
    for (; s + W <= s1; s += W) packed_q8_strip<BITS, VNNI, MT, W>(p, m0, s * kQ8Strip, g, next(g, s, W));
    if constexpr (W > 1) {
      for (; s < s1; ++s) packed_q8_strip<BITS, VNNI, MT, 1>(p, m0, s * kQ8Strip, g, next(g, s, 1));
    }
  }
}

template <int BITS, bool VNNI>
LOWBIT_AVX2 void packed_q8_strips(const PackedQ8Problem& p, int64_t s0, int64_t s1) {
  int64_t m0 = 0;
  for (; m0 + kQ8RowTile <= p.m; m0 += kQ8RowTile) packed_q8_rows<BITS, VNNI, kQ8RowTile>(p, m0, s0, s1);
  if (m0 < p.m) packed_q8_rows<BITS, VNNI, 1>(p, m0, s0, s1);
}
#endif

template <int BITS>
void packed_q8_run(ffi::ThreadPool& pool, const PackedQ8Problem& p) {
#ifdef LOWBIT_X86
  constexpr int64_t strip = kQ8Strip;
#else
  constexpr int64_t strip = kStrip;
#endif
  const bool vnni = BITS != 1 && has_vnni();  // (binary codes keep the AVX2 dots)
  split_columns(
      pool, p.n, p.rows * p.n, strip,
      [&](int64_t s0, int64_t s1) {
#ifdef LOWBIT_X86
        if constexpr (BITS != 1) {
          if (vnni) return packed_q8_strips<BITS, true>(p, s0, s1);
        }
        packed_q8_strips<BITS, false>(p, s0, s1);
#endif
      },
      [&](int64_t n0, int64_t n1) { packed_q8_columns_scalar<BITS>(p, n0, n1); });
}

// The checks both packed kernels make of a packed weight data [rows, N] over K inputs: bits, code
// values, group size, and scale/zero tables of [groups, N] in a float type the kernels read.
ffi::Error check_packed_weight(const char* kernel, const ffi::Buffer<ffi::U8>& data, const ffi::AnyBuffer& scale,
                               const ffi::AnyBuffer& zero, const ffi::Buffer<ffi::F32>& levels, int64_t k,
                               int64_t bits, int64_t group_size, int64_t has_zero, FloatKind* scale_kind,
                               FloatKind* zero_kind, int64_t* groups) {
  auto fail = [kernel](const char* what) { return invalid((std::string(kernel) + ": " + what).c_str()); };
  if (bits != 1 && bits != 2 && bits != 4) return fail("bits must be 1, 2 or 4");
  if (static_cast<int64_t>(levels.element_count()) != (int64_t{1} << bits)) return fail("levels must hold 2**bits values");
  const int64_t fields = 8 / bits, rows = data.dimensions()[0], n = data.dimensions()[1];
  if (rows * fields < k || rows * fields - k >= fields) return fail("data must hold ceil(K / codes per byte) rows");
  if (group_size <= 0 || group_size % fields) return fail("group_size must be a positive multiple of the codes per byte");
  *groups = (rows * fields + group_size - 1) / group_size;  // the last group may be partial
  if (!float_kind(scale.element_type(), scale_kind) || !float_kind(zero.element_type(), zero_kind)) {
    return fail("scale and zero must be f32, f16 or bf16");
  }
  if (static_cast<int64_t>(scale.element_count()) != *groups * n ||
      (has_zero && static_cast<int64_t>(zero.element_count()) != *groups * n)) {
    return fail("scale/zero must have shape [groups, N]");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Blocked GEMM for many activation rows (prefill, training): out[M, C] = A[M, R] B[R, C], where B is
// never held whole: a `fill` dequantizes one panel B[r0:r1, c0:c1] (kGemmDepth x kGemmPanel floats,
// 64 KiB, cache resident) and every row of A meets it through a 6 x 16 FMA micro-kernel. Tasks take
// column panels (claimed one at a time, so both cores stay busy); each walks the reduction in
// kGemmDepth steps, writing its output columns on the first and adding on the others. The decoding
// costs R x C per call, not per row.

constexpr int kGemmRows = 6;      // rows of A per micro-kernel (12 accumulators + 2 B + 1 A registers)
constexpr int kGemmDepth = 256;   // reduction rows per panel
constexpr int kGemmPanel = 64;    // output columns per panel (a multiple of kStrip)

// out[m, 0:cols] (+)= sum_r a[m, r] b[r, 0:16] for MT rows, `depth` reduction rows, b's row stride `width`.
template <int MT>
void gemm_micro_scalar(const float* a, int64_t lda, const float* b, int64_t width, int64_t depth, float* out,
                       int64_t ldo, int64_t cols, bool accumulate) {
  float acc[MT][kStrip] = {};
  for (int64_t r = 0; r < depth; ++r) {
    const float* br = b + r * width;
    for (int m = 0; m < MT; ++m) {
      const float av = a[m * lda + r];
      for (int j = 0; j < kStrip; ++j) acc[m][j] += av * br[j];
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int64_t j = 0; j < cols; ++j) out[m * ldo + j] = accumulate ? out[m * ldo + j] + acc[m][j] : acc[m][j];
  }
}

#ifdef LOWBIT_X86
// Always 6 rows in named registers (an accumulator array made GCC store every FMA's result to the
// stack); a tile of fewer rows repeats its last row and drops the copies.
template <int MT>
LOWBIT_AVX2 void gemm_micro_avx2(const float* a, int64_t lda, const float* b, int64_t width, int64_t depth, float* out,
                                 int64_t ldo, int64_t cols, bool accumulate) {
  const float* a0 = a;
  const float* a1 = a + std::min(1, MT - 1) * lda;
  const float* a2 = a + std::min(2, MT - 1) * lda;
  const float* a3 = a + std::min(3, MT - 1) * lda;
  const float* a4 = a + std::min(4, MT - 1) * lda;
  const float* a5 = a + std::min(5, MT - 1) * lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t r = 0; r < depth; ++r) {
    const __m256 b0 = _mm256_loadu_ps(b + r * width), b1 = _mm256_loadu_ps(b + r * width + 8);
    __m256 av = _mm256_broadcast_ss(a0 + r);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + r);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + r);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + r);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + r);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + r);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  alignas(32) float part[6][kStrip];
  _mm256_store_ps(part[0], c00);
  _mm256_store_ps(part[0] + 8, c01);
  _mm256_store_ps(part[1], c10);
  _mm256_store_ps(part[1] + 8, c11);
  _mm256_store_ps(part[2], c20);
  _mm256_store_ps(part[2] + 8, c21);
  _mm256_store_ps(part[3], c30);
  _mm256_store_ps(part[3] + 8, c31);
  _mm256_store_ps(part[4], c40);
  _mm256_store_ps(part[4] + 8, c41);
  _mm256_store_ps(part[5], c50);
  _mm256_store_ps(part[5] + 8, c51);
  for (int m = 0; m < MT; ++m) {
    float* o = out + m * ldo;
    for (int64_t j = 0; j < cols; ++j) o[j] = accumulate ? o[j] + part[m][j] : part[m][j];
  }
}
#endif

template <int MT>
void gemm_micro(bool simd, const float* a, int64_t lda, const float* b, int64_t width, int64_t depth, float* out,
                int64_t ldo, int64_t cols, bool accumulate) {
#ifdef LOWBIT_X86
  if (simd) return gemm_micro_avx2<MT>(a, lda, b, width, depth, out, ldo, cols, accumulate);
#endif
  gemm_micro_scalar<MT>(a, lda, b, width, depth, out, ldo, cols, accumulate);
}

// Runs out = A B with B made by fill(r0, r1, c0, c1, buffer, width): buffer[(i - r0) * width + (j - c0)]
// = B[i, j] for r0 <= i < r1, c0 <= j < c1 (columns past c1 in the buffer stay zero).
template <typename Fill>
void gemm_run(ffi::ThreadPool& pool, const float* a, int64_t m, int64_t depth_total, int64_t c, float* out,
              const Fill& fill) {
  const bool simd = has_avx2();
  const int64_t panels = (c + kGemmPanel - 1) / kGemmPanel;
  parallel_for(pool, panels, [&](int64_t t) {
    const int64_t c0 = t * kGemmPanel, c1 = std::min(c, c0 + kGemmPanel);
    const int64_t width = (c1 - c0 + kStrip - 1) / kStrip * kStrip;
    std::vector<float> panel(static_cast<size_t>(kGemmDepth * width), 0.0f);
    for (int64_t r0 = 0; r0 < depth_total; r0 += kGemmDepth) {
      const int64_t r1 = std::min(depth_total, r0 + kGemmDepth), depth = r1 - r0;
      fill(r0, r1, c0, c1, panel.data(), width);
      const bool accumulate = r0 > 0;
      for (int64_t m0 = 0; m0 < m; m0 += kGemmRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, m - m0));
        const float* am = a + m0 * depth_total + r0;
        for (int64_t s = 0; s < width; s += kStrip) {
          const int64_t cols = std::min<int64_t>(kStrip, c1 - c0 - s);
          float* o = out + m0 * c + c0 + s;
          const float* b = panel.data() + s;
          switch (rows) {
            case 6: gemm_micro<6>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
            case 5: gemm_micro<5>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
            case 4: gemm_micro<4>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
            case 3: gemm_micro<3>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
            case 2: gemm_micro<2>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
            default: gemm_micro<1>(simd, am, depth_total, b, width, depth, o, c, cols, accumulate); break;
          }
        }
      }
    }
  });
}

// One K-row of a packed weight, W[k, n0:n1], dequantized as the XLA reference does (levels[u] *
// scale, then + zero: the same two roundings, so the values are bit-identical).
struct PackedWeightView {
  const uint8_t* data;  // [rows, N]
  FloatTable scale, zero;
  bool has_zero;
  const float* levels;
  int64_t n, group_size;
};

template <int BITS>
void packed_row_scalar(const PackedWeightView& w, int64_t k, int64_t n0, int64_t n1, float* out) {
  constexpr int F = 8 / BITS;
  const uint8_t* row = w.data + (k / F) * w.n;
  const int shift = static_cast<int>(k % F) * BITS;
  const int64_t g = k / w.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    float value = w.levels[(row[n] >> shift) & ((1u << BITS) - 1u)] * w.scale.at(g * w.n + n);
    if (w.has_zero) value += w.zero.at(g * w.n + n);
    out[n - n0] = value;
  }
}

#ifdef LOWBIT_X86
template <int BITS>
LOWBIT_AVX2 void packed_row_avx2(const PackedWeightView& w, int64_t k, int64_t n0, int64_t n1, float* out) {
  constexpr int F = 8 / BITS;
  const uint8_t* row = w.data + (k / F) * w.n;
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(k % F) * BITS);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int64_t g = k / w.group_size;
  alignas(32) float values[16] = {};
  for (int i = 0; i < (1 << BITS); ++i) values[i] = w.levels[i];
  const __m256 low = _mm256_load_ps(values), high = _mm256_load_ps(values + 8);
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const __m256i u = _mm256_and_si256(
        _mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + n))), shift), mask);
    __m256 q = _mm256_permutevar8x32_ps(low, u);
    if constexpr (BITS == 4) {
      q = _mm256_blendv_ps(q, _mm256_permutevar8x32_ps(high, u), _mm256_castsi256_ps(_mm256_slli_epi32(u, 28)));
    }
    __m256 value = _mm256_mul_ps(q, load8(w.scale, g * w.n + n));
    if (w.has_zero) value = _mm256_add_ps(value, load8(w.zero, g * w.n + n));
    _mm256_storeu_ps(out + (n - n0), value);
  }
  if (n < n1) packed_row_scalar<BITS>(w, k, n, n1, out + (n - n0));
}
#endif

template <int BITS>
void packed_row(bool simd, const PackedWeightView& w, int64_t k, int64_t n0, int64_t n1, float* out) {
#ifdef LOWBIT_X86
  if (simd) return packed_row_avx2<BITS>(w, k, n0, n1, out);
#endif
  packed_row_scalar<BITS>(w, k, n0, n1, out);
}

// y [M, N] = x [M, K] W: panels of W[k0:k1, n0:n1] row by row.
template <int BITS>
void packed_gemm(ffi::ThreadPool& pool, const PackedWeightView& w, const float* x, int64_t m, int64_t k, float* y) {
  const bool simd = has_avx2();
  gemm_run(pool, x, m, k, w.n, y, [&](int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* panel, int64_t width) {
    for (int64_t kk = k0; kk < k1; ++kk) packed_row<BITS>(simd, w, kk, n0, n1, panel + (kk - k0) * width);
  });
}

// x-bar [M, K] = g [M, N] W^T: the panel holds W^T[n0:n1, k0:k1], each K-row of W dequantized along
// n and written down a column of the panel.
template <int BITS>
void packed_gemm_transposed(ffi::ThreadPool& pool, const PackedWeightView& w, const float* g, int64_t m, int64_t k,
                            float* xbar) {
  const bool simd = has_avx2();
  gemm_run(pool, g, m, w.n, k, xbar, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* panel, int64_t width) {
    float row[kGemmDepth];
    for (int64_t kk = k0; kk < k1; ++kk) {
      packed_row<BITS>(simd, w, kk, n0, n1, row);
      for (int64_t i = 0; i < n1 - n0; ++i) panel[i * width + (kk - k0)] = row[i];
    }
  });
}

template <int BITS>
void packed_gemm_any(ffi::ThreadPool& pool, bool transposed, const PackedWeightView& w, const float* a, int64_t m,
                     int64_t k, float* out) {
  if (transposed) {
    packed_gemm_transposed<BITS>(pool, w, a, m, k, out);
  } else {
    packed_gemm<BITS>(pool, w, a, m, k, out);
  }
}

void packed_gemm_dispatch(ffi::ThreadPool& pool, int64_t bits, bool transposed, const PackedWeightView& w,
                          const float* a, int64_t m, int64_t k, float* out) {
  switch (bits) {
    case 4: packed_gemm_any<4>(pool, transposed, w, a, m, k, out); break;
    case 2: packed_gemm_any<2>(pool, transposed, w, a, m, k, out); break;
    default: packed_gemm_any<1>(pool, transposed, w, a, m, k, out); break;
  }
}

// check_packed_weight, then the weight as the GEMMs and the dequantization read it.
ffi::Error packed_weight_view(const char* kernel, const ffi::Buffer<ffi::U8>& data, const ffi::AnyBuffer& scale,
                              const ffi::AnyBuffer& zero, const ffi::Buffer<ffi::F32>& levels, int64_t k, int64_t bits,
                              int64_t group_size, int64_t has_zero, PackedWeightView* view) {
  FloatKind scale_kind, zero_kind;
  int64_t groups = 0;
  ffi::Error error = check_packed_weight(kernel, data, scale, zero, levels, k, bits, group_size, has_zero, &scale_kind,
                                         &zero_kind, &groups);
  if (error.failure()) return error;
  *view = PackedWeightView{data.typed_data(), {scale.untyped_data(), scale_kind}, {zero.untyped_data(), zero_kind},
                           has_zero != 0, levels.typed_data(), data.dimensions()[1], group_size};
  return ffi::Error::Success();
}

// The int8-activation product (the GEMV at every row count): checks that the codes are integers
// (levels[u] = multiplier * u + offset) and that `block` divides the group into whole packed rows,
// rounds x per block, then runs the kernel over column strips.
ffi::Error packed_q8_matmul(ffi::ThreadPool& pool, const float* x, const ffi::Buffer<ffi::U8>& data,
                            const ffi::AnyBuffer& scale, const ffi::AnyBuffer& zero, const ffi::Buffer<ffi::F32>& levels,
                            float* y, int64_t m, int64_t k, int64_t bits, int64_t group_size, int64_t has_zero,
                            int64_t groups, int64_t block, FloatKind scale_kind, FloatKind zero_kind) {
  const int64_t fields = 8 / bits;
  if (block <= 0 || block > 4096 || block % fields || group_size % block) {  // 4096: int32 block sums
    return invalid("packed_matmul: block must be at most 4096 and divide group_size into whole packed rows");
  }
  const float* values = levels.typed_data();
  const float multiplier = values[1] - values[0];
  for (int64_t i = 0; i < (int64_t{1} << bits); ++i) {
    const float expected = values[0] + multiplier * static_cast<float>(i);
    if (values[i] != expected || values[i] != std::nearbyint(values[i]) || std::fabs(values[i]) > 1024.0f) {
      return invalid("packed_matmul: int8 activations need integer codes (levels[u] = multiplier * u + offset)");
    }
  }
  const int64_t n = data.dimensions()[1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  const int64_t kp = groups * group_size, blocks = kp / block;
  std::vector<float> xpad(static_cast<size_t>(m * kp), 0.0f);
  for (int64_t i = 0; i < m; ++i) std::memcpy(&xpad[i * kp], x + i * k, sizeof(float) * k);
  std::vector<int8_t> xq(static_cast<size_t>(m * kp + 4));  // + 4: the VNNI kernel reads 4 at a time
  std::vector<float> xd(static_cast<size_t>(m * blocks)), xhatsum(static_cast<size_t>(m * groups), 0.0f);
  std::vector<int32_t> xqsum(static_cast<size_t>(m * blocks));
  quantize_activation_blocks(xpad.data(), m * blocks, block, xq.data(), xd.data(), xqsum.data());
  for (int64_t b = 0; b < m * blocks; ++b) {
    xhatsum[b / (group_size / block)] += xd[b] * static_cast<float>(xqsum[b]);
  }
  PackedQ8Problem p{};
  p.xq = xq.data();
  p.xd = xd.data();
  p.xqsum = xqsum.data();
  p.xhatsum = xhatsum.data();
  p.data = data.typed_data();
  p.scale = {scale.untyped_data(), scale_kind};
  p.zero = {zero.untyped_data(), zero_kind};
  p.has_zero = has_zero != 0;
  p.multiplier = static_cast<int32_t>(multiplier);
  p.offset = static_cast<int32_t>(values[0]);
  p.m = m;
  p.n = n;
  p.kp = kp;
  p.groups = groups;
  p.group_size = group_size;
  p.block = block;
  p.rows = data.dimensions()[0];
  p.y = y;
  switch (bits) {
    case 4: packed_q8_run<4>(pool, p); break;
    case 2: packed_q8_run<2>(pool, p); break;
    default: packed_q8_run<1>(pool, p); break;
  }
  return ffi::Error::Success();
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> data,
                            ffi::AnyBuffer scale, ffi::AnyBuffer zero, ffi::Buffer<ffi::F32> levels,
                            ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size, int64_t has_zero,
                            int64_t gemm_rows, int64_t activations, int64_t block) {
  auto xd = x.dimensions();
  auto wd = data.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return invalid("packed_matmul: x and data must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  PackedProblem p{};
  int64_t groups = 0;
  ffi::Error error = check_packed_weight("packed_matmul", data, scale, zero, levels, k, bits, group_size, has_zero,
                                         &p.scale.kind, &p.zero.kind, &groups);
  if (error.failure()) return error;
  if (activations != 0 && activations != 1) return invalid("packed_matmul: activations must be 0 (f32) or 1 (int8)");
  if (activations == 1) {
    return packed_q8_matmul(pool, x.typed_data(), data, scale, zero, levels, y->typed_data(), m, k, bits, group_size,
                            has_zero, groups, block, p.scale.kind, p.zero.kind);
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (m >= gemm_rows) {
    const PackedWeightView w{data.typed_data(), {scale.untyped_data(), p.scale.kind}, {zero.untyped_data(), p.zero.kind},
                             has_zero != 0, levels.typed_data(), n, group_size};
    packed_gemm_dispatch(pool, bits, false, w, x.typed_data(), m, k, y->typed_data());
    return ffi::Error::Success();
  }
  const int64_t kp = groups * group_size;
  // x zero padded to whole groups, and its sums per group.
  std::vector<float> xpad(static_cast<size_t>(m * kp), 0.0f);
  std::vector<float> xsum(static_cast<size_t>(m * groups), 0.0f);
  const float* xin = x.typed_data();
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(&xpad[i * kp], xin + i * k, sizeof(float) * k);
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t j = g * group_size; j < std::min(k, (g + 1) * group_size); ++j) sum += xpad[i * kp + j];
      xsum[i * groups + g] = sum;
    }
  }
  p.x = xpad.data();
  p.xsum = xsum.data();
  p.data = data.typed_data();
  p.scale.data = scale.untyped_data();
  p.zero.data = zero.untyped_data();
  p.has_zero = has_zero != 0;
  p.levels = levels.typed_data();
  p.offset = p.levels[0];
  p.m = m;
  p.n = n;
  p.kp = kp;
  p.groups = groups;
  p.group_size = group_size;
  p.rows = wd[0];
  p.y = y->typed_data();
  switch (bits) {
    case 4: packed_matmul_run<4>(pool, p); break;
    case 2: packed_matmul_run<2>(pool, p); break;
    default: packed_matmul_run<1>(pool, p); break;
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The transposed product of a packed weight, for the gradient w.r.t. the activations:
//   xbar[m, k] = sum_n g[m, n] W[k, n]
// by the blocked GEMM at every M (panels of W^T dequantized from the packed bytes; measured faster
// than a GEMV-shaped kernel already at 1-8 rows, since each weight is decoded once per call).

ffi::Error PackedMatmulTransposedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> data,
                                      ffi::AnyBuffer scale, ffi::AnyBuffer zero, ffi::Buffer<ffi::F32> levels,
                                      ffi::ResultBuffer<ffi::F32> xbar, int64_t bits, int64_t group_size,
                                      int64_t has_zero) {
  auto gd = g.dimensions();
  auto wd = data.dimensions();
  auto xd = xbar->dimensions();
  if (gd.size() != 2 || wd.size() != 2 || xd.size() != 2) return invalid("packed_matmul_transposed: 2-D arrays expected");
  const int64_t m = gd[0], n = gd[1], k = xd[1];
  if (wd[1] != n || xd[0] != m) return invalid("packed_matmul_transposed: g [M, N], data [rows, N], xbar [M, K]");
  PackedWeightView w;
  ffi::Error error = packed_weight_view("packed_matmul_transposed", data, scale, zero, levels, k, bits, group_size,
                                        has_zero, &w);
  if (error.failure()) return error;
  if (m == 0 || k == 0) return ffi::Error::Success();
  packed_gemm_dispatch(pool, bits, true, w, g.typed_data(), m, k, xbar->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The packed weight as a float W [K, N] (for prefill, where XLA's GEMM of the dequantized weight is
// the faster product): each K-row by packed_row, the XLA reference's values bit for bit.

template <int BITS>
void packed_dequantize_rows(const PackedWeightView& w, int64_t k0, int64_t k1, float* out) {
  const bool simd = has_avx2();
  for (int64_t kk = k0; kk < k1; ++kk) packed_row<BITS>(simd, w, kk, 0, w.n, out + kk * w.n);
}

ffi::Error PackedDequantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> data, ffi::AnyBuffer scale,
                                ffi::AnyBuffer zero, ffi::Buffer<ffi::F32> levels, ffi::ResultBuffer<ffi::F32> w,
                                int64_t bits, int64_t group_size, int64_t has_zero) {
  auto dd = data.dimensions();
  auto wd = w->dimensions();
  if (dd.size() != 2 || wd.size() != 2 || dd[1] != wd[1]) return invalid("packed_dequantize: data [rows, N], w [K, N]");
  const int64_t k = wd[0], n = wd[1];
  PackedWeightView view;
  ffi::Error error = packed_weight_view("packed_dequantize", data, scale, zero, levels, k, bits, group_size, has_zero,
                                        &view);
  if (error.failure()) return error;
  if (k == 0 || n == 0) return ffi::Error::Success();
  float* out = w->typed_data();
  const int64_t tasks = task_count(pool, k * n * 4, k);  // the float bytes written
  parallel_for(pool, tasks, [&](int64_t t) {
    const int64_t k0 = k * t / tasks, k1 = k * (t + 1) / tasks;
    switch (bits) {
      case 4: packed_dequantize_rows<4>(view, k0, k1, out); break;
      case 2: packed_dequantize_rows<2>(view, k0, k1, out); break;
      default: packed_dequantize_rows<1>(view, k0, k1, out); break;
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// GGUF blocks as stored in the file: blocks uint8 [N, K/32 * block_bytes], one output row per
// weight row, 32 consecutive K elements per block.
//   Q4_0 (18 B): f16 d, 16 B nibbles; element j = low nibble of byte j, j+16 = high; w = (q - 8) d
//   Q4_1 (20 B): f16 d, f16 m, nibbles as Q4_0; w = q d + m
//   Q8_0 (34 B): f16 d, 32 int8 q; w = q d

enum GgufType : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

inline uint16_t read_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

struct GgufProblem {
  const float* x;     // [M, K]
  const float* xsum;  // [M, K/32]
  // int8 activations (as ggml's q8_0): per row and 32-block, x ~ xd * xq with xq = round(x / xd) in
  // [-127, 127], xd = max|x| / 127; xqsum = the block's sum of xq.
  const int8_t* xq;   // [M, K]
  const float* xd;    // [M, K/32]
  const int32_t* xqsum;
  const uint8_t* blocks;
  int64_t type, m, n, k, block_bytes;
  float* y;
};

// One block's integer dot of the weight codes (unsigned nibbles u for Q4_0/Q4_1, signed q for Q8_0)
// with the int8 activations, then its float contribution:
//   Q8_0: dw dx sum(q xq); Q4_0: dw dx (sum(u xq) - 8 xqsum); Q4_1: dw dx sum(u xq) + mw dx xqsum.
inline float gguf_q8_block(int64_t type, const uint8_t* blk, int32_t dot, float dx, int32_t xqsum) {
  const float dw = half_to_float(read_u16(blk));
  if (type == kQ8_0) return dw * dx * static_cast<float>(dot);
  if (type == kQ4_0) return dw * dx * static_cast<float>(dot - 8 * xqsum);
  return dw * dx * static_cast<float>(dot) + half_to_float(read_u16(blk + 2)) * dx * static_cast<float>(xqsum);
}

void gguf_rows_q8_scalar(const GgufProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.k / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * nb * p.block_bytes;
    for (int64_t m = 0; m < p.m; ++m) {
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * p.block_bytes;
        const int8_t* xb = p.xq + m * p.k + b * 32;
        int32_t dot = 0;
        if (p.type == kQ8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < 32; ++j) dot += static_cast<int32_t>(q[j]) * xb[j];
        } else {
          const uint8_t* q = blk + (p.type == kQ4_1 ? 4 : 2);
          for (int j = 0; j < 16; ++j) dot += static_cast<int32_t>(q[j] & 0x0f) * xb[j] + static_cast<int32_t>(q[j] >> 4) * xb[j + 16];
        }
        total += gguf_q8_block(p.type, blk, dot, p.xd[m * nb + b], p.xqsum[m * nb + b]);
      }
      p.y[m * p.n + r] = total;
    }
  }
}

// Per block: the dot of the 32 signed codes (q - 8 for Q4_0) with x, and the block's (scale, bias) so
// that the block adds scale * dot + bias * sum(x over the block); bias is Q4_1's m, else 0.
inline void gguf_block_terms(int64_t type, const uint8_t* b, float* scale, float* bias) {
  const float d = half_to_float(read_u16(b));
  *scale = d;
  *bias = type == kQ4_1 ? half_to_float(read_u16(b + 2)) : 0.0f;
}

void gguf_rows_scalar(const GgufProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.k / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * nb * p.block_bytes;
    for (int64_t m = 0; m < p.m; ++m) {
      const float* xm = p.x + m * p.k;
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * p.block_bytes;
        const float* xb = xm + b * 32;
        float scale, bias, dot = 0.0f;
        gguf_block_terms(p.type, blk, &scale, &bias);
        if (p.type == kQ8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < 32; ++j) dot += xb[j] * static_cast<float>(q[j]);
        } else {
          const uint8_t* q = blk + (p.type == kQ4_1 ? 4 : 2);
          const int shift = p.type == kQ4_0 ? 8 : 0;
          for (int j = 0; j < 16; ++j) {
            dot += xb[j] * static_cast<float>((q[j] & 0x0f) - shift) + xb[j + 16] * static_cast<float>((q[j] >> 4) - shift);
          }
        }
        total += scale * dot + bias * p.xsum[m * nb + b];
      }
      p.y[m * p.n + r] = total;
    }
  }
}

#ifdef LOWBIT_X86
LOWBIT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LOWBIT_AVX2 inline float half_to_float_f16c(const uint8_t* p) {
  return _cvtsh_ss(read_u16(p));
}

template <int MT>
LOWBIT_AVX2 void gguf_row_avx2(const GgufProblem& p, int64_t r, int64_t m0) {
  const int64_t nb = p.k / 32;
  const uint8_t* row = p.blocks + r * nb * p.block_bytes;
  const __m128i low = _mm_set1_epi8(0x0f);
  __m256 acc[MT];
  float bias_total[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm256_setzero_ps();
    bias_total[m] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * p.block_bytes;
    const float scale = half_to_float_f16c(blk);
    const float bias = p.type == kQ4_1 ? half_to_float_f16c(blk + 2) : 0.0f;
    __m256 w[4];
    if (p.type == kQ8_0) {
      const uint8_t* q = blk + 2;
      for (int i = 0; i < 4; ++i) {
        w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
      }
    } else {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (p.type == kQ4_1 ? 4 : 2)));
      const __m128i shift = _mm_set1_epi8(p.type == kQ4_0 ? 8 : 0);
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, low), shift);
      const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), shift);
      w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
      w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    }
    const __m256 d = _mm256_set1_ps(scale);
    for (int m = 0; m < MT; ++m) {
      const float* xb = p.x + (m0 + m) * p.k + b * 32;
      __m256 dot = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
      dot = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), dot);
      dot = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), dot);
      dot = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), dot);
      acc[m] = _mm256_fmadd_ps(dot, d, acc[m]);
      bias_total[m] += bias * p.xsum[(m0 + m) * nb + b];
    }
  }
  for (int m = 0; m < MT; ++m) p.y[(m0 + m) * p.n + r] = hsum(acc[m]) + bias_total[m];
}

// int8 activations: _mm256_maddubs_epi16 of unsigned codes (Q8_0: |q|, with xq carrying q's sign) and
// signed xq, pairs summed to int32 by _mm256_madd_epi16 (exact), then one FMA per block into 8 float
// lanes scaled by dw dx (no horizontal sum per block). RT weight rows times MT activation rows per
// pass: the activation block is loaded once for the RT rows, and the RT x MT accumulators are
// independent chains (one row alone waits on its FMA's latency every block).
template <int MT, int RT>
LOWBIT_AVX2 void gguf_tile_q8_avx2(const GgufProblem& p, int64_t r, int64_t m0) {
  const int64_t nb = p.k / 32;
  const int64_t row_bytes = nb * p.block_bytes;
  const __m128i low = _mm_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][MT];
  float bias_total[RT][MT];
  for (int i = 0; i < RT; ++i) {
    for (int m = 0; m < MT; ++m) {
      acc[i][m] = _mm256_setzero_ps();
      bias_total[i][m] = 0.0f;
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m256i x[MT];
    float dx[MT], xsum[MT];  // the block's scale and dx * sum(xq), shared by the RT rows
    for (int m = 0; m < MT; ++m) {
      const int64_t block = (m0 + m) * nb + b;
      x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + m) * p.k + b * 32));
      dx[m] = p.xd[block];
      xsum[m] = dx[m] * static_cast<float>(p.xqsum[block]);
    }
    for (int i = 0; i < RT; ++i) {
      const uint8_t* blk = p.blocks + (r + i) * row_bytes + b * p.block_bytes;
      // The same block of the next pass's row: RT rows read at once are streams the hardware
      // prefetchers lose from DRAM (the tile measured faster than one row from cache, slower in the model).
      if (RT > 1 && r + i + RT < p.n) _mm_prefetch(reinterpret_cast<const char*>(blk + RT * row_bytes), _MM_HINT_T0);
      const float dw = half_to_float_f16c(blk);
      // Q4_0's codes are u - 8 and Q4_1 adds mw: both become a per-block multiple of xqsum.
      const float bias = p.type == kQ4_1 ? half_to_float_f16c(blk + 2) : (p.type == kQ4_0 ? -8.0f * dw : 0.0f);
      __m256i w;
      if (p.type == kQ8_0) {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (p.type == kQ4_1 ? 4 : 2)));
        w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
      }
      const __m256i w_unsigned = p.type == kQ8_0 ? _mm256_sign_epi8(w, w) : w;
      for (int m = 0; m < MT; ++m) {
        const __m256i xm = p.type == kQ8_0 ? _mm256_sign_epi8(x[m], w) : x[m];
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w_unsigned, xm), ones);
        acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * dx[m]), acc[i][m]);
        bias_total[i][m] += bias * xsum[m];
      }
    }
  }
  for (int i = 0; i < RT; ++i) {
    for (int m = 0; m < MT; ++m) p.y[(m0 + m) * p.n + r + i] = hsum(acc[i][m]) + bias_total[i][m];
  }
}

// The last MT (< kRowTile) activation rows against `rows` weight rows from r: RT at once when rows == RT.
template <int MT, int RT>
LOWBIT_AVX2 void gguf_rest_q8_avx2(const GgufProblem& p, int64_t r, int64_t rows, int64_t m0) {
  if (rows == RT) {
    gguf_tile_q8_avx2<MT, RT>(p, r, m0);
  } else {
    for (int64_t i = 0; i < rows; ++i) gguf_tile_q8_avx2<MT, 1>(p, r + i, m0);
  }
}

// Per pass over `step` weight rows: every kRowTile activation rows, then the last one to three rows.
// Several weight rows a pass pay for Q4_0 and Q4_1 only (interleaved old/new, 2 threads, SmolLM2's
// 576 x 49152 at M = 1: 838 -> 671 us for Q4_1; Q8_0's 34-byte blocks read from two or four rows at
// once ran 1.3-2x slower than from one, as did the f32-activation kernel with four rows).
LOWBIT_AVX2 void gguf_rows_q8_avx2(const GgufProblem& p, int64_t r0, int64_t r1) {
  const int64_t full = p.m - p.m % kRowTile;
  const int64_t rest = p.m % kRowTile;
  const int64_t step = p.type == kQ8_0 || rest == 0 ? 1 : (rest == 1 ? 4 : 2);
  for (int64_t r = r0; r < r1; r += step) {
    const int64_t rows = std::min(step, r1 - r);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t m0 = 0; m0 < full; m0 += kRowTile) gguf_tile_q8_avx2<kRowTile, 1>(p, r + i, m0);
    }
    switch (rest * 8 + step) {
      case 3 * 8 + 2: gguf_rest_q8_avx2<3, 2>(p, r, rows, full); break;
      case 3 * 8 + 1: gguf_rest_q8_avx2<3, 1>(p, r, rows, full); break;
      case 2 * 8 + 2: gguf_rest_q8_avx2<2, 2>(p, r, rows, full); break;
      case 2 * 8 + 1: gguf_rest_q8_avx2<2, 1>(p, r, rows, full); break;
      case 1 * 8 + 4: gguf_rest_q8_avx2<1, 4>(p, r, rows, full); break;
      case 1 * 8 + 1: gguf_rest_q8_avx2<1, 1>(p, r, rows, full); break;
      default: break;  // rest == 0
    }
  }
}

LOWBIT_AVX2 void gguf_rows_avx2(const GgufProblem& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t m0 = 0;
    for (; m0 + kRowTile <= p.m; m0 += kRowTile) gguf_row_avx2<kRowTile>(p, r, m0);
    switch (p.m - m0) {
      case 3: gguf_row_avx2<3>(p, r, m0); break;
      case 2: gguf_row_avx2<2>(p, r, m0); break;
      case 1: gguf_row_avx2<1>(p, r, m0); break;
      default: break;
    }
  }
}
#endif

int64_t gguf_block_bytes(int64_t type) { return type == kQ4_0 ? 18 : (type == kQ4_1 ? 20 : 34); }

// One GGUF block -> its 32 f32 weights, by ggml's formulas.
void gguf_dequantize_block(int64_t type, const uint8_t* blk, float* w) {
  const float d = half_to_float(read_u16(blk));
  if (type == kQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(q[j]) * d;
  } else if (type == kQ4_1) {
    const float m = half_to_float(read_u16(blk + 2));
    for (int j = 0; j < 16; ++j) {
      w[j] = static_cast<float>(blk[4 + j] & 0x0f) * d + m;
      w[j + 16] = static_cast<float>(blk[4 + j] >> 4) * d + m;
    }
  } else {
    for (int j = 0; j < 16; ++j) {
      w[j] = (static_cast<float>(blk[2 + j] & 0x0f) - 8.0f) * d;
      w[j + 16] = (static_cast<float>(blk[2 + j] >> 4) - 8.0f) * d;
    }
  }
}

// Weights W[r, k0:k1] of GGUF row r (k0 and k1 multiples of 32, or k1 = K) -> out[0 : k1 - k0].
void gguf_row_range(int64_t type, const uint8_t* blocks, int64_t block_bytes, int64_t k, int64_t r, int64_t k0,
                    int64_t k1, float* out) {
  const uint8_t* row = blocks + r * (k / 32) * block_bytes;
  for (int64_t b = k0 / 32; b * 32 < k1; ++b) gguf_dequantize_block(type, row + b * block_bytes, out + b * 32 - k0);
}

// GGUF blocks [N, K/32 * block bytes] -> f32 weights [N, K] (dequantize once, then XLA's GEMM),
// rows split over the threads.
void gguf_dequantize_rows(int64_t type, const uint8_t* blocks, int64_t block_bytes, int64_t k, int64_t r0,
                          int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) gguf_row_range(type, blocks, block_bytes, k, r, 0, k, out + r * k);
}

ffi::Error GgufDequantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> blocks, ffi::ResultBuffer<ffi::F32> w,
                              int64_t type) {
  auto bd = blocks.dimensions();
  auto wd = w->dimensions();
  if (type != kQ4_0 && type != kQ4_1 && type != kQ8_0) return invalid("gguf_dequantize: type must be 0, 1 or 2");
  const int64_t block_bytes = gguf_block_bytes(type);
  if (bd.size() != 2 || wd.size() != 2 || bd[0] != wd[0] || wd[1] % 32 || bd[1] != wd[1] / 32 * block_bytes) {
    return invalid("gguf_dequantize: blocks [N, K/32 * block bytes] and w [N, K] expected");
  }
  const int64_t n = wd[0], k = wd[1];
  if (n == 0 || k == 0) return ffi::Error::Success();
  const int64_t tasks = task_count(pool, n * bd[1], n);
  const uint8_t* data = blocks.typed_data();
  float* out = w->typed_data();
  parallel_for(pool, tasks, [&](int64_t t) {
    gguf_dequantize_rows(type, data, block_bytes, k, n * t / tasks, n * (t + 1) / tasks, out);
  });
  return ffi::Error::Success();
}

// y [M, N] = x [M, K] W^T by the blocked GEMM: the panel holds W^T[k0:k1, n0:n1], each GGUF row's
// blocks in [k0, k1) decoded and written down a column.
void gguf_gemm(ffi::ThreadPool& pool, int64_t type, const uint8_t* blocks, const float* x, int64_t m, int64_t k,
               int64_t n, float* y) {
  const int64_t block_bytes = gguf_block_bytes(type);
  gemm_run(pool, x, m, k, n, y, [&](int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* panel, int64_t width) {
    float row[kGemmDepth];
    for (int64_t r = n0; r < n1; ++r) {
      gguf_row_range(type, blocks, block_bytes, k, r, k0, k1, row);
      for (int64_t i = 0; i < k1 - k0; ++i) panel[i * width + (r - n0)] = row[i];
    }
  });
}

// x-bar [M, K] = g [M, N] W by the blocked GEMM: the panel holds W[n0:n1, k0:k1], GGUF rows as stored.
void gguf_gemm_transposed(ffi::ThreadPool& pool, int64_t type, const uint8_t* blocks, const float* g, int64_t m,
                          int64_t k, int64_t n, float* xbar) {
  const int64_t block_bytes = gguf_block_bytes(type);
  gemm_run(pool, g, m, n, k, xbar, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* panel, int64_t width) {
    for (int64_t r = n0; r < n1; ++r) gguf_row_range(type, blocks, block_bytes, k, r, k0, k1, panel + (r - n0) * width);
  });
}

ffi::Error GgufMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks,
                          ffi::ResultBuffer<ffi::F32> y, int64_t type, int64_t activations, int64_t gemm_rows) {
  auto xd = x.dimensions();
  auto bd = blocks.dimensions();
  if (xd.size() != 2 || bd.size() != 2) return invalid("gguf_matmul: x and blocks must be 2-D");
  if (type != kQ4_0 && type != kQ4_1 && type != kQ8_0) return invalid("gguf_matmul: type must be Q4_0, Q4_1 or Q8_0");
  GgufProblem p{};
  p.type = type;
  p.block_bytes = gguf_block_bytes(type);
  p.m = xd[0];
  p.k = xd[1];
  p.n = bd[0];
  if (p.k % 32 || bd[1] != p.k / 32 * p.block_bytes) return invalid("gguf_matmul: blocks must be [N, K/32 * block bytes]");
  if (activations != 0 && activations != 1) return invalid("gguf_matmul: activations must be 0 (f32) or 1 (int8)");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (activations == 0 && p.m >= gemm_rows) {
    gguf_gemm(pool, type, blocks.typed_data(), x.typed_data(), p.m, p.k, p.n, y->typed_data());
    return ffi::Error::Success();
  }
  const int64_t nb = p.k / 32;
  std::vector<float> xsum, xscale;
  std::vector<int8_t> xq;
  std::vector<int32_t> xqsum;
  if (activations == 1) {
    xq.resize(static_cast<size_t>(p.m * p.k));
    xscale.resize(static_cast<size_t>(p.m * nb));
    xqsum.resize(static_cast<size_t>(p.m * nb));
    quantize_activation_blocks(x.typed_data(), p.m * nb, 32, xq.data(), xscale.data(), xqsum.data());
  } else {
    xsum.resize(static_cast<size_t>(p.m * nb));
    for (int64_t i = 0; i < p.m * nb; ++i) {
      float sum = 0.0f;
      for (int j = 0; j < 32; ++j) sum += x.typed_data()[i * 32 + j];
      xsum[i] = sum;
    }
  }
  p.x = x.typed_data();
  p.xsum = xsum.data();
  p.xq = xq.data();
  p.xd = xscale.data();
  p.xqsum = xqsum.data();
  p.blocks = blocks.typed_data();
  p.y = y->typed_data();
  const bool simd = has_avx2();
  const int64_t tasks = task_count(pool, p.n * nb * p.block_bytes, p.n);
  const int64_t rows_per_task = (p.n + tasks - 1) / tasks;
  parallel_for(pool, tasks, [&](int64_t t) {
    const int64_t r0 = t * rows_per_task, r1 = std::min(p.n, r0 + rows_per_task);
#ifdef LOWBIT_X86
    if (simd) {
      if (activations == 1) {
        gguf_rows_q8_avx2(p, r0, r1);
      } else {
        gguf_rows_avx2(p, r0, r1);
      }
      return;
    }
#endif
    if (activations == 1) {
      gguf_rows_q8_scalar(p, r0, r1);
    } else {
      gguf_rows_scalar(p, r0, r1);
    }
  });
  return ffi::Error::Success();
}

ffi::Error GgufMatmulTransposedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> blocks,
                                    ffi::ResultBuffer<ffi::F32> xbar, int64_t type) {
  auto gd = g.dimensions();
  auto bd = blocks.dimensions();
  auto xd = xbar->dimensions();
  if (type != kQ4_0 && type != kQ4_1 && type != kQ8_0) return invalid("gguf_matmul_transposed: type must be 0, 1 or 2");
  if (gd.size() != 2 || bd.size() != 2 || xd.size() != 2 || gd[1] != bd[0] || gd[0] != xd[0] || xd[1] % 32 ||
      bd[1] != xd[1] / 32 * gguf_block_bytes(type)) {
    return invalid("gguf_matmul_transposed: g [M, N], blocks [N, K/32 * block bytes], xbar [M, K] expected");
  }
  const int64_t m = gd[0], n = gd[1], k = xd[1];
  if (m == 0 || k == 0) return ffi::Error::Success();
  if (n == 0) {
    std::fill(xbar->typed_data(), xbar->typed_data() + m * k, 0.0f);
    return ffi::Error::Success();
  }
  gguf_gemm_transposed(pool, type, blocks.typed_data(), g.typed_data(), m, k, n, xbar->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// W8A8: int8 x [M, K] times int8 w [K, N], exact int32 sums, then (sum * x_scale[m]) * w_scale[n].

struct Int8Problem {
  const int8_t* x;
  const float* xs;
  const int8_t* w;
  const float* ws;
  int64_t m, k, n;
  float* y;
};

void int8_columns_scalar(const Int8Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.m; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      int32_t sum = 0;
      for (int64_t k = 0; k < p.k; ++k) sum += static_cast<int32_t>(p.x[m * p.k + k]) * p.w[k * p.n + n];
      p.y[m * p.n + n] = static_cast<float>(sum) * p.xs[m] * p.ws[n];
    }
  }
}

#ifdef LOWBIT_X86
// Two K rows at a time: bytes of rows k and k+1 interleaved per column, widened to int16, and
// _mm256_madd_epi16 against (x[k], x[k+1]) gives each column's exact int32 partial sum.
template <int MT>
LOWBIT_AVX2 void int8_strip_avx2(const Int8Problem& p, int64_t m0, int64_t n0) {
  __m256i acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < p.k; k += 2) {
    const bool pair = k + 1 < p.k;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + k * p.n + n0));
    const __m128i b = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + (k + 1) * p.n + n0))
                           : _mm_setzero_si128();
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
    for (int m = 0; m < MT; ++m) {
      const int8_t* xm = p.x + (m0 + m) * p.k;
      const uint32_t lo = static_cast<uint16_t>(static_cast<int16_t>(xm[k]));
      const uint32_t hi = pair ? static_cast<uint16_t>(static_cast<int16_t>(xm[k + 1])) : 0u;
      const __m256i xv = _mm256_set1_epi32(static_cast<int32_t>(lo | (hi << 16)));
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, xv));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, xv));
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m256 xs = _mm256_set1_ps(p.xs[m0 + m]);
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][h]), xs);
      v = _mm256_mul_ps(v, _mm256_loadu_ps(p.ws + n0 + 8 * h));
      _mm256_storeu_ps(p.y + (m0 + m) * p.n + n0 + 8 * h, v);
    }
  }
}

LOWBIT_AVX2 void int8_strips_avx2(const Int8Problem& p, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    int64_t m0 = 0;
    for (; m0 + kRowTile <= p.m; m0 += kRowTile) int8_strip_avx2<kRowTile>(p, m0, s * kStrip);
    switch (p.m - m0) {
      case 3: int8_strip_avx2<3>(p, m0, s * kStrip); break;
      case 2: int8_strip_avx2<2>(p, m0, s * kStrip); break;
      case 1: int8_strip_avx2<1>(p, m0, s * kStrip); break;
      default: break;
    }
  }
}
#endif

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> xs,
                          ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> ws, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) return invalid("int8_matmul: x [M, K] and w [K, N] expected");
  Int8Problem p{x.typed_data(), xs.typed_data(), w.typed_data(), ws.typed_data(), xd[0], xd[1], wd[1], y->typed_data()};
  if (static_cast<int64_t>(xs.element_count()) != p.m || static_cast<int64_t>(ws.element_count()) != p.n) {
    return invalid("int8_matmul: x_scale must be [M, 1] and w_scale [1, N]");
  }
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  split_columns(
      pool, p.n, p.k * p.n, kStrip,
      [&](int64_t s0, int64_t s1) {
#ifdef LOWBIT_X86
        int8_strips_avx2(p, s0, s1);
#endif
      },
      [&](int64_t n0, int64_t n1) { int8_columns_scalar(p, n0, n1); });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence over the float KV pages (f32, f16 or bf16) of one
// layer of a stacked cache [L, P, ps, Hkv, D], read in place through each sequence's block table.

struct AttentionProblem {
  const float* q;          // [B, H, D]
  const void* k;           // this layer's pages [P, ps, Hkv, D]
  const void* v;
  FloatKind kind;          // the pages' element type
  int64_t element;         // its bytes
  const int32_t* tables;   // [B, W]
  const int32_t* lengths;  // [B]
  int64_t heads, kv_heads, dim, pages, page_size, width;
  float scale;
  float* out;  // [B, H, D]
};

void group_dots_scalar(const float* q, int64_t group, const void* key, FloatKind kind, int64_t d, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    float total = 0.0f;
    for (int64_t i = 0; i < d; ++i) total += q[g * d + i] * FloatTable{key, kind}.at(i);
    out[g] = total;
  }
}

void axpy_scalar(float alpha, const void* x, FloatKind kind, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += alpha * FloatTable{x, kind}.at(i);
}

// e^x for x <= 0 (softmax after subtracting the maximum), in place over n floats.
void exp_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

#ifdef LOWBIT_X86
// Eight page elements from i on as f32 (the tail, fewer than eight, through FloatTable::at).
LOWBIT_AVX2 inline __m256 page_load8(const void* row, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i)));
    case FloatKind::kBF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i))),
          16));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(row) + i);
  }
}

// out[g] = dot(q + g * d, key) for g < group, the key read once: four accumulators at a time.
LOWBIT_AVX2 void group_dots_avx2(const float* q, int64_t group, const void* key, FloatKind kind, int64_t d,
                                 float* out) {
  const int64_t whole = d / 8 * 8;
  for (int64_t g = 0; g < group; g += 4) {
    const int64_t count = std::min<int64_t>(4, group - g);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < whole; i += 8) {
      const __m256 k = page_load8(key, kind, i);
      for (int64_t j = 0; j < count; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (g + j) * d + i), k, acc[j]);
    }
    for (int64_t j = 0; j < count; ++j) {
      out[g + j] = hsum(acc[j]);
      for (int64_t i = whole; i < d; ++i) out[g + j] += q[(g + j) * d + i] * FloatTable{key, kind}.at(i);
    }
  }
}

LOWBIT_AVX2 void axpy_avx2(float alpha, const void* x, FloatKind kind, float* y, int64_t d) {
  const __m256 a = _mm256_set1_ps(alpha);
  const int64_t whole = d / 8 * 8;
  for (int64_t i = 0; i < whole; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, page_load8(x, kind, i), _mm256_loadu_ps(y + i)));
  }
  for (int64_t i = whole; i < d; ++i) y[i] += alpha * FloatTable{x, kind}.at(i);
}

// The sums of eight vectors' lanes, as one vector: lane j = sum of a[j]'s lanes.
LOWBIT_AVX2 inline __m256 lane_sums8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scores[g * stride + j] = scale * dot(q + g * d, key row j) for the eight rows at rows + offsets[j]
// and every query head g of the group (d a multiple of 8): two accumulators per dot, the eight dots'
// horizontal sums taken together.
LOWBIT_AVX2 void group_dots8_avx2(const float* q, int64_t group, const char* rows, const int64_t* offsets,
                                  FloatKind kind, int64_t d, float scale, float* scores, int64_t stride) {
  const __m256 factor = _mm256_set1_ps(scale);
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * d;
    __m256 dots[8];
    for (int j = 0; j < 8; ++j) {
      const void* key = rows + offsets[j];
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), page_load8(key, kind, i), even);
        odd = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), page_load8(key, kind, i + 8), odd);
      }
      if (i < d) even = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), page_load8(key, kind, i), even);
      dots[j] = _mm256_add_ps(even, odd);
    }
    _mm256_storeu_ps(scores + g * stride, _mm256_mul_ps(lane_sums8(dots), factor));
  }
}

// o[0 : 8R] += sum_t weights[t] * (value row t)[0 : 8R] over `count` rows at rows + offsets[t] (+ column
// byte offset `at`), the R output vectors held in registers.
template <int R>
LOWBIT_AVX2 void weighted_rows_avx2(const float* weights, const char* rows, const int64_t* offsets, int64_t count,
                                    int64_t at, FloatKind kind, float* o) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(o + 8 * r);
  for (int64_t t = 0; t < count; ++t) {
    const __m256 w = _mm256_set1_ps(weights[t]);
    const char* row = rows + offsets[t] + at;
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, page_load8(row, kind, 8 * r), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(o + 8 * r, acc[r]);
}

// The same over a row of d floats (d a multiple of 8), 64 at a time.
LOWBIT_AVX2 void weighted_sum_avx2(const float* weights, const char* rows, const int64_t* offsets, int64_t count,
                                   FloatKind kind, int64_t element, int64_t d, float* o) {
  for (int64_t c = 0; c < d; c += 64) {
    const int64_t at = c * element;
    switch (std::min<int64_t>(64, d - c) / 8) {
      case 1: weighted_rows_avx2<1>(weights, rows, offsets, count, at, kind, o + c); break;
      case 2: weighted_rows_avx2<2>(weights, rows, offsets, count, at, kind, o + c); break;
      case 3: weighted_rows_avx2<3>(weights, rows, offsets, count, at, kind, o + c); break;
      case 4: weighted_rows_avx2<4>(weights, rows, offsets, count, at, kind, o + c); break;
      case 5: weighted_rows_avx2<5>(weights, rows, offsets, count, at, kind, o + c); break;
      case 6: weighted_rows_avx2<6>(weights, rows, offsets, count, at, kind, o + c); break;
      case 7: weighted_rows_avx2<7>(weights, rows, offsets, count, at, kind, o + c); break;
      default: weighted_rows_avx2<8>(weights, rows, offsets, count, at, kind, o + c); break;
    }
  }
}

// e^x for x <= 0, eight at a time: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts),
// e^r by its degree-6 Taylor polynomial (relative error below 2e-7 on that interval), times 2^n
// through the exponent bits; below -87.3 the result is 0 (as e^x rounds there in f32).
LOWBIT_AVX2 void exp_avx2(float* x, int64_t n) {
  const __m256 log2e = _mm256_set1_ps(1.44269504f), ln2_hi = _mm256_set1_ps(0.693359375f),
               ln2_lo = _mm256_set1_ps(-2.12194440e-4f), low = _mm256_set1_ps(-87.3f), one = _mm256_set1_ps(1.0f);
  const float c[6] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_max_ps(_mm256_loadu_ps(x + i), low);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, v));
    __m256 p = _mm256_set1_ps(c[0]);
    for (int j = 1; j < 6; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[j]));
    p = _mm256_fmadd_ps(p, r, one);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    _mm256_storeu_ps(x + i, _mm256_and_ps(e, _mm256_cmp_ps(v, low, _CMP_GT_OQ)));
  }
  exp_scalar(x + i, n - i);
}
#endif

// A piece of one softmax: for the `group` query heads of sequence `row` that read KV head `kv`
// (heads kv * group ...), positions [t0, t1): the running maximum m of the scaled scores, the sum l
// of exp(score - m) and o = sum exp(score - m) v (unnormalized). Each key and value row is read once
// for the whole group. Page ids outside [0, P) read page 0, as the XLA path clips them (the API checks
// concrete tables). An empty range gives m = -inf, l = 0, o = 0.
struct Partial {
  float* m;  // [group]
  float* l;  // [group]
  float* o;  // [group, d]
};

// Positions are visited in order with the rows kAhead positions on requested ahead of use: a KV
// head's rows sit Hkv * D elements apart, a stride the hardware prefetchers did not follow from
// DRAM (in the model, with the weights streaming between layers: 170 us a layer at 530 tokens).
constexpr int64_t kAhead = 8;

inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(row + at, 0, 3);
}

void attention_part(const AttentionProblem& a, int64_t row, int64_t kv, int64_t t0, int64_t t1, bool simd,
                    std::vector<float>& scores, std::vector<int64_t>& offsets, const Partial& part) {
  const int64_t group = a.heads / a.kv_heads;
  const int64_t d = a.dim;
  const int64_t length = std::max<int64_t>(0, t1 - t0);
  const float* q = a.q + (row * a.heads + kv * group) * d;
  std::fill(part.o, part.o + group * d, 0.0f);
  std::fill(part.m, part.m + group, -INFINITY);
  std::fill(part.l, part.l + group, 0.0f);
  if (length == 0) return;
  scores.resize(group * length + group);
  float* dots = scores.data() + group * length;
  // Byte offset of each position's row in a layer's pages, walking the block table page by page.
  offsets.resize(length);
  const int64_t row_bytes = d * a.element;
  for (int64_t t = 0, slot = t0 % a.page_size, entry = t0 / a.page_size; t < length; ++t) {
    int64_t page = a.tables[row * a.width + entry];
    if (page < 0 || page >= a.pages) page = 0;
    offsets[t] = ((page * a.page_size + slot) * a.kv_heads + kv) * row_bytes;
    if (++slot == a.page_size) slot = 0, ++entry;
  }
  const char* keys = static_cast<const char*>(a.k);
  const char* values = static_cast<const char*>(a.v);
  // Scores: eight positions at a time on the AVX2 path (when d is a multiple of 8), one at a time
  // for the rest; each key row is requested kAhead positions before its use.
  int64_t t = 0;
#ifdef LOWBIT_X86
  const bool blocked = simd && d % 8 == 0;
  if (blocked) {
    for (; t + 8 <= length; t += 8) {
      for (int64_t j = t + kAhead; j < std::min(length, t + kAhead + 8); ++j) prefetch_row(keys + offsets[j], row_bytes);
      group_dots8_avx2(q, group, keys, offsets.data() + t, a.kind, d, a.scale, scores.data() + t, length);
    }
  }
#endif
  for (; t < length; ++t) {
    if (t + kAhead < length) prefetch_row(keys + offsets[t + kAhead], row_bytes);
#ifdef LOWBIT_X86
    if (simd) {
      group_dots_avx2(q, group, keys + offsets[t], a.kind, d, dots);
    } else
#endif
    {
      group_dots_scalar(q, group, keys + offsets[t], a.kind, d, dots);
    }
    for (int64_t g = 0; g < group; ++g) scores[g * length + t] = dots[g] * a.scale;
  }
  for (int64_t t = 0; t < std::min(kAhead, length); ++t) prefetch_row(values + offsets[t], row_bytes);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * length;
    const float top = *std::max_element(s, s + length);
    for (int64_t t = 0; t < length; ++t) s[t] -= top;
#ifdef LOWBIT_X86
    if (simd) {
      exp_avx2(s, length);
    } else
#endif
    {
      exp_scalar(s, length);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < length; ++t) total += s[t];
    part.m[g] = top;
    part.l[g] = total;
  }
  // Output: on the blocked path, chunks of kChunk positions (L1-resident), each query head's output
  // in registers across a chunk; else one position's value row at a time for every head.
#ifdef LOWBIT_X86
  if (blocked) {
    constexpr int64_t kChunk = 32;
    for (int64_t c = 0; c < length; c += kChunk) {
      const int64_t count = std::min(kChunk, length - c);
      for (int64_t j = c + kAhead; j < std::min(length, c + kChunk + kAhead); ++j) {
        prefetch_row(values + offsets[j], row_bytes);
      }
      for (int64_t g = 0; g < group; ++g) {
        weighted_sum_avx2(scores.data() + g * length + c, values, offsets.data() + c, count, a.kind, a.element, d,
                          part.o + g * d);
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < length; ++t) {
    if (t + kAhead < length) prefetch_row(values + offsets[t + kAhead], row_bytes);
    const char* value = values + offsets[t];
    for (int64_t g = 0; g < group; ++g) {
#ifdef LOWBIT_X86
      if (simd) {
        axpy_avx2(scores[g * length + t], value, a.kind, part.o + g * d, d);
        continue;
      }
#endif
      axpy_scalar(scores[g * length + t], value, a.kind, part.o + g * d, d);
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lengths,
                               ffi::ResultBuffer<ffi::F32> out, int64_t layer, float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2) {
    return invalid("decode_attention: q [B, H, D], pages [L, P, ps, Hkv, D] and tables [B, W] expected");
  }
  if (v.dimensions().size() != 5 || !std::equal(kd.begin(), kd.end(), v.dimensions().begin())) {
    return invalid("decode_attention: k and v pages must have the same shape");
  }
  FloatKind kind;
  if (!float_kind(k.element_type(), &kind) || k.element_type() != v.element_type()) {
    return invalid("decode_attention: k and v pages must both be f32, f16 or bf16");
  }
  const int64_t batch = qd[0], heads = qd[1], dim = qd[2];
  if (kd[4] != dim || kd[3] == 0 || heads % kd[3] != 0 || td[0] != batch ||
      static_cast<int64_t>(lengths.element_count()) != batch) {
    return invalid("decode_attention: head_dim, GQA group, batch or lengths do not match");
  }
  if (layer < 0 || layer >= kd[0]) return invalid("decode_attention: layer outside the stacked pages");
  const int64_t element = kind == FloatKind::kF32 ? 4 : 2;
  const int64_t layer_bytes = kd[1] * kd[2] * kd[3] * kd[4] * element;
  const int64_t capacity = td[1] * kd[2];
  AttentionProblem a{q.typed_data(), static_cast<const char*>(k.untyped_data()) + layer * layer_bytes,
                     static_cast<const char*>(v.untyped_data()) + layer * layer_bytes, kind, element,
                     tables.typed_data(), lengths.typed_data(), heads, kd[3], dim, kd[1], kd[2], td[1], scale,
                     out->typed_data()};
  for (int64_t b = 0; b < batch; ++b) {
    if (a.lengths[b] < 0 || a.lengths[b] > capacity) return invalid("decode_attention: a length exceeds the table");
  }
  const bool simd = has_avx2();
  int64_t bytes = 0, longest = 0;  // K and V bytes read, for the task split
  for (int64_t b = 0; b < batch; ++b) {
    bytes += 2 * a.lengths[b] * a.kv_heads * dim * element;
    longest = std::max<int64_t>(longest, a.lengths[b]);
  }
  // Tasks: every (sequence, KV head), each cut into `splits` position ranges when there are fewer
  // of them than twice the threads (SmolLM2 decoding one sequence: 3 KV heads on 2 threads), so
  // that every thread streams a share of the cache; pieces of at least 128 positions, and one
  // thread for less than 64 KiB of K/V (waking a helper costs more than that read).
  const int64_t groups = batch * a.kv_heads, group = heads / a.kv_heads;
  const bool parallel = bytes >= (64 << 10) && thread_limit(pool) > 1;
  const int64_t threads = parallel ? thread_limit(pool) : 1;
  int64_t splits = groups >= 2 * threads ? 1 : (2 * threads + groups - 1) / groups;
  splits = std::max<int64_t>(1, std::min(splits, longest / 128));
  const int64_t tasks = groups * splits;
  std::vector<float> stats(static_cast<size_t>(tasks * group * (dim + 2)));
  auto partial = [&](int64_t task) {
    float* base = stats.data() + task * group * (dim + 2);
    return Partial{base, base + group, base + 2 * group};
  };
  auto run = [&](int64_t task) {
    std::vector<float> scores;
    std::vector<int64_t> offsets;
    const int64_t g = task / splits, split = task % splits;
    const int64_t row = g / a.kv_heads, length = a.lengths[row];
    attention_part(a, row, g % a.kv_heads, split * length / splits, (split + 1) * length / splits, simd, scores,
                   offsets, partial(task));
  };
  if (parallel) {
    parallel_for(pool, tasks, run);
  } else {
    for (int64_t task = 0; task < tasks; ++task) run(task);
  }
  // Merge the pieces: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t row = g / a.kv_heads, kv = g % a.kv_heads;
    for (int64_t h = 0; h < group; ++h) {
      float* out = a.out + (row * heads + kv * group + h) * dim;
      std::fill(out, out + dim, 0.0f);
      float top = -INFINITY, total = 0.0f;
      for (int64_t s = 0; s < splits; ++s) top = std::max(top, partial(g * splits + s).m[h]);
      if (top == -INFINITY) continue;  // no position (length 0): zeros
      for (int64_t s = 0; s < splits; ++s) {
        const Partial p = partial(g * splits + s);
        if (p.l[h] == 0.0f) continue;
        const float weight = std::exp(p.m[h] - top);
        total += weight * p.l[h];
        for (int64_t i = 0; i < dim; ++i) out[i] += weight * p.o[h * dim + i];
      }
      for (int64_t i = 0; i < dim; ++i) out[i] /= total;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("has_zero")
                                  .Attr<int64_t>("gemm_rows")
                                  .Attr<int64_t>("activations")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitPackedDequantize, PackedDequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("has_zero"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitPackedMatmulTransposed, PackedMatmulTransposedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("has_zero"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGgufMatmul, GgufMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("type")
                                  .Attr<int64_t>("activations")
                                  .Attr<int64_t>("gemm_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGgufMatmulTransposed, GgufMatmulTransposedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("type"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGgufDequantize, GgufDequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("type"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale"));

// Which SIMD path runs on this CPU: 2 AVX-512 VNNI (int8-activation GEMVs) over AVX2, 1 AVX2+FMA+F16C,
// 0 the portable scalar code.
extern "C" int lowbit_native_simd_level() { return has_vnni() ? 2 : (has_avx2() ? 1 : 0); }

// The cap lowbit_native_set_simd last set (2 unless lowered).
extern "C" int lowbit_native_simd_limit() { return simd_limit.load(std::memory_order_relaxed); }

// Caps the SIMD level at `limit` (0, 1 or 2; for tests that compare the paths); returns the level in effect.
extern "C" int lowbit_native_set_simd(int limit) {
  simd_limit.store(std::clamp(limit, 0, 2), std::memory_order_relaxed);
  return lowbit_native_simd_level();
}
