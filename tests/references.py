"""Hand-written PyTorch references for the cells of the zoo (cells/*.cell).

Each is a plain function ``(params, state, x) -> (new_state, output)`` written
from the papers' equations, independently of the compiler: ``params`` maps the
parameter names of the .cell file to tensors, ``state`` is a tuple of
``(batch, size)`` tensors in the cell's order, ``x`` is ``(batch, input)``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Params = Dict[str, Tensor]
State = Tuple[Tensor, ...]
Reference = Callable[[Params, State, Tensor], Tuple[State, Tensor]]

# The stock cells torch.nn has a cell for: (input_size, hidden_size) -> that torch.nn cell.
TORCH_CELLS = {
    "lstm": lambda i, h: torch.nn.LSTMCell(i, h),
    "gru": lambda i, h: torch.nn.GRUCell(i, h),
    "rnn_tanh": lambda i, h: torch.nn.RNNCell(i, h, nonlinearity="tanh"),
    "rnn_relu": lambda i, h: torch.nn.RNNCell(i, h, nonlinearity="relu"),
}


def _linear(weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    out = x @ weight.t()
    return out if bias is None else out + bias


def _layer_norm(v: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)  # biased, as torch.nn.LayerNorm
    return (v - mean) / torch.sqrt(var + eps) * weight + bias


def mingru(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    z = torch.sigmoid(_linear(p["weight_z"], x, p["bias_z"]))
    h_new = (1 - z) * h + z * _linear(p["weight_h"], x, p["bias_h"])
    return (h_new,), h_new


def minlstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    f = torch.sigmoid(_linear(p["weight_f"], x, p["bias_f"]))
    i = torch.sigmoid(_linear(p["weight_i"], x, p["bias_i"]))
    h_new = f / (f + i) * h + i / (f + i) * _linear(p["weight_h"], x, p["bias_h"])
    return (h_new,), h_new


def qrnn(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (c,) = state
    z = torch.tanh(_linear(p["weight_z"], x, p["bias_z"]))
    f = torch.sigmoid(_linear(p["weight_f"], x, p["bias_f"]))
    o = torch.sigmoid(_linear(p["weight_o"], x, p["bias_o"]))
    c_new = f * c + (1 - f) * z
    return (c_new,), o * c_new


def indrnn(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    h_new = torch.relu(_linear(p["weight_ih"], x, p["bias_ih"]) + p["weight_hh"] * h)
    return (h_new,), h_new


def mgu(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    f = torch.sigmoid(_linear(p["weight_f"], x) + _linear(p["recurrent_f"], h) + p["bias_f"])
    candidate = torch.tanh(_linear(p["weight_h"], x) + _linear(p["recurrent_h"], f * h) + p["bias_h"])
    h_new = (1 - f) * h + f * candidate
    return (h_new,), h_new


def peephole_lstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    h, c = state
    gates = _linear(p["weight_ih"], x, p["bias_ih"]) + _linear(p["weight_hh"], h, p["bias_hh"])
    gi, gf, gg, go = gates.chunk(4, 1)
    i = torch.sigmoid(gi + p["peephole_i"] * c)
    f = torch.sigmoid(gf + p["peephole_f"] * c)
    c_new = f * c + i * torch.tanh(gg)
    o = torch.sigmoid(go + p["peephole_o"] * c_new)
    h_new = o * torch.tanh(c_new)
    return (h_new, c_new), h_new


def layernorm_lstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    h, c = state
    gates = (_layer_norm(_linear(p["weight_ih"], x), p["layernorm_ih_weight"], p["layernorm_ih_bias"])
             + _layer_norm(_linear(p["weight_hh"], h), p["layernorm_hh_weight"], p["layernorm_hh_bias"]))
    i, f, g, o = gates.chunk(4, 1)
    c_new = _layer_norm(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g),
                        p["layernorm_c_weight"], p["layernorm_c_bias"])
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return (h_new, c_new), h_new


def cifg_lstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    h, c = state
    gates = _linear(p["weight_ih"], x, p["bias_ih"]) + _linear(p["weight_hh"], h, p["bias_hh"])
    f, g, o = gates.chunk(3, 1)
    c_new = torch.sigmoid(f) * c + (1 - torch.sigmoid(f)) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return (h_new, c_new), h_new


def sru(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (c,) = state
    f = torch.sigmoid(_linear(p["weight_f"], x, p["bias_f"]) + p["vector_f"] * c)
    r = torch.sigmoid(_linear(p["weight_r"], x, p["bias_r"]) + p["vector_r"] * c)
    c_new = f * c + (1 - f) * _linear(p["weight"], x)
    h = r * torch.tanh(c_new) + (1 - r) * x
    return (c_new,), h


def janet(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    s = _linear(p["weight_f"], x) + _linear(p["recurrent_f"], h) + p["bias_f"]
    candidate = torch.tanh(_linear(p["weight_c"], x) + _linear(p["recurrent_c"], h) + p["bias_c"])
    h_new = torch.sigmoid(s) * h + (1 - torch.sigmoid(s - 1.0)) * candidate  # beta = 1
    return (h_new,), h_new


def attention_rnn(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    (h,) = state
    attention = torch.softmax(2.0 * (_linear(p["weight_a"], h) + p["bias_a"]), dim=-1)
    h_new = torch.tanh(_linear(p["weight_ih"], x) + _linear(p["weight_hh"], p["gain"] * attention * h) + p["bias"])
    return (h_new,), h_new


def lstm_cell_clip(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    h, c = state
    gates = _linear(p["weight_ih"], x, p["bias_ih"]) + _linear(p["weight_hh"], h, p["bias_hh"])
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.clamp(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), -3.0, 3.0)  # cell_clip = 3
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return (h_new, c_new), h_new


# Matrix-valued states: the cells carry them flat, (batch, heads*key*value); the references
# work per head with einsum, and flatten again. With the cells' default sizes (key = value =
# head_dim = hidden) the output projection tells the number of heads: weight_o is
# [hidden, heads*hidden].

def _head_count(p: Params) -> int:
    rows, columns = p["weight_o"].shape
    return columns // rows


def _heads(v: Tensor, heads: int) -> Tensor:
    return v.reshape(v.shape[0], heads, -1)


def _outer(k: Tensor, v: Tensor) -> Tensor:
    return torch.einsum("bhk,bhv->bhkv", k, v)


def _prenorm(p: Params, x: Tensor) -> Tensor:
    """The block's pre-norm that the matrix-state cells apply to their input."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p["norm_weight"], p["norm_bias"], eps=1e-5)


