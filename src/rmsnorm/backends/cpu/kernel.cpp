// Fused RMSNorm / pRMSNorm CPU kernels (forward and backward), compiled for the host on first use.
//
// Rows are independent: the forward reads each row of x (and residual) once from memory and writes
// y (and h) once; the backward reads h and dy once and writes dh once, accumulating dw/db into one fp32
// partial buffer per block of rows. Blocks are fixed by the caller (rmsnorm.backends.cpu.heuristics),
// partials are summed in block order: gradients are bitwise reproducible for a given block count.
// Second passes over a row re-read it from cache. Math: see rmsnorm/reference.py.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <unordered_map>

namespace {

// The options of one call: rmsnorm/spec.py's Spec, the same fields in the same order. Python passes its
// Spec (a NamedTuple) whole; the type caster at the end of this file converts it at the binding.
struct Spec {
  int64_t nd = 1, k = 1;
  double eps = 0.0;
  bool eps_outside = false;
  double offset = 0.0;
  at::ScalarType round_to = at::ScalarType::Undefined;  // Undefined: no rounding before the gain
  at::ScalarType out_dtype = at::kFloat;
  bool residual = false;
  // gated RMSNorm (rmsnorm/spec.py): gate 0 none, 1 "before", 2 "after"; act 0 silu, 1 sigmoid; group > 0:
  // the RMS over groups of that many elements; gate_round: "after" rounds the norm's result through it
  int64_t gate = 0, act = 0, group = 0;
  at::ScalarType gate_round = at::ScalarType::Undefined;
  at::ScalarType rstd_round = at::ScalarType::Undefined;  // cast "rstd": 1/r rounded through it before use

  // For an autograd node's saved_data (which holds IValues) and back (ungated specs only reach the node).
  c10::IValue pack() const {
    return c10::ivalue::Tuple::create({nd, k, eps, eps_outside, offset, static_cast<int64_t>(round_to),
                                       static_cast<int64_t>(out_dtype), residual, static_cast<int64_t>(rstd_round)});
  }
  static Spec unpack(const c10::IValue& v) {
    const auto& e = v.toTupleRef().elements();
    Spec s{e[0].toInt(), e[1].toInt(), e[2].toDouble(), e[3].toBool(), e[4].toDouble(),
           static_cast<at::ScalarType>(e[5].toInt()), static_cast<at::ScalarType>(e[6].toInt()), e[7].toBool()};
    s.rstd_round = static_cast<at::ScalarType>(e[8].toInt());
    return s;
  }
  // The fields as a Python tuple (rmsnorm.spec.Spec(*fields) rebuilds the Python object).
  py::tuple fields() const {
    auto opt = [](at::ScalarType t) { return t == at::ScalarType::Undefined ? py::none() : py::cast(t); };
    return py::make_tuple(nd, k, eps, eps_outside, offset, opt(round_to), py::cast(out_dtype), residual,
                          py::none(), "silu", 0, py::none(), opt(rstd_round));
  }
};

#define RMSNORM_INLINE __attribute__((always_inline)) inline
#define RMSNORM_LAMBDA_INLINE __attribute__((always_inline))  // (a lambda's operator(): after its parameters)

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t kF = fVec::size();
constexpr int64_t kW = 2 * kF;  // elements per step: one Vectorized<bf16/fp16>, two of fp32

// Load / store 2*kF elements of T as two fp32 vectors; the `n` overloads touch only n < kW elements.
// Always inlined: an out-of-line call passes the vectors through memory, which made every row with a
// tail (N not a multiple of kW) cost twice a row without one.
template <typename T>
struct Io {
  RMSNORM_INLINE static void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  RMSNORM_INLINE static void load(const T* p, fVec& a, fVec& b, int64_t n) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n));
  }
  RMSNORM_INLINE static void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  RMSNORM_INLINE static void store(T* p, const fVec& a, const fVec& b, int64_t n) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
  RMSNORM_INLINE static void round(fVec& a, fVec& b) {  // round through T (the cast's rounding: see round_through)
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
};

#if defined(RMSNORM_AVX512BF16)
// fp32 -> bf16 in one instruction (vcvtne2ps2bf16, round to nearest even) where the CPU has AVX512-BF16.
inline __m512i to_bf16(const fVec& a, const fVec& b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}
template <>
struct Io<c10::BFloat16> {
  using T = c10::BFloat16;
  RMSNORM_INLINE static void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  RMSNORM_INLINE static void load(const T* p, fVec& a, fVec& b, int64_t n) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n));
  }
  RMSNORM_INLINE static void store(T* p, const fVec& a, const fVec& b) { _mm512_storeu_si512(p, to_bf16(a, b)); }
  RMSNORM_INLINE static void store(T* p, const fVec& a, const fVec& b, int64_t n) {
    _mm512_mask_storeu_epi16(p, (__mmask32)((1ull << n) - 1), to_bf16(a, b));
  }
  RMSNORM_INLINE static void round(fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>(to_bf16(a, b)));
  }
};
#endif

template <>
struct Io<float> {
  RMSNORM_INLINE static void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kF);
  }
  RMSNORM_INLINE static void load(const float* p, fVec& a, fVec& b, int64_t n) {
    a = fVec::loadu(p, std::min(n, kF));
    b = n > kF ? fVec::loadu(p + kF, n - kF) : fVec(0.f);
  }
  RMSNORM_INLINE static void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + kF);
  }
  RMSNORM_INLINE static void store(float* p, const fVec& a, const fVec& b, int64_t n) {
    a.store(p, std::min(n, kF));
    if (n > kF) b.store(p + kF, n - kF);
  }
  RMSNORM_INLINE static void round(fVec&, fVec&) {}
};

// Non-temporal stores for outputs larger than the caches (no read-for-ownership of the destination:
// 2 memory streams instead of 3). Needs a kStreamAlign-aligned destination; other builds store normally.
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
inline void stream_bits(void* p, const Vectorized<float>& v) { _mm512_stream_ps(static_cast<float*>(p), v); }
template <typename V>
inline void stream_int(void* p, const V& v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kStreamAlign = 32;
inline void stream_bits(void* p, const Vectorized<float>& v) { _mm256_stream_ps(static_cast<float*>(p), v); }
template <typename V>
inline void stream_int(void* p, const V& v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#else
constexpr uintptr_t kStreamAlign = 0;  // no streaming
inline void stream_bits(void* p, const Vectorized<float>& v) { v.store(p); }
template <typename V>
inline void stream_int(void* p, const V& v) { v.store(p); }
inline void stream_fence() {}
#endif

template <typename T>
inline void stream_store(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    stream_bits(p, a);
    stream_bits(p + kF, b);
#if defined(RMSNORM_AVX512BF16)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    stream_int(p, to_bf16(a, b));
#endif
  } else {
    stream_int(p, at::vec::convert_from_float<T>(a, b));
  }
}

// Software prefetch of `bytes` bytes at p into L2.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

template <typename T>
inline bool can_stream(const T* row) {
  return kStreamAlign != 0 && reinterpret_cast<uintptr_t>(row) % kStreamAlign == 0;
}

// Calls f(j, n) over [j0, j1) in steps of kW; n < kW only for the tail.
template <typename F>
RMSNORM_INLINE void steps(int64_t j0, int64_t j1, F&& f) {
  int64_t j = j0;
  for (; j + kW <= j1; j += kW) f(j, kW);
  if (j < j1) f(j, j1 - j);
}

template <typename T>
RMSNORM_INLINE void load(const T* p, fVec& a, fVec& b, int64_t n) {
  if (n == kW) Io<T>::load(p, a, b); else Io<T>::load(p, a, b, n);
}
template <typename T>
RMSNORM_INLINE void store(T* p, const fVec& a, const fVec& b, int64_t n) {
  if (n == kW) Io<T>::store(p, a, b); else Io<T>::store(p, a, b, n);
}
// A store that streams full steps when `stream` (the row start must be aligned: see can_stream).
template <typename T>
RMSNORM_INLINE void store(T* p, const fVec& a, const fVec& b, int64_t n, bool stream) {
  if (stream && n == kW) stream_store(p, a, b); else store(p, a, b, n);
}

// The cast's rounding of the normalized row (Spec::round_to): through bf16, through fp16, or none.
RMSNORM_INLINE void round_through(at::ScalarType t, fVec& a, fVec& b) {
  if (t == at::kBFloat16) Io<c10::BFloat16>::round(a, b);
  else if (t == at::kHalf) Io<c10::Half>::round(a, b);
}

// 1/r rounded through bf16 or fp16 (Spec::rstd_round, cast "rstd"), or as it is.
inline float round_scalar(at::ScalarType t, float v) {
  if (t == at::kBFloat16) return static_cast<float>(static_cast<c10::BFloat16>(v));
  if (t == at::kHalf) return static_cast<float>(static_cast<c10::Half>(v));
  return v;
}

inline float inv_rms(float ss, int64_t k, float eps, bool eps_outside) {
  const float ms = ss / static_cast<float>(k);
  return eps_outside ? 1.f / (std::sqrt(ms) + eps) : 1.f / std::sqrt(ms + eps);
}

// Sum of a vector's lanes.
inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& u, fVec& w) { return u + w; }, v);
}

// A row's sum with bounded round-off. The caller's two vector accumulators (kept in registers) take
// kBlock steps; each block's sum is then pushed here and added pairwise (a binary counter of partial
// sums), so the error grows like kBlock + log2(blocks) terms instead of N / kW: torch's cascade sum does
// as well, a plain running sum of 2^22 elements does not.
struct Cascade {
  // Steps of kW elements per block: 8 cost 5-8% on 32K-element rows, 32 nothing measurable, with the
  // same accuracy (docs/benchmarks/cpu.md, "Accuracy").
  static constexpr int64_t kBlock = 32;
  // Rows shorter than this keep the plain running sum: N / kW <= 256 terms a lane, where the error is
  // already torch's (docs/benchmarks/cpu.md, "Accuracy"); a cascade on short rows cost up to 30%
  // (64 x 512, 16384 x 128; the kernel with and without it, timed in one process).
  static constexpr int64_t kMinElements = 8192;
  int64_t blocks = 0;
  // Uninitialised on purpose (a Vectorized<float> array would be zeroed for every row): level i is
  // written before it is read, when block 2^i completes.
  alignas(64) float level[40 * kF];

