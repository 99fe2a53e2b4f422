// Host-side argument checks shared by the CPU ops (sassha_ops.cpp) and the CUDA ops
// (sassha_cuda.cpp). Torch headers only: not for device code (see sassha_math.h).
#pragma once

#include <ATen/ATen.h>

#include "sassha_math.h"

namespace sassha {

// element_offset: the global probe element of each tensor's first element (a
// shard's place in its unsharded tensor, FSDP2); empty means 0 for every tensor.
inline void check_element_offsets(const char* op, c10::ArrayRef<int64_t> element_offset, at::TensorList tensors) {
  TORCH_CHECK(element_offset.empty() || element_offset.size() == tensors.size(), "sassha_fused::", op, ": got ",
              element_offset.size(), " element_offset values for ", tensors.size(),
              " tensors; pass exactly one entry per parameter, or none (all 0)");
  for (size_t j = 0; j < element_offset.size(); ++j) {
    TORCH_CHECK(element_offset[j] >= 0 && element_offset[j] <= kMaxProbeNumel - tensors[j].numel(),
                "sassha_fused::", op, ": element_offset[", j, "] = ", element_offset[j], " with ", tensors[j].numel(),
                " elements is outside the probes' range [0, 2**37)");
  }
}

}  // namespace sassha
