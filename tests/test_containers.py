"""The scan containers and setup_recurrent, on hand-picked cells.

The hand-written cells wrap ``torch.nn.LSTMCell``/``GRUCell`` in the cell
calling convention (as rnnlib users composed hand-picked modules), so these
tests exercise the containers' Python loop; the compiled cells, with their own
``forward_sequence``, come in through ``rnndsl.load_cell``. References are
plain loops over ``torch.nn`` cells, one sequence at a time.
"""
import pickle

import pytest
import torch
from torch import nn

import rnndsl
from rnndsl.containers import Bidirectional, RecurrentTable, SequenceTable, ZeroState, setup_recurrent
from rnndsl.sequences import reverse_padded

TOL = dict(rtol=1e-10, atol=1e-12)


def randn(*shape, **kwargs):
    return torch.randn(*shape, dtype=torch.float64, **kwargs)


class TorchLSTMCell(nn.Module):
    """torch.nn.LSTMCell in the cell calling convention."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.inner = nn.LSTMCell(input_size, hidden_size)
        self.input_size, self.hidden_size, self.output_size = input_size, hidden_size, hidden_size
        self.state_sizes, self.state_names = [hidden_size, hidden_size], ["h", "c"]

    def forward(self, state, x):
        h, c = self.inner(x, state)
        return (h, c), h


class TorchGRUCell(nn.Module):
    """torch.nn.GRUCell in the cell calling convention."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.inner = nn.GRUCell(input_size, hidden_size)
        self.input_size, self.hidden_size, self.output_size = input_size, hidden_size, hidden_size
        self.state_sizes, self.state_names = [hidden_size], ["h"]

    def forward(self, state, x):
        h = self.inner(x, state[0])
        return (h,), h


def reference(cells, xs, states, lengths=None):
    """Layer by layer, sequence by sequence, each cut to its own length."""
    batch = xs.size(1)
    lengths = [xs.size(0)] * batch if lengths is None else lengths
    outputs = torch.zeros(xs.size(0), batch, cells[-1].output_size, dtype=xs.dtype)
    finals = [[None] * batch for _ in cells]
    for b in range(batch):
        seq = xs[:lengths[b], b:b + 1]
        for depth, cell in enumerate(cells):
            state = tuple(s[b:b + 1] for s in states[depth])
            ys = []
            for x in seq:
                state, y = cell(state, x)
                ys.append(y)
            seq = torch.stack(ys)
            finals[depth][b] = state
        outputs[:lengths[b], b:b + 1] = seq
    finals = tuple(tuple(torch.cat([f[b][k] for b in range(batch)]) for k in range(len(f[0])))
                   for f in finals)
    return outputs, finals


def mixed_cells(compiled=False):
    """An LSTM layer, then a GRU layer of another size: hand-picked per layer."""
    if compiled:
        cells = [rnndsl.load_cell("lstm").build(3, 5), rnndsl.load_cell("gru").build(5, 4)]
    else:
        cells = [TorchLSTMCell(3, 5), TorchGRUCell(5, 4)]
    return [cell.double() for cell in cells]


def random_states(cells, batch):
    return tuple(tuple(randn(batch, n) for n in cell.state_sizes) for cell in cells)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_sequence_of_recurrent_tables_matches_reference(compiled, with_lengths):
    torch.manual_seed(0)
    cells = mixed_cells(compiled)
    net = SequenceTable([RecurrentTable(c) for c in cells])
    xs = randn(6, 3, 3, requires_grad=True)
    states = random_states(cells, 3)
    lengths = [6, 2, 4] if with_lengths else None
    mask = None if lengths is None else torch.arange(6).unsqueeze(1) < torch.tensor(lengths)
    finals, ys = net(states, xs, mask)
    ref_ys, ref_finals = reference(cells, xs, states, lengths)
    torch.testing.assert_close(ys, ref_ys, **TOL)
    torch.testing.assert_close(finals, ref_finals, **TOL)
    grads = torch.autograd.grad(ys.square().sum() + sum(f.sum() for s in finals for f in s),
                                [xs] + list(net.parameters()))
    ref_grads = torch.autograd.grad(ref_ys.square().sum() + sum(f.sum() for s in ref_finals for f in s),
                                    [xs] + list(net.parameters()))
    torch.testing.assert_close(grads, ref_grads, **TOL)