  // After the step at [j, j + n): at the end of every kBlock steps, adds the block in (s0, s1) and clears
  // the accumulators (the position decides, so the loop carries no counter).
  inline void step(fVec& s0, fVec& s1, int64_t j, int64_t n) {
    if (((j + n) & (kBlock * kW - 1)) != 0) return;
    push(s0 + s1);
    s0 = fVec(0.f);
    s1 = fVec(0.f);
  }
  void push(fVec v) {
    int i = 0;
    for (int64_t c = blocks; c & 1; c >>= 1, ++i) v = v + fVec::loadu(level + i * kF);
    v.store(level + i * kF);
    ++blocks;
  }
  float total(const fVec& s0, const fVec& s1) const {
    fVec t = s0 + s1;
    for (int i = 0; (blocks >> i) != 0; ++i) {
      if ((blocks >> i) & 1) t = t + fVec::loadu(level + i * kF);
    }
    return hsum(t);
  }
};

// The plain running sum (short rows): same interface, nothing to do.
struct NoCascade {
  int64_t blocks = 0;
  inline void step(fVec&, fVec&, int64_t, int64_t) {}
  inline float total(const fVec& s0, const fVec& s1) const { return hsum(s0 + s1); }
};

// The gate of a gated call (forward_rows / backward_rows with GATED): z read in its own dtype, a = act(z)
// with torch's formulas (silu: z / (1 + exp(-z)), sigmoid: 1 / (1 + exp(-z))), so a is torch's value.
struct Gate {
  const void* z = nullptr;  // rows of N elements, row stride N (contiguous)
  at::ScalarType tz = at::kFloat;
  int64_t mode = 0, act = 0;  // as Spec::gate, Spec::act
  at::ScalarType round = at::ScalarType::Undefined;  // Spec::gate_round
  int64_t period = 1;  // rows per gain row (groups of a row are rows here; the gain row is r % period)

  void load(int64_t r, int64_t N, int64_t j, int64_t n, fVec& a, fVec& b) const {
    switch (tz) {
      case at::kBFloat16: ::load(static_cast<const c10::BFloat16*>(z) + r * N + j, a, b, n); break;
      case at::kHalf: ::load(static_cast<const c10::Half*>(z) + r * N + j, a, b, n); break;
      default: ::load(static_cast<const float*>(z) + r * N + j, a, b, n);
    }
  }
  static fVec sigmoid(const fVec& v) { return (fVec(1.f) + v.neg().exp()).reciprocal(); }
  fVec value(const fVec& v) const {  // act(z)
    return act == 0 ? v / (fVec(1.f) + v.neg().exp()) : sigmoid(v);
  }
  fVec slope(const fVec& v) const {  // act'(z): silu' = s (1 + z (1 - s)), sigmoid' = s (1 - s)
    const fVec sg = sigmoid(v), one(1.f);
    return act == 0 ? sg * (one + v * (one - sg)) : sg * (one - sg);
  }
};

struct Fwd {
  const void* x; int64_t sx;
  const void* res; int64_t sres;
  void* h; void* y; float* rstd;
  const float* g; const float* bias;
  int64_t N, k; float eps; bool eps_outside; at::ScalarType round_to;
  at::ScalarType rstd_round;  // 1/r rounded through it before it multiplies (Undefined: not)
  bool stream;  // non-temporal stores of y and h
  Gate gate;
};

// TX: x, TH: the normalized tensor (residual's dtype with RES, else x's), TO: output.
// Rows are software-pipelined: while row r is normalized and written (from cache), row r+1 is read
// from memory and its sum of squares accumulated (its elements past k are prefetched), so reads and writes
// stream concurrently. With RES, h = x + residual of a row goes to the h output and to one of two
// `scratch` rows (2*N elements, in cache) that the output loop reads.
// GATED: the gated / grouped call (Fwd::gate; no residual): "before" multiplies each x by act(z) where it
// is read, "after" multiplies the output by act(z); the gain row of row r is r % gate.period.
template <typename TX, typename TH, typename TO, bool RES, bool LONG, bool GATED = false>
void forward_rows(const Fwd& a, int64_t r0, int64_t r1, TH* scratch) {
  const int64_t N = a.N, k = a.k;
  auto xrow = [&](int64_t r) { return static_cast<const TX*>(a.x) + r * a.sx; };
  auto src = [&](int64_t r) -> const TH* {
    if constexpr (RES) return scratch + (r & 1) * N;
    else return reinterpret_cast<const TH*>(xrow(r));
  };
  // Stage A of row r at [j, j+n): read it (with RES: form h) and add squares of its first k elements.
  auto stage_a = [&](int64_t r, int64_t j, int64_t n, fVec& s0, fVec& s1) RMSNORM_LAMBDA_INLINE {
    const TX* x = xrow(r);
    if constexpr (RES) {
      const TH* res = static_cast<const TH*>(a.res) + r * a.sres;
      TH* hs = scratch + (r & 1) * N;
      TH* hout = static_cast<TH*>(a.h) + r * N;
      fVec p, q, u, v;
      load(x + j, p, q, n);
      load(res + j, u, v, n);
      p = p + u;
      q = q + v;
      store(hs + j, p, q, n);
      store(hout + j, p, q, n, a.stream && can_stream(hout));
      if (j >= k) return;
      if (j + n > k) load(hs + j, p, q, k - j);  // the rounded h, first k - j lanes only
      else if constexpr (!std::is_same_v<TH, float>) Io<TH>::round(p, q);
      s0 = at::vec::fmadd(p, p, s0);
      s1 = at::vec::fmadd(q, q, s1);
    } else {
      if (j >= k) {
        prefetch(x + j, n * static_cast<int64_t>(sizeof(TX)));
        return;
      }
      fVec p, q;
      load(x + j, p, q, std::min(n, k - j));
      if constexpr (GATED) {
        if (a.gate.mode == 1) {
          fVec z0, z1;
          a.gate.load(r, N, j, std::min(n, k - j), z0, z1);
          p = p * a.gate.value(z0);
          q = q * a.gate.value(z1);
        }
      }
      s0 = at::vec::fmadd(p, p, s0);
      s1 = at::vec::fmadd(q, q, s1);
    }
  };
  // LONG: rows of at least Cascade::kMinElements, summed pairwise; shorter rows keep the running sum
  // (no bookkeeping at all: the template instance without it is what short rows run)
  std::conditional_t<LONG, Cascade, NoCascade> cas;
  fVec s0(0.f), s1(0.f);
  steps(0, RES ? N : k, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
    stage_a(r0, j, n, s0, s1);
    cas.step(s0, s1, j, n);
  });
  float ss = cas.total(s0, s1);
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = inv_rms(ss, k, a.eps, a.eps_outside);
    if (a.rstd) a.rstd[r] = rs;
    const fVec vr(round_scalar(a.rstd_round, rs));
    const TH* h = src(r);
    TO* y = static_cast<TO*>(a.y) + r * N;
    const float* grow = a.g;
    const float* brow = a.bias;
    if constexpr (GATED) {
      const int64_t off = (r % a.gate.period) * N;
      grow += off;
      if (brow) brow += off;
    }
    const bool st = a.stream && can_stream(y);
    const bool next = r + 1 < r1;
    fVec n0(0.f), n1(0.f);
    cas.blocks = 0;
    steps(0, N, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
      if (next) {
        stage_a(r + 1, j, n, n0, n1);
        cas.step(n0, n1, j, n);
      }
      fVec p, q, g0, g1, a0, a1;
      load(h + j, p, q, n);
      if constexpr (GATED) {
        if (a.gate.mode != 0) {
          a.gate.load(r, N, j, n, a0, a1);
          a0 = a.gate.value(a0);
          a1 = a.gate.value(a1);
          if (a.gate.mode == 1) {
            p = p * a0;
            q = q * a1;
          }
        }
      }
      p = p * vr;
      q = q * vr;
      round_through(a.round_to, p, q);
      load(grow + j, g0, g1, n);
      p = p * g0;
      q = q * g1;
      if (brow) {
        fVec b0, b1;
        load(brow + j, b0, b1, n);
        p = p + b0;
        q = q + b1;
      }
      if constexpr (GATED) {
        if (a.gate.mode == 2) {
          round_through(a.gate.round, p, q);
          p = p * a0;
          q = q * a1;
        }
      }
      store(y + j, p, q, n, st);
    });
    ss = cas.total(n0, n1);
  }
  if (a.stream) stream_fence();
}

// Column sums over a block's rows (dW, db) with bounded round-off: `acc` (N floats) takes kRows rows,
// then is merged pairwise into `levels` (a binary counter of N-float partial sums), so the error grows like
// kRows + log2(rows / kRows) terms instead of the row count. finish() leaves the block's total in `acc`.
struct ColumnSums {
  static constexpr int64_t kRows = 32;
  float* acc;
  float* levels;  // levels_for(rows) x N floats, or null (then a plain running sum)
  int64_t N, rows = 0, chunks = 0;

  ColumnSums(float* acc_, float* levels_, int64_t N_) : acc(acc_), levels(levels_), N(N_) {}

  static int64_t levels_for(int64_t rows) {
    int64_t l = 1;
    while ((kRows << (l - 1)) < rows) ++l;
    return l;
  }
  inline void row_done() {
    if (acc == nullptr || levels == nullptr || ++rows < kRows) return;
    rows = 0;
    int64_t t = 0;  // the level this chunk lands in: the count of trailing ones of `chunks`
    for (int64_t c = chunks; c & 1; c >>= 1) ++t;
    float* dst = levels + t * N;
    steps(0, N, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
      fVec v0, v1, l0, l1;
      load(acc + j, v0, v1, n);
      for (int64_t i = 0; i < t; ++i) {
        load(levels + i * N + j, l0, l1, n);
        v0 = v0 + l0;
        v1 = v1 + l1;
      }
      store(dst + j, v0, v1, n);
      store(acc + j, fVec(0.f), fVec(0.f), n);
    });
    ++chunks;
  }
  inline void finish() {
    if (acc == nullptr || levels == nullptr || chunks == 0) return;
    steps(0, N, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
      fVec v0, v1, l0, l1;
      load(acc + j, v0, v1, n);
      for (int64_t i = 0; (chunks >> i) != 0; ++i) {
        if (((chunks >> i) & 1) == 0) continue;
        load(levels + i * N + j, l0, l1, n);
        v0 = v0 + l0;
        v1 = v1 + l1;
      }
      store(acc + j, v0, v1, n);
    });
  }
};

