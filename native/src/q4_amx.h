// The Q4 decoder's AMX tile: int4 weights x int8 activations for rows in groups of 16.
#pragma once

#include <cstdint>

namespace irouter::q4 {

// Whether this CPU has AMX with int8 tiles and the kernel lets this process use them: asks
// Linux for the tile data state once (arch_prctl ARCH_REQ_XCOMP_PERM), as every AMX user must.
bool amx_usable();

// C[16 groups rows, 16 t .. 16 t_end columns): column tiles [t, t_end) of 16 groups rows, as the
// decoder's AVX-512 VNNI tile computes them, bit for bit: per 32-block the exact int32 dot of
// the row's int8 codes with the column's 4-bit codes less their zero point 8 (a TDPBSSD), scaled
// by the activation's and the weight's scale and added to the row's float sum. codes/scales:
// the packed weight from tile 0 ([tiles][nb][256] bytes, [tiles][nb][16] floats); aq/as: the
// quantized activations from the first row (K int8 and nb scales a row); C: the first row's
// output from column 0, ldc floats a row. Saves the calling thread's tile configuration and
// restores it (ONNX Runtime's AMX kernels share the thread).
void amx_tiles(const uint8_t* codes, const float* scales, int nb, int t, int t_end, int groups,
               const int8_t* aq, const float* as, int K, float* C, int ldc);

}  // namespace irouter::q4
