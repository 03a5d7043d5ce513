// Hessian accumulation on CPU: H += x^T x exploiting symmetry, G += x_q^T x_fp.
//
// Why tiles: x^T x is symmetric, so only the block-upper triangle is computed. H is cut into
// block rows of kTile columns; block row i takes one GEMM  P = x_i^T x[:, i0:]  (MKL, all cores),
// added to H[i, i0:] and, transposed, to the mirror H[i0+T:, i]. With kTile = 256 the GEMMs stay
// large enough for full BLAS efficiency while the work approaches half of a full x^T x.
#include <torch/library.h>

#include "hessian_common.h"

namespace piso {
namespace {

constexpr int64_t kTile = 256;

void symmetric_update(const at::Tensor& H, const at::Tensor& xc) {
  const int64_t D = H.size(0);
  if (D <= kTile) {
    auto P = at::mm(xc.t(), xc);
    H.add_(P.add(P.t()).mul_(0.5));  // exactly symmetric
    return;
  }
  for (int64_t i0 = 0; i0 < D; i0 += kTile) {
    const int64_t i1 = std::min(D, i0 + kTile);
    auto P = at::mm(xc.narrow(1, i0, i1 - i0).t(), xc.narrow(1, i0, D - i0));  // [T, D - i0]
    auto diag = P.narrow(1, 0, i1 - i0);
    H.narrow(0, i0, i1 - i0).narrow(1, i0, i1 - i0).add_(diag.add(diag.t()).mul_(0.5));
    if (i1 < D) {
      auto off = P.narrow(1, i1 - i0, D - i1);  // [T, D - i1]
      H.narrow(0, i0, i1 - i0).narrow(1, i1, D - i1).add_(off);
      H.narrow(0, i1, D - i1).narrow(1, i0, i1 - i0).add_(off.t());
    }
  }
}

void hessian_accumulate_cpu(const at::Tensor& H, const at::Tensor& x) {
  auto x2 = check_accumulate_args(H, "H", x, "x");
  TORCH_CHECK(H.device().is_cpu(), "H: expected a CPU tensor for the CPU kernel");
  for (int64_t t0 = 0; t0 < x2.size(0); t0 += kTokenChunk) {
    auto xc = x2.narrow(0, t0, std::min(kTokenChunk, x2.size(0) - t0)).to(H.scalar_type());
    symmetric_update(H, xc);
  }
}

void cross_accumulate_cpu(const at::Tensor& G, const at::Tensor& x_q, const at::Tensor& x_fp) {
  auto xq = check_accumulate_args(G, "G", x_q, "x_q");
  auto xf = check_accumulate_args(G, "G", x_fp, "x_fp");
  TORCH_CHECK(xq.size(0) == xf.size(0), "x_q and x_fp: expected the same number of paired tokens, got ",
              xq.size(0), " and ", xf.size(0));
  for (int64_t t0 = 0; t0 < xq.size(0); t0 += kTokenChunk) {
    const int64_t n = std::min(kTokenChunk, xq.size(0) - t0);
    G.addmm_(xq.narrow(0, t0, n).to(G.scalar_type()).t(), xf.narrow(0, t0, n).to(G.scalar_type()));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) {
  m.impl("hessian_accumulate_", &hessian_accumulate_cpu);
  m.impl("cross_accumulate_", &cross_accumulate_cpu);
}

}  // namespace piso