struct Bwd {
  const void* dy; int64_t sdy;
  const void* dh; int64_t sdh;
  const void* h; int64_t sh;
  const float* rstd; const float* g;
  void* dx;
  float* dw; float* db;  // (blocks, N) partials, or null
  int64_t N, k; float eps; bool eps_outside; at::ScalarType round_to;
  bool stream;  // non-temporal stores of dx
  float* levels_dw = nullptr;  // per block: ColumnSums levels (set per block by the caller)
  float* levels_db = nullptr;
  Gate gate;  // GATED: the gate; h is x itself (no residual)
  const float* bias = nullptr;  // GATED "after": the bias (the gate's gradient needs the norm's output)
  void* dz = nullptr;  // GATED with a gate: the gate's gradient, z's dtype, rows of N
};

// TH: the normalized tensor and its gradient, TO: dy (the output's dtype). Pipelined like the forward:
// the dot product S of row r+1 (reading h and dy from memory) runs inside row r's gradient loop.
// GATED (no dh): with a = act(z), "before" normalizes h' = x * a, so dx = d * a and dz = d * x * act'(z)
// for d the gradient of h'; "after" differentiates u * a: dy' = dy * a goes into the norm and
// dz = dy * u * act'(z), u recomputed as the forward made it. Gain rows repeat with gate.period; with
// period > 1 the dW/db partials have period * N columns and no cascade (the caller passes no levels).
template <typename TH, typename TO, bool HAS_DH, bool LONG, bool GATED = false>
void backward_rows(const Bwd& a, int64_t r0, int64_t r1, float* dw, float* db) {
  const int64_t N = a.N;
  auto hrow = [&](int64_t r) { return static_cast<const TH*>(a.h) + r * a.sh; };
  auto dyrow = [&](int64_t r) { return static_cast<const TO*>(a.dy) + r * a.sdy; };
  auto gain = [&](int64_t r) {
    if constexpr (GATED) return a.g + (r % a.gate.period) * N;
    else return a.g;
  };
  // GATED: h' (the normalized input) and dy' (the norm's output gradient) of row r at [j, j+n), and act(z)
  auto gated = [&](int64_t r, int64_t j, int64_t n, fVec& p, fVec& q, fVec& u, fVec& v, fVec& a0,
                   fVec& a1) RMSNORM_LAMBDA_INLINE {
    if (a.gate.mode == 0) return;
    a.gate.load(r, N, j, n, a0, a1);
    a0 = a.gate.value(a0);
    a1 = a.gate.value(a1);
    if (a.gate.mode == 1) {
      p = p * a0;
      q = q * a1;
    } else {
      u = u * a0;
      v = v * a1;
    }
  };
  auto stage_a = [&](int64_t r, int64_t j, int64_t n, fVec& s0, fVec& s1) RMSNORM_LAMBDA_INLINE {
    fVec p, q, u, v, g0, g1;
    load(hrow(r) + j, p, q, n);
    load(dyrow(r) + j, u, v, n);
    load(gain(r) + j, g0, g1, n);
    if constexpr (GATED) {
      fVec a0, a1;
      gated(r, j, n, p, q, u, v, a0, a1);
    }
    s0 = at::vec::fmadd(u * g0, p, s0);
    s1 = at::vec::fmadd(v * g1, q, s1);
    if constexpr (HAS_DH) prefetch(static_cast<const TH*>(a.dh) + r * a.sdh + j, n * static_cast<int64_t>(sizeof(TH)));
  };
  std::conditional_t<LONG, Cascade, NoCascade> cas;  // as in forward_rows
  fVec s0(0.f), s1(0.f);
  steps(0, N, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
    stage_a(r0, j, n, s0, s1);
    cas.step(s0, s1, j, n);
  });
  float s = cas.total(s0, s1);
  ColumnSums cw(dw, a.levels_dw, N), cb(db, a.levels_db, N);
  for (int64_t r = r0; r < r1; ++r) {
    const TH* h = hrow(r);
    const TO* dy = dyrow(r);
    const float rs = a.rstd[r];
    float c;
    if (a.eps_outside) {
      const float root = 1.f / rs - a.eps;
      c = root > 0.f ? rs * rs / (static_cast<float>(a.k) * root) : 0.f;
    } else {
      c = rs * rs * rs / static_cast<float>(a.k);
    }
    const fVec vr(rs), vcs(c * s);
    TH* dx = static_cast<TH*>(a.dx) + r * N;
    const bool st = a.stream && can_stream(dx);
    const TH* dh = HAS_DH ? static_cast<const TH*>(a.dh) + r * a.sdh : nullptr;
    const bool next = r + 1 < r1;
    fVec n0(0.f), n1(0.f);
    cas.blocks = 0;
    const int64_t k = a.k;
    const fVec zero(0.f);
    const float* grow = gain(r);
    float* dwr = dw;
    float* dbr = db;
    if constexpr (GATED) {
      const int64_t off = (r % a.gate.period) * N;
      if (dwr) dwr += off;
      if (dbr) dbr += off;
    }
    steps(0, N, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
      if (next) {
        stage_a(r + 1, j, n, n0, n1);
        cas.step(n0, n1, j, n);
      }
      fVec p, q, u, v, g0, g1;
      load(h + j, p, q, n);
      load(dy + j, u, v, n);
      load(grow + j, g0, g1, n);
      fVec x0, x1, y0, y1, a0, a1;  // GATED: x and dy as read, act(z)
      if constexpr (GATED) {
        x0 = p, x1 = q, y0 = u, y1 = v;
        gated(r, j, n, p, q, u, v, a0, a1);
      }
      fVec d0 = u * g0 * vr, d1 = v * g1 * vr;
      if (j + n <= k) {  // the statistic's gradient reaches the first k elements only
        d0 = at::vec::fnmadd(p, vcs, d0);
        d1 = at::vec::fnmadd(q, vcs, d1);
      } else if (j < k) {
        const int64_t m = k - j;
        d0 = d0 - fVec::set(zero, p * vcs, std::min(m, kF));
        d1 = d1 - fVec::set(zero, q * vcs, std::max<int64_t>(0, m - kF));
      }
      if constexpr (HAS_DH) {
        fVec e0, e1;
        load(dh + j, e0, e1, n);
        d0 = d0 + e0;
        d1 = d1 + e1;
      }
      if constexpr (GATED) {
        if (a.gate.mode != 0) {
          fVec z0, z1;
          a.gate.load(r, N, j, n, z0, z1);
          z0 = a.gate.slope(z0);
          z1 = a.gate.slope(z1);
          if (a.gate.mode == 1) {  // dz = d * x * act'(z); dx = d * a
            z0 = d0 * x0 * z0;
            z1 = d1 * x1 * z1;
            d0 = d0 * a0;
            d1 = d1 * a1;
          } else {  // dz = dy * u * act'(z), u the norm's output before the gate
            fVec w0 = p * vr, w1 = q * vr;
            round_through(a.round_to, w0, w1);
            w0 = w0 * g0;
            w1 = w1 * g1;
            if (a.bias) {
              fVec b0, b1;
              load(a.bias + (r % a.gate.period) * N + j, b0, b1, n);
              w0 = w0 + b0;
              w1 = w1 + b1;
            }
            round_through(a.gate.round, w0, w1);
            z0 = y0 * w0 * z0;
            z1 = y1 * w1 * z1;
          }
          switch (a.gate.tz) {
            case at::kBFloat16: store(static_cast<c10::BFloat16*>(a.dz) + r * N + j, z0, z1, n); break;
            case at::kHalf: store(static_cast<c10::Half*>(a.dz) + r * N + j, z0, z1, n); break;
            default: store(static_cast<float*>(a.dz) + r * N + j, z0, z1, n);
          }
        }
      }
      store(dx + j, d0, d1, n, st);
      if (dwr) {
        fVec w0, w1;
        p = p * vr;
        q = q * vr;
        round_through(a.round_to, p, q);
        load(dwr + j, w0, w1, n);
        store(dwr + j, at::vec::fmadd(u, p, w0), at::vec::fmadd(v, q, w1), n);
      }
      if (dbr) {
        fVec b0, b1;
        load(dbr + j, b0, b1, n);
        store(dbr + j, b0 + u, b1 + v, n);
      }
    });
    s = cas.total(n0, n1);
    cw.row_done();
    cb.row_done();
  }
  cw.finish();
  cb.finish();
  if (a.stream) stream_fence();
}

// Runs body(block, row_begin, row_end) for `blocks` contiguous row blocks, in parallel when blocks > 1.
template <typename F>
void for_blocks(int64_t M, int64_t blocks, F&& body) {
  blocks = std::max<int64_t>(1, std::min(blocks, M));
  const int64_t per = (M + blocks - 1) / blocks;
  auto run = [&](int64_t b) { body(b, b * per, std::min(M, (b + 1) * per)); };
  if (blocks == 1) {
    run(0);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) run(b);
  });
}

template <typename F>
void dispatch(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "rmsnorm cpu: unsupported dtype ", t, " for ", what);
  }
}

// (*batch, *normalized) as M rows of N elements: a base pointer and a row stride (elements). Contiguous
// tensors are read in place (no view is made); other layouts are reshaped, copied only when their rows are
// not unit-stride; negative views (torch._neg_view) are resolved, as every ATen kernel would.
struct Rows {
  at::Tensor keep;  // the copy or view the pointer points into, when one was needed
  const void* ptr = nullptr;
  int64_t stride = 0;
};

Rows rows(const at::Tensor& t, int64_t M, int64_t N, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "rmsnorm cpu: ", what, " must be a CPU tensor");
  if (!t.is_neg() && t.is_contiguous()) return {at::Tensor(), t.data_ptr(), N};
  at::Tensor r = t.is_neg() ? t.resolve_neg() : t;
  r = (r.dim() == 2 && r.size(0) == M) ? r : r.reshape({M, N});
  if (N > 1 && r.stride(1) != 1) r = r.contiguous();
  return {r, r.data_ptr(), r.stride(0)};
}

// A parameter (gain or bias) as N fp32 values, read in its own dtype: an fp32 contiguous parameter is
// used in place; any other (bf16, fp16, offset != 0, strided) is converted into `buf`, a per-thread buffer
// that lives across calls, so a call makes no tensor for it. Without a weight the gain is 1 + offset.
template <typename T>
void widen(const T* src, float* dst, int64_t N, float add) {
  for (int64_t i = 0; i < N; ++i) dst[i] = static_cast<float>(src[i]) + add;
}

