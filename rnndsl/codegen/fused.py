"""The fused kernel: a linear recurrence's coefficient math and its scan as one generated C++ loop.

For an update ``s' = a * s + b`` (rnndsl/codegen/parallel.py), ``a`` and ``b`` are elementwise
functions of values computed before the scan (GEMM outputs, their slices, parameters). The
parallel scan computes them with one torch op per node, each a pass over a ``(T, batch, hidden)``
tensor, forward and again backward, then scans. Here the nodes between those values (the
kernel's *leaves*) and ``a``, ``b`` are written as C++ on ATen's SIMD vectors
(``at::vec::Vectorized``, the type ATen's own CPU kernels use, with the same exp and tanh), and
one loop over time runs them and the scan: forward, one pass over the leaves writing the states;
backward, one pass back in time that recomputes the coefficients, carries the scan's gradient
and applies each node's derivative rule, writing the leaves' gradients.

What the kernel computes is decided here, from the IR: a node joins it when its op has a C++ rule
below, it varies per step (free of every state, as ``a`` and ``b`` are), and it has the state's
shape; any other value it reads is a leaf, computed by torch as before. Nothing here imports
torch; rnndsl/fused_scan.py builds and runs the source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Dict, List, Set, Tuple

from ..dependency import Dependence, dependencies
from ..ir import Graph, Node, Op


def _infix(symbol: str) -> Callable[[List[str]], str]:
    return lambda a: f"{a[0]} {symbol} {a[1]}"


def _method(name: str) -> Callable[[List[str]], str]:
    return lambda a: f"{a[0]}.{name}()"


# A node's value as a C++ expression of its inputs' (``V`` is the vector type).
_VALUES: Dict[Op, Callable[[List[str]], str]] = {
    Op.NEG: _method("neg"),
    Op.ADD: _infix("+"),
    Op.SUB: _infix("-"),
    Op.MUL: _infix("*"),
    Op.DIV: _infix("/"),
    Op.TANH: _method("tanh"),
    Op.EXP: _method("exp"),
    Op.LOG: _method("log"),
    # ATen's sigmoid, silu and softplus kernels, term for term; softplus is x itself above 20.
    Op.SIGMOID: lambda a: f"V(1) / (V(1) + {a[0]}.neg().exp())",
    Op.SILU: lambda a: f"{a[0]} / (V(1) + {a[0]}.neg().exp())",
    Op.SOFTPLUS: lambda a: f"V::blendv({a[0]}.exp().log1p(), {a[0]}, {a[0]} > V(20))",
    Op.RELU: lambda a: f"at::vec::clamp_min({a[0]}, V(0))",
}

# Each input's gradient contribution, from the node's gradient ``g``, its inputs ``a`` and its value
# ``y``; None where the input gets none. torch's derivative formulas for the same ops.
_GRADIENTS: Dict[Op, Callable[[str, List[str], str], List[str]]] = {
    Op.NEG: lambda g, a, y: [f"{g}.neg()"],
    Op.ADD: lambda g, a, y: [g, g],
    Op.SUB: lambda g, a, y: [g, f"{g}.neg()"],
    Op.MUL: lambda g, a, y: [f"{g} * {a[1]}", f"{g} * {a[0]}"],
    # torch's -g * ((a / b) / b): b * b would overflow or underflow where the quotient does not.
    Op.DIV: lambda g, a, y: [f"{g} / {a[1]}", f"({g} * (({a[0]} / {a[1]}) / {a[1]})).neg()"],
    Op.SIGMOID: lambda g, a, y: [f"{g} * (V(1) - {y}) * {y}"],
    Op.TANH: lambda g, a, y: [f"{g} * (V(1) - {y} * {y})"],
    Op.EXP: lambda g, a, y: [f"{g} * {y}"],
    Op.LOG: lambda g, a, y: [f"{g} / {a[0]}"],
    # threshold_backward's test, so a NaN passes its gradient as torch's does.
    Op.RELU: lambda g, a, y: [f"V::blendv({g}, V(0), {y} <= V(0))"],
    Op.SILU: lambda g, a, y: [f"{g} * (V(1) / (V(1) + {a[0]}.neg().exp())) * "
                              f"(V(1) + {a[0]} * (V(1) - V(1) / (V(1) + {a[0]}.neg().exp())))"],
    Op.SOFTPLUS: lambda g, a, y: [f"V::blendv({g} * ({a[0]}.exp() / ({a[0]}.exp() + V(1))), {g}, {a[0]} > V(20))"],
}

FUSED_OPS = frozenset(_VALUES)


@dataclass(frozen=True)
class FusedKernelCode:
    """A generated kernel for ``state' = a * state + b``: the C++ source, and the nodes whose
    values it reads (its leaves), in the order the caller passes them."""

    state: str
    leaves: Tuple[str, ...]
    source: str


def fused_kernel(graph: Graph, state: str, a: str, b: str, leaves_only: Collection[str] = (),
                 origin: str = "") -> FusedKernelCode:
    """The kernel running ``state' = a * state + b`` with the math of ``a`` and ``b``.

    ``leaves_only`` names values the caller computes anyway in its own way (a GEMM's bias-adding
    sum), which stay leaves even where an op of theirs has a rule here.
    """
    nodes = graph.node_map()
    found = dependencies(graph)
    shape = nodes[state].shape
    region = _region(nodes, (a, b), lambda node: (node.op in FUSED_OPS and found[node.name] is Dependence.INPUT
                                                  and node.shape == shape and node.name not in leaves_only))
    order = [node for node in graph.nodes if node.name in region]  # graph order is topological
    leaves: List[str] = []
    for name in [a, b] + [i for node in order for i in node.inputs]:
        if name not in region and name not in leaves and nodes[name].op is not Op.CONST:
            leaves.append(name)
    writer = _Writer(nodes, leaves)
    forward = writer.values(order)
    source = _SOURCE.format(
        origin=origin or graph.name, state=state, a=a, b=b,
        leaves="\n".join(f"//   leaves[{i}]: {name}" for i, name in enumerate(leaves)),
        forward_values=_indent(forward, 10), a_value=writer.ref(a), b_value=writer.ref(b),
        backward_values=_indent(forward, 10),
        gradients=_indent(writer.gradients(order, a, b), 10))
    return FusedKernelCode(state, tuple(leaves), source)


def _region(nodes: Dict[str, Node], roots: Tuple[str, ...], joins: Callable[[Node], bool]) -> Set[str]:
    """The nodes ``joins`` admits that reach a root through admitted nodes only."""
    region: Set[str] = set()
    stack = [name for name in roots if joins(nodes[name])]
    while stack:
        name = stack.pop()
        if name not in region:
            region.add(name)
            stack.extend(i for i in nodes[name].inputs if joins(nodes[i]))
    return region


class _Writer:
    """C++ statements over vectors: each node a ``const V`` named after it, each leaf ``leaf<i>``."""

    def __init__(self, nodes: Dict[str, Node], leaves: List[str]):
        self.nodes = nodes
        self.leaves = {name: f"leaf{i}" for i, name in enumerate(leaves)}

    def ref(self, name: str) -> str:
        node = self.nodes[name]
        if node.op is Op.CONST:
            return f"V(scalar_t({float(node.attr('value'))!r}))"
        return self.leaves.get(name, f"v_{name}")

    def values(self, order: List[Node]) -> List[str]:
        lines = [f"const V {ref} = load(leaves[{i}], t, b, u, n);" for i, ref in enumerate(self.leaves.values())]
        for node in order:
            lines.append(f"const V v_{node.name} = {_VALUES[node.op]([self.ref(i) for i in node.inputs])};")
        return lines

    def gradients(self, order: List[Node], a: str, b: str) -> List[str]:
        """Reverse mode over ``order`` from ``grad_a`` and ``grad_b``; each leaf's gradient stored."""
        terms: Dict[str, List[str]] = {}
        terms.setdefault(a, []).append("grad_a")
        terms.setdefault(b, []).append("grad_b")
        lines = []
        for node in reversed(order):
            if node.name not in terms:
                continue
            grad = f"d_{node.name}"
            lines.append(f"const V {grad} = {' + '.join(terms.pop(node.name))};")
            contributions = _GRADIENTS[node.op](grad, [self.ref(i) for i in node.inputs], f"v_{node.name}")
            for name, term in zip(node.inputs, contributions):
                if self.nodes[name].op is not Op.CONST:
                    terms.setdefault(name, []).append(term)
        for i, name in enumerate(self.leaves):
            total = " + ".join(terms.get(name, ["V(0)"]))
            lines.append(f"({total}).store(grad_leaves[{i}].address(t, b, u), n);")
        return lines