@pytest.mark.parametrize("compiled", [False, True])
def test_depth_first_unroll_equals_layer_by_layer(compiled):
    """RecurrentTable(SequenceTable(cells)) unrolls over depth first, as
    rnnlib's ``make(2, SequenceTable{dim=1})``; same result, mask included."""
    torch.manual_seed(1)
    cells = mixed_cells(compiled)
    xs = randn(5, 3, 3)
    states = random_states(cells, 3)
    mask = torch.arange(5).unsqueeze(1) < torch.tensor([5, 1, 3])
    layered = SequenceTable([RecurrentTable(c) for c in cells])
    depth_first = RecurrentTable(SequenceTable(cells))
    torch.testing.assert_close(depth_first(states, xs, mask), layered(states, xs, mask), **TOL)


def test_scan_and_return_states_take_a_deep_cells_nested_state():
    """rnndsl.scan of a deep cell (a SequenceTable of cells) failed with a mask (torch.where of
    nested states), and RecurrentTable(deep, return_states=True) failed to join them."""
    torch.manual_seed(1)
    cells = mixed_cells(True)
    deep = SequenceTable(cells)
    xs, states = randn(5, 3, 3), random_states(cells, 3)
    mask = torch.arange(5).unsqueeze(1) < torch.tensor([5, 1, 3])
    want_final, want_outputs = RecurrentTable(deep)(states, xs, mask)
    outputs, final = rnndsl.scan(deep, xs, states, mask)
    torch.testing.assert_close((outputs, final), (want_outputs, want_final), **TOL)
    final, (outputs, steps) = RecurrentTable(deep, return_states=True)(states, xs, mask)
    torch.testing.assert_close((outputs, final), (want_outputs, want_final), **TOL)
    assert [[tuple(s.shape) for s in layer] for layer in steps] == [[(5, 3, 5)] * 2, [(5, 3, 4)]]
    for layer_steps, layer_final in zip(steps, final):
        for each_step, last in zip(layer_steps, layer_final):
            torch.testing.assert_close(each_step[-1, 0], last[0], **TOL)  # sequence 0 runs all 5 steps


def test_containers_refuse_a_state_not_nested_as_their_cells():
    """Used directly, the containers gave bare TypeErrors (None, a tensor, a flat (h, c)), a
    RecursionError (a dict) or an unpacking error (three directions)."""
    lstm, gru = rnndsl.load_cell("lstm").build(3, 4), rnndsl.load_cell("gru").build(4, 4)
    xs, h = torch.randn(5, 2, 3), torch.zeros(2, 4)
    table = RecurrentTable(lstm)
    for state, got in ((h, "Tensor"), (None, "NoneType"), ({"h": h, "c": h}, "dict")):
        with pytest.raises(ValueError, match=rf"RecurrentTable: state must be a tuple of 2, got {got}; the state "
                                             r"is nested as \(\(batch, 4\), \(batch, 4\)\)"):
            table(state, xs)
    stack = SequenceTable([RecurrentTable(lstm), RecurrentTable(gru)])
    with pytest.raises(ValueError, match=r"RecurrentTable: state must be a tuple of 1, got Tensor; the state is "
                                         r"nested as \(\(batch, 4\),\)"):  # the layer's own check
        stack(((h, h), h), xs)
    with pytest.raises(ValueError, match=r"SequenceTable: state must be a tuple of 2, got Tensor; the state is "
                                         r"nested as \(\(\(batch, 4\), \(batch, 4\)\), \(\(batch, 4\),\)\)"):
        stack(h, xs)
    both = Bidirectional(RecurrentTable(lstm), RecurrentTable(rnndsl.load_cell("lstm").build(3, 4)))
    with pytest.raises(ValueError, match=r"RecurrentTable: state must be a tuple of 2, got Tensor"):
        both((h, h), xs)  # a flat (h, c) for both directions
    with pytest.raises(ValueError, match=r"Bidirectional: state must be a tuple of 2, got 3 entries"):
        both(((h, h),) * 3, xs)
    with pytest.raises(ValueError, match=r"scan: state must be a tuple of the cell's state tensors, as \(h,\) or "
                                         r"\(h, c\), got Tensor"):
        rnndsl.scan(gru, xs[..., :4].contiguous(), h)  # tuple(h) would be its rows: "got 2 values"
    for mask, words in (([[True, True]] * 5, "mask must be a \\(T, batch\\) bool tensor, got list"),
                        (torch.ones(5, 2, 1, dtype=torch.bool), r"mask must have shape \(T, batch\) = \(5, 2\)")):
        with pytest.raises(ValueError, match=words):  # Bidirectional read it (mask.sum) before any check
            both(((h, h), (h, h)), xs, mask)


