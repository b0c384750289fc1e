// Mixed-adapter LoRA: every row of a batch adds its own adapter's s·(x·A)·B to the base output,
// reading that adapter's A and B straight from the layer's stack, in one call per layer.
//
//   out[n, t] += (x[n, t] · A[slot[n]]) · B[slot[n]]      slot 0: the base model (no LoRA: skipped)
//
//   x (N, in) or (N, T, in) fp32   A (S+1, in, r) fp32|bf16   B (S+1, r, out) fp32|bf16 (the scale folded in)
//   slot (N,) int64  out (N, out) or (N, T, out) fp32, added to in place
//
// Why a kernel: at decode each row is one token, so the LoRA term is two GEMVs per row. As torch
// ops it is two bmm per layer (210 layers for SmolLM2-135M x 7 linears), and those small GEMMs
// cost about as much again as the bytes they read. Here the weights stream once through FMA loops,
// bf16 stacks are widened to fp32 in registers (half the bytes, fp32 arithmetic: no native bf16
// unit needed), and torch's own thread pool splits the rows. A prefill (T > 1: a row's prompt) runs
// the same term in blocks of tokens, in AVX-512 builds (see "prefill" below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int64_t kLine = 64;  // cache line bytes

// Asks for the weights the next row will read while this row computes, spread over this row's
// loop (a few lines per iteration), so the memory fetch overlaps the FMAs instead of following them.
// Into L2 (locality 2, prefetcht1): into L1 it evicted the current row's weights and ran slower.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += kLine) __builtin_prefetch(c + off, 0, 2);
}

// out[p:o] += xa · B[:, p:o] one output at a time: the columns past the last whole block of 64
template <int R, typename W>
inline void xa_times_b_tail(const float* __restrict xa, const W* __restrict b, float* __restrict out, int64_t o,
                            int64_t p) {
  for (; p < o; ++p) {
    float v = out[p];
    for (int j = 0; j < R; ++j) v += xa[j] * widen(b[j * o + p]);
    out[p] = v;
  }
}

#if defined(__AVX512F__)
// AVX-512 forms of the two loops below, for ranks that are multiples of 16 (one register of fp32 per
// 16 ranks); compiled where the build's -march has AVX-512, the portable loops elsewhere (and for
// rank 8). A bf16 load widens 16 values with one zero-extend and one shift: GCC's own vectorization
// of `widen` split each row into two 256-bit halves with extracts, about twice the instructions.
// Measured (benchmarks/lora_rows_kernel.py's shapes): bf16 stacks 7.2 ms a pass against 8.4-9.3,
// fp32 12.8 against 13.4-14.0; the arithmetic alone (one adapter for every row) 2.3 against 2.9.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int R, typename W>
inline void x_times_a_512(const float* __restrict x, const W* __restrict a, float* __restrict xa, int64_t in,
                          const W* next) {
  constexpr int V = R / 16;
  __m512 s0[V], s1[V], s2[V], s3[V];
  for (int v = 0; v < V; ++v) s0[v] = s1[v] = s2[v] = s3[v] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= in; k += 4) {
    const W* a0 = a + k * R;
    if (next) prefetch_span(next + k * R, 4 * R * sizeof(W));
    const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
    const __m512 x2 = _mm512_set1_ps(x[k + 2]), x3 = _mm512_set1_ps(x[k + 3]);
    for (int v = 0; v < V; ++v) {
      s0[v] = _mm512_fmadd_ps(x0, load16(a0 + v * 16), s0[v]);
      s1[v] = _mm512_fmadd_ps(x1, load16(a0 + R + v * 16), s1[v]);
      s2[v] = _mm512_fmadd_ps(x2, load16(a0 + 2 * R + v * 16), s2[v]);
      s3[v] = _mm512_fmadd_ps(x3, load16(a0 + 3 * R + v * 16), s3[v]);
    }
  }
  for (; k < in; ++k) {
    const __m512 xk = _mm512_set1_ps(x[k]);
    for (int v = 0; v < V; ++v) s0[v] = _mm512_fmadd_ps(xk, load16(a + k * R + v * 16), s0[v]);
  }
  for (int v = 0; v < V; ++v)
    _mm512_storeu_ps(xa + v * 16, _mm512_add_ps(_mm512_add_ps(s0[v], s1[v]), _mm512_add_ps(s2[v], s3[v])));
}