const float* param_row(const std::optional<at::Tensor>& t, int64_t N, double offset, bool is_gain,
                       std::vector<float>& buf) {
  if (!t.has_value()) {
    if (!is_gain) return nullptr;
    buf.assign(N, static_cast<float>(1.0 + offset));
    return buf.data();
  }
  TORCH_CHECK(t->numel() == N, "rmsnorm cpu: ", is_gain ? "weight" : "bias", " must have N elements");
  TORCH_CHECK(t->device().is_cpu(), "rmsnorm cpu: ", is_gain ? "weight" : "bias", " must be a CPU tensor");
  const bool plain = t->is_contiguous() && !t->is_neg();
  if (plain && t->scalar_type() == at::kFloat && offset == 0.0) return t->data_ptr<float>();
  const at::Tensor c = plain ? *t : t->resolve_neg().contiguous();
  buf.resize(N);
  const float add = static_cast<float>(offset);
  switch (c.scalar_type()) {
    case at::kFloat: widen(c.data_ptr<float>(), buf.data(), N, add); break;
    case at::kBFloat16: widen(c.data_ptr<c10::BFloat16>(), buf.data(), N, add); break;
    case at::kHalf: widen(c.data_ptr<c10::Half>(), buf.data(), N, add); break;
    case at::kDouble: {  // fp64 parameters with half/fp32 activations: rounded to fp32 first, as .to(float)
      const double* d = c.data_ptr<double>();
      for (int64_t i = 0; i < N; ++i) buf[i] = static_cast<float>(d[i]) + add;
      break;
    }
    default: TORCH_CHECK(false, "rmsnorm cpu: unsupported parameter dtype ", c.scalar_type());
  }
  return buf.data();
}

// Per-thread parameter buffers (the calling thread's; the kernels' worker threads only read them).
struct ParamBuffers {
  std::vector<float> gain, bias;
};
ParamBuffers& param_buffers() {
  thread_local ParamBuffers b;
  return b;
}

struct Shape {
  int64_t M, N;
  std::vector<int64_t> batch;
};

Shape split_rows(const at::Tensor& t, int64_t nd) {
  TORCH_CHECK(nd >= 1 && nd <= t.dim(), "rmsnorm cpu: bad normalized_ndim");
  Shape s{1, 1, {}};
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d < t.dim() - nd) {
      s.batch.push_back(t.size(d));
      s.M *= t.size(d);
    } else {
      s.N *= t.size(d);
    }
  }
  return s;
}

// -> (y, h or None, rstd); y and h have x's shape, rstd the batch shape, in fp32 (undefined when
// !need_rstd: a forward nothing will differentiate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const Spec& spec, int64_t blocks, bool stream,
    bool need_rstd = true) {
  TORCH_CHECK(spec.gate == 0 && spec.group == 0, "rmsnorm cpu: a gated or grouped spec needs forward_gated");
  const Shape sh = split_rows(x, spec.nd);
  const int64_t M = sh.M, N = sh.N, k = spec.k;
  const at::ScalarType out_dtype = spec.out_dtype;
  TORCH_CHECK(k >= 1 && k <= N, "rmsnorm cpu: k must be in [1, N]");
  const bool res = residual.has_value();
  TORCH_CHECK(res == spec.residual, "rmsnorm cpu: the spec's residual flag does not match the arguments");
  const at::ScalarType th = res ? residual->scalar_type() : x.scalar_type();
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto y = at::empty(x.sizes(), opts.dtype(out_dtype));
  auto h = res ? at::empty(x.sizes(), opts.dtype(th)) : at::Tensor();
  auto rstd = need_rstd ? at::empty(sh.batch, opts.dtype(at::kFloat)) : at::Tensor();
  if (M == 0) return {y, h, rstd};
  const Rows x2 = rows(x, M, N, "x");
  const Rows r2 = res ? rows(*residual, M, N, "residual") : Rows();
  ParamBuffers& pb = param_buffers();
  const float* g = param_row(weight, N, spec.offset, true, pb.gain);
  const float* b = param_row(bias, N, 0.0, false, pb.bias);
  const Fwd a{x2.ptr, x2.stride, r2.ptr, r2.stride, res ? h.data_ptr() : nullptr, y.data_ptr(),
              need_rstd ? rstd.data_ptr<float>() : nullptr, g, b, N, k, static_cast<float>(spec.eps),
              spec.eps_outside, spec.round_to, spec.rstd_round, stream};
  blocks = std::max<int64_t>(1, std::min(blocks, M));
  dispatch(x.scalar_type(), "x", [&](auto tx) {
    using TX = decltype(tx);
    dispatch(out_dtype, "out_dtype", [&](auto to) {
      using TO = decltype(to);
      if (res) {
        dispatch(th, "residual", [&](auto thv) {
          using TH = decltype(thv);
          at::Tensor scratch = at::empty({blocks, 2 * N}, opts.dtype(th));
          TH* sp = static_cast<TH*>(scratch.data_ptr());
          for_blocks(M, blocks, [&](int64_t blk, int64_t r0, int64_t r1) {
            if (r0 >= r1) return;
            if (N >= Cascade::kMinElements) forward_rows<TX, TH, TO, true, true>(a, r0, r1, sp + blk * 2 * N);
            else forward_rows<TX, TH, TO, true, false>(a, r0, r1, sp + blk * 2 * N);
          });
        });
      } else {
        for_blocks(M, blocks, [&](int64_t, int64_t r0, int64_t r1) {
          if (r0 >= r1) return;
          if (k >= Cascade::kMinElements) forward_rows<TX, TX, TO, false, true>(a, r0, r1, nullptr);
          else forward_rows<TX, TX, TO, false, false>(a, r0, r1, nullptr);
        });
      }
    });
  });
  return {y, h, rstd};
}

// Fixed-order sum of (blocks, N) fp32 partials (columns in parallel, blocks in order).
at::Tensor reduce_blocks(const at::Tensor& part, int64_t N) {
  auto out = at::empty({N}, part.options());
  const float* p = part.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t nb = part.size(0);
  at::parallel_for(0, N, 1 << 14, [&](int64_t c0, int64_t c1) {
    steps(c0, c1, [&](int64_t j, int64_t n) RMSNORM_LAMBDA_INLINE {
      fVec s0, s1;
      load(p + j, s0, s1, n);
      for (int64_t b = 1; b < nb; ++b) {
        fVec u, v;
        load(p + b * N + j, u, v, n);
        s0 = s0 + u;
        s1 = s1 + v;
      }
      store(o + j, s0, s1, n);
    });
  });
  return out;
}

// The (blocks, N) fp32 partials of a parameter's gradient, or undefined when it is not asked for; one block's
// are allocated as (N). Zeroed here only when there are no rows (no worker runs: zero gradients); else each
// block zeroes its own row (zero_partial_row) inside its worker, which spares a fill op per call and touches
// the row on the thread that sums into it.
at::Tensor partials(bool need, int64_t blocks, int64_t N, int64_t rows, const at::TensorOptions& f32) {
  if (!need) return at::Tensor();
  const auto shape = blocks == 1 ? std::vector<int64_t>{N} : std::vector<int64_t>{blocks, N};
  return rows == 0 ? at::zeros(shape, f32) : at::empty(shape, f32);
}

inline float* zero_partial_row(float* part, int64_t blk, int64_t N) {
  if (part == nullptr) return nullptr;
  float* row = part + blk * N;
  std::fill(row, row + N, 0.f);
  return row;
}

// A parameter's gradient from the (blocks, N) fp32 partials (undefined when none were asked for), in the
// parameter's dtype and shape.
at::Tensor finish_partials(const at::Tensor& part, const std::optional<at::Tensor>& like, int64_t N) {
  if (!part.defined()) return at::Tensor();
  at::Tensor sum = part.dim() == 1 ? part : reduce_blocks(part, N);
  if (sum.scalar_type() != like->scalar_type()) sum = sum.to(like->scalar_type());
  return like->dim() == 1 ? sum : sum.view(like->sizes());
}

// -> (dh in h's dtype and shape, dw in weight's dtype and shape or None, db likewise for bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& rstd,
    const Spec& spec, bool need_dw, bool need_db, int64_t blocks, bool stream) {
  TORCH_CHECK(spec.gate == 0 && spec.group == 0, "rmsnorm cpu: a gated or grouped spec needs backward_gated");
  const Shape sh = split_rows(h, spec.nd);
  const int64_t M = sh.M, N = sh.N, k = spec.k;
  TORCH_CHECK(dy.sizes() == h.sizes(), "rmsnorm cpu: dy must have h's shape");
  TORCH_CHECK(!need_dw || weight.has_value(), "rmsnorm cpu: need_dw without a weight");
  TORCH_CHECK(!need_db || bias.has_value(), "rmsnorm cpu: need_db without a bias");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == M,
              "rmsnorm cpu: rstd must be a contiguous fp32 tensor of M elements");
  auto dx = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  blocks = std::max<int64_t>(1, std::min(blocks, M));
  auto f32 = h.options().dtype(at::kFloat);
  at::Tensor pw = partials(need_dw, blocks, N, M, f32);
  at::Tensor pb = partials(need_db, blocks, N, M, f32);
  if (M > 0) {
    const Rows h2 = rows(h, M, N, "h"), dy2 = rows(dy, M, N, "dy");
    Rows dh2;
    if (dh.has_value()) {
      TORCH_CHECK(dh->scalar_type() == h.scalar_type() && dh->sizes() == h.sizes(),
                  "rmsnorm cpu: dh must have h's dtype and shape");
      dh2 = rows(*dh, M, N, "dh");
    }
    const float* g = param_row(weight, N, spec.offset, true, param_buffers().gain);
    const Bwd a{dy2.ptr, dy2.stride, dh2.ptr, dh2.stride, h2.ptr, h2.stride, rstd.data_ptr<float>(),
                g, dx.data_ptr(), need_dw ? pw.data_ptr<float>() : nullptr,
                need_db ? pb.data_ptr<float>() : nullptr, N, k, static_cast<float>(spec.eps), spec.eps_outside,
                spec.round_to, stream};
    // pairwise levels of the dW/db column sums, per block (see ColumnSums)
    const int64_t per_block = (M + blocks - 1) / blocks;
    const int64_t nl = ColumnSums::levels_for(per_block);
    const bool cascade = per_block > ColumnSums::kRows && (need_dw || need_db);
    at::Tensor lv = cascade ? at::empty({blocks, (need_dw ? nl : 0) + (need_db ? nl : 0), N}, f32) : at::Tensor();
    dispatch(h.scalar_type(), "h", [&](auto thv) {
      using TH = decltype(thv);
      dispatch(dy.scalar_type(), "dy", [&](auto tov) {
        using TO = decltype(tov);
        for_blocks(M, blocks, [&](int64_t blk, int64_t r0, int64_t r1) {
          float* dwb = zero_partial_row(a.dw, blk, N);
          float* dbb = zero_partial_row(a.db, blk, N);
          if (r0 >= r1) return;
          Bwd b = a;
          if (cascade) {
            float* base = lv.data_ptr<float>() + blk * lv.size(1) * N;
            b.levels_dw = need_dw ? base : nullptr;
            b.levels_db = need_db ? base + (need_dw ? nl : 0) * N : nullptr;
          }
          const bool lng = N >= Cascade::kMinElements;
          if (a.dh && lng) backward_rows<TH, TO, true, true>(b, r0, r1, dwb, dbb);
          else if (a.dh) backward_rows<TH, TO, true, false>(b, r0, r1, dwb, dbb);
          else if (lng) backward_rows<TH, TO, false, true>(b, r0, r1, dwb, dbb);
          else backward_rows<TH, TO, false, false>(b, r0, r1, dwb, dbb);
        });
      });
    });
  }
  return {dx, finish_partials(pw, weight, N), finish_partials(pb, bias, N)};
}

