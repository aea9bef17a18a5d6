"""Gradients under PyTorch's own parameter machinery, on every backend, against torch.nn.

The drop-ins run torch's parameters through rnndsl's cells; whatever a user does to those
parameters (reassign, tie, parametrize, prune, swap with functional_call, build on meta) the
gradients must be torch's own, and so must higher derivatives and torch.func's transforms.
Each case once silently gave wrong gradients on the script backend, whose backward read the
module's parameters at backward time instead of the tensors the forward used.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import rnndsl
from rnndsl.resources import stock_cell_names

BACKENDS = ["script", "eager", "native"]


def pair(backend: str, cls: str = "LSTM", **kwargs):
    """torch.nn's network and rnndsl's, with the same parameters, float64."""
    torch.manual_seed(1)
    reference = getattr(nn, cls)(3, 5, dtype=torch.float64, **kwargs)
    ours = getattr(rnndsl, cls)(3, 5, backend=backend, dtype=torch.float64, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def assert_same_gradients(reference: nn.Module, ours: nn.Module, seed: int = 2) -> None:
    """Same outputs and the same gradient for the input and every parameter the module has now."""
    results = []
    for module in (reference, ours):
        torch.manual_seed(seed)  # parametrizations may draw (spectral_norm's power iteration)
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7),
                        requires_grad=True)
        output, _ = module(x)
        parameters = [p for p in module.parameters() if p.requires_grad]
        weights = torch.linspace(-1, 1, output.size(-1), dtype=torch.float64)
        grads = torch.autograd.grad((output * weights).square().sum(),
                                    [x] + parameters)
        results.append((output, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    assert_pairwise_close(grads_a, grads_b)


def assert_pairwise_close(reference: list, ours: list) -> None:
    """torch's results and ours, one by one, in float64's tolerance."""
    assert len(reference) == len(ours)
    for want, got in zip(reference, ours):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _reassign(module):
    module.weight_hh_l0 = nn.Parameter(module.weight_hh_l0.detach() * 2)


def _assign_state(module):
    state = {k: v.detach() * 1.5 for k, v in module.state_dict().items()}
    module.load_state_dict(state, assign=True)


def _weight_norm(module):
    parametrizations.weight_norm(module, "weight_hh_l0")


def _spectral_norm(module):
    torch.manual_seed(3)
    # In training, as here, every read of the weight runs a power iteration: the drop-ins read it
    # as often as torch.nn.LSTM does, so that the same calls give the same norm.
    parametrizations.spectral_norm(module, "weight_ih_l0")


def _prune(module):
    torch.manual_seed(4)
    prune.random_unstructured(module, "weight_hh_l0", amount=0.4)


MUTATIONS = {"reassigned": _reassign, "load_state_dict(assign=True)": _assign_state,
             "weight_norm": _weight_norm, "spectral_norm": _spectral_norm, "prune": _prune}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_parameters_changed_after_construction(backend, mutation):
    reference, ours = pair(backend)
    for module in (reference, ours):
        MUTATIONS[mutation](module)
    assert_same_gradients(reference, ours)


CELL_HOOKS = {"prune": lambda cell: prune.l1_unstructured(cell, "weight_hh", amount=0.5),
              "weight_norm (the hook form)": lambda cell: nn.utils.weight_norm(cell, "weight_hh")}


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", list(CELL_HOOKS))
def test_a_cells_forward_hooks_run_inside_a_network(backend, hook):
    """prune and the old weight_norm compute the weight in a forward pre-hook of the cell. The
    networks ran the cell's whole-sequence method, which no hook sees: the weight of the hook's
    first call stayed, stale after an optimizer step (and a second backward through it failed)."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("lstm", 3, [5], backend=backend, save_hidden=False).double()
    cell = net.network.layers[0].cell
    CELL_HOOKS[hook](cell)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the second step reads what the first one changed
        net(x)[0].square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    reference = nn.LSTM(3, 5, dtype=torch.float64)
    for name in ("weight_ih", "bias_ih", "bias_hh"):
        setattr(reference, f"{name}_l0", nn.Parameter(getattr(cell, name).detach().clone()))
    pruned = "weight_hh_orig" in dict(cell.named_parameters())
    effective = (cell.weight_hh_orig * cell.weight_hh_mask if pruned
                 else torch._weight_norm(cell.weight_hh_v, cell.weight_hh_g, 0))
    reference.weight_hh_l0 = nn.Parameter(effective.detach().clone())
    torch.testing.assert_close(net(x)[0], reference(x)[0], rtol=1e-10, atol=1e-12)


