// update_blocks.cu -- the block arithmetic of kappa_gpu's update operators (DESIGN.md sec. 2),
// one Op per (operator family, pass), run by the generic kernel kg_block<Op, T, C, FLAT> of
// kg_common.cuh. The plain-torch twin of every Op is in kappa_gpu/_cuda/_reference.py, with the
// same names, the same segment-table columns (in the same order) and the same formulas.
//
// Notation, per entry i: hv = (H u)_i is the HVP result the caller computed (bare Hessian, no
// sign, no weight decay); ht = sign*hv + wd*x1 is (Ht x1)_i with Ht = sign*H + diag(wd).
// Every operator costs one HVP per product: matvec takes hv = H x1; rmatvec runs Pre (the HVP
// input u from y), then the caller computes hv = H u, then Post.
//
// Families (segment-table columns in brackets, in order):
//   Order1 [c, Da, wd, sign]: SGD without momentum; state theta.
//       J = c I - Da Ht                  J^T = c I - Ht Da
//   Order2 [a, a2, b, beta, c, D, wd, sign], optional per-entry factor cf0 = Dvec (D*Dvec):
//       heavy ball, nesterov, momentum-free groups and Adam/AdamW "frozen"; state (theta, buf).
//       J = [[c I - D a Ht, -D b], [a2 Ht, beta I]]
//       J^T = [[c I - Ht a D, a2 Ht], [-b D, beta I]]   (H symmetric, D, a, ... diagonal)
//   AdamFull [a, b1, b2, c, wd, sign], per-entry cf0 = D, cf1 = q, cf2 = r; state (theta, m, v).
//       dm' = b1 dm + a Ht dth;  dv' = b2 dv + r Ht dth;  dth' = c dth - D dm' + q dv'
//       (a = 1-b1, r = 2 (1-b2) gt, q = (eta/bc1) m' / (denom^2 2 sqrt(v') sqrt(bc2)))

#include "kg_common.cuh"

namespace kg {

// ---------------------------------------------------------------------------------- Order1
struct Order1Fwd {  // in: x1, hv        out: y1 = c x1 - Da ht
  static constexpr int NIN = 2, NOUT = 1, NC = 0, NG = 4;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A*, const A* p, A* o) {
    const A ht = p[3] * v[1] + p[2] * v[0];
    o[0] = p[0] * v[0] - p[1] * ht;
  }
};

struct Order1Pre {  // in: y1            out: u = Da y1
  static constexpr int NIN = 1, NOUT = 1, NC = 0, NG = 4;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A*, const A* p, A* o) {
    o[0] = p[1] * v[0];
  }
};

struct Order1Post {  // in: y1, hv = H u  out: x1 = c y1 - (sign hv + wd u)
  static constexpr int NIN = 2, NOUT = 1, NC = 0, NG = 4;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A*, const A* p, A* o) {
    const A u = p[1] * v[0];
    o[0] = p[0] * v[0] - (p[3] * v[1] + p[2] * u);
  }
};

// ---------------------------------------------------------------------------------- Order2
// columns: p[0] a, p[1] a2, p[2] b, p[3] beta, p[4] c, p[5] D, p[6] wd, p[7] sign
struct Order2Fwd {  // in: x1, x2, hv     out: y1 = c x1 - D (a ht + b x2), y2 = a2 ht + beta x2
  static constexpr int NIN = 3, NOUT = 2, NC = 1, NG = 8;
  template <class A> static KG_HD A coef_default(int) { return A(1); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A ht = p[7] * v[2] + p[6] * v[0];
    const A D = p[5] * c[0];
    o[0] = p[4] * v[0] - D * (p[0] * ht + p[2] * v[1]);
    o[1] = p[1] * ht + p[3] * v[1];
  }
};

struct Order2Pre {  // in: y1, y2         out: u = a2 y2 - a D y1
  static constexpr int NIN = 2, NOUT = 1, NC = 1, NG = 8;
  template <class A> static KG_HD A coef_default(int) { return A(1); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A Dy1 = p[5] * c[0] * v[0];
    o[0] = p[1] * v[1] - p[0] * Dy1;
  }
};