template <int R, typename W>
inline void xa_times_b_512(const float* __restrict xa, const W* __restrict b, float* __restrict out, int64_t o,
                           const W* next) {
  int64_t p = 0;
  for (; p + 64 <= o; p += 64) {
    __m512 v0 = _mm512_loadu_ps(out + p), v1 = _mm512_loadu_ps(out + p + 16);
    __m512 v2 = _mm512_loadu_ps(out + p + 32), v3 = _mm512_loadu_ps(out + p + 48);
    for (int j = 0; j < R; ++j) {
      const __m512 c = _mm512_set1_ps(xa[j]);
      const W* bj = b + j * o + p;
      if (next) prefetch_span(next + j * o + p, 64 * sizeof(W));
      v0 = _mm512_fmadd_ps(c, load16(bj), v0);
      v1 = _mm512_fmadd_ps(c, load16(bj + 16), v1);
      v2 = _mm512_fmadd_ps(c, load16(bj + 32), v2);
      v3 = _mm512_fmadd_ps(c, load16(bj + 48), v3);
    }
    _mm512_storeu_ps(out + p, v0);
    _mm512_storeu_ps(out + p + 16, v1);
    _mm512_storeu_ps(out + p + 32, v2);
    _mm512_storeu_ps(out + p + 48, v3);
  }
  xa_times_b_tail<R>(xa, b, out, o, p);
}
#endif

// xa = x · A for one row, A (in, R) row-major. Four input features per iteration into four
// independent accumulators, so the FMAs do not wait on each other (one chain would be
// latency-bound at r = 16: one 16-wide FMA every 4 cycles).
template <int R, typename W>
inline void x_times_a(const float* __restrict x, const W* __restrict a, float* __restrict xa, int64_t in,
                      const W* next) {
  float s0[R] = {}, s1[R] = {}, s2[R] = {}, s3[R] = {};
  int64_t k = 0;
  for (; k + 4 <= in; k += 4) {
    const W* a0 = a + k * R;
    if (next) prefetch_span(next + k * R, 4 * R * sizeof(W));
    for (int j = 0; j < R; ++j) {
      s0[j] += x[k] * widen(a0[j]);
      s1[j] += x[k + 1] * widen(a0[R + j]);
      s2[j] += x[k + 2] * widen(a0[2 * R + j]);
      s3[j] += x[k + 3] * widen(a0[3 * R + j]);
    }
  }
  for (; k < in; ++k)
    for (int j = 0; j < R; ++j) s0[j] += x[k] * widen(a[k * R + j]);
  for (int j = 0; j < R; ++j) xa[j] = (s0[j] + s1[j]) + (s2[j] + s3[j]);
}

// out += xa · B for one row, B (R, o) row-major: each block of 64 outputs stays in registers (four
// AVX-512 accumulators: independent FMA chains) while the R rows of B stream past it, one load and
// one store of out per block, not R. 64 measured faster than 16 (one register: every FMA waited on
// the last) and than 32 or 128 outputs: ~0.4 ms of a decode step's 7.7 bf16, ~0.9 of 13.5 fp32.
template <int R, typename W>
inline void xa_times_b(const float* __restrict xa, const W* __restrict b, float* __restrict out, int64_t o,
                       const W* next) {
  constexpr int64_t kBlock = 64;
  int64_t p = 0;
  for (; p + kBlock <= o; p += kBlock) {
    float v[kBlock];
    for (int l = 0; l < kBlock; ++l) v[l] = out[p + l];
    for (int j = 0; j < R; ++j) {
      const float c = xa[j];
      const W* bj = b + j * o + p;
      if (next) prefetch_span(next + j * o + p, kBlock * sizeof(W));  // the next row's lines of this block
      for (int l = 0; l < kBlock; ++l) v[l] += c * widen(bj[l]);
    }
    for (int l = 0; l < kBlock; ++l) out[p + l] = v[l];
  }
  xa_times_b_tail<R>(xa, b, out, o, p);
}

