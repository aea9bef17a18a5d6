// The linear recurrence s_t = a_t * s_{t-1} + b_t on CPU as one loop over time, lanes
// (batch x hidden) side by side: one pass over a and b forward, one over the gradient,
// a and the states backward (rnndsl/linear_scan.py's chunked scan makes five or six).
// Every tensor comes contiguous, (T, lanes) in effect; threads split the lanes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

// Lanes per task: enough that a thread's share of one step fills cache lines and SIMD registers.
constexpr int64_t kGrain = 256;

// out = a * x + y over lanes [lo, hi); restrict lets the compiler vectorize the loop.
template <typename scalar_t>
void step(const scalar_t* __restrict__ a, const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
          scalar_t* __restrict__ out, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) out[i] = a[i] * x[i] + y[i];
}

template <typename scalar_t>
void product(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
             int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) out[i] = x[i] * y[i];
}

torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& s0) {
  auto states = torch::empty_like(b);
  const int64_t steps = a.size(0), lanes = s0.numel();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_recurrence_forward", [&] {
    const scalar_t* A = a.const_data_ptr<scalar_t>();
    const scalar_t* B = b.const_data_ptr<scalar_t>();
    const scalar_t* S0 = s0.const_data_ptr<scalar_t>();
    scalar_t* S = states.data_ptr<scalar_t>();
    at::parallel_for(0, lanes, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t row = t * lanes;
        step(A + row, t > 0 ? S + row - lanes : S0, B + row, S + row, lo, hi);
      }
    });
  });
  return states;
}

// g_t = grad_t + a_{t+1} * g_{t+1} from g_T = grad_T; dL/db = g, dL/da_t = g_t * s_{t-1},
// dL/ds0 = a_1 * g_1 (1-based, as in linear_scan.py), all in the same pass back in time.
std::vector<torch::Tensor> backward(const torch::Tensor& grad, const torch::Tensor& a, const torch::Tensor& s0,
                                    const torch::Tensor& states) {
  auto g = torch::empty_like(grad), grad_a = torch::empty_like(grad), grad_s0 = torch::empty_like(s0);
  const int64_t steps = a.size(0), lanes = s0.numel();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_recurrence_backward", [&] {
    const scalar_t* dS = grad.const_data_ptr<scalar_t>();
    const scalar_t* A = a.const_data_ptr<scalar_t>();
    const scalar_t* S0 = s0.const_data_ptr<scalar_t>();
    const scalar_t* S = states.const_data_ptr<scalar_t>();
    scalar_t* G = g.data_ptr<scalar_t>();
    scalar_t* dA = grad_a.data_ptr<scalar_t>();
    scalar_t* dS0 = grad_s0.data_ptr<scalar_t>();
    at::parallel_for(0, lanes, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t row = t * lanes;
        const scalar_t* previous = t > 0 ? S + row - lanes : S0;
        if (t == steps - 1) {
          std::copy(dS + row + lo, dS + row + hi, G + row + lo);
        } else {
          step(A + row + lanes, G + row + lanes, dS + row, G + row, lo, hi);
        }
        product(G + row, previous, dA + row, lo, hi);
      }
      product(A, G, dS0, lo, hi);
    });
  });
  return {grad_a, g, grad_s0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "all states of s_t = a_t * s_{t-1} + b_t");
  m.def("backward", &backward, "the gradients of a, b and s0 from the states' gradient");
}