// --------------------------------------------------------------------------- gated and grouped calls
// Rows of a grouped call are its groups: (M, N) with groups of G is (M * N / G, G) with the gain row
// r % (N / G). x and the gate are made contiguous. The Python side (rmsnorm/backends/cpu/__init__.py) adds
// autograd around these (a double backward recomputes through rmsnorm.composite.gated).

struct GroupRows {
  int64_t M, N, period;
};

GroupRows group_rows(const at::Tensor& x, const Spec& spec) {
  TORCH_CHECK(spec.nd == 1 && !spec.residual, "rmsnorm cpu: gated calls take a 1-D normalized shape, no residual");
  const int64_t n = x.dim() > 0 ? x.size(-1) : 1;
  const int64_t M = n > 0 ? x.numel() / n : 0;
  if (spec.group > 0) {
    TORCH_CHECK(n % spec.group == 0, "rmsnorm cpu: group does not divide N");
    return {M * (n / spec.group), spec.group, n / spec.group};
  }
  return {M, n, 1};
}

Gate gate_of(const std::optional<at::Tensor>& z, const Spec& spec, int64_t period) {
  Gate g;
  g.mode = z.has_value() ? spec.gate : 0;
  g.act = spec.act;
  g.round = spec.gate_round;
  g.period = period;
  if (z.has_value()) {
    g.z = z->data_ptr();
    g.tz = z->scalar_type();
  }
  return g;
}

// -> (y, rstd of the M * N / G rows)
std::tuple<at::Tensor, at::Tensor> forward_gated(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& z_, const Spec& spec, int64_t blocks, bool stream) {
  const at::Tensor x = x_.resolve_neg().contiguous();
  std::optional<at::Tensor> z;
  if (z_.has_value()) {
    z = z_->resolve_neg().contiguous();
    TORCH_CHECK(z->sizes() == x.sizes() && z->device().is_cpu(), "rmsnorm cpu: the gate must have x's shape");
  }
  const GroupRows gr = group_rows(x, spec);
  const int64_t M = gr.M, N = gr.N, n_full = gr.N * gr.period;
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto y = at::empty(x.sizes(), opts.dtype(spec.out_dtype));
  auto rstd = at::empty({M}, opts.dtype(at::kFloat));
  if (M == 0 || N == 0) return {y, rstd};
  ParamBuffers& pb = param_buffers();
  const float* g = param_row(weight, n_full, spec.offset, true, pb.gain);
  const float* b = param_row(bias, n_full, 0.0, false, pb.bias);
  const int64_t k = spec.group > 0 ? N : spec.k;
  Fwd a{x.data_ptr(), N, nullptr, 0, nullptr, y.data_ptr(), rstd.data_ptr<float>(), g, b, N, k,
        static_cast<float>(spec.eps), spec.eps_outside, spec.round_to, at::ScalarType::Undefined, stream,
        gate_of(z, spec, gr.period)};
  blocks = std::max<int64_t>(1, std::min(blocks, M));
  dispatch(x.scalar_type(), "x", [&](auto tx) {
    using TX = decltype(tx);
    dispatch(spec.out_dtype, "out_dtype", [&](auto to) {
      using TO = decltype(to);
      for_blocks(M, blocks, [&](int64_t, int64_t r0, int64_t r1) {
        if (r0 >= r1) return;
        if (k >= Cascade::kMinElements) forward_rows<TX, TX, TO, false, true, true>(a, r0, r1, nullptr);
        else forward_rows<TX, TX, TO, false, false, true>(a, r0, r1, nullptr);
      });
    });
  });
  return {y, rstd};
}

// -> (dx in x's dtype, dz in z's dtype or None, dw or None, db or None)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_gated(
    const at::Tensor& dy_, const at::Tensor& x_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& z_, const at::Tensor& rstd,
    const Spec& spec, bool need_dw, bool need_db, int64_t blocks, bool stream) {
  const at::Tensor x = x_.resolve_neg().contiguous(), dy = dy_.resolve_neg().contiguous();
  std::optional<at::Tensor> z;
  if (z_.has_value()) z = z_->resolve_neg().contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes(), "rmsnorm cpu: dy must have x's shape");
  const GroupRows gr = group_rows(x, spec);
  const int64_t M = gr.M, N = gr.N, n_full = gr.N * gr.period;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == M,
              "rmsnorm cpu: rstd must be a contiguous fp32 tensor of the group rows");
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto dx = at::empty(x.sizes(), opts);
  auto dz = z ? at::empty(x.sizes(), opts.dtype(z->scalar_type())) : at::Tensor();
  blocks = std::max<int64_t>(1, std::min(blocks, std::max<int64_t>(M, 1)));
  auto f32 = opts.dtype(at::kFloat);
  at::Tensor pw = partials(need_dw, blocks, n_full, M, f32);
  at::Tensor pb = partials(need_db, blocks, n_full, M, f32);
  if (M > 0 && N > 0) {
    ParamBuffers& bufs = param_buffers();
    const float* g = param_row(weight, n_full, spec.offset, true, bufs.gain);
    const float* b = param_row(bias, n_full, 0.0, false, bufs.bias);
    Bwd a{dy.data_ptr(), N, nullptr, 0, x.data_ptr(), N, rstd.data_ptr<float>(), g, dx.data_ptr(),
          need_dw ? pw.data_ptr<float>() : nullptr, need_db ? pb.data_ptr<float>() : nullptr, N,
          spec.group > 0 ? N : spec.k, static_cast<float>(spec.eps), spec.eps_outside, spec.round_to, stream};
    a.gate = gate_of(z, spec, gr.period);
    a.bias = b;
    a.dz = dz.defined() ? dz.data_ptr() : nullptr;
    dispatch(x.scalar_type(), "x", [&](auto thv) {
      using TH = decltype(thv);
      dispatch(dy.scalar_type(), "dy", [&](auto tov) {
        using TO = decltype(tov);
        for_blocks(M, blocks, [&](int64_t blk, int64_t r0, int64_t r1) {
          float* dwb = zero_partial_row(a.dw, blk, n_full);
          float* dbb = zero_partial_row(a.db, blk, n_full);
          if (r0 >= r1) return;
          if (N >= Cascade::kMinElements) backward_rows<TH, TO, false, true, true>(a, r0, r1, dwb, dbb);
          else backward_rows<TH, TO, false, false, true>(a, r0, r1, dwb, dbb);
        });
      });
    });
  }
  return {dx, dz, finish_partials(pw, weight, n_full), finish_partials(pb, bias, n_full)};
}

// A backward with create_graph=True (grad mode on inside it) needs gradients that are themselves
// differentiable: it calls back into Python (rmsnorm.composite.input_grads via set_graph_backward).
py::object* g_graph_backward = nullptr;

void set_graph_backward(py::object f) {
  if (g_graph_backward == nullptr) g_graph_backward = new py::object();  // never freed: outlives Python
  *g_graph_backward = std::move(f);
}

// Eager autograd in C++: the backward runs without Python, which is most of the cost of small calls.
struct CpuKernelFunction : public torch::autograd::Function<CpuKernelFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const Spec& spec,
      int64_t blocks, bool stream) {
    auto [y, h, rstd] = ::forward(x, weight, bias, residual, spec, blocks, stream);
    const bool res = residual.has_value();
    ctx->save_for_backward({res ? h : x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), rstd});
    ctx->saved_data["spec"] = spec.pack();
    ctx->saved_data["blocks"] = blocks;
    ctx->saved_data["stream"] = stream;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    if (res) return {y, h};
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& h = saved[0];
    const Spec spec = Spec::unpack(ctx->saved_data["spec"]);
    const bool res = spec.residual;
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    // needs_input_grad counts only the tensors that were given (an absent optional has no edge)
    bool needs[4] = {false, false, false, false};
    for (size_t i = 0, edge = 0; i < 4; ++i) {
      const bool given = i == 0 || (i < 3 ? saved[i].defined() : res);
      if (given) needs[i] = ctx->needs_input_grad(edge++);
    }
    // one gradient per forward argument: x, weight, bias, residual, spec, blocks, stream
    torch::autograd::variable_list result(7);
    if (at::GradMode::is_enabled()) {
      TORCH_CHECK(g_graph_backward != nullptr, "rmsnorm cpu: no differentiable backward registered");
      py::gil_scoped_acquire gil;
      auto opt = [](const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
      py::tuple out = (*g_graph_backward)(
          opt(grads[0]), res && grads.size() > 1 ? opt(grads[1]) : py::none(), h, opt(saved[1]), opt(saved[2]),
          spec.fields(), x_dtype, py::make_tuple(needs[0], needs[1], needs[2], needs[3]));
      for (size_t i = 0; i < 4; ++i) {
        if (!out[i].is_none()) result[i] = out[i].cast<at::Tensor>();
      }
      return result;
    }
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros(h.sizes(), h.options().dtype(spec.out_dtype));
    std::optional<at::Tensor> dh;
    if (res && grads.size() > 1 && grads[1].defined()) dh = grads[1].to(h.scalar_type());
    std::optional<at::Tensor> weight, bias;
    if (saved[1].defined()) weight = saved[1];
    if (saved[2].defined()) bias = saved[2];
    const bool need_dw = weight.has_value() && needs[1];
    const bool need_db = bias.has_value() && needs[2];
    auto [dgrad, dw, db] = ::backward(dy, dh, h, weight, bias, saved[3], spec, need_dw, need_db,
                                      ctx->saved_data["blocks"].toInt(), ctx->saved_data["stream"].toBool());
    result[0] = dgrad.scalar_type() == x_dtype ? dgrad : dgrad.to(x_dtype);
    result[1] = dw;
    result[2] = db;
    if (res) result[3] = dgrad;
    return result;
  }
};