// ---- prefill: T tokens a row (a row's prompt), the same per-row adapters ----------------------------
// Each row's T tokens share its adapter, so the LoRA term is two small GEMMs a row: (T, in)·A and
// (T, r)·B. Tokens are taken in blocks whose sums stay in registers: each widened A row or B block
// is loaded once per block of tokens, not once per token (a token at a time ran at the decode
// loops' arithmetic rate, ~4x slower than torch's batched GEMMs here). Tokens left after the last
// whole block go through the one-token loops above.
//
// AVX-512 builds and ranks that are multiples of 16 only (`prefill_ranks`): there it beats torch's
// path (bf16 stacks: no widened copy of the stack per prefill; benchmarks/lora_rows_kernel.py
// --tokens 40: 40 against 52 ms a pass, fp32 44 against 49). Portable loops of the same blocking ran
// slower than torch's bmm (GCC kept the sums in memory: 64 against 40 ms at rank 8, far worse for
// fp32 AVX2 builds), so elsewhere the caller keeps torch's bmm for prefills.
#if defined(__AVX512F__)
// x·A: TB tokens x R/16 registers of sums (two sets: even and odd k), each A row loaded and
// widened once for the TB tokens' broadcasts.
template <int R, int TB, typename W>
inline void x_times_a_block_512(const float* __restrict x, const W* __restrict a, float* __restrict xa, int64_t in) {
  constexpr int V = R / 16;
  __m512 s[TB][V], u[TB][V];  // two sums a (token, register): even and odd k, twice the independent FMA chains
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) s[t][v] = u[t][v] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= in; k += 2) {
    __m512 a0[V], a1[V];
    for (int v = 0; v < V; ++v) a0[v] = load16(a + k * R + v * 16), a1[v] = load16(a + (k + 1) * R + v * 16);
    for (int t = 0; t < TB; ++t) {
      const __m512 x0 = _mm512_set1_ps(x[t * in + k]), x1 = _mm512_set1_ps(x[t * in + k + 1]);
      for (int v = 0; v < V; ++v) {
        s[t][v] = _mm512_fmadd_ps(x0, a0[v], s[t][v]);
        u[t][v] = _mm512_fmadd_ps(x1, a1[v], u[t][v]);
      }
    }
  }
  for (; k < in; ++k) {
    __m512 ak[V];
    for (int v = 0; v < V; ++v) ak[v] = load16(a + k * R + v * 16);
    for (int t = 0; t < TB; ++t) {
      const __m512 xt = _mm512_set1_ps(x[t * in + k]);
      for (int v = 0; v < V; ++v) s[t][v] = _mm512_fmadd_ps(xt, ak[v], s[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(xa + t * R + v * 16, _mm512_add_ps(s[t][v], u[t][v]));
}

// xa·B: TB tokens x 64 outputs (four registers a token) held while the R rows of the B block pass
template <int R, int TB, typename W>
inline void xa_times_b_block_512(const float* __restrict xa, const W* __restrict b, float* __restrict out, int64_t o) {
  int64_t p = 0;
  for (; p + 64 <= o; p += 64) {
    __m512 v[TB][4];
    for (int t = 0; t < TB; ++t)
      for (int q = 0; q < 4; ++q) v[t][q] = _mm512_loadu_ps(out + t * o + p + q * 16);
    for (int j = 0; j < R; ++j) {
      const W* bj = b + j * o + p;
      const __m512 b0 = load16(bj), b1 = load16(bj + 16), b2 = load16(bj + 32), b3 = load16(bj + 48);
      for (int t = 0; t < TB; ++t) {
        const __m512 c = _mm512_set1_ps(xa[t * R + j]);
        v[t][0] = _mm512_fmadd_ps(c, b0, v[t][0]);
        v[t][1] = _mm512_fmadd_ps(c, b1, v[t][1]);
        v[t][2] = _mm512_fmadd_ps(c, b2, v[t][2]);
        v[t][3] = _mm512_fmadd_ps(c, b3, v[t][3]);
      }
    }
    for (int t = 0; t < TB; ++t)
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + t * o + p + q * 16, v[t][q]);
  }
  for (int t = 0; t < TB; ++t) xa_times_b_tail<R>(xa + t * R, b, out + t * o, o, p);
}

constexpr int64_t kChunk = 16;  // tokens of one row per work item: a 40-token prompt of 16 rows is 48 items

// One row's tokens [0, nt) (nt <= kChunk): out (nt, o) += (x (nt, in) · A) · B
template <int R, typename W>
inline void tokens_chunk(const float* x, const W* a, const W* b, float* out, int64_t nt, int64_t in, int64_t o) {
  constexpr int TA = R == 16 ? 8 : R == 32 ? 4 : 2;  // 2·TA·R/16 = 16 sums in registers
  constexpr int TB = 4;                               // 4·4 = 16 sums, plus the B block's 4 registers
  float xa[kChunk * R];
  int64_t t = 0;
  for (; t + TA <= nt; t += TA) x_times_a_block_512<R, TA>(x + t * in, a, xa + t * R, in);
  // the tokens left (a short prompt suffix after a prefix-cache hit is often all of them): halved blocks
  if constexpr (TA > 4) for (; t + 4 <= nt; t += 4) x_times_a_block_512<R, 4>(x + t * in, a, xa + t * R, in);
  if constexpr (TA > 2) for (; t + 2 <= nt; t += 2) x_times_a_block_512<R, 2>(x + t * in, a, xa + t * R, in);
  for (; t < nt; ++t) x_times_a_512<R>(x + t * in, a, xa + t * R, in, static_cast<const W*>(nullptr));
  for (t = 0; t + TB <= nt; t += TB) xa_times_b_block_512<R, TB>(xa + t * R, b, out + t * o, o);
  for (; t + 2 <= nt; t += 2) xa_times_b_block_512<R, 2>(xa + t * R, b, out + t * o, o);
  for (; t < nt; ++t) xa_times_b_512<R>(xa + t * R, b, out + t * o, o, static_cast<const W*>(nullptr));
}

// Prefill: x (N, T, in), out (N, T, out); the rows' tokens split into chunks of kChunk over the threads.
// Only the rows with an adapter make work items: the server keeps base rows together (after the
// adapters' rows), and contiguous ranges of all rows would give one thread most of the LoRA work.
template <int R, typename W>
void tokens_kernel(const float* x, const W* a, const W* b, const int64_t* slot, float* out,
                   int64_t n, int64_t T, int64_t in, int64_t o) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  std::vector<int64_t> rows;  // the rows with an adapter
  rows.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] != 0) rows.push_back(i);
  const int64_t m = static_cast<int64_t>(rows.size());
  at::parallel_for(0, m * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t i = rows[item / chunks], t0 = (item % chunks) * kChunk, s = slot[i];
      const int64_t nt = T - t0 < kChunk ? T - t0 : kChunk;
      tokens_chunk<R>(x + (i * T + t0) * in, a + s * in * R, b + s * R * o, out + (i * T + t0) * o, nt, in, o);
    }
  });
}
#endif  // __AVX512F__

