"""The language's everyday functions, one small cell each, against hand-written PyTorch.

For every function: the cell compiles on both backends; one step and a sequence (through
``rnndsl.scan``) agree in float64 with a reference written directly in torch, outputs and
gradients with respect to the input, the state and every parameter; and
``torch.autograd.gradcheck`` holds for the derived backward. Subgradients (max, min, clamp,
where) follow torch's conventions, so they equal autograd of the reference. Then the errors:
each misuse is a CellError at its line and column.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F

import rnndsl
from rnndsl.cellspec import load_source
from rnndsl.derived import DerivedSequence
from rnndsl.errors import CellError
from rnndsl.options import CELL_BACKENDS as BACKENDS

TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def cell_source(*lines: str) -> str:
    """A one-state cell with a pre-activation ``a`` that depends on the input and the state."""
    return "\n".join(["cell f(x[input]) -> h {", "  state h[hidden]", "  param W[hidden, input], U[hidden, hidden]",
                      *(f"  {line}" for line in lines), "}", ""])


def pre(p, h, x):
    return x @ p["W"].t() + h @ p["U"].t()


# name -> (lines of the cell after `a = W @ x + U @ h`, the next h from (params, a, h, x))
CASES: Dict[str, tuple] = {
    "gelu": (["h' = gelu(a)"], lambda p, a, h, x: F.gelu(a)),
    "elu": (["h' = elu(a)"], lambda p, a, h, x: F.elu(a)),
    "selu": (["h' = selu(a)"], lambda p, a, h, x: torch.selu(a)),
    "mish": (["h' = mish(a)"], lambda p, a, h, x: F.mish(a)),
    "logsigmoid": (["h' = logsigmoid(a)"], lambda p, a, h, x: F.logsigmoid(a)),
    "hardtanh": (["h' = hardtanh(3 * a)"], lambda p, a, h, x: F.hardtanh(3 * a)),
    "hardsigmoid": (["h' = hardsigmoid(6 * a)"], lambda p, a, h, x: F.hardsigmoid(6 * a)),
    "softsign": (["h' = softsign(a)"], lambda p, a, h, x: F.softsign(a)),
    "sin_cos": (["h' = sin(a) * cos(h)"], lambda p, a, h, x: torch.sin(a) * torch.cos(h)),
    "log1p_expm1": (["h' = log1p(sigmoid(a)) + expm1(tanh(h))"],
                    lambda p, a, h, x: torch.log1p(torch.sigmoid(a)) + torch.expm1(torch.tanh(h))),
    "erf": (["h' = erf(a)"], lambda p, a, h, x: torch.erf(a)),
    "power": (["hyper k = 1.5", "h' = tanh(tanh(a) ** 2 + pow(sigmoid(h), k) - 0.5 * sigmoid(a) ** -1)"],
              lambda p, a, h, x: torch.tanh(torch.tanh(a) ** 2 + torch.sigmoid(h) ** 1.5
                                            - 0.5 * torch.sigmoid(a) ** -1)),
    "max_min": (["h' = max(tanh(a), h) + min(a, U @ h)"],
                lambda p, a, h, x: torch.maximum(torch.tanh(a), h) + torch.minimum(a, h @ p["U"].t())),
    "max_min_number": (["h' = max(a, 0.1) - min(-0.2, h)"],
                       lambda p, a, h, x: torch.clamp(a, min=0.1) - torch.clamp(h, max=-0.2)),
    "clamp": (["h' = clamp(a, -0.5, 0.25) + clamp(h, -1, 1)"],
              lambda p, a, h, x: torch.clamp(a, -0.5, 0.25) + torch.clamp(h, -1, 1)),
    "where": (["h' = where(a > h, tanh(a), h) + where(a <= 0.1, 0.0, a) + where(0.2 >= h, h, 1.0)"
               " - where(h < a, a, h)"],
              lambda p, a, h, x: (torch.where(a > h, torch.tanh(a), h) + torch.where(a <= 0.1, 0.0, a)
                                  + torch.where(0.2 >= h, h, 1.0) - torch.where(h < a, a, h))),
    "sum_mean": (["h' = tanh(a - mean(a) + 0.1 * sum(h))"],
                 lambda p, a, h, x: torch.tanh(a - a.mean(-1, keepdim=True) + 0.1 * h.sum(-1, keepdim=True))),
    "softmax": (["h' = softmax(a) + 0.5 * h"], lambda p, a, h, x: torch.softmax(a, -1) + 0.5 * h),
    "logsumexp": (["h' = tanh(a - logsumexp(a)) * logsumexp(x)"],
                  lambda p, a, h, x: torch.tanh(a - torch.logsumexp(a, -1, keepdim=True))
                  * torch.logsumexp(x, -1, keepdim=True)),
    "scalar_params": (["param s, g[] = 0.5", "h' = tanh(s * a + g) * mean(h) + s"],
                      lambda p, a, h, x: torch.tanh(p["s"] * a + p["g"]) * h.mean(-1, keepdim=True) + p["s"]),
    "buffer": (["buffer ones[hidden] = 1.0, decay = 0.5", "h' = tanh(a) * ones + decay * h"],
               lambda p, a, h, x: torch.tanh(a) + 0.5 * h),
    "numbers_folded": (["hyper k = 0.3", "h' = sigmoid(k) * tanh(a) + exp(-k) * h + gelu(k) + max(k, 0.5)"
                        " + clamp(sqrt(k), 0.0, 0.5) + softplus(log(k)) * elu(-k) ** 2"],
                       lambda p, a, h, x: (torch.sigmoid(torch.tensor(0.3, dtype=torch.float64)).item() * torch.tanh(a)
                                           + math.exp(-0.3) * h + F.gelu(torch.tensor(0.3, dtype=torch.float64)).item() + 0.5
                                           + min(math.sqrt(0.3), 0.5)
                                           + F.softplus(torch.tensor(math.log(0.3), dtype=torch.float64)).item() * math.expm1(-0.3) ** 2)),
}


def load(source: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnndsl.CellWarning)
        return load_source(source)["f"]


def spec_of(name: str):
    lines, _ = CASES[name]
    return load(cell_source("a = W @ x + U @ h", *lines))


def reference_step(name: str, params, h, x):
    return CASES[name][1](params, pre(params, h, x), h, x)


def _parameters(cell, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
            for name, p in cell.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_function_matches_torch(name: str, backend: str):
    cell = spec_of(name).build(3, 4, backend, scan="sequential").double()
    values = _parameters(cell, seed=1)
    with torch.no_grad():
        for key, parameter in cell.named_parameters():
            parameter.copy_(values[key])
    generator = torch.Generator().manual_seed(2)
    xs = torch.randn(5, 2, 3, generator=generator, dtype=torch.float64)
    h0 = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 2, generator=generator) < 0.7

    def ours(xs, h, params):
        return rnndsl.scan(cell, xs, (h,), mask)

    def theirs(xs, h, params):
        outputs = []
        for t in range(xs.size(0)):
            new = reference_step(name, params, h, xs[t])
            h = torch.where(mask[t].unsqueeze(1), new, h)
            outputs.append(new * mask[t].unsqueeze(1))
        return torch.stack(outputs), (h,)

    results = []
    for function, params in ((ours, dict(cell.named_parameters())),
                             (theirs, {k: v.clone().requires_grad_() for k, v in values.items()})):
        x, h = xs.clone().requires_grad_(), h0.clone().requires_grad_()
        outputs, (final,) = function(x, h, params)
        weights = torch.Generator().manual_seed(3)
        loss = sum((r * torch.randn(r.shape, generator=weights, dtype=r.dtype)).sum() for r in (outputs, final))
        grads = torch.autograd.grad(loss, [x, h, *params.values()])
        results.append([outputs, final, *grads])
        # One step, as the cell's forward.
        if function is ours:
            step = cell((h0,), xs[0])[1]
        else:
            step = reference_step(name, params, h0, xs[0])
        results[-1].append(step)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_of_the_derived_backward(name: str):
    cell = spec_of(name).build(3, 4, "script", scan="sequential").double().eval()
    values = _parameters(cell, seed=4)
    with torch.no_grad():
        for key, parameter in cell.named_parameters():
            parameter.copy_(values[key])
    generator = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 2, 3, generator=generator, dtype=torch.float64)
    h = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(3, 2, generator=generator) < 0.7

    def function(xs, *tensors):
        return DerivedSequence.apply(cell, xs, mask, 1, *tensors)

    arguments = [xs.requires_grad_(True), h.requires_grad_(True), *cell.parameters()]
    assert torch.autograd.gradcheck(function, arguments)