torch::autograd::variable_list forward_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const Spec& spec, int64_t blocks, bool stream) {
  return CpuKernelFunction::apply(x, weight, bias, residual, spec, blocks, stream);
}

// ------------------------------------------------------------------------------------ eager entry
// One C++ call per norm for the common eager case (rmsnorm/backends/cpu/entry.py builds the Config):
// the checks, the option resolution (rmsnorm.functional.resolve's rules), the grad choice and the launch
// heuristic run here. Anything unusual returns None and the caller takes the Python path, which keeps
// every error message and every other route (ops.run's table) in one place.

// Whether the automatic backend choice on CPU is this backend (rmsnorm.backends.registry sets it).
bool g_auto_is_cpu = false;

void set_auto_is_cpu(bool on) { g_auto_is_cpu = on; }

enum class CastMode : int64_t { kFp32 = 0, kLlama = 1, kT5 = 2, kRstd = 3 };

struct Config {
  std::vector<int64_t> shape;  // the normalized shape; empty: the weight's, else the bias's, else x's last dim
  double p = 1.0;
  bool floor = false;  // partial_rounding="floor"
  bool has_eps = true;  // false: eps=None, the compute dtype's machine epsilon
  double eps = 1e-6;
  bool eps_outside = false;
  double offset = 0.0;
  CastMode cast = CastMode::kFp32;
  at::ScalarType out_dtype = at::ScalarType::Undefined;  // Undefined: resolved per call
  bool named = false;  // backend="cpu" was named (else it runs only while the automatic choice is cpu)
  int64_t parallel_min_elements = 1 << 16;
  int64_t stream_min_bytes = 8 << 20;
  int64_t k_fixed = 0;  // k for a fixed shape (0: computed per call)
};

// rmsnorm.args.partial_size, the same arithmetic in double precision.
int64_t partial_size(int64_t n, double p, bool floor) {
  if (p >= 1.0) return n;
  const double exact = p * static_cast<double>(n);
  const double tol = 1e-9 + 1e-12 * exact;
  const int64_t k = static_cast<int64_t>(floor ? std::floor(exact + tol) : std::ceil(exact - tol));
  return std::min(std::max<int64_t>(k, 1), n);
}

bool is_io_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }
bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// A tensor an entry reads with its data pointer: a plain strided tensor that no transform, mode or
// subclass wraps (those keep their own semantics on the Python path).
bool plain_any(const at::Tensor& t) {
  static const auto kOther = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize,
      c10::DispatchKey::Negative, c10::DispatchKey::Conjugate, c10::DispatchKey::ZeroTensor,
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode});
  return t.layout() == at::kStrided && !t.key_set().has_any(kOther);
}

// ... of the CPU entry: also on the CPU, in a dtype the kernels read.
bool plain_cpu(const at::Tensor& t) {
  return plain_any(t) && t.device().is_cpu() && is_io_dtype(t.scalar_type());
}

// A parameter argument: None, or a (possibly nn.Parameter) tensor; false if it is anything else.
bool param_arg(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == Py_None) return true;
  if (!THPVariable_Check(o)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!plain_cpu(t)) return false;
  out = t;
  return true;
}

// The call, or None for the Python path.
// The call, or None for the Python path: y, or (y, h) with a residual (h = x + residual).
py::object call(const Config& c, py::handle xo, py::handle wo, py::handle bo, py::handle ro) {
  PyObject* xp = xo.ptr();
  if (!THPVariable_CheckExact(xp)) return py::none();
  const at::Tensor& x = THPVariable_Unpack(xp);
  std::optional<at::Tensor> w, b, r;
  if (!plain_cpu(x) || !param_arg(wo.ptr(), w) || !param_arg(bo.ptr(), b)) return py::none();
  if (ro.ptr() != Py_None) {
    if (!THPVariable_CheckExact(ro.ptr())) return py::none();
    r = THPVariable_Unpack(ro.ptr());
    if (!plain_cpu(*r) || r->sizes() != x.sizes() || r->_fw_grad(0).defined()) return py::none();
  }
  if (!(c.named || g_auto_is_cpu)) return py::none();
  // forward-mode AD: the kernels carry no tangents (the Python path decomposes)
  if (x._fw_grad(0).defined() || (w && w->_fw_grad(0).defined()) || (b && b->_fw_grad(0).defined())) {
    return py::none();
  }
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return py::none();
  }
  if (c.offset != 0.0 && !w.has_value()) return py::none();  // an error, raised by the Python path
  // the normalized shape and its size
  c10::IntArrayRef shape = c.shape;
  if (shape.empty()) shape = w ? w->sizes() : b ? b->sizes() : x.sizes().slice(x.dim() > 0 ? x.dim() - 1 : 0);
  const int64_t nd = static_cast<int64_t>(shape.size());
  if (nd == 0 || x.dim() < nd || x.sizes().slice(x.dim() - nd) != shape) return py::none();
  if ((w && w->sizes() != shape) || (b && b->sizes() != shape)) return py::none();
  int64_t N = 1;
  for (int64_t s : shape) N *= s;
  const int64_t k = c.k_fixed > 0 ? c.k_fixed : partial_size(N, c.p, c.floor);
  if (N == 0 || k == 0) return py::none();
  // dtypes (rmsnorm.spec.round_to / out_dtype_for)
  const at::ScalarType h_dtype = r ? r->scalar_type() : x.scalar_type();
  Spec spec;
  spec.nd = nd;
  spec.k = k;
  spec.eps = c.has_eps ? c.eps : static_cast<double>(std::numeric_limits<float>::epsilon());
  spec.eps_outside = c.eps_outside;
  spec.offset = c.offset;
  spec.residual = r.has_value();
  at::ScalarType out = h_dtype;
  if (c.cast == CastMode::kLlama || c.cast == CastMode::kRstd) {
    spec.round_to = is_half(h_dtype) ? h_dtype : at::ScalarType::Undefined;
    if (c.cast == CastMode::kRstd) spec.rstd_round = spec.round_to;
    if (w) out = at::promote_types(h_dtype, w->scalar_type());
  } else if (c.cast == CastMode::kT5) {
    spec.round_to = w && is_half(w->scalar_type()) ? w->scalar_type() : at::ScalarType::Undefined;
    if (w) out = w->scalar_type();
  }
  spec.out_dtype = c.out_dtype != at::ScalarType::Undefined ? c.out_dtype : out;
  if (!is_io_dtype(spec.out_dtype)) return py::none();
  // launch (rmsnorm.backends.cpu.heuristics.launch)
  const int64_t numel = x.numel();
  const int64_t blocks = numel < c.parallel_min_elements ? 1 : at::get_num_threads();
  const bool stream = numel * static_cast<int64_t>(x.element_size()) >= c.stream_min_bytes;
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || (w && w->requires_grad()) ||
                                                   (b && b->requires_grad()) || (r && r->requires_grad()));
  if (grad && (x.is_inference() || (r && r->is_inference()))) {
    return py::none();  // torch's module accepts it: the Python path clones
  }
  at::Tensor y, h;
  if (grad) {
    auto out_list = CpuKernelFunction::apply(x, w, b, r, spec, blocks, stream);
    y = out_list[0];
    if (r) h = out_list[1];
  } else {
    std::tie(y, h, std::ignore) = ::forward(x, w, b, r, spec, blocks, stream, /*need_rstd=*/false);
  }
  auto wrap = [](at::Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); };
  if (!r) return wrap(std::move(y));
  return py::make_tuple(wrap(std::move(y)), wrap(std::move(h)));
}


// ------------------------------------------------------------------------------------ Triton launches
// The GPU eager entry (rmsnorm/backends/triton/entry.py) allocates and launches Triton's compiled row
// kernels from here: no Python between the call and cuLaunchKernel. A TritonLaunch is one compiled kernel
// at one specialization: its CUfunction, grid, block, shared memory and its parameters as bytes, packed
// once as Triton's own launcher packs them (rmsnorm/backends/triton/prebound.py, checked against
// Triton's launcher on a stand-in libcuda by the tests); per call only the tensor pointers change. The
// driver entry point is looked up in the libcuda that Triton loaded.

using CuLaunchKernel = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                               void**, void**);

CuLaunchKernel cu_launch_kernel() {
  static const CuLaunchKernel fn = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<CuLaunchKernel>(dlsym(lib, "cuLaunchKernel")) : nullptr;
  }();
  return fn;
}

constexpr size_t kMaxParamBytes = 1024;
constexpr size_t kMaxParams = 64;

struct TritonLaunch {
  uint64_t function = 0;
  std::array<uint32_t, 3> grid{1, 1, 1};
  uint32_t block = 32;
  uint32_t shared = 0;
  std::string bytes;                                  // every parameter, parameter i at offsets[i]
  std::vector<uint32_t> offsets;
  std::vector<uint32_t> sizes;                        // of each parameter in bytes
  std::vector<std::pair<uint32_t, uint32_t>> slots;  // (parameter, source tensor): the pointers patched per call
  int64_t device = -1;                                // the CUDA device; -1: CPU tensors stand in (benchmarks)

  // Whether a launch may go here now: the kernel's device is the current one (Triton launches in the
  // current context) and the driver is there.
  bool ready() const {
    if (cu_launch_kernel() == nullptr) return false;
    if (device < 0) return true;
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    static const bool has_handles = [impl] {  // torch answers the raw stream of a c10::Stream
      try {
        impl->getStream(impl->getDevice()).native_handle();
        return true;
      } catch (const std::exception&) {
        return false;
      }
    }();
    return has_handles && impl->getDevice().index() == device;
  }

  void run(std::initializer_list<const at::Tensor*> sources) const {
    const at::Tensor* const* src = sources.begin();
    alignas(16) char buf[kMaxParamBytes];
    void* params[kMaxParams];
    std::memcpy(buf, bytes.data(), bytes.size());
    for (const auto& [param, source] : slots) {
      void* ptr = src[source]->data_ptr();
      std::memcpy(buf + offsets[param], &ptr, sizeof(ptr));
    }
    for (size_t i = 0; i < offsets.size(); ++i) params[i] = buf + offsets[i];
    void* stream = nullptr;
    if (device >= 0) {
      stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
                   ->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)))
                   .native_handle();
    }
    const int err = cu_launch_kernel()(reinterpret_cast<void*>(function), grid[0], grid[1], grid[2], block, 1, 1,
                                       shared, stream, params, nullptr);
    TORCH_CHECK(err == 0, "rmsnorm: cuLaunchKernel failed (CUDA error ", err, ")");
  }
};