struct Order2Post {  // in: y1, y2, hv = H u   out: x1 = c y1 + sign hv + wd u, x2 = beta y2 - b D y1
  static constexpr int NIN = 3, NOUT = 2, NC = 1, NG = 8;
  template <class A> static KG_HD A coef_default(int) { return A(1); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A Dy1 = p[5] * c[0] * v[0];
    const A u = p[1] * v[1] - p[0] * Dy1;
    o[0] = p[4] * v[0] + (p[7] * v[2] + p[6] * u);
    o[1] = p[3] * v[1] - p[2] * Dy1;
  }
};

// -------------------------------------------------------------------------------- AdamFull
// columns: p[0] a, p[1] b1, p[2] b2, p[3] c, p[4] wd, p[5] sign;  coefficients: c[0] D, c[1] q, c[2] r
struct AdamFullFwd {  // in: x1, x2, x3, hv    out: y1, y2 = dm', y3 = dv'
  static constexpr int NIN = 4, NOUT = 3, NC = 3, NG = 6;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A ht = p[5] * v[3] + p[4] * v[0];
    const A dm = p[1] * v[1] + p[0] * ht;
    const A dv = p[2] * v[2] + c[2] * ht;
    o[0] = p[3] * v[0] - c[0] * dm + c[1] * dv;
    o[1] = dm;
    o[2] = dv;
  }
};

struct AdamFullPre {  // in: y1, y2, y3      out: u = a (y2 - D y1) + r (y3 + q y1)
  static constexpr int NIN = 3, NOUT = 1, NC = 3, NG = 6;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A w = v[1] - c[0] * v[0];
    const A z = v[2] + c[1] * v[0];
    o[0] = p[0] * w + c[2] * z;
  }
};

// The host may omit r (cf2 = null, read as 0) when every segment has wd = 0: r enters Post
// only through wd u. That saves one of the seven vector reads in the AdamW case.
struct AdamFullPost {  // in: y1, y2, y3, hv = H u   out: x1 = c y1 + sign hv + wd u, x2 = b1 w, x3 = b2 z
  static constexpr int NIN = 4, NOUT = 3, NC = 3, NG = 6;
  template <class A> static KG_HD A coef_default(int) { return A(0); }
  template <class A> static KG_HD void apply(const A* v, const A* c, const A* p, A* o) {
    const A w = v[1] - c[0] * v[0];
    const A z = v[2] + c[1] * v[0];
    const A u = p[0] * w + c[2] * z;
    o[0] = p[3] * v[0] + (p[5] * v[3] + p[4] * u);
    o[1] = p[1] * w;
    o[2] = p[2] * z;
  }
};

}  // namespace kg

#if defined(KG_INSTANTIATE) && defined(__CUDACC__)
// Explicit instantiations for offline checks (nvcc -ptx -DKG_INSTANTIATE, see
// tests/test_kernels_compile.py). At run time CuPy instantiates the ones it needs through
// NVRTC name expressions instead (kappa_gpu/_cuda/_cupy.py).
#define KG_INST_OP1(OP, T, C, F)                                                              \
  template __global__ void kg_block<kg::OP, T, C, F>(                                         \
      kg::i64, kg::i64, int, const T*, kg::i64, kg::i64, const T*, kg::i64, kg::i64, const T*, \
      kg::i64, kg::i64, const T*, kg::i64, kg::i64, T*, kg::i64, kg::i64, T*, kg::i64,        \
      kg::i64, T*, kg::i64, kg::i64, const C*, const C*, const C*, const kg::i64*, int,       \
      const double*);
#define KG_INST_OP(OP, T, C) KG_INST_OP1(OP, T, C, true) KG_INST_OP1(OP, T, C, false)
#define KG_INST_ALL(T, C)                                                                     \
  KG_INST_OP(Order1Fwd, T, C) KG_INST_OP(Order1Pre, T, C) KG_INST_OP(Order1Post, T, C)        \
  KG_INST_OP(Order2Fwd, T, C) KG_INST_OP(Order2Pre, T, C) KG_INST_OP(Order2Post, T, C)        \
  KG_INST_OP(AdamFullFwd, T, C) KG_INST_OP(AdamFullPre, T, C) KG_INST_OP(AdamFullPost, T, C)
KG_INST_ALL(float, float)
KG_INST_ALL(double, double)
KG_INST_ALL(kg::bf16, kg::bf16)
#endif