def _normed(p: Params, v: Tensor) -> Tensor:
    """The norm of the heads' output (one layer norm over all heads) in the matrix-state cells."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], p["o_norm_weight"], p["o_norm_bias"], eps=1e-5)


def linear_attention(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    heads = _head_count(p)
    phi = lambda v: torch.nn.functional.elu(v) + 1  # noqa: E731
    q = phi(_heads(_linear(p["weight_q"], x), heads))
    k = phi(_heads(_linear(p["weight_k"], x), heads))
    v = _heads(_linear(p["weight_v"], x), heads)
    S = state[0].reshape(k.shape + v.shape[-1:]) + _outer(k, v)
    z = state[1].reshape(k.shape) + k
    o = torch.einsum("bhk,bhkv->bhv", q, S) / (torch.einsum("bhk,bhk->bh", q, z).unsqueeze(-1) + 1e-6)
    return (S.flatten(1), z.flatten(1)), _linear(p["weight_o"], o.flatten(1))


def retnet(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    heads = _head_count(p)
    q, k, v = (_heads(_linear(p[f"weight_{n}"], x), heads) for n in "qkv")
    gamma = torch.sigmoid(p["decay"])[None, :, None, None]
    S = gamma * state[0].reshape(k.shape + v.shape[-1:]) + _outer(k, v)
    o = _normed(p, torch.einsum("bhk,bhkv->bhv", q, S).flatten(1))
    return (S.flatten(1),), _linear(p["weight_o"], torch.nn.functional.silu(_linear(p["weight_g"], x)) * o)


def gla(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    heads = _head_count(p)
    q, k, v = (_heads(_linear(p[f"weight_{n}"], x), heads) for n in "qkv")
    alpha = torch.sigmoid(_heads(_linear(p["weight_a"], x, p["bias_a"]), heads)) ** (1 / 16)
    S = alpha.unsqueeze(-1) * state[0].reshape(k.shape + v.shape[-1:]) + _outer(k, v)
    o = _normed(p, torch.einsum("bhk,bhkv->bhv", q, S).flatten(1))
    return (S.flatten(1),), _linear(p["weight_o"], torch.nn.functional.silu(_linear(p["weight_r"], x)) * o)


def mamba2(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    heads = p["A_log"].shape[0]
    u = _heads(_linear(p["weight_u"], x), heads)
    B, C = (_heads(_linear(p[f"weight_{n}"], x), heads) for n in "bc")
    dt = torch.nn.functional.softplus(_linear(p["weight_dt"], x, p["dt_bias"]))  # (batch, heads)
    decay = torch.exp(dt * -torch.exp(p["A_log"]))
    S = decay[..., None, None] * state[0].reshape(B.shape + u.shape[-1:]) + _outer(B, dt.unsqueeze(-1) * u)
    o = torch.einsum("bhn,bhnp->bhp", C, S) + p["D"][:, None] * u
    gate = torch.nn.functional.silu(_linear(p["weight_z"], x))
    return (S.flatten(1),), _linear(p["weight_o"], _normed(p, o.flatten(1) * gate))


def _l2_normalized(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-6)


def _delta_rule(p: Params, state: State, x: Tensor, alpha: Optional[Tensor]) -> Tuple[State, Tensor]:
    """S' = alpha (I - beta k k^T) S + beta k v^T, o = q^T S' (DeltaNet: alpha = 1)."""
    heads = _head_count(p)
    q, k = (_l2_normalized(_heads(_linear(p[f"weight_{n}"], x), heads)) for n in "qk")
    v = _heads(_linear(p["weight_v"], x), heads)
    beta = torch.sigmoid(_linear(p["weight_b"], x))[..., None, None]
    S = state[0].reshape(k.shape + v.shape[-1:])
    eye = torch.eye(k.shape[-1], dtype=x.dtype)
    transition = eye - beta * torch.einsum("bhi,bhj->bhij", k, k)
    if alpha is not None:
        transition = alpha[..., None, None] * transition
    S = transition @ S + beta * _outer(k, v)
    o = _normed(p, torch.einsum("bhk,bhkv->bhv", q, S).flatten(1))
    return (S.flatten(1),), _linear(p["weight_o"], torch.nn.functional.silu(_linear(p["weight_g"], x)) * o)


def mlstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    heads = p["weight_i"].shape[0]
    q, k, v = (_heads(_linear(p[f"weight_{n}"], x), heads) for n in "qkv")
    C = state[0].reshape(k.shape + v.shape[-1:])
    n, m = state[1].reshape(k.shape), state[2]
    log_f = torch.nn.functional.logsigmoid(_linear(p["weight_f"], x, p["bias_f"]))
    i_tilde = _linear(p["weight_i"], x, p["bias_i"])
    m_new = torch.maximum(log_f + m, i_tilde)
    i, f = torch.exp(i_tilde - m_new), torch.exp(log_f + m - m_new)
    C = f[..., None, None] * C + torch.einsum("bhk,bhv->bhkv", i[..., None] * k, v)
    n = f[..., None] * n + i[..., None] * k
    denominator = torch.maximum(torch.einsum("bhk,bhk->bh", q, n).abs(), torch.exp(-m_new))
    h = torch.einsum("bhk,bhkv->bhv", q, C) / denominator[..., None]
    y = _linear(p["weight_out"], torch.sigmoid(_linear(p["weight_o"], x)) * _normed(p, h.flatten(1)))
    return (C.flatten(1), n.flatten(1), m_new), y


def slstm(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    h, c, n, m = state
    heads = p["R_z"].shape[0]

    def gate(name: str) -> Tensor:  # W x + R h (block-diagonal, per head) + b
        recurrent = torch.einsum("hij,bhj->bhi", p[f"R_{name}"], _heads(h, heads)).flatten(1)
        return _linear(p[f"weight_{name}"], x) + recurrent + p[f"bias_{name}"]
    z, o, i_tilde = torch.tanh(gate("z")), torch.sigmoid(gate("o")), gate("i")
    log_f = torch.nn.functional.logsigmoid(gate("f"))
    m_new = torch.maximum(log_f + m, i_tilde)
    i, f = torch.exp(i_tilde - m_new), torch.exp(log_f + m - m_new)
    c_new, n_new = f * c + i * z, f * n + i
    h_new = o * c_new / n_new
    return (h_new, c_new, n_new, m_new), h_new


def deltanet(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    return _delta_rule(p, state, x, None)


def gated_deltanet(p: Params, state: State, x: Tensor) -> Tuple[State, Tensor]:
    x = _prenorm(p, x)
    dt = torch.nn.functional.softplus(_linear(p["weight_a"], x, p["dt_bias"]))
    return _delta_rule(p, state, x, torch.exp(-torch.exp(p["A_log"]) * dt))


REFERENCES: Dict[str, Reference] = {
    "mingru": mingru, "minlstm": minlstm, "qrnn": qrnn, "indrnn": indrnn, "mgu": mgu,
    "peephole_lstm": peephole_lstm, "layernorm_lstm": layernorm_lstm, "cifg_lstm": cifg_lstm, "sru": sru,
    "janet": janet, "attention_rnn": attention_rnn, "lstm_cell_clip": lstm_cell_clip,
    "linear_attention": linear_attention, "retnet": retnet, "gla": gla, "mamba2": mamba2,
    "deltanet": deltanet, "gated_deltanet": gated_deltanet, "mlstm": mlstm, "slstm": slstm,
}
# Spatial cells: states and inputs are images (batch, channels, height, width), carried flat.

def _conv(weight: Tensor, image: Tensor) -> Tensor:
    """A 2-d convolution keeping height and width (odd kernels), as torch.nn.Conv2d(padding=k // 2)."""
    return torch.nn.functional.conv2d(image, weight, padding=(weight.shape[2] // 2, weight.shape[3] // 2))


def _image(v: Tensor, height: int, width: int) -> Tensor:
    return v.reshape(v.shape[0], -1, height, width)


def convlstm(p: Params, state: State, x: Tensor, height: int, width: int) -> Tuple[State, Tensor]:
    """Shi et al. 2015, eqs. (3), gate by gate: the stacked kernels cut into i, f, c, o."""
    h, c = (_image(v, height, width) for v in state)
    x = _image(x, height, width)
    w_x, w_h, bias = (t.chunk(4, 0) for t in (p["weight_x"], p["weight_h"], p["bias"]))

    def gate(k: int) -> Tensor:
        return _conv(w_x[k], x) + _conv(w_h[k], h) + bias[k][:, None, None]
    i = torch.sigmoid(gate(0) + p["peephole_i"] * c)
    f = torch.sigmoid(gate(1) + p["peephole_f"] * c)
    c_new = f * c + i * torch.tanh(gate(2))
    o = torch.sigmoid(gate(3) + p["peephole_o"] * c_new)
    h_new = (o * torch.tanh(c_new)).flatten(1)
    return (h_new, c_new.flatten(1)), h_new


def convgru(p: Params, state: State, x: Tensor, height: int, width: int) -> Tuple[State, Tensor]:
    """Ballas et al. 2016, section 3, with biases."""
    h, x = _image(state[0], height, width), _image(x, height, width)
    w_z, w_r, w = p["weight_x"].chunk(3, 0)
    b_z, b_r, b = (v[:, None, None] for v in p["bias"].chunk(3, 0))
    u_z, u_r = p["weight_zr"].chunk(2, 0)
    z = torch.sigmoid(_conv(w_z, x) + _conv(u_z, h) + b_z)
    r = torch.sigmoid(_conv(w_r, x) + _conv(u_r, h) + b_r)
    candidate = torch.tanh(_conv(w, x) + _conv(p["weight_h"], r * h) + b)
    h_new = ((1 - z) * h + z * candidate).flatten(1)
    return (h_new,), h_new


# By name: the spatial cells' references, which take the height and width too (tests/test_conv.py).
SPATIAL_REFERENCES = {"convlstm": convlstm, "convgru": convgru}


def reference_scan(reference: Reference, params: Params, state: State, xs: Tensor,
                   mask: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    """A reference over a ``(T, batch, input)`` sequence: outputs and final state.

    Where ``mask`` (T, batch) is False the state carries over and the output is zero.
    """
    outputs = []
    for t, x in enumerate(xs):
        new_state, output = reference(params, state, x)
        if mask is not None:
            keep = mask[t].unsqueeze(1)
            new_state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state))
            output = output * keep.to(output.dtype)
        state = new_state
        outputs.append(output)
    return torch.stack(outputs), state


def random_parameters(cell: torch.nn.Module, generator: torch.Generator) -> Params:
    """Draws a value for every parameter of ``cell`` (layer-norm weights too, so that their gradients
    matter), sets the cell's parameters to them and returns them."""
    params = {name: 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
              for name, p in cell.named_parameters()}
    with torch.no_grad():
        for name, parameter in cell.named_parameters():
            parameter.copy_(params[name])
    return params


def _gradients(results: Sequence[Tensor], wrt: Sequence[Tensor], seed: int) -> List[Tensor]:
    """Gradients of a random linear function of ``results``, the same for both sides of a comparison."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum((r * torch.randn(r.shape, generator=generator, dtype=r.dtype)).sum() for r in results)
    return list(torch.autograd.grad(loss, wrt))


def compare_with_reference(cell: torch.nn.Module, reference: Reference, *, batch: int, steps: int, masked: bool,
                           seed: int, sequence: bool, tolerance: Dict[str, float], label: str) -> None:
    """A float64 cell against its reference, on parameters, input and state drawn from ``seed``:
    outputs, next states and the gradients of the input, the state and every parameter, for one
    step (``cell(state, x)``) or over a sequence (``rnndsl.scan``, masked if ``masked``)."""
    import rnndsl  # the references themselves never use the compiler

    generator = torch.Generator().manual_seed(seed)
    params = random_parameters(cell, generator)
    leading = (steps, batch) if sequence else (batch,)
    x = torch.randn(*leading, cell.input_size, generator=generator, dtype=torch.float64)
    state = tuple(torch.randn(batch, size, generator=generator, dtype=torch.float64) for size in cell.state_sizes)
    mask = torch.rand(leading, generator=generator) < 0.7 if sequence and masked else None

    def run(function, parameters: Params) -> List[Tensor]:
        xs, s = x.clone().requires_grad_(), tuple(v.clone().requires_grad_() for v in state)
        output, final = function(xs, s, mask) if sequence else function(s, xs)[::-1]
        results = [output, *final]
        return results + _gradients(results, [xs, *s, *parameters.values()], seed)

    ref_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    if sequence:
        got = run(lambda xs, s, m: rnndsl.scan(cell, xs, s, m), dict(cell.named_parameters()))
        want = run(lambda xs, s, m: reference_scan(reference, ref_params, s, xs, m), ref_params)
    else:
        got = run(cell, dict(cell.named_parameters()))
        want = run(lambda s, xs: reference(ref_params, s, xs), ref_params)
    labels = ["output"] + [f"next {n}" for n in cell.state_names] + ["d input"]
    labels += [f"d {n}" for n in cell.state_names] + [f"d {n}" for n in params]
    # atol scales with the largest number of the comparison: a gradient that is a difference of large
    # terms keeps their rounding. At sizes of 1 the cells' layer norms and unit vectors make such
    # differences: gated_deltanet's input gradient of 4e-3 beside ones of 107 was 1.8e-12 off, and
    # linear_attention's, exactly 0 (a layer norm over one number), 7e-12 beside one of 2,455.
    scale = max([1.0] + [float(b.detach().abs().max()) for b in want if b.numel()])
    for name, a, b in zip(labels, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale,
                                   msg=lambda m, name=name: f"{label} {name}: {m}")