TritonLaunch make_triton_launch(uint64_t function, std::array<uint32_t, 3> grid, uint32_t block, uint32_t shared,
                                const py::bytes& bytes, std::vector<uint32_t> offsets, std::vector<uint32_t> sizes,
                                std::vector<std::pair<uint32_t, uint32_t>> slots, int64_t device) {
  TritonLaunch l;
  l.function = function;
  l.grid = grid;
  l.block = block;
  l.shared = shared;
  l.bytes = bytes;
  l.offsets = std::move(offsets);
  l.sizes = std::move(sizes);
  l.slots = std::move(slots);
  l.device = device;
  TORCH_CHECK(l.bytes.size() <= kMaxParamBytes && l.offsets.size() <= kMaxParams, "rmsnorm: too many parameters");
  TORCH_CHECK(l.sizes.size() == l.offsets.size(), "rmsnorm: one size per parameter");
  for (size_t i = 0; i < l.offsets.size(); ++i) {
    TORCH_CHECK(l.offsets[i] + l.sizes[i] <= l.bytes.size(), "rmsnorm: parameter out of range");
  }
  for (const auto& [param, source] : l.slots) {
    TORCH_CHECK(param < l.offsets.size() && l.offsets[param] + sizeof(void*) <= l.bytes.size(),
                "rmsnorm: pointer parameter out of range");
  }
  return l;
}

// A tensor argument by its Python object (None: absent), without pybind's conversions.
const at::Tensor* tensor_arg(py::handle o) {
  return o.ptr() == Py_None ? nullptr : &THPVariable_Unpack(o.ptr());
}

py::object wrap_tensor(at::Tensor t) {
  if (!t.defined()) return py::none();
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}

// The row kernels' forward launch: (y, rstd with ``keep``, else undefined). Sources of the kernel's
// pointers: x, weight (x if absent), bias (x if absent), y, rstd (y if absent).
std::pair<at::Tensor, at::Tensor> forward_launch(const TritonLaunch& l, const at::Tensor& x, const at::Tensor* w,
                                                 const at::Tensor* b, at::ScalarType out_dtype, bool keep) {
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor rstd;
  if (keep) rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  l.run({&x, w ? w : &x, b ? b : &x, &y, keep ? &rstd : &y});
  return {y, rstd};
}

// The same as a call from Python: y, (y, rstd) with ``keep``, or None when the launch cannot go here now.
py::object triton_forward(const TritonLaunch& l, py::handle xo, py::handle wo, py::handle bo,
                          at::ScalarType out_dtype, bool keep) {
  if (!l.ready()) return py::none();
  auto [y, rstd] = forward_launch(l, THPVariable_Unpack(xo.ptr()), tensor_arg(wo), tensor_arg(bo), out_dtype, keep);
  if (!keep) return wrap_tensor(std::move(y));
  return py::make_tuple(wrap_tensor(std::move(y)), wrap_tensor(std::move(rstd)));
}

// The column sums of per-program partials (programs, n) in ``dtype``: a view when there is one program and
// nothing to convert, else the partial-sum kernel (sources: the partials, the output).
at::Tensor sum_partials(const TritonLaunch* l, const at::Tensor& part, at::ScalarType dtype) {
  const int64_t n = part.size(1);
  if (part.size(0) == 1 && dtype == at::kFloat) return part.view({n});
  at::Tensor out = at::empty({n}, part.options().dtype(dtype));
  TORCH_CHECK(l != nullptr, "rmsnorm: no partial-sum launch");
  l->run({&part, &out});
  return out;
}

// The row kernels' backward launches: (dx, dw, db), undefined where not needed. Sources of the backward
// kernel's pointers: dy, x, weight (x if absent), rstd, dx, dW partials (rstd if absent), db partials (rstd if
// absent); then the partial sums (db in fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_launches(
    const TritonLaunch& l, const TritonLaunch* sum_w, const TritonLaunch* sum_b, const at::Tensor& dy,
    const at::Tensor& x, const at::Tensor* w, const at::Tensor& rstd, int64_t programs, bool zero_partials,
    bool need_dx, bool need_dw, bool need_db, at::ScalarType dw_dtype) {
  const int64_t n = x.size(-1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const auto part_options = x.options().dtype(at::kFloat);
  auto partials = [&](bool need) {
    if (!need) return at::Tensor();
    return zero_partials ? at::zeros({programs, n}, part_options) : at::empty({programs, n}, part_options);
  };
  at::Tensor dwp = partials(need_dw), dbp = partials(need_db);
  l.run({&dy, &x, w ? w : &x, &rstd, &dx, need_dw ? &dwp : &rstd, need_db ? &dbp : &rstd});
  at::Tensor dw = need_dw ? sum_partials(sum_w, dwp, dw_dtype) : at::Tensor();
  at::Tensor db = need_db ? sum_partials(sum_b, dbp, at::kFloat) : at::Tensor();
  return {need_dx ? dx : at::Tensor(), dw, db};
}

// The same as a call from Python: (dx, dw, db), None where not needed; None when the launch cannot go here now.
py::object triton_backward(const TritonLaunch& l, const TritonLaunch* sum_w, const TritonLaunch* sum_b,
                           py::handle dyo, py::handle xo, py::handle wo, py::handle rstdo, int64_t programs,
                           bool zero_partials, bool need_dx, bool need_dw, bool need_db, at::ScalarType dw_dtype) {
  if (!l.ready()) return py::none();
  auto [dx, dw, db] = backward_launches(l, sum_w, sum_b, THPVariable_Unpack(dyo.ptr()), THPVariable_Unpack(xo.ptr()),
                                        tensor_arg(wo), THPVariable_Unpack(rstdo.ptr()), programs, zero_partials,
                                        need_dx, need_dw, need_db, dw_dtype);
  return py::make_tuple(wrap_tensor(std::move(dx)), wrap_tensor(std::move(dw)), wrap_tensor(std::move(db)));
}

// The GPU entry's calls that record a backward, with the autograd node in C++ (a Python autograd.Function
// costs more than the whole launch). TritonRows holds one entry key's launches: the forward that stores
// rstd, and each backward launch once the Python side has bound it (by which gradients are needed and dy's
// 16-byte alignment), with the partial sums. The node's backward runs them when dy is as y is and grad mode
// is off; anything else (create_graph, another dtype or layout of dy, a launch not bound yet) calls back
// into Python (set_triton_slow_backward: the entry binds there, or takes the general backward).
struct TritonRows : torch::CustomClassHolder {
  int64_t id = 0;  // the Python side's handle for its Rows (the slow backward looks it up)
  Spec spec;
  at::ScalarType x_dtype = at::kFloat, dw_dtype = at::kFloat;
  int64_t programs = 1;
  bool zero_partials = false;
  std::optional<TritonLaunch> fwd;
  std::unordered_map<int64_t, TritonLaunch> bwd;  // by backward_key
  std::unordered_map<int64_t, TritonLaunch> sums;  // by output dtype

  static int64_t backward_key(bool need_dw, bool need_db, int64_t align) {
    return static_cast<int64_t>(need_dw) | static_cast<int64_t>(need_db) << 1 | align << 2;
  }
  const TritonLaunch* sum(at::ScalarType t) const {
    auto it = sums.find(static_cast<int64_t>(t));
    return it == sums.end() ? nullptr : &it->second;
  }
};

py::object* g_triton_slow_backward = nullptr;

void set_triton_slow_backward(py::object f) {
  if (g_triton_slow_backward == nullptr) g_triton_slow_backward = new py::object();  // outlives Python
  *g_triton_slow_backward = std::move(f);
}

// dy as the kernels read it: a plain, contiguous tensor of y's dtype and shape.
bool plain_like(const at::Tensor& dy, const at::Tensor& x, at::ScalarType dtype) {
  return dy.defined() && plain_any(dy) && dy.scalar_type() == dtype && dy.sizes() == x.sizes() &&
         dy.is_contiguous() && dy.device() == x.device();
}

struct TritonRowsFunction : public torch::autograd::Function<TritonRowsFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const c10::intrusive_ptr<TritonRows>& rows) {
    auto [y, rstd] = forward_launch(*rows->fwd, x, weight ? &*weight : nullptr, bias ? &*bias : nullptr,
                                    rows->spec.out_dtype, /*keep=*/true);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), rstd});
    ctx->saved_data["rows"] = c10::IValue::make_capsule(rows);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& rstd = saved[3];
    auto rows = c10::static_intrusive_pointer_cast<TritonRows>(ctx->saved_data["rows"].toCapsule());
    bool needs[3] = {false, false, false};  // an absent optional has no edge
    for (size_t i = 0, edge = 0; i < 3; ++i) {
      if (i == 0 || saved[i].defined()) needs[i] = ctx->needs_input_grad(edge++);
    }
    const bool need_dw = saved[1].defined() && needs[1], need_db = saved[2].defined() && needs[2];
    torch::autograd::variable_list result(4);
    const at::Tensor& dy = grads[0];
    if (!at::GradMode::is_enabled() && plain_like(dy, x, rows->spec.out_dtype) && rows->fwd->ready()) {
      const int64_t align = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dy.data_ptr()) & 15);
      auto it = rows->bwd.find(TritonRows::backward_key(need_dw, need_db, align));
      const TritonLaunch* sum_w = rows->sum(rows->dw_dtype);
      const TritonLaunch* sum_b = rows->sum(at::kFloat);
      const bool sums_ready = (!need_dw || sum_w || (rows->programs == 1 && rows->dw_dtype == at::kFloat)) &&
                              (!need_db || sum_b || rows->programs == 1);
      if (it != rows->bwd.end() && sums_ready) {
        auto [dx, dw, db] = backward_launches(it->second, sum_w, sum_b, dy, x, saved[1].defined() ? &saved[1] : nullptr,
                                              rstd, rows->programs, rows->zero_partials, needs[0], need_dw, need_db,
                                              rows->dw_dtype);
        result[0] = dx;
        result[1] = dw;
        result[2] = db.defined() && db.scalar_type() != saved[2].scalar_type() ? db.to(saved[2].scalar_type()) : db;
        return result;
      }
    }
    TORCH_CHECK(g_triton_slow_backward != nullptr, "rmsnorm triton: no backward registered");
    py::gil_scoped_acquire gil;
    auto opt = [](const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
    py::tuple out = (*g_triton_slow_backward)(rows->id, rows->spec.fields(), rows->x_dtype, opt(dy), x, opt(saved[1]),
                                              opt(saved[2]), rstd, py::make_tuple(needs[0], needs[1], needs[2]));
    for (size_t i = 0; i < 3; ++i) {
      if (!out[i].is_none()) result[i] = out[i].cast<at::Tensor>();
    }
    return result;
  }
};

