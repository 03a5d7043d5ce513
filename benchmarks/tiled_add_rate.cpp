// Would register tiling speed up the PiSO prefix pass's additions? prefix_u adds H's rows one at a
// time into a d-wide float64 accumulator (load, add, store per element). The tiled alternative keeps
// a column tile of the accumulator (32 or 64 doubles) in AVX-512 registers while walking all rows of
// H in a row-specific order, for a chunk of W rows (so H's column panel stays in L2), and stores the
// tile only where reads are served (every 1, 2 or 4 positions). Times both over 64 random orders of
// a 1024 x 1024 float32 H, one core.
//
//   g++ -O3 -march=x86-64-v4 benchmarks/tiled_add_rate.cpp -o /tmp/tiled_add_rate && /tmp/tiled_add_rate
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>
__attribute__((target("arch=x86-64-v4"),noinline)) void add_row(double* __restrict h, const float* __restrict row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] += double(row[j]);
}
template <int NV>
__attribute__((target("arch=x86-64-v4"),noinline)) void tile_pass(const float* H, int64_t d, int64_t c0, const int* ord, const double* sg, int64_t n, double* snap, int every) {
  __m512d acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_pd();
  for (int64_t x = 0; x < n; ++x) {
    const float* r = H + (int64_t)ord[x] * d + c0;
    const __m512d s = _mm512_set1_pd(sg[x]);
    for (int v = 0; v < NV; ++v) {
      __m512d h = _mm512_cvtps_pd(_mm256_loadu_ps(r + 8 * v));
      acc[v] = _mm512_fmadd_pd(h, s, acc[v]);
    }
    if ((x & (every - 1)) == 0) for (int v = 0; v < NV; ++v) _mm512_storeu_pd(snap + 8 * v, acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_pd(snap + 8 * v, acc[v]);
}
int main() {
  const int d = 1024;
  std::vector<float> H((size_t)d * d);
  std::mt19937 g(1);
  for (auto& v : H) v = std::uniform_real_distribution<float>(-1, 1)(g);
  const int R = 64;  // W rows in a chunk
  std::vector<std::vector<int>> ords(R, std::vector<int>(d));
  std::vector<double> sg(d);
  for (auto& o : ords) { for (int i = 0; i < d; ++i) o[i] = i; std::shuffle(o.begin(), o.end(), g); }
  for (int i = 0; i < d; ++i) sg[i] = (i & 1) ? 1.0 : -1.0;
  std::vector<double> acc(d), snap(64);
  for (int rep = 0; rep < 2; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < R; ++r) for (int x = 0; x < d; ++x) add_row(acc.data(), H.data() + (size_t)ords[r][x] * d, d);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("row-at-a-time: %.2f G adds/s (%.1f us/row)\n", R * double(d) * d / s / 1e9, s / R * 1e6);
    for (int every : {1, 2, 4}) {
      t0 = std::chrono::steady_clock::now();
      for (int c0 = 0; c0 < d; c0 += 32) for (int r = 0; r < R; ++r) tile_pass<4>(H.data(), d, c0, ords[r].data(), sg.data(), d, snap.data(), every);
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("tile 32, store every %d: %.2f G adds/s (%.1f us/row)\n", every, R * double(d) * d / s / 1e9, s / R * 1e6);
      t0 = std::chrono::steady_clock::now();
      for (int c0 = 0; c0 < d; c0 += 64) for (int r = 0; r < R; ++r) tile_pass<8>(H.data(), d, c0, ords[r].data(), sg.data(), d, snap.data(), every);
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("tile 64, store every %d: %.2f G adds/s (%.1f us/row)\n", every, R * double(d) * d / s / 1e9, s / R * 1e6);
    }
  }
  std::printf("%g %g\n", acc[3], snap[3]);
}
