// Hessian accumulation on CUDA: H += x^T x exploiting symmetry, G += x_q^T x_fp, with cuBLAS.
//
// Same blocking as the CPU kernel (csrc/cpu/hessian_cpu.cpp, where it is tested): the feature range
// is halved recursively, each off-diagonal quarter is one GEMM into a workspace added to the upper
// block and, transposed, to the mirror block; diagonal blocks of at most kTile features are full
// products symmetrized ((P + P^T)/2). Flops: about (1 + kTile/D)/2 of a full x^T x.
//
// Inputs go to cublasGemmEx in their NATIVE dtype when H is float32: bf16/fp16 products are exact in
// fp32 and accumulate in fp32 (tensor cores, no converted copy of x); fp32 inputs use
// CUBLAS_COMPUTE_32F_PEDANTIC so that a global TF32 setting never rounds Hessian products to 10-bit
// mantissas. A float64 H converts token chunks of x to float64 (CUBLAS_COMPUTE_64F).
// Everything runs on the current stream through PyTorch's cuBLAS handle.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include "hessian_common.h"

namespace piso {
namespace {

// Diagonal blocks up to kTile features are computed whole: smaller products would leave most of the
// GPU's SMs idle (a 1024 x 1024 output is 64 tiles of 128 x 128).
constexpr int64_t kTile = 1024;
// Workspace for one off-diagonal panel (elements of H's dtype); larger blocks go in column panels.
constexpr int64_t kWorkspaceElems = int64_t(1) << 25;
// GEMM depth (tokens) per cuBLAS call: the API takes int dimensions.
constexpr int64_t kMaxGemmDepth = int64_t(1) << 30;

cudaDataType_t cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "hessian (CUDA): unsupported dtype ", st);
  }
}

// Leading dimension of a row-major matrix with unit column stride. A single-row tensor counts as
// contiguous whatever its row stride (even 0), but cuBLAS requires ld >= the row length.
int64_t row_ld(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);
}

// C = beta * C + X[:, xi0:xi0+m]^T Y[:, yj0:yj0+n] with X, Y row-major [k, *] of one dtype and C a
// row-major [m, n] view (unit column stride) in float32/float64.
// cuBLAS is column-major: row-major C with leading dimension ldc is the column-major [n, m] matrix
// C^T = Y_cm[yj0:, :] * X_cm[xi0:, :]^T, where X_cm is X read column-major ([*, k], ld = X.stride(0)).
void gemm_tn(const at::Tensor& X, int64_t xi0, int64_t m, const at::Tensor& Y, int64_t yj0,
             int64_t n, const at::Tensor& C, bool accumulate) {
  TORCH_INTERNAL_ASSERT(X.scalar_type() == Y.scalar_type() && C.size(0) == m && C.size(1) == n);
  TORCH_INTERNAL_ASSERT((X.stride(1) == 1 || X.size(1) <= 1) && (Y.stride(1) == 1 || Y.size(1) <= 1) &&
                        (C.stride(1) == 1 || C.size(1) <= 1));
  const int64_t k = X.size(0);
  if (m == 0 || n == 0 || k == 0) return;
  const auto in_t = cuda_dtype(X.scalar_type());
  const auto out_t = cuda_dtype(C.scalar_type());
  const auto esz = X.element_size();
  const void* xp = static_cast<const char*>(X.data_ptr()) + xi0 * esz;
  const void* yp = static_cast<const char*>(Y.data_ptr()) + yj0 * esz;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  if (C.scalar_type() == at::kDouble) {
    TORCH_INTERNAL_ASSERT(X.scalar_type() == at::kDouble);
    const double alpha = 1.0, beta = accumulate ? 1.0 : 0.0;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, int(n), int(m), int(k), &alpha,
                                      yp, in_t, int(row_ld(Y)), xp, in_t, int(row_ld(X)), &beta,
                                      C.data_ptr(), out_t, int(row_ld(C)), CUBLAS_COMPUTE_64F,
                                      CUBLAS_GEMM_DEFAULT));
  } else {
    const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
    const cublasComputeType_t compute =
        X.scalar_type() == at::kFloat ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, int(n), int(m), int(k), &alpha,
                                      yp, in_t, int(row_ld(Y)), xp, in_t, int(row_ld(X)), &beta,
                                      C.data_ptr(), out_t, int(row_ld(C)), compute,
                                      CUBLAS_GEMM_DEFAULT));
  }
}