// Ranks with a prefill path in this build (empty: the caller keeps torch's bmm for prefills)
std::vector<int64_t> prefill_ranks() {
#if defined(__AVX512F__)
  return {16, 32, 64};
#else
  return {};
#endif
}

template <int R, typename W>
void rows_kernel(const float* x, const W* a, const W* b, const int64_t* slot, float* out,
                 int64_t n, int64_t in, int64_t o) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    float xa[R];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = slot[i];
      if (s == 0) continue;  // a base-model row
      int64_t nx = i + 1;  // the next row with an adapter, on another one: its weights are prefetched
      while (nx < hi && (slot[nx] == 0 || slot[nx] == s)) ++nx;
      const int64_t sn = nx < hi ? slot[nx] : 0;
#if defined(__AVX512F__)
      if constexpr (R % 16 == 0) {
        x_times_a_512<R>(x + i * in, a + s * in * R, xa, in, sn ? a + sn * in * R : nullptr);
        xa_times_b_512<R>(xa, b + s * R * o, out + i * o, o, sn ? b + sn * R * o : nullptr);
        continue;
      }
#endif
      x_times_a<R>(x + i * in, a + s * in * R, xa, in, sn ? a + sn * in * R : nullptr);
      xa_times_b<R>(xa, b + s * R * o, out + i * o, o, sn ? b + sn * R * o : nullptr);
    }
  });
}