PyTypeObject* parameter_type() {
  static PyTypeObject* type = [] {
    py::gil_scoped_acquire gil;
    py::object parameter = py::module_::import("torch.nn").attr("Parameter");
    return reinterpret_cast<PyTypeObject*>(parameter.release().ptr());  // kept for the process
  }();
  return type;
}

void key_tensor(std::string& k, const at::Tensor& t, char kind) {
  const int64_t dim = t.dim();
  k.push_back(kind);
  k.push_back(static_cast<char>(t.scalar_type()));
  k.push_back(static_cast<char>(t.device().type()));
  k.push_back(static_cast<char>(t.device().index()));
  k.push_back(static_cast<char>(reinterpret_cast<uintptr_t>(t.data_ptr()) & 15));
  k.push_back(static_cast<char>(t.requires_grad()));
  k.push_back(static_cast<char>(dim));
  k.append(reinterpret_cast<const char*>(t.sizes().data()), dim * sizeof(int64_t));
  k.append(reinterpret_cast<const char*>(t.strides().data()), dim * sizeof(int64_t));
}

// The GPU entry's key for a call on (x, weight, bias): everything its launch depends on, exactly, as bytes
// (shape, strides, dtype, device, 16-byte alignment, requires_grad and class of each tensor; whether the
// call records a backward, first; and x.is_inference() for such calls), or None for a call the entry does
// not serve (a subclass, a transform, tracing, a dispatch mode, a negative view: the caller's general route).
// Python checks forward-mode AD levels and the residual.
py::object triton_key(py::handle xo, py::handle wo, py::handle bo) {
  if (!THPVariable_CheckExact(xo.ptr())) return py::none();
  const at::Tensor& x = THPVariable_Unpack(xo.ptr());
  if (!plain_any(x) || torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return py::none();
  }
  const at::Tensor* p[2] = {nullptr, nullptr};
  char kinds[2] = {0, 0};
  PyObject* objs[2] = {wo.ptr(), bo.ptr()};
  for (int i = 0; i < 2; ++i) {
    if (objs[i] == Py_None) continue;
    if (!THPVariable_Check(objs[i])) return py::none();
    const bool exact = THPVariable_CheckExact(objs[i]);
    if (!exact && Py_TYPE(objs[i]) != parameter_type()) return py::none();
    p[i] = &THPVariable_Unpack(objs[i]);
    if (!plain_any(*p[i])) return py::none();
    kinds[i] = exact ? 'T' : 'P';
  }
  const bool needs = at::GradMode::is_enabled() &&
                     (x.requires_grad() || (p[0] && p[0]->requires_grad()) || (p[1] && p[1]->requires_grad()));
  std::string k;
  k.reserve(128);
  k.push_back(static_cast<char>(needs));
  k.push_back(static_cast<char>(needs && x.is_inference()));
  key_tensor(k, x, 'x');
  for (int i = 0; i < 2; ++i) {
    if (p[i]) key_tensor(k, *p[i], kinds[i]);
    else k.push_back('-');
  }
  return py::bytes(k);
}

// The GPU entry's grad-mode call: y recorded for autograd, or None when the launch cannot go here now.
py::object triton_apply(const c10::intrusive_ptr<TritonRows>& rows, py::handle xo, py::handle wo, py::handle bo) {
  if (!rows->fwd || !rows->fwd->ready()) return py::none();
  std::optional<at::Tensor> w, b;
  if (wo.ptr() != Py_None) w = THPVariable_Unpack(wo.ptr());
  if (bo.ptr() != Py_None) b = THPVariable_Unpack(bo.ptr());
  return wrap_tensor(TritonRowsFunction::apply(THPVariable_Unpack(xo.ptr()), w, b, rows));
}

}  // namespace

// rmsnorm.spec.Spec (a NamedTuple) -> Spec, read with the C API (this runs on every call).
namespace pybind11::detail {
template <>
struct type_caster<Spec> {
  PYBIND11_TYPE_CASTER(Spec, _("rmsnorm.spec.Spec"));
  static bool dtype(PyObject* o, at::ScalarType& out) {
    if (!THPDtype_Check(o)) return false;
    out = reinterpret_cast<THPDtype*>(o)->scalar_type;
    return true;
  }
  bool load(handle src, bool) {
    PyObject* t = src.ptr();
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 8) return false;
    auto item = [t](Py_ssize_t i) { return PyTuple_GET_ITEM(t, i); };
    // the gate fields (gate, gate_act, group, gate_round), when the tuple has them
    if (PyTuple_GET_SIZE(t) >= 12) {
      PyObject* gate = item(8);
      if (gate == Py_None) value.gate = 0;
      else if (PyUnicode_CompareWithASCIIString(gate, "before") == 0) value.gate = 1;
      else if (PyUnicode_CompareWithASCIIString(gate, "after") == 0) value.gate = 2;
      else return false;
      value.act = PyUnicode_CompareWithASCIIString(item(9), "sigmoid") == 0 ? 1 : 0;
      value.group = PyLong_AsLongLong(item(10));
      if (item(11) == Py_None) value.gate_round = at::ScalarType::Undefined;
      else if (!dtype(item(11), value.gate_round)) return false;
    }
    if (PyTuple_GET_SIZE(t) >= 13) {
      if (item(12) == Py_None) value.rstd_round = at::ScalarType::Undefined;
      else if (!dtype(item(12), value.rstd_round)) return false;
    }
    value.nd = PyLong_AsLongLong(item(0));
    value.k = PyLong_AsLongLong(item(1));
    value.eps = PyFloat_AsDouble(item(2));
    value.eps_outside = PyObject_IsTrue(item(3)) == 1;
    value.offset = PyFloat_AsDouble(item(4));
    value.residual = PyObject_IsTrue(item(7)) == 1;
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (item(5) == Py_None) value.round_to = at::ScalarType::Undefined;
    else if (!dtype(item(5), value.round_to)) return false;
    return dtype(item(6), value.out_dtype);
  }
};
}  // namespace pybind11::detail

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("vector_width") = py::int_(kF);
  m.def("forward",
        [](const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& residual, const Spec& spec, int64_t blocks, bool stream) {
          return forward(x, weight, bias, residual, spec, blocks, stream);
        },
        "RMSNorm forward -> (y, h, rstd)");
  m.def("backward", &backward, "RMSNorm backward -> (dh, dw, db)");
  m.def("forward_autograd", &forward_autograd, "RMSNorm forward recorded for autograd -> [y] or [y, h]");
  m.def("set_graph_backward", &set_graph_backward, "the differentiable backward used with create_graph=True");
  m.def("forward_gated", &forward_gated, "gated / grouped RMSNorm forward -> (y, rstd of the group rows)");
  m.def("backward_gated", &backward_gated, "gated / grouped RMSNorm backward -> (dx, dz, dw, db)");
  py::class_<Config>(m, "Config")
      .def(py::init([](std::vector<int64_t> shape, double p, bool floor, std::optional<double> eps,
                       bool eps_outside, double offset, int64_t cast, std::optional<at::ScalarType> out_dtype,
                       bool named, int64_t parallel_min_elements, int64_t stream_min_bytes) {
             Config c;
             c.shape = std::move(shape);
             c.p = p;
             c.floor = floor;
             c.has_eps = eps.has_value();
             c.eps = eps.value_or(0.0);
             c.eps_outside = eps_outside;
             c.offset = offset;
             c.cast = static_cast<CastMode>(cast);
             c.out_dtype = out_dtype.value_or(at::ScalarType::Undefined);
             c.named = named;
             c.parallel_min_elements = parallel_min_elements;
             c.stream_min_bytes = stream_min_bytes;
             if (!c.shape.empty()) {
               int64_t n = 1;
               for (int64_t s : c.shape) n *= s;
               c.k_fixed = partial_size(n, p, floor);
             }
             return c;
           }));
  m.def("call", &call, "the eager entry: y (or (y, h) with a residual), or None for the Python path",
        py::arg("config"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual") = py::none());
  py::class_<TritonLaunch>(m, "TritonLaunch")
      .def(py::init(&make_triton_launch), py::arg("function"), py::arg("grid"), py::arg("block"), py::arg("shared"),
           py::arg("bytes"), py::arg("offsets"), py::arg("sizes"), py::arg("slots"), py::arg("device"))
      .def("launch", [](const TritonLaunch& l, const std::vector<at::Tensor>& sources) {
             TORCH_CHECK(sources.size() >= 7, "rmsnorm: launch takes 7 source tensors");
             const at::Tensor* s = sources.data();
             l.run({s, s + 1, s + 2, s + 3, s + 4, s + 5, s + 6});
           }, "launch with these source tensors (tests)")
      .def_readonly("offsets", &TritonLaunch::offsets)
      .def_readonly("sizes", &TritonLaunch::sizes)
      .def_property_readonly("bytes", [](const TritonLaunch& l) { return py::bytes(l.bytes); });
  py::class_<TritonRows, c10::intrusive_ptr<TritonRows>>(m, "TritonRows")
      .def(py::init([](int64_t id, const Spec& spec, at::ScalarType x_dtype, at::ScalarType dw_dtype,
                       int64_t programs, bool zero_partials) {
             auto r = c10::make_intrusive<TritonRows>();
             r->id = id;
             r->spec = spec;
             r->x_dtype = x_dtype;
             r->dw_dtype = dw_dtype;
             r->programs = programs;
             r->zero_partials = zero_partials;
             return r;
           }))
      .def("set_forward", [](TritonRows& r, const TritonLaunch& l) { r.fwd = l; })
      .def("set_backward", [](TritonRows& r, bool need_dw, bool need_db, int64_t align, const TritonLaunch& l) {
             r.bwd[TritonRows::backward_key(need_dw, need_db, align)] = l;
           })
      .def("set_sum", [](TritonRows& r, at::ScalarType dtype, const TritonLaunch& l) {
             r.sums[static_cast<int64_t>(dtype)] = l;
           });
  m.def("triton_key", &triton_key, "the GPU entry's key of a call (bytes; the first: whether it records a backward), "
        "or None");
  m.def("triton_apply", &triton_apply, "the GPU entry's grad-mode call with its C++ autograd node: y, or None");
  m.def("set_triton_slow_backward", &set_triton_slow_backward, "the Python backward for what the node does not serve");
  m.def("triton_forward", &triton_forward, "the GPU entry's forward: y, (y, rstd) with keep, or None");
  m.def("triton_backward", &triton_backward, "the GPU entry's backward: (dx, dw, db), or None");
  m.def("set_auto_is_cpu", &set_auto_is_cpu, "whether the automatic backend choice on CPU is this backend");
}