def test_reverse_padded_reverses_within_lengths():
    xs = torch.arange(4.0, dtype=torch.float64).view(4, 1, 1).expand(4, 3, 1)
    out = reverse_padded(xs, torch.tensor([4, 2, 1]))
    assert out[:, :, 0].T.tolist() == [[3, 2, 1, 0], [1, 0, 2, 3], [0, 1, 2, 3]]
    torch.testing.assert_close(reverse_padded(out, torch.tensor([4, 2, 1])), xs)


def test_bidirectional_reverse_reads_each_sequence_backwards():
    torch.manual_seed(2)
    fwd, rev = TorchLSTMCell(3, 4).double(), TorchLSTMCell(3, 4).double()
    layer = Bidirectional(RecurrentTable(fwd), RecurrentTable(rev))
    xs, lengths = randn(5, 2, 3), [5, 3]
    states = random_states([fwd, rev], 2)
    mask = torch.arange(5).unsqueeze(1) < torch.tensor(lengths)
    (f_final, r_final), ys = layer(states, xs, mask)
    ref_f, ref_f_final = reference([fwd], xs, states[:1], lengths)
    flipped = torch.zeros_like(xs)
    for b, n in enumerate(lengths):
        flipped[:n, b] = xs[:n, b].flip(0)
    ref_r, ref_r_final = reference([rev], flipped, states[1:], lengths)
    for b, n in enumerate(lengths):
        ref_r[:n, b] = ref_r[:n, b].clone().flip(0)
    torch.testing.assert_close(ys, torch.cat([ref_f, ref_r], -1), **TOL)
    torch.testing.assert_close((f_final, r_final), (ref_f_final[0], ref_r_final[0]), **TOL)
    assert layer.output_size == 8 and layer.state_sizes == ([4, 4], [4, 4])


def test_bidirectional_refuses_a_mask_that_is_not_a_prefix():
    cell = TorchGRUCell(3, 4).double()
    layer = Bidirectional(RecurrentTable(cell))
    mask = torch.tensor([[True, False], [True, True], [True, True], [False, True]])  # sequence 1 left-padded
    with pytest.raises(ValueError, match="sequence 1's has padding before a real step"):
        layer(random_states([cell, cell], 2), randn(4, 2, 3), mask)


def test_bidirectional_without_reverse_shares_the_forward_weights():
    cell = TorchGRUCell(3, 4).double()
    shared = Bidirectional(RecurrentTable(cell))
    explicit = Bidirectional(RecurrentTable(cell), RecurrentTable(cell))
    assert shared.shares_weights and len(list(shared.parameters())) == 4
    xs, states = randn(4, 2, 3), random_states([cell, cell], 2)
    torch.testing.assert_close(shared(states, xs), explicit(states, xs))


def make_network(save_hidden=True, **kwargs):
    torch.manual_seed(3)
    cells = mixed_cells()
    return cells, setup_recurrent(SequenceTable([RecurrentTable(c) for c in cells]),
                                  save_hidden=save_hidden, **kwargs)


