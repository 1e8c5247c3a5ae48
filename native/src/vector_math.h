// The sampler's passes over a whole vocabulary, vectorized for the CPU at hand (AVX-512, AVX2):
// temperature scaling and the softmax numerators.
#pragma once

#include <cstdint>

namespace irouter::sampling {

// out[i] = x[i] / d for i in [0, n): IEEE float32 division, the same bits at any vector width.
void divide(const float* x, int64_t n, float d, float* out);

// Writes e[i] = exp(double(z[i]) - m) for i in [0, n) and returns their float64 sum, for
// m >= every z[i] (so each e is in [0, 1]) and z finite or -inf. Each e is within 1 ULP of
// glibc's exp (4M values over [-760, 0], both vector paths), and 0 where z[i] - m < -708
// (e < 3.3e-308: no cut a sampler makes falls between such a value and 0, beside a largest e
// of 1). The sum runs in two accumulators of 8 (AVX-512) or 4 (AVX2) lanes over index order,
// whose lanes are then added pairwise, then the scalar tail; without either, sequentially.
double exp_sum(const float* z, int64_t n, double m, double* e);

}  // namespace irouter::sampling
