// One translation unit for the serving kernels; nn/kernels.py compiles this and unit_training.cpp,
// not the kernel files one by one. Why: alone, each kernel file spent most of its 10-29 s of
// compiling on ATen's headers (embedding.cpp, 58 lines: 13 s); here they are parsed once per unit.
// Every header a kernel file uses is included first, at file scope, so the #includes inside the
// files are no-ops (all have include guards); each file sits in a namespace of its own, so helpers
// with the same name in two files (`share`, `fV`, ...) cannot collide.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "linear_f32.h"
#include "paged_attention.h"

namespace exaflop_paged_attention {
#include "paged_attention.cpp"
}
namespace exaflop_linear_row {
#include "linear_row.cpp"
}
namespace exaflop_linear_f32 {
#include "linear_f32.cpp"
}
namespace exaflop_decode_f32 {
#include "decode_f32.cpp"
}