def test_setup_recurrent_two_halves_equal_the_whole():
    cells, net = make_network()
    xs = randn(8, 2, 3)
    whole, whole_final = net(xs, net.initialize_hidden(2))
    net.initialize_hidden(2)
    first, _ = net(xs[:4])
    second, final = net(xs[4:])
    torch.testing.assert_close(torch.cat([first, second]), whole, **TOL)
    torch.testing.assert_close(final, whole_final, **TOL)
    net.initialize_hidden(2)
    again, _ = net(xs[:4])
    torch.testing.assert_close(again, first, **TOL)


def test_saved_hidden_is_detached_and_holds_no_graph():
    _, net = make_network()
    xs = randn(5, 2, 3, requires_grad=True)
    net(xs)[0].sum().backward()
    for tensor in [t for layer in net.hidden for t in layer]:
        assert tensor.grad_fn is None and not tensor.requires_grad
    out, _ = net(xs)  # continues from the saved state; backward must not reach the first graph
    out.sum().backward()


def test_saved_hidden_in_eval_and_batch_size_change():
    _, net = make_network()
    fresh = setup_recurrent(net.network, save_hidden=False)
    net.eval()
    x2, x3 = randn(4, 2, 3), randn(4, 3, 3)
    with torch.no_grad():
        first, _ = net(x2)
        continued, _ = net(x2)
        assert not torch.allclose(first, continued)  # the second call starts where the first ended
        restarted, _ = net(x3)  # another batch size: starts afresh from the init functions
        torch.testing.assert_close(restarted, fresh(x3)[0], **TOL)
        torch.testing.assert_close(first, fresh(x2)[0], **TOL)
    assert net.hidden[0][0].shape == (3, 5)


def test_explicit_state_and_batch_first():
    _, net = make_network(save_hidden=False, batch_first=True)
    x = randn(2, 6, 3)
    state = net.initialize_hidden(2)
    out, _ = net(x, state)
    out_t, _ = setup_recurrent(net.network, save_hidden=False)(x.transpose(0, 1), state)
    torch.testing.assert_close(out, out_t.transpose(0, 1))


def test_init_functions_and_hinitfun():
    _, net = make_network()
    init = ZeroState([5, 5], hinitfun=lambda t: t.fill_(0.5))
    custom = setup_recurrent(net.network, [init, ZeroState([4])])
    state = custom.initialize_hidden(3)
    assert torch.all(state[0][0] == 0.5) and torch.all(state[1][0] == 0)
    assert custom.hidden is state


def test_state_errors_name_expected_and_received():
    _, net = make_network()
    x = randn(4, 2, 3)
    good = net.initialize_hidden(2)
    with pytest.raises(ValueError, match=r"state\[1\]\[0\] \(h\) has shape \(3, 4\), expected \(2, 4\)"):
        net(x, (good[0], (torch.zeros(3, 4, dtype=torch.float64),)))
    with pytest.raises(ValueError, match=r"state must be a tuple of 2, got 1 entries; the state is nested as "
                                         r"\(\(\(batch, 5\), \(batch, 5\)\), \(\(batch, 4\),\)\)"):
        net(x, good[:1])
    with pytest.raises(ValueError, match="float32 on cpu but the input is float64"):
        net(x, (good[0], (torch.zeros(2, 4, dtype=torch.float32),)))
    with pytest.raises(ValueError, match="expected input of size 3 in the last dimension, got 7"):
        net(randn(4, 2, 7))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        net(x, lengths=[5, 2])
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        net(x, lengths=[4, 2, 1])


def test_a_network_refuses_a_non_tensor_input_meta_lengths_and_a_bad_batch_size():
    """Each gave a bare error from deep inside: 'list' has no attribute 'dim', Tensor.item() on meta,
    torch.zeros' "Dimension size must be non-negative"."""
    _, net = make_network()
    with pytest.raises(ValueError, match="expected the input as a tensor or a PackedSequence, got list"):
        net([[0.0] * 3] * 4)
    with pytest.raises(ValueError, match="lengths are on the meta device"):
        net(randn(4, 2, 3), lengths=torch.tensor([4, 2], device="meta"))
    for bad in (-1, 3.0, True, torch.tensor(True), torch.tensor([2])):
        with pytest.raises(ValueError, match="batch_size must be a whole number of sequences"):
            net.initialize_hidden(bad)
    assert net.initialize_hidden(torch.tensor(2))[0][0].shape[0] == 2


