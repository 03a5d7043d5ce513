// Hessian accumulation on CPU: H += x^T x exploiting symmetry, G += x_q^T x_fp.
//
// Why blocks: x^T x is symmetric, so only the block-upper triangle is computed: the feature range is
// halved recursively, each off-diagonal quarter is one GEMM (MKL through ATen, all cores) into a
// reused workspace, added to the upper block and, transposed, to the mirror block; diagonal blocks of
// at most kTile features are full products symmetrized. Flops: about (1 + kTile/D)/2 of a full x^T x.
// Adding a product (rather than writing the GEMM straight into the upper triangle and copying it
// down) keeps `H += x^T x` exact for any H, symmetric or not, at the cost of a few D^2 memory passes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "hessian_common.h"

namespace piso {
namespace {

// Workspace for the off-diagonal products (elements); larger blocks are done in column panels.
constexpr int64_t kWorkspaceElems = int64_t(1) << 22;
// Deepest GEMM (tokens) in one call: MKL's LP64 interface takes int dimensions.
constexpr int64_t kMaxGemmDepth = int64_t(1) << 30;
// Recursion stops at diagonal blocks of at most kTile features, computed as a full product. Measured
// with benchmarks/bench_hessian.py (16k tokens x 2048, 2 shared cores): 512 beat 256 (whose small
// GEMMs lose MKL efficiency) and 1024 (more redundant flops).
constexpr int64_t kTile = 512;

// NaN/Inf test on the raw bits (all exponent bits set), one parallel read-only pass without the
// temporary bool tensor of at::isfinite -- it cost ~15% of the GEMM time at 16k x 2048.
template <typename U>
bool has_nonfinite_bits(const void* data, int64_t n, U exp_mask) {
  const U* p = static_cast<const U*>(data);
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t b, int64_t e) {
    unsigned char hit = 0;
    for (int64_t i = b; i < e; ++i) hit |= static_cast<unsigned char>((p[i] & exp_mask) == exp_mask);
    if (hit) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

void check_finite_cpu(const at::Tensor& x2, const char* name) {
  const int64_t n = x2.numel();
  if (n == 0) return;
  bool bad = false;
  switch (x2.scalar_type()) {
    case at::kBFloat16: bad = has_nonfinite_bits<uint16_t>(x2.data_ptr(), n, 0x7F80u); break;
    case at::kHalf: bad = has_nonfinite_bits<uint16_t>(x2.data_ptr(), n, 0x7C00u); break;
    case at::kFloat: bad = has_nonfinite_bits<uint32_t>(x2.data_ptr(), n, 0x7F800000u); break;
    case at::kDouble:
      bad = has_nonfinite_bits<uint64_t>(x2.data_ptr(), n, 0x7FF0000000000000ull);
      break;
    default: TORCH_CHECK(false, name, ": unexpected dtype ", x2.scalar_type());
  }
  TORCH_CHECK(!bad, name, ": contains NaN or Inf; remove non-finite values before calling");
}

// Off-diagonal block: H[r0:r0+nr, c0:c0+nc] += P and H[c0:c0+nc, r0:r0+nr] += P^T with
// P = xc[:, r]^T xc[:, c], computed in column panels that fit the workspace.
void offdiag_update(const at::Tensor& H, const at::Tensor& xc, int64_t r0, int64_t nr, int64_t c0,
                    int64_t nc, at::Tensor& ws) {
  const int64_t panel = std::max<int64_t>(1, std::min(nc, ws.numel() / nr));
  for (int64_t j0 = c0; j0 < c0 + nc; j0 += panel) {
    const int64_t nj = std::min(panel, c0 + nc - j0);
    auto P = ws.narrow(0, 0, nr * nj).view({nr, nj});
    at::mm_out(P, xc.narrow(1, r0, nr).t(), xc.narrow(1, j0, nj));
    H.narrow(0, r0, nr).narrow(1, j0, nj).add_(P);
    H.narrow(0, j0, nj).narrow(1, r0, nr).add_(P.t());
  }
}

// H[a:a+n, a:a+n] += xc[:, a:a+n]^T xc[:, a:a+n], recursively: the two diagonal halves recurse and
// the off-diagonal quarter is one large GEMM mirrored into both triangles. Flops approach half of
// a full x^T x while the GEMMs stay as large as possible (block rows of a fixed height would give
// MKL thin [tile x D] products that lose the saving again).
void symmetric_update(const at::Tensor& H, const at::Tensor& xc, int64_t a, int64_t n,
                      at::Tensor& ws) {
  if (n <= kTile) {
    auto P = ws.narrow(0, 0, n * n).view({n, n});
    at::mm_out(P, xc.narrow(1, a, n).t(), xc.narrow(1, a, n));
    // (P + P^T)/2: GEMM rounding may differ between (i, j) and (j, i).
    H.narrow(0, a, n).narrow(1, a, n).add_(P.add(P.t()), 0.5);
    return;
  }
  const int64_t h = (n / 2 + 15) / 16 * 16;  // keep panel offsets aligned for the BLAS
  symmetric_update(H, xc, a, h, ws);
  symmetric_update(H, xc, a + h, n - h, ws);
  offdiag_update(H, xc, a, h, a + h, n - h, ws);
}

void hessian_accumulate_cpu(const at::Tensor& H, const at::Tensor& x) {
  auto x2 = check_accumulate_args(H, "H", x, "x");
  TORCH_CHECK(H.device().is_cpu(), "H: expected a CPU tensor for the CPU kernel, got ", H.device());
  check_finite_cpu(x2, "x");
  const int64_t T = x2.size(0), D = H.size(0);
  if (T == 0 || D == 0) return;  // an empty batch adds nothing
  // Chunks bound the converted copy; an x already in H's dtype is used in place in one go.
  const int64_t chunk = x2.scalar_type() == H.scalar_type() ? kMaxGemmDepth : token_chunk(D);
  const int64_t t = std::min(kTile, D);
  auto ws = at::empty({std::max(t * t, std::min(kWorkspaceElems, D * D / 4 + D))}, H.options());
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    auto xc = x2.narrow(0, t0, std::min(chunk, T - t0)).to(H.scalar_type());
    symmetric_update(H, xc, 0, D, ws);
  }
}

void cross_accumulate_cpu(const at::Tensor& G, const at::Tensor& x_q, const at::Tensor& x_fp) {
  auto xq = check_accumulate_args(G, "G", x_q, "x_q");
  auto xf = check_accumulate_args(G, "G", x_fp, "x_fp");
  TORCH_CHECK(G.device().is_cpu(), "G: expected a CPU tensor for the CPU kernel, got ", G.device());
  TORCH_CHECK(xq.size(0) == xf.size(0),
              "x_q and x_fp: expected the same number of paired tokens, got ", xq.size(0), " and ",
              xf.size(0));
  check_finite_cpu(xq, "x_q");
  check_finite_cpu(xf, "x_fp");
  const int64_t T = xq.size(0), D = G.size(0);
  if (T == 0 || D == 0) return;
  const bool same = xq.scalar_type() == G.scalar_type() && xf.scalar_type() == G.scalar_type();
  const int64_t chunk = same ? kMaxGemmDepth : token_chunk(D);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    G.addmm_(xq.narrow(0, t0, n).to(G.scalar_type()).t(), xf.narrow(0, t0, n).to(G.scalar_type()));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) {
  m.impl("hessian_accumulate_", &hessian_accumulate_cpu);
  m.impl("cross_accumulate_", &cross_accumulate_cpu);
}

}  // namespace piso
