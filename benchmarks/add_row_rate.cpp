// Rate of the PiSO prefix pass's inner loop on one core: acc[j] += double(H[row][j]) over the rows
// of a float32 d x d matrix taken in a random order (as prefix_u takes them, by |w|), two
// accumulators alternating (accp / accn). The floor under the CPU sweep's n d additions per row.
//
//   g++ -O3 benchmarks/add_row_rate.cpp -o /tmp/add_row_rate && /tmp/add_row_rate
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

__attribute__((target("arch=x86-64-v4"))) void add_row(double* __restrict h,
                                                        const float* __restrict row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] += double(row[j]);
}

int main() {
  for (int d : {256, 512, 1024, 2048, 4096}) {
    std::vector<float> H(static_cast<size_t>(d) * d, 1.0f);
    std::vector<double> acc(d), acc2(d);
    std::vector<int> ord(d);
    for (int i = 0; i < d; ++i) ord[i] = i;
    std::mt19937 g(1);
    const long reps = std::max(1L, (1L << 30) / (static_cast<long>(d) * d));
    const auto t0 = std::chrono::steady_clock::now();
    for (long r = 0; r < reps; ++r) {
      std::shuffle(ord.begin(), ord.end(), g);
      for (int x = 0; x < d; ++x)
        add_row((x & 1) ? acc.data() : acc2.data(), H.data() + static_cast<size_t>(ord[x]) * d, d);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("d=%5d (H %6.1f MB): %.2f G additions/s on one core  [check %g]\n", d,
                4.0 * d * d / 1e6, reps * double(d) * d / s / 1e9, acc[0] + acc2[0]);
  }
}
