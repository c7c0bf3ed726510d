// kg_common.cuh -- what every fused update-block kernel of kappa_gpu shares.
//
// One generic elementwise kernel, `kg_block<Op, T, C, FLAT>`, reads the vector operands of one
// block operation once, applies `Op::apply` per entry in float32 (float64 for double storage)
// and writes the outputs once. The arithmetic of each block operation lives in an `Op` struct
// (update_blocks.cu); its plain-torch twin is kappa_gpu/_cuda/_reference.py.
//
// Operands (all of one launch):
//   in0..in3   up to 4 state-like inputs of shape (n, s): element (i, j) at p[i*rs + j*cs]
//              (any non-negative strides: (n, s) row-major, (s, n) transposed, column slices)
//   out0..out2 up to 3 outputs, same convention; must not overlap the inputs
//   cf0..cf2   up to 3 per-entry coefficient vectors of length n, contiguous, storage C;
//              a null pointer means "absent": Op::coef_default(c) is used instead
//   goff, ng   segment offsets (ng + 1 int64, goff[0] = 0, goff[ng] = n, non-decreasing)
//   gtab       per-segment coefficients, ng rows of Op::NG doubles (row-major)
// Storage T, C: float, double, or kg::bf16 (bfloat16 bits). Arithmetic: float, or double
// when T is double.
//
// Thread mapping: flat index k in [0, n*s). order 0 ("rows"): i = k / s, j = k % s, which
// coalesces (n, s) row-major operands; order 1 ("cols"): j = k / n, i = k % n, for (s, n)
// layouts. Each thread handles KG_ILP entries KG_BLOCK apart per trip of a grid-stride loop,
// loading all of them before computing any (independent loads in flight = memory-level
// parallelism, which is what a bandwidth-bound kernel needs).
//
// The same source compiles as plain C++ (no __CUDACC__): every (block, thread) of a launch is
// then run serially by kg::host_launch. The CPU tests use that to check the exact arithmetic,
// indexing and argument marshalling of these kernels against the torch reference without a GPU.

#ifndef KG_COMMON_CUH
#define KG_COMMON_CUH

#if !defined(__CUDACC__)
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#endif

#define KG_HD __host__ __device__ __forceinline__

#ifndef KG_BLOCK
#define KG_BLOCK 256
#endif
#ifndef KG_ILP
#define KG_ILP 4
#endif

namespace kg {

typedef long long i64;

// bfloat16 storage: the upper 16 bits of a float32.
struct bf16 {
  unsigned short bits;
};

template <class T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

KG_HD float bits_to_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

KG_HD unsigned int float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned int u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Loads go through the read-only data cache (__ldg): the inputs are never written by the launch.
KG_HD float ld(const float* p, i64 k) {
#ifdef __CUDA_ARCH__
  return __ldg(p + k);
#else
  return p[k];
#endif
}

KG_HD double ld(const double* p, i64 k) {
#ifdef __CUDA_ARCH__
  return __ldg(p + k);
#else
  return p[k];
#endif
}

KG_HD float ld(const bf16* p, i64 k) {
#ifdef __CUDA_ARCH__
  const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p) + k);
#else
  const unsigned short b = p[k].bits;
#endif
  return bits_to_float(static_cast<unsigned int>(b) << 16);
}

KG_HD void st(float* p, i64 k, float v) { p[k] = v; }
KG_HD void st(double* p, i64 k, double v) { p[k] = v; }

// float -> bfloat16 rounded to nearest even, NaN -> 0x7FC0: bit for bit what torch's
// Tensor.to(torch.bfloat16) does, so that the kernels and the reference round alike.
KG_HD void st(bf16* p, i64 k, float v) {
  const unsigned int u = float_to_bits(v);
  unsigned short b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b = 0x7fc0u;
  } else {
    b = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  p[k].bits = b;
}