def _indent(lines: List[str], spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in lines)


# Lanes (batch x hidden) split into tasks of one example's block of units; each thread runs the
# whole sequence over a contiguous range of tasks, step by step, so that each step reads one
# contiguous stretch of every tensor (task by task, the rows of one step lie a page apart).
_SOURCE = """\
// Generated by rnndsl from {origin}. Edit the .cell file, not this code.
// {state}' = a * {state} + b, a = {a}, b = {b}, over all steps, in one loop over time.
// leaves: (T, batch, hidden) views, units contiguous (stride 1) or broadcast (stride 0):
{leaves}
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {{

constexpr int64_t kBlock = 256;  // units per task

template <typename scalar_t>
struct Leaf {{
  const scalar_t* data;
  int64_t step_stride, batch_stride, unit_stride;
}};

// Where a leaf's gradient goes: a (T, batch, hidden) view, units contiguous.
template <typename scalar_t>
struct Gradient {{
  scalar_t* data;
  int64_t step_stride, batch_stride;
  scalar_t* address(int64_t t, int64_t b, int64_t u) const {{ return data + t * step_stride + b * batch_stride + u; }}
}};

template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> load(const Leaf<scalar_t>& leaf, int64_t t, int64_t b, int64_t u, int64_t n) {{
  const scalar_t* p = leaf.data + t * leaf.step_stride + b * leaf.batch_stride + u * leaf.unit_stride;
  return leaf.unit_stride == 0 ? at::vec::Vectorized<scalar_t>(*p) : at::vec::Vectorized<scalar_t>::loadu(p, n);
}}

template <typename scalar_t>
void forward(const Leaf<scalar_t>* leaves, const scalar_t* s0, scalar_t* states, int64_t steps, int64_t batch,
             int64_t hidden) {{
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t blocks = (hidden + kBlock - 1) / kBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {{
    for (int64_t t = 0; t < steps; ++t) {{
      for (int64_t task = begin; task < end; ++task) {{
        const int64_t b = task / blocks, lo = task % blocks * kBlock, hi = std::min(hidden, lo + kBlock);
        const scalar_t* previous = t == 0 ? s0 + b * hidden : states + ((t - 1) * batch + b) * hidden;
        for (int64_t u = lo; u < hi; u += V::size()) {{
          const int64_t n = std::min<int64_t>(V::size(), hi - u), offset = (t * batch + b) * hidden + u;
{forward_values}
          const V a = {a_value}, b_ = {b_value};
          (a * V::loadu(previous + u, n) + b_).store(states + offset, n);
        }}
      }}
    }}
  }});
}}

// g_t = dL/ds_t + a_(t+1) * g_(t+1); dL/da_t = g_t * s_(t-1), dL/db_t = g_t; dL/ds0 = a_1 * g_1.
template <typename scalar_t>
void backward(const Leaf<scalar_t>* leaves, const scalar_t* s0, const scalar_t* states, const scalar_t* grad_states,
              const Gradient<scalar_t>* grad_leaves, scalar_t* grad_s0, int64_t steps, int64_t batch, int64_t hidden) {{
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t blocks = (hidden + kBlock - 1) / kBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {{
    // g_(t+1) and a_(t+1) of the tasks' units, kBlock per task
    std::vector<scalar_t> carried_((end - begin) * kBlock, scalar_t(0)), next_a_((end - begin) * kBlock, scalar_t(0));
    for (int64_t t = steps - 1; t >= 0; --t) {{
      for (int64_t task = begin; task < end; ++task) {{
        const int64_t b = task / blocks, lo = task % blocks * kBlock, hi = std::min(hidden, lo + kBlock);
        scalar_t* carried = carried_.data() + (task - begin) * kBlock - lo;
        scalar_t* next_a = next_a_.data() + (task - begin) * kBlock - lo;
        const scalar_t* previous = t == 0 ? s0 + b * hidden : states + ((t - 1) * batch + b) * hidden;
        for (int64_t u = lo; u < hi; u += V::size()) {{
          const int64_t n = std::min<int64_t>(V::size(), hi - u), offset = (t * batch + b) * hidden + u;
{backward_values}
          const V a = {a_value};
          const V g = V::loadu(grad_states + offset, n) + V::loadu(next_a + u, n) * V::loadu(carried + u, n);
          g.store(carried + u, n);
          a.store(next_a + u, n);
          const V grad_a = g * V::loadu(previous + u, n), grad_b = g;
{gradients}
        }}
      }}
    }}
    for (int64_t task = begin; task < end; ++task) {{
      const int64_t b = task / blocks, lo = task % blocks * kBlock, hi = std::min(hidden, lo + kBlock);
      const scalar_t* carried = carried_.data() + (task - begin) * kBlock - lo;
      const scalar_t* next_a = next_a_.data() + (task - begin) * kBlock - lo;
      for (int64_t u = lo; u < hi; u += V::size()) {{
        const int64_t n = std::min<int64_t>(V::size(), hi - u);
        (V::loadu(next_a + u, n) * V::loadu(carried + u, n)).store(grad_s0 + b * hidden + u, n);
      }}
    }}
  }});
}}

template <typename scalar_t>
std::vector<Gradient<scalar_t>> gradients_of(void* const* data, const int64_t* strides, int64_t count) {{
  std::vector<Gradient<scalar_t>> gradients;
  for (int64_t i = 0; i < count; ++i)
    gradients.push_back({{static_cast<scalar_t*>(data[i]), strides[2 * i], strides[2 * i + 1]}});
  return gradients;
}}

template <typename scalar_t>
std::vector<Leaf<scalar_t>> leaves_of(const void* const* data, const int64_t* strides, int64_t count) {{
  std::vector<Leaf<scalar_t>> leaves;
  for (int64_t i = 0; i < count; ++i)
    leaves.push_back({{static_cast<const scalar_t*>(data[i]), strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]}});
  return leaves;
}}

}}  // namespace

// The entry points rnndsl/fused_scan.py calls; `is_double` picks float64 over float32.
extern "C" void rnndsl_forward(int is_double, const void* const* leaf_data, const int64_t* leaf_strides,
                               int64_t leaf_count, const void* s0, void* states, int64_t steps, int64_t batch,
                               int64_t hidden) {{
  if (is_double)
    forward(leaves_of<double>(leaf_data, leaf_strides, leaf_count).data(), static_cast<const double*>(s0),
            static_cast<double*>(states), steps, batch, hidden);
  else
    forward(leaves_of<float>(leaf_data, leaf_strides, leaf_count).data(), static_cast<const float*>(s0),
            static_cast<float*>(states), steps, batch, hidden);
}}

extern "C" void rnndsl_backward(int is_double, const void* const* leaf_data, const int64_t* leaf_strides,
                                int64_t leaf_count, const void* s0, const void* states, const void* grad_states,
                                void* const* grad_leaves, const int64_t* grad_strides, void* grad_s0,
                                int64_t steps, int64_t batch, int64_t hidden) {{
  if (is_double)
    backward(leaves_of<double>(leaf_data, leaf_strides, leaf_count).data(), static_cast<const double*>(s0),
             static_cast<const double*>(states), static_cast<const double*>(grad_states),
             gradients_of<double>(grad_leaves, grad_strides, leaf_count).data(), static_cast<double*>(grad_s0), steps,
             batch, hidden);
  else
    backward(leaves_of<float>(leaf_data, leaf_strides, leaf_count).data(), static_cast<const float*>(s0),
             static_cast<const float*>(states), static_cast<const float*>(grad_states),
             gradients_of<float>(grad_leaves, grad_strides, leaf_count).data(), static_cast<float*>(grad_s0), steps,
             batch, hidden);
}}
"""