# How the network is made, and which parameter becomes which.
TIES = {"across layers": (dict(num_layers=3), {"weight_hh_l1": "weight_hh_l0", "weight_hh_l2": "weight_hh_l0"}),
        "across directions": (dict(bidirectional=True), {"weight_hh_l0_reverse": "weight_hh_l0",
                                                         "weight_ih_l0_reverse": "weight_ih_l0"})}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", list(TIES))
def test_tied_weights(backend, tie):
    kwargs, ties = TIES[tie]
    reference, ours = pair(backend, **kwargs)
    for module in (reference, ours):
        for name, shared in ties.items():
            setattr(module, name, getattr(module, shared))
    assert_same_gradients(reference, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_module_params_on_conversion(backend):
    reference, ours = pair(backend)
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        reference, ours = reference.float().double(), ours.float().double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert_same_gradients(reference, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_with_other_parameters(backend):
    reference, ours = pair(backend)
    torch.manual_seed(5)
    others = {k: torch.randn_like(v, requires_grad=True) for k, v in reference.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    grads = []
    for module in (reference, ours):
        output, _ = torch.func.functional_call(module, others, (x,))
        grads.append(torch.autograd.grad(output.square().sum(), list(others.values())))
    assert_pairwise_close(*grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_construction_then_to_empty(backend):
    reference, _ = pair(backend)
    with torch.device("meta"):
        ours = rnndsl.LSTM(3, 5, backend=backend, dtype=torch.float64)
    ours = ours.to_empty(device="cpu")
    ours.load_state_dict(reference.state_dict())
    assert_same_gradients(reference, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_edited_in_place_between_forward_and_backward_raises(backend):
    _, ours = pair(backend)
    output, _ = ours(torch.randn(4, 2, 3, dtype=torch.float64))
    with torch.no_grad():
        ours.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


# Higher-order and functional autograd ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_gradcheck_batched_and_gradgradcheck(backend, cls):
    _, ours = pair(backend, cls)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = ours.weight_hh_l0

    def run(x, h, weight):
        hx = (h, h.tanh()) if cls == "LSTM" else h
        output, _ = torch.func.functional_call(ours, {"weight_hh_l0": weight}, (x, hx))
        return output

    assert torch.autograd.gradcheck(run, (x, h, weight), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(run, (x, h, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_torch(backend):
    """Double backward: the gradient of a gradient's norm (WGAN-GP style)."""
    reference, ours = pair(backend)
    results = []
    for module in (reference, ours):
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                        requires_grad=True)
        output, _ = module(x)
        grad_x, = torch.autograd.grad(output.sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), list(module.parameters())))
    assert_pairwise_close(*results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_match_torch(backend):
    reference, ours = pair(backend)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    found = []
    for module in (reference, ours):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, x, module=module):
            return torch.func.functional_call(module, p, (x,))[0].square().sum()

        grads = torch.func.grad(loss)(params, x)
        if module is reference or backend == "native":  # torch's kernel fails under vmap: one at a time
            per_example = torch.stack([torch.func.grad(loss)(params, x[:, i])["weight_ih_l0"]
                                       for i in range(x.size(1))])
        else:
            per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, x)["weight_ih_l0"]
        jacobian = torch.func.jacrev(lambda x, m=module, p=params: torch.func.functional_call(m, p, (x,))[0])(x)
        vectorized = torch.autograd.functional.jacobian(lambda x, m=module: m(x)[0], x, vectorize=True)
        found.append([grads["weight_hh_l0"], per_example, jacobian, vectorized])
    assert_pairwise_close(*found)


def test_plain_training_keeps_the_derived_backward():
    """First-order training on the script backend still runs the derived backward (its speed)."""
    _, ours = pair("script")
    output, _ = ours(torch.randn(4, 2, 3, dtype=torch.float64))
    assert type(output.grad_fn).__name__ == "DerivedSequenceBackward"


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend, scan", [("script", "sequential"), ("script", "auto"), ("eager", "auto")])
def test_every_stock_cell_has_higher_and_batched_derivatives(name, backend, scan):
    """gradcheck (batched too) and gradgradcheck of each stock cell's sequence, through the derived
    backward and, for cells linear in their state (scan="auto"), the parallel scan; in eval mode
    (cells with dropout or zoneout draw no noise then)."""
    spec = rnndsl.load_cell(name)
    if scan == "auto" and spec.parallel_plan()[0] is None and backend == "eager":
        pytest.skip("the eager loop is plain autograd: nothing of rnndsl's own to check")
    torch.manual_seed(0)
    input_size, hidden_size, spatial = (4 if name == "sru" else 3), 4, {}
    if len(spec.input_dims) > 1:
        # gradgradcheck perturbs every element: 2x3 images of 1 and 2 channels keep them a few hundred.
        input_size, hidden_size, spatial = 1, 2, dict(height=2, width=3)
    cell = spec.build(input_size, hidden_size, backend=backend, scan=scan, **spatial).double().eval()
    x = torch.randn(3, 2, cell.input_size, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in cell.state_sizes)
    names = [n for n, _ in cell.named_parameters()]

    def run(x, *tensors):
        state, parameters = tensors[:len(cell.state_sizes)], tensors[len(cell.state_sizes):]
        for key, value in zip(names, parameters):
            cell._parameters[key] = value  # setattr takes only Parameters: swap in, as functional_call does
        outputs, final = cell.forward_sequence(x, state)
        return (outputs, *final)

    inputs = (x, *state, *[p.detach().clone().requires_grad_() for p in cell.parameters()])
    assert torch.autograd.gradcheck(run, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(run, inputs)


@pytest.mark.parametrize("parametrize", [parametrizations.weight_norm, parametrizations.orthogonal])
def test_a_parametrized_scripted_cell_trains_as_the_eager_one(parametrize):
    """A scripted cell is a plain module that binds its TorchScript kernel to the parameters as its
    code reads them: a parametrization's tensor, computed at each call, with its gradient path."""
    torch.manual_seed(0)
    cells = [rnndsl.load_cell("lstm").build(3, 4, backend=backend).double() for backend in ("script", "eager")]
    cells[1].load_state_dict(cells[0].state_dict())
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    state = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    grads, through = [], []
    for cell in cells:
        torch.manual_seed(1)  # orthogonal may draw
        parametrize(cell, "weight_hh")
        outputs, (h, c) = cell.forward_sequence(xs, state)
        (outputs.square().sum() + c.sum()).backward()
        grads.append([p.grad for p in cell.parameters()])
        through.append(type(outputs.grad_fn).__name__)
        single, _ = cell(state, xs[0])  # one step reads the parametrized weight too
        torch.testing.assert_close(single[0], outputs[0], rtol=1e-12, atol=1e-12)
    assert through[0] == "DerivedSequenceBackward"
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_higher_derivatives_when_a_result_depends_on_nothing_differentiated():
    """A state that only doubles itself, from a start that needs no gradient: the recomputed
    backward must leave it out rather than hand autograd a result it cannot differentiate."""
    spec = rnndsl.load_source("cell c(x[input]) -> h {\n    state h[hidden], n[hidden]\n"
                              "    param u[hidden, input]\n    h' = tanh(u @ x + h)\n    n' = n * 2.0\n}\n")["c"]
    cell = spec.build(3, 4, backend="script").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    state = (torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    outputs, _ = cell.forward_sequence(x, state)
    grad_u, = torch.autograd.grad(outputs.square().sum(), cell.u, create_graph=True)
    second, = torch.autograd.grad(grad_u.square().sum(), cell.u)
    eager = spec.build(3, 4, backend="eager").double()
    eager.load_state_dict(cell.state_dict())
    outputs, _ = eager.forward_sequence(x, state)
    grad_u, = torch.autograd.grad(outputs.square().sum(), eager.u, create_graph=True)
    want, = torch.autograd.grad(grad_u.square().sum(), eager.u)
    torch.testing.assert_close(second, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_every_stock_cell_trains_under_cpu_autocast(name, backend):
    """bfloat16 autocast on CPU: forward and backward run, and the gradients are those of the same
    autocast forward on the eager backend (the script backend once mixed bfloat16 and float32 in
    its derived backward, e.g. for layernorm_lstm)."""
    if name in ("convlstm", "convgru"):
        pytest.skip("a spatial cell reads images carried flat, not a (T, batch, 5) input; "
                    "its autocast run is in tests/test_mixed_precision.py")
    size = 8 if name == "sru" else 5  # sru reads x[hidden]
    grads = []
    for build_backend in (backend, "eager"):
        torch.manual_seed(0)
        net = rnndsl.make_recurrent(name, size, [8], backend=build_backend, save_hidden=False)
        x = torch.randn(6, 3, size, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = net(x)
        output.float().square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _forward_mode_tangent(function, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(function(forward_ad.make_dual(x, tangent))).tangent


@pytest.mark.parametrize("name, options", [("lstm", {}), ("lstm", {"derived_backward": False}),
                                           ("mingru", {}), ("gla", {})])
def test_forward_mode_ad_outside_torch_func(name, options):
    """TorchScript's optimized graphs drop forward-mode tangents after their first run (a zero
    Jacobian from the second call), and rnndsl's autograd Functions have no jvp rule: under a dual
    level the cells run plain ops, as under torch.func."""
    torch.manual_seed(0)
    reference = rnndsl.make_recurrent(name, 3, [4], backend="eager", save_hidden=False, scan="sequential").double()
    ours = rnndsl.make_recurrent(name, 3, [4], save_hidden=False, **options).double()
    ours.load_state_dict(reference.state_dict())
    x, dx = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    _, expected = torch.autograd.functional.jvp(lambda v: reference(v)[0], (x,), (dx,))
    for _ in range(3):  # the first run of a TorchScript graph differs from the later, optimized ones
        torch.testing.assert_close(_forward_mode_tangent(lambda v: ours(v)[0], x, dx), expected)
    cell = ours.network.layers[0].cell
    state = tuple(torch.zeros(2, size, dtype=torch.float64) for size in cell.state_sizes)
    for _ in range(3):
        torch.testing.assert_close(_forward_mode_tangent(lambda v: cell(state, v)[1], x[0], dx[0]),
                                   _forward_mode_tangent(lambda v: reference.network.layers[0].cell(state, v)[1],
                                                         x[0], dx[0]))


def _attention_tables():
    """attention_rnn (a buffer, `sharpness`) over time on the eager and script backends, same weights."""
    torch.manual_seed(0)
    eager = rnndsl.load_cell("attention_rnn").build(3, 4, backend="eager").double()
    script = rnndsl.load_cell("attention_rnn").build(3, 4).double()
    script.load_state_dict(eager.state_dict())
    return [rnndsl.RecurrentTable(cell) for cell in (eager, script)]


def test_a_buffer_swapped_for_a_tensor_needing_grad_gets_its_gradient():
    """The derived backward gives buffers no gradient: functional_call with a buffer that needs one
    takes autograd's loop (it gave None on the script backend)."""
    xs, state = torch.randn(5, 2, 3, dtype=torch.float64), (torch.zeros(2, 4, dtype=torch.float64),)
    found = []
    for table in _attention_tables():
        sharpness = table.cell.sharpness.clone().requires_grad_()
        _, outputs = torch.func.functional_call(table, {"cell.sharpness": sharpness}, (state, xs))
        outputs.square().sum().backward()
        found.append(sharpness.grad)
    assert found[1] is not None
    torch.testing.assert_close(found[1], found[0])


@pytest.mark.parametrize("create_graph", [False, True])
def test_the_backward_uses_the_forwards_buffers_and_hyper_parameters(create_graph):
    """A buffer or hyper-parameter reassigned between forward and backward left autograd of the eager
    loop unchanged but changed the script backend's gradient (its backward read them then)."""
    xs, state = torch.randn(5, 2, 3, dtype=torch.float64), (torch.zeros(2, 4, dtype=torch.float64),)
    for table in _attention_tables():
        grads = []
        for reassign in (False, True):
            _, outputs = table(state, xs)
            if reassign:
                table.cell.sharpness = table.cell.sharpness * 5
            grads.append(torch.autograd.grad(outputs.square().sum(), list(table.parameters()),
                                             create_graph=create_graph))
        table.cell.sharpness = table.cell.sharpness / 5
        for before, after in zip(*grads):
            torch.testing.assert_close(after, before)
    torch.manual_seed(0)
    cell = rnndsl.load_cell("lstm_cell_clip").build(3, 4, cell_clip=0.5).double()
    state = (torch.zeros(2, 4, dtype=torch.float64),) * 2
    grads = []
    for reassign in (False, True):
        outputs, _ = cell.forward_sequence(xs * 5, state)
        if reassign:
            cell.cell_clip = 3.0
        grads.append(torch.autograd.grad(outputs.sum(), list(cell.parameters()), create_graph=create_graph))
    for before, after in zip(*grads):
        torch.testing.assert_close(after, before)


def test_vmap_over_a_network_that_saves_its_state_leaves_the_next_call_working():
    """vmap's batched final state used to be saved as the next call's start, which then failed."""
    net = rnndsl.make_recurrent("gru", 3, [4]).double()
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    batched = torch.func.vmap(lambda x: net(x)[0])(xs)
    assert batched.shape == (3, 5, 2, 4)
    torch.testing.assert_close(net(xs[0])[0], batched[0])  # from zeros: nothing saved under vmap
