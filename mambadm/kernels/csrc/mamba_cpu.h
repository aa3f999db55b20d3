// The selective scan's forward (mamba_cpu.cpp) for the other source files of the CPU extension.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace mambadm {

// Arguments and results as the `mambadm_cpu::scan_forward` op's (see mamba_cpu.cpp): {out, last state, chunk-start
// states (empty unless save_starts)}.
std::vector<at::Tensor> selective_scan_forward(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool softplus, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& delta_proj, int64_t chunk,
    bool save_starts);

}  // namespace mambadm