// The segment g with goff[g] <= i < goff[g + 1], searched in [lo, ng - 1] (the caller knows
// the answer is not below lo). Empty segments are skipped: the largest such g is returned.
KG_HD int find_segment(const i64* goff, int lo, int ng, i64 i) {
  int hi = ng - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (goff[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The body of kg_block<Op, T, C, FLAT>, run by thread `thread` of block `block` of `nblocks`.
//
// FLAT: every vector operand is dense in the flat index (s == 1 with unit stride, or (n, s)
// row-major contiguous): element k is p[k] and the strides are not read, so the KG_ILP
// addresses of a trip are one register plus immediate offsets. The general path needs a
// 64-bit address per operand and entry (more registers, lower occupancy).
//
// Segments: a thread caches the segment [glo, ghi) of the entries it handles and its
// coefficients gp. A trip whose KG_ILP entries all lie in the cached segment (the common case:
// segments are long, adjacent equal ones are merged by the host) loads all of its operands
// before computing any. A trip that straddles a segment boundary runs entry by entry.
template <class Op, class T, class C, bool FLAT>
KG_HD void block_body(i64 block, i64 nblocks, int thread, i64 n, i64 s, int order,
                      const T* in0, i64 in0r, i64 in0c, const T* in1, i64 in1r, i64 in1c,
                      const T* in2, i64 in2r, i64 in2c, const T* in3, i64 in3r, i64 in3c,
                      T* out0, i64 out0r, i64 out0c, T* out1, i64 out1r, i64 out1c,
                      T* out2, i64 out2r, i64 out2c, const C* cf0, const C* cf1,
                      const C* cf2, const i64* goff, int ng, const double* gtab) {
  typedef typename Acc<T>::type A;
  const T* const in[4] = {in0, in1, in2, in3};
  const i64 inr[4] = {in0r, in1r, in2r, in3r};
  const i64 inc[4] = {in0c, in1c, in2c, in3c};
  T* const out[3] = {out0, out1, out2};
  const i64 outr[3] = {out0r, out1r, out2r};
  const i64 outc[3] = {out0c, out1c, out2c};
  const C* const cf[3] = {cf0, cf1, cf2};
  const int NC = Op::NC > 0 ? Op::NC : 1;

  const i64 total = n * s;
  const i64 tile = static_cast<i64>(KG_BLOCK) * KG_ILP;
  int g = 0;
  i64 glo = 0, ghi = -1;
  A gp[Op::NG];
  for (int q = 0; q < Op::NG; ++q) gp[q] = A(0);

  for (i64 base = block * tile + thread; base < total; base += nblocks * tile) {
    i64 ii[KG_ILP], jj[KG_ILP];
#pragma unroll
    for (int r = 0; r < KG_ILP; ++r) {
      const i64 k = base + static_cast<i64>(r) * KG_BLOCK;
      if (s == 1) {
        ii[r] = k;
        jj[r] = 0;
      } else if (FLAT || order == 0) {
        ii[r] = k / s;
        jj[r] = k - ii[r] * s;
      } else {
        jj[r] = k / n;
        ii[r] = k - jj[r] * n;
      }
    }
    if (ii[0] < glo || ii[0] >= ghi) {
      g = find_segment(goff, (ghi >= 0 && ii[0] >= ghi) ? g : 0, ng, ii[0]);
      glo = goff[g];
      ghi = goff[g + 1];
      for (int q = 0; q < Op::NG; ++q) gp[q] = static_cast<A>(gtab[g * Op::NG + q]);
    }
    bool uniform = true;
#pragma unroll
    for (int r = 1; r < KG_ILP; ++r) {
      const i64 k = base + static_cast<i64>(r) * KG_BLOCK;
      uniform = uniform && (k >= total || (ii[r] >= glo && ii[r] < ghi));
    }

    if (uniform) {
      A v[KG_ILP][Op::NIN];
      A c[KG_ILP][NC];
#pragma unroll
      for (int r = 0; r < KG_ILP; ++r) {
        const i64 k = base + static_cast<i64>(r) * KG_BLOCK;
        if (k < total) {
#pragma unroll
          for (int a = 0; a < Op::NIN; ++a)
            v[r][a] = static_cast<A>(ld(in[a], FLAT ? k : ii[r] * inr[a] + jj[r] * inc[a]));
#pragma unroll
          for (int b = 0; b < Op::NC; ++b)
            c[r][b] = cf[b] ? static_cast<A>(ld(cf[b], ii[r])) : Op::template coef_default<A>(b);
        }
      }
#pragma unroll
      for (int r = 0; r < KG_ILP; ++r) {
        const i64 k = base + static_cast<i64>(r) * KG_BLOCK;
        if (k < total) {
          A o[Op::NOUT];
          Op::template apply<A>(v[r], c[r], gp, o);
#pragma unroll
          for (int b = 0; b < Op::NOUT; ++b)
            st(out[b], FLAT ? k : ii[r] * outr[b] + jj[r] * outc[b], o[b]);
        }
      }
    } else {
      for (int r = 0; r < KG_ILP; ++r) {
        const i64 k = base + static_cast<i64>(r) * KG_BLOCK;
        if (k >= total) break;
        const i64 i = ii[r], j = jj[r];
        if (i < glo || i >= ghi) {
          g = find_segment(goff, (ghi >= 0 && i >= ghi) ? g : 0, ng, i);
          glo = goff[g];
          ghi = goff[g + 1];
          for (int q = 0; q < Op::NG; ++q) gp[q] = static_cast<A>(gtab[g * Op::NG + q]);
        }
        A v[Op::NIN], c[NC], o[Op::NOUT];
        for (int a = 0; a < Op::NIN; ++a)
          v[a] = static_cast<A>(ld(in[a], FLAT ? k : i * inr[a] + j * inc[a]));
        for (int b = 0; b < Op::NC; ++b)
          c[b] = cf[b] ? static_cast<A>(ld(cf[b], i)) : Op::template coef_default<A>(b);
        Op::template apply<A>(v, c, gp, o);
        for (int b = 0; b < Op::NOUT; ++b)
          st(out[b], FLAT ? k : i * outr[b] + j * outc[b], o[b]);
      }
    }
  }
}

#if !defined(__CUDACC__)
// Host emulation of one launch of kg_block<Op, T, C, FLAT> with `grid` blocks: `a` holds
// pointers to the 30 argument values, exactly the kernelParams array cuLaunchKernel (and CuPy)
// pass to a kernel.
template <class Op, class T, class C, bool FLAT>
void host_launch(i64 grid, void** a) {
#define KG_A(idx, type) (*reinterpret_cast<type*>(a[idx]))
  for (i64 b = 0; b < grid; ++b) {
    for (int t = 0; t < KG_BLOCK; ++t) {
      block_body<Op, T, C, FLAT>(
          b, grid, t, KG_A(0, i64), KG_A(1, i64), KG_A(2, int),
          KG_A(3, const T*), KG_A(4, i64), KG_A(5, i64), KG_A(6, const T*), KG_A(7, i64),
          KG_A(8, i64), KG_A(9, const T*), KG_A(10, i64), KG_A(11, i64), KG_A(12, const T*),
          KG_A(13, i64), KG_A(14, i64), KG_A(15, T*), KG_A(16, i64), KG_A(17, i64),
          KG_A(18, T*), KG_A(19, i64), KG_A(20, i64), KG_A(21, T*), KG_A(22, i64),
          KG_A(23, i64), KG_A(24, const C*), KG_A(25, const C*), KG_A(26, const C*),
          KG_A(27, const i64*), KG_A(28, int), KG_A(29, const double*));
    }
  }
#undef KG_A
}
#endif

}  // namespace kg

#if defined(__CUDACC__)
// The kernel: 30 arguments, in the order kappa_gpu/_cuda/_cupy.py:kernel_args builds them.
template <class Op, class T, class C, bool FLAT>
__global__ void __launch_bounds__(KG_BLOCK)
    kg_block(kg::i64 n, kg::i64 s, int order,
             const T* __restrict__ in0, kg::i64 in0r, kg::i64 in0c,
             const T* __restrict__ in1, kg::i64 in1r, kg::i64 in1c,
             const T* __restrict__ in2, kg::i64 in2r, kg::i64 in2c,
             const T* __restrict__ in3, kg::i64 in3r, kg::i64 in3c,
             T* __restrict__ out0, kg::i64 out0r, kg::i64 out0c,
             T* __restrict__ out1, kg::i64 out1r, kg::i64 out1c,
             T* __restrict__ out2, kg::i64 out2r, kg::i64 out2c,
             const C* __restrict__ cf0, const C* __restrict__ cf1, const C* __restrict__ cf2,
             const kg::i64* __restrict__ goff, int ng, const double* __restrict__ gtab) {
  kg::block_body<Op, T, C, FLAT>(blockIdx.x, gridDim.x, threadIdx.x, n, s, order, in0, in0r, in0c,
                           in1, in1r, in1c, in2, in2r, in2c, in3, in3r, in3c, out0, out0r,
                           out0c, out1, out1r, out1c, out2, out2r, out2c, cf0, cf1, cf2, goff,
                           ng, gtab);
}
#endif

#endif  // KG_COMMON_CUH
