// See q4_amx.h. Why by hand: the tile multiplies the decoder's own packed int4 weights by its
// int8 activations and must give the VNNI tile's bits; no library's AMX GEMM takes either layout
// or its per-32-block scales (ONNX Runtime's u8s8 AMX GEMM wants a repacked int8 B and one scale).
#include "q4_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

namespace irouter::q4 {
namespace {

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 0, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// Tile 0: sums (16 rows of 16 int32); 1: A (16 rows of one 32-byte block of int8
// activations); 2: B (8 rows of 16 columns x 4 codes).
TileConfig our_config() {
  TileConfig c;
  c.palette = 1;
  c.rows[0] = 16, c.colsb[0] = 64;
  c.rows[1] = 16, c.colsb[1] = 32;
  c.rows[2] = 8, c.colsb[2] = 64;
  return c;
}

// Written as asm, not _tile_loadconfig / _tile_storeconfig: GCC 12's intrinsics tell the
// compiler they touch only a pointer's worth of the 64 bytes, and it then dropped the stores
// that fill the rest (ldtilecfg faulted on a zero configuration).
__attribute__((target("amx-tile"))) void load_config(const TileConfig& c) {
  asm volatile("ldtilecfg %0" : : "m"(c));
}
__attribute__((target("amx-tile"))) void store_config(TileConfig& c) {
  asm volatile("sttilecfg %0" : "=m"(c));
}
__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

bool cpu_has_amx_int8() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 24 & 1) && (d >> 25 & 1);  // AMX-TILE, AMX-INT8
}

// The 8 rows of B for one 32-block of 16 columns: the VNNI tile's w[0..7] (codes 4g..4g+3 of
// each column in row g), unpacked from the packed weight's 256 bytes, less the zero point 8.
// Signed codes make the dot sum(a (w - 8)) = sum(a w) - asum8 the VNNI tile computes in two
// steps (TDPBSSD): no subtraction a row in the sums' pass, ~15% of the tile's time.
__attribute__((target("avx512f,avx512bw"))) void unpack_block(const uint8_t* p, int8_t* b) {
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
  for (int g = 0; g < 4; ++g) {
    const __m512i x = _mm512_loadu_si512(p + g * 64);
    _mm512_store_si512(b + g * 64, _mm512_sub_epi8(_mm512_and_si512(x, low), eight));
    _mm512_store_si512(b + (g + 4) * 64,
                       _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(x, 4), low), eight));
  }
}

// One 16-row group x 16 columns over every block; B: the column tile's unpacked blocks; dots:
// nb x 256 int32 of scratch. Every block's dot products first, then their sums: a vector load
// right behind the tile store it reads stalls (measured: the tile then ran no faster than VNNI).
__attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8"))) void group_tile(
    const int8_t* B, const float* PS, int nb, const int8_t* aq, const float* as, int K,
    float* C, int ldc, int32_t* dots) {
  // (Blocks rotating over four sums tiles, and over two, ran no faster.)
  for (int b = 0; b < nb; ++b) {
    _tile_loadd(1, aq + b * 32, K);
    _tile_loadd(2, B + b * 512, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, dots + b * 256, 64);
  }
  __m512 acc[16];
  for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    // The same float operations, in the same order, as tile_vnni's (q4_decoder.cpp).
    const __m512 ws = _mm512_loadu_ps(PS + b * 16);
    const int32_t* d = dots + b * 256;
    for (int m = 0; m < 16; ++m) {
      const __m512i t = _mm512_load_si512(d + m * 16);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),
                               _mm512_mul_ps(ws, _mm512_set1_ps(as[m * nb + b])), acc[m]);
    }
  }
  for (int m = 0; m < 16; ++m) _mm512_storeu_ps(C + static_cast<size_t>(m) * ldc, acc[m]);
}

}  // namespace

bool amx_usable() {
  static const bool usable = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // <asm/prctl.h>, XFEATURE_XTILEDATA
    return cpu_has_amx_int8() && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return usable;
}

void amx_tiles(const uint8_t* codes, const float* scales, int nb, int t, int t_end, int groups,
               const int8_t* aq, const float* as, int K, float* C, int ldc) {
  struct alignas(64) Block {
    int8_t codes[512];
  };
  struct alignas(64) Dots {
    int32_t sums[256];
  };
  thread_local std::vector<Block> unpacked;
  thread_local std::vector<Dots> dots;
  if (unpacked.size() < static_cast<size_t>(nb)) unpacked.resize(nb), dots.resize(nb);
  TileConfig saved;
  store_config(saved);
  static const TileConfig ours = our_config();
  load_config(ours);
  for (; t < t_end; ++t) {
    const uint8_t* P = codes + static_cast<size_t>(t) * nb * 256;
    for (int b = 0; b < nb; ++b) unpack_block(P + b * 256, unpacked[b].codes);
    // GCC 12's tile loads are asm without a memory clobber: nothing may move the stores above
    // past them (group_tile, of another target, is never inlined here; this holds if it were).
    asm volatile("" : : : "memory");
    for (int g = 0; g < groups; ++g)
      group_tile(reinterpret_cast<const int8_t*>(unpacked.data()),
                 scales + static_cast<size_t>(t) * nb * 16, nb,
                 aq + static_cast<size_t>(g) * 16 * K, as + g * 16 * nb, K,
                 C + static_cast<size_t>(g) * 16 * ldc + t * 16, ldc,
                 reinterpret_cast<int32_t*>(dots.data()));
  }
  if (saved.palette)
    load_config(saved);
  else
    release_tiles();
}

}  // namespace irouter::q4
