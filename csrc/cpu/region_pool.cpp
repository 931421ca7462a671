// CPU region_pool: the mean of each region's keys, and its backward.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "key_lists.h"
#include "vec_kernels.h"

namespace gaze::cpu {
namespace {

template <typename scalar_t>
void pool_regions(const PoolArgs& args, at::Tensor& desc) {
  using acc = acc_t<scalar_t>;
  const at::Tensor& keys = args.keys;
  const int64_t B = keys.size(0), H = keys.size(1), R = args.layout.num_regions;
  const int D = static_cast<int>(keys.size(3));
  const LayoutView layout = args.layout.view(keys.size(2));
  const scalar_t* key_data = keys.const_data_ptr<scalar_t>();
  const Strides4 ks = strides_of(keys);
  scalar_t* out = desc.data_ptr<scalar_t>();

  at::parallel_for(0, B * H * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(D), ones(kKeyBlock, acc(1));
    const scalar_t* rows[kKeyBlock];
    std::vector<int32_t> members;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * R), h = (item / R) % H;
      const int32_t r = static_cast<int32_t>(item % R);
      std::fill(sum.begin(), sum.end(), acc(0));
      members.clear();
      append_region_keys(layout, b, r, kNoCausalLimit, members);
      for_each_block(
          members,
          [&](const int32_t* pos, int n, const int32_t*, int) {
            for (int j = 0; j < n; ++j) rows[j] = key_data + ks.offset(b, h, pos[j]);
            accumulate_rows(ones.data(), kKeyBlock, 1, rows, n, D, sum.data());
          });
      store_row(sum.data(), D, region_mean_scale<acc>(layout.region(b, r).size()),
                out + (item * D));
    }
  });
}

template <typename scalar_t>
void pool_regions_backward(const PoolBackwardArgs& args, at::Tensor& grad_keys_acc) {
  using acc = acc_t<scalar_t>;
  const at::Tensor& grad_desc = args.grad_desc;
  const int64_t B = grad_desc.size(0), H = grad_desc.size(1), N = args.num_keys;
  const int32_t R = args.layout.num_regions;
  const int D = static_cast<int>(grad_desc.size(3));
  const LayoutView layout = args.layout.view(N);
  const scalar_t* grad_data = grad_desc.const_data_ptr<scalar_t>();
  const Strides4 gs = strides_of(grad_desc);
  acc* out = grad_keys_acc.data_ptr<acc>();

  // One (b, h) per task: a key listed in several regions is only written by its task.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> grad_row(D), weights(kKeyBlock);
    acc* rows[kKeyBlock];
    std::vector<int32_t> members;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H;
      acc* grad_keys = out + item * N * D;
      for (int32_t r = 0; r < R; ++r) {
        std::fill(weights.begin(), weights.end(), region_mean_scale<acc>(layout.region(b, r).size()));
        load_row(grad_data + gs.offset(b, h, r), D, grad_row.data());
        members.clear();
        append_region_keys(layout, b, r, kNoCausalLimit, members);
        for_each_block(
            members,
            [&](const int32_t* pos, int n, const int32_t*, int) {
              for (int j = 0; j < n; ++j) rows[j] = grad_keys + int64_t(pos[j]) * D;
              scatter_rows(weights.data(), kKeyBlock, 1, grad_row.data(), rows, n, D);
            });
      }
    }
  });
}

// keys [B, Hkv, N, D] -> desc [B, Hkv, R, D]
at::Tensor region_pool_cpu(const at::Tensor& keys, const at::Tensor& region_ptr,
                           const at::Tensor& region_tokens) {
  PoolArgs args = prepare_region_pool(keys, region_ptr, region_tokens);
  at::Tensor desc = at::empty({keys.size(0), keys.size(1), args.layout.num_regions, keys.size(3)},
                              keys.options());
  dispatch_cpu_float_types(keys.scalar_type(), "region_pool", [&](auto tag) {
    pool_regions<decltype(tag)>(args, desc);
  });
  return desc;
}

// grad_desc [B, Hkv, R, D] -> grad_keys [B, Hkv, N, D]
at::Tensor region_pool_backward_cpu(const at::Tensor& grad_desc, const at::Tensor& region_ptr,
                                    const at::Tensor& region_tokens, int64_t num_keys) {
  PoolBackwardArgs args = prepare_region_pool_backward(grad_desc, region_ptr, region_tokens,
                                                       num_keys);
  const auto acc_dtype = grad_desc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_keys = at::zeros({grad_desc.size(0), grad_desc.size(1), num_keys,
                                    grad_desc.size(3)},
                                   grad_desc.options().dtype(acc_dtype));
  dispatch_cpu_float_types(grad_desc.scalar_type(), "region_pool_backward", [&](auto tag) {
    pool_regions_backward<decltype(tag)>(args, grad_keys);
  });
  return grad_keys.to(grad_desc.scalar_type());
}

}  // namespace
}  // namespace gaze::cpu

TORCH_LIBRARY_IMPL(gaze, CPU, m) {
  m.impl("region_pool", &gaze::cpu::region_pool_cpu);
  m.impl("region_pool_backward", &gaze::cpu::region_pool_backward_cpu);
}