// H[r0:r0+nr, c0:c0+nc] += P and H[c0:c0+nc, r0:r0+nr] += P^T with P = xc[:, r]^T xc[:, c].
void offdiag_update(const at::Tensor& H, const at::Tensor& xc, int64_t r0, int64_t nr, int64_t c0,
                    int64_t nc, const at::Tensor& ws) {
  const int64_t panel = std::max<int64_t>(1, std::min(nc, ws.numel() / nr));
  for (int64_t j0 = c0; j0 < c0 + nc; j0 += panel) {
    const int64_t nj = std::min(panel, c0 + nc - j0);
    auto P = ws.narrow(0, 0, nr * nj).view({nr, nj});
    gemm_tn(xc, r0, nr, xc, j0, nj, P, /*accumulate=*/false);
    H.narrow(0, r0, nr).narrow(1, j0, nj).add_(P);
    H.narrow(0, j0, nj).narrow(1, r0, nr).add_(P.t());
  }
}

// H[a:a+n, a:a+n] += xc[:, a:a+n]^T xc[:, a:a+n] (recursive halving, see the file comment).
void symmetric_update(const at::Tensor& H, const at::Tensor& xc, int64_t a, int64_t n,
                      const at::Tensor& ws) {
  if (n <= kTile) {
    auto P = ws.narrow(0, 0, n * n).view({n, n});
    gemm_tn(xc, a, n, xc, a, n, P, /*accumulate=*/false);
    H.narrow(0, a, n).narrow(1, a, n).add_(P.add(P.t()), 0.5);  // rounding differs at (i,j), (j,i)
    return;
  }
  const int64_t h = (n / 2 + 15) / 16 * 16;  // 16-element offsets keep tensor-core alignment
  symmetric_update(H, xc, a, h, ws);
  symmetric_update(H, xc, a + h, n - h, ws);
  offdiag_update(H, xc, a, h, a + h, n - h, ws);
}

// The dtype the GEMM reads: the inputs' own when cuBLAS can accumulate them into H's dtype
// directly, else H's dtype (a converted copy per token chunk).
at::ScalarType gemm_input_dtype(at::ScalarType x, at::ScalarType acc) {
  if (acc == at::kFloat && (x == at::kFloat || x == at::kBFloat16 || x == at::kHalf)) return x;
  return acc;
}

void hessian_accumulate_cuda(const at::Tensor& H, const at::Tensor& x) {
  auto x2 = check_accumulate_args(H, "H", x, "x");
  TORCH_CHECK(H.is_cuda(), "H: expected a CUDA tensor for the CUDA kernel, got ", H.device());
  c10::cuda::CUDAGuard guard(H.device());
  check_finite(x2, "x");
  const int64_t T = x2.size(0), D = H.size(0);
  if (T == 0 || D == 0) return;  // an empty batch adds nothing
  const auto in_dtype = gemm_input_dtype(x2.scalar_type(), H.scalar_type());
  const int64_t chunk = in_dtype == x2.scalar_type() ? kMaxGemmDepth : token_chunk(D);
  const int64_t t = std::min(kTile, D);
  auto ws = at::empty({std::max(t * t, std::min(kWorkspaceElems, D * D / 4 + D))}, H.options());
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    auto xc = x2.narrow(0, t0, std::min(chunk, T - t0)).to(in_dtype);
    symmetric_update(H, xc, 0, D, ws);
  }
}

void cross_accumulate_cuda(const at::Tensor& G, const at::Tensor& x_q, const at::Tensor& x_fp) {
  auto xq = check_accumulate_args(G, "G", x_q, "x_q");
  auto xf = check_accumulate_args(G, "G", x_fp, "x_fp");
  TORCH_CHECK(G.is_cuda(), "G: expected a CUDA tensor for the CUDA kernel, got ", G.device());
  TORCH_CHECK(xq.size(0) == xf.size(0),
              "x_q and x_fp: expected the same number of paired tokens, got ", xq.size(0), " and ",
              xf.size(0));
  c10::cuda::CUDAGuard guard(G.device());
  check_finite(xq, "x_q");
  check_finite(xf, "x_fp");
  const int64_t T = xq.size(0), D = G.size(0);
  if (T == 0 || D == 0) return;
  // Both operands of one GEMM share a dtype: native only when the two inputs agree.
  const auto in_dtype = xq.scalar_type() == xf.scalar_type()
                            ? gemm_input_dtype(xq.scalar_type(), G.scalar_type())
                            : G.scalar_type();
  const bool native = in_dtype == xq.scalar_type() && in_dtype == xf.scalar_type();
  const int64_t chunk = native ? kMaxGemmDepth : token_chunk(D);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    gemm_tn(xq.narrow(0, t0, n).to(in_dtype), 0, D, xf.narrow(0, t0, n).to(in_dtype), 0, D, G,
            /*accumulate=*/true);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CUDA, m) {
  m.impl("hessian_accumulate_", &hessian_accumulate_cuda);
  m.impl("cross_accumulate_", &cross_accumulate_cuda);
}

}  // namespace piso
