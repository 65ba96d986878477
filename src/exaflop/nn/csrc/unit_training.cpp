// One translation unit for the training kernels (why, and how the files are included: see
// unit_serving.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "amx.h"

namespace exaflop_cross_entropy {
#include "cross_entropy.cpp"
}
namespace exaflop_attention_amx {
#include "attention_amx.cpp"
}
namespace exaflop_wgrad_amx {
#include "wgrad_amx.cpp"
}
namespace exaflop_rmsnorm {
#include "rmsnorm.cpp"
}
namespace exaflop_swiglu {
#include "swiglu.cpp"
}
namespace exaflop_embedding {
#include "embedding.cpp"
}