def test_init_functions_are_a_list_whose_states_are_checked():
    cells = mixed_cells()
    table = SequenceTable([RecurrentTable(c) for c in cells])
    with pytest.raises(TypeError, match=r"init_functions must be a list with one function per layer, got a "
                                        r"ZeroState: write \[ZeroState\(...\), ...\]"):
        setup_recurrent(table, ZeroState(table.state_sizes))
    net = setup_recurrent(table, [ZeroState(table.state_sizes[0]), ZeroState(4)])  # a tensor, not (h,)
    with pytest.raises(ValueError, match=r"the init functions' state\[1\] must be a tuple of 1, got Tensor"):
        net(randn(4, 2, 3))


def test_network_pickles_with_its_saved_state():
    _, net = make_network()
    net(randn(3, 2, 3))
    copy = pickle.loads(pickle.dumps(net))
    x = randn(2, 2, 3)
    torch.testing.assert_close(copy(x)[0], net(x)[0])


TWO_OUTPUTS = """cell two(x[input]) -> y, z {
    state h[hidden]
    param W[hidden, input], U[hidden, hidden], b[hidden]
    h' = tanh(W @ x + U @ h + b)
    y = h'
    z = sigmoid(h') * 2.0
}
"""


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cells_with_two_outputs_stack_feeding_the_first_to_the_next_layer(backend, bidirectional, tmp_path):
    path = tmp_path / "two.cell"
    path.write_text(TWO_OUTPUTS)
    make = rnndsl.make_bidirectional if bidirectional else rnndsl.make_recurrent
    torch.manual_seed(0)
    net = make(path, 3, [4, 5], backend=backend, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    (y, z), _ = net(x, lengths=torch.tensor([6, 4]))
    directions = 2 if bidirectional else 1
    assert y.shape == z.shape == (2, 6, 5 * directions)
    # The same layers by hand: layer 2 reads layer 1's first output.
    first, second = net.network.layers
    xs = x.transpose(0, 1)
    mask = rnndsl.sequences.lengths_mask(torch.tensor([6, 4]), 6, 2, x.device)
    zero = rnndsl.containers.ZeroState(net.network.state_sizes)(2, dtype=x.dtype, device=x.device)
    _, (y1, _) = first(zero[0], xs, mask)
    _, (y2, z2) = second(zero[1], y1, mask)
    torch.testing.assert_close(y, y2.transpose(0, 1))
    torch.testing.assert_close(z, z2.transpose(0, 1))


def test_the_python_loop_keeps_nan_in_the_padding_out_of_outputs_and_gradients():
    """A hand-written cell runs through the scan's Python loop: nan in the padding must reach
    neither the outputs (zero there) nor a gradient."""
    from rnndsl.scan import exported_python_scan
    torch.manual_seed(0)
    cell = TorchLSTMCell(3, 4).double()
    mask = torch.arange(4)[:, None] < torch.tensor([2, 4])
    xs = randn(4, 2, 3) * mask[..., None]
    state = (randn(2, 4), randn(2, 4))
    poisoned = torch.where(mask[..., None], xs, float("nan"))
    grads = []
    for inputs in (xs, poisoned):
        cell.zero_grad()
        outputs, _ = rnndsl.scan(cell, inputs, state, mask)
        outputs.sum().backward()
        assert not outputs[~mask].any()
        grads.append([p.grad.clone() for p in cell.parameters()])
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    # The exported form (no backward to protect) masks the outputs with where.
    torch.testing.assert_close(exported_python_scan(cell, poisoned, state, mask), rnndsl.scan(cell, xs, state, mask))