// The rank is a template argument so the accumulators live in registers; stacks of other ranks are
// zero-padded up to the next of these by the caller (lora_rows.padded_rank). T == 1: a decode step.
template <int R, typename W>
void run(const float* x, const W* a, const W* b, const int64_t* slot, float* out, int64_t n, int64_t T,
         int64_t in, int64_t o) {
  if (T == 1) return rows_kernel<R>(x, a, b, slot, out, n, in, o);
#if defined(__AVX512F__)
  if constexpr (R % 16 == 0) return tokens_kernel<R>(x, a, b, slot, out, n, T, in, o);
#endif
  TORCH_CHECK(false, "lora_rows: no prefill path (T > 1) for rank ", R, " in this build: see prefill_ranks()");
}

template <typename W>
void dispatch(const float* x, const W* a, const W* b, const int64_t* slot, float* out,
              int64_t n, int64_t T, int64_t in, int64_t r, int64_t o) {
  switch (r) {
    case 8: return run<8>(x, a, b, slot, out, n, T, in, o);
    case 16: return run<16>(x, a, b, slot, out, n, T, in, o);
    case 32: return run<32>(x, a, b, slot, out, n, T, in, o);
    case 64: return run<64>(x, a, b, slot, out, n, T, in, o);
    default: TORCH_CHECK(false, "lora_rows: rank ", r, " is not 8, 16, 32 or 64 (pad the stack: lora_rows.padded_rank)");
  }
}

void add_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
              const torch::Tensor& slot, torch::Tensor& out) {
  // x and out: (N, in) / (N, out), or the model's own (N, T, in) / (N, T, out) (T = 1: a decode
  // step, passed as it is, with no reshape ops on the host's hot path; T > 1: a prefill)
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && slot.dim() == 1,
              "lora_rows: x (N, [T,] in), A (S, in, r), B (S, r, out), slot (N,), out (N, [T,] out)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "lora_rows: x and out must be fp32");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lora_rows: A and B must share a dtype");
  TORCH_CHECK(slot.scalar_type() == at::kLong, "lora_rows: slot must be int64");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && a.is_contiguous() && b.is_contiguous() && slot.is_contiguous(),
              "lora_rows: contiguous tensors only");
  const int64_t n = slot.size(0), in = a.size(1), r = a.size(2), o = b.size(2);
  const int64_t T = x.dim() == 3 ? x.size(1) : 1;
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.dim() == out.dim() && x.size(0) == n && x.size(-1) == in &&
              out.size(0) == n && out.size(-1) == o && (x.dim() == 2 || out.size(1) == T) && b.size(1) == r &&
              b.size(0) == a.size(0),
              "lora_rows: shapes do not match");
  const int64_t* sl = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < a.size(0), "lora_rows: slot ", sl[i], " outside the stack of ", a.size(0));
  if (a.scalar_type() == at::kFloat) {
    dispatch(x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), sl, out.data_ptr<float>(), n, T, in, r, o);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16, "lora_rows: A and B must be fp32 or bf16");
    dispatch(x.data_ptr<float>(), a.data_ptr<at::BFloat16>(), b.data_ptr<at::BFloat16>(), sl,
             out.data_ptr<float>(), n, T, in, r, o);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while it runs, as torch's own ops do: the server's HTTP threads go on meanwhile
  m.def("add_rows", &add_rows, "out[n, t] += (x[n, t] . A[slot[n]]) . B[slot[n]], slot 0 skipped",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_ranks", &prefill_ranks, "ranks whose T > 1 calls (prefills) this build runs");
}
