"""Check: AST -> checked AST. Names, declarations and the rules of state updates.

Shapes are checked while lowering (rnndsl/lower.py), where each expression's
shape is computed by the op's shape rule. Everything here raises a
:class:`CellError` at the offending spot, or warns about legal oddities.
"""
from __future__ import annotations

import dataclasses
import functools
import keyword
import math
import numbers
from typing import Dict, Iterator, List, Optional, Set, Tuple

from . import syntax_tree as st
from .errors import CellError, Span, did_you_mean, warn
from .ir import MAX_DIMENSION
from .ops import FUNCTIONS
from .options import BUILD_POSITIONAL, BuildOptions

BUILTIN_SIZES = ("input", "hidden")
KEYWORDS = {"cell", "state", "param", "buffer", "size", "hyper"}


@functools.lru_cache(maxsize=None)
def _module_attributes() -> frozenset:
    """MODULE_ATTRIBUTES: names parameters, sizes and hyper-parameters must keep clear of, since
    they become module attributes: those of nn.Module (class and instance), of scripted modules,
    and of the cells rnndsl builds."""
    import torch  # function-level: the front end imports no torch until a cell is checked
    return frozenset(set(dir(torch.nn.Module)) | set(vars(torch.nn.Module())) |
                     set(dir(torch.jit.RecursiveScriptModule)) | _CELL_ATTRIBUTES)


def __getattr__(name: str) -> object:
    # PEP 562: `check.MODULE_ATTRIBUTES` is computed (with torch) on first use, not at import.
    if name == "MODULE_ATTRIBUTES":
        return _module_attributes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The attributes of the cells rnndsl builds.
_CELL_ATTRIBUTES = {"input_size", "hidden_size", "output_size", "output_image", "state_sizes", "state_names", "source",
                    "code", "cell_name", "forward_sequence", "reset_parameters", "generated_source", "kernel",
                    "call_kernel", "scripted_method", "backward_sequence", "derived_backward_trains",
                    "forward_sequence_saving", "forward_parallel", "scan_mode", "parallel_source",
                    "forward_sequence_scan", "extra_inputs"}

# Sizes and hyper-parameters are set as keyword arguments of CellSpec.build(input_size, hidden_size,
# backend, *, <the build options>, **hyper): they cannot share a name with its own arguments.
BUILD_ARGUMENTS = frozenset(BUILD_POSITIONAL) | {field.name for field in dataclasses.fields(BuildOptions)}
# The arguments of the calls that take a cell's other inputs by keyword (cell(state, x, ...),
# forward_sequence(xs, state, mask, ...), scan(cell, xs, state, mask, ...), net(x, state, lengths, ...)):
# an input of one of these names could not be passed.
CALL_ARGUMENTS = frozenset({"self", "cell", "state", "x", "xs", "mask", "lengths"})


def check_file(file: st.File) -> st.File:
    """Check every cell of a parsed file; return it unchanged when all is well."""
    seen: Dict[str, st.Cell] = {}
    for cell in file.cells:
        if cell.name in seen:
            raise CellError(f"cell `{cell.name}` is defined twice (first at line "
                            f"{seen[cell.name].span.line})", cell.name_span)
        seen[cell.name] = cell
        check_cell(cell)
    return file


def check_cell(cell: st.Cell) -> st.Cell:
    _check_declarations(cell)
    _check_body(cell)
    return cell


def _check_name(name: str, span: Span, what: str) -> None:
    if name in KEYWORDS:
        raise CellError(f"`{name}` is a keyword of the cell language and cannot name {_article(what)}", span)
    if keyword.iskeyword(name) or name.startswith("__"):
        raise CellError(f"`{name}` cannot name {_article(what)}: it is reserved in Python", span,
                        hint=_another_name(name))
    if "__" in name:
        # Generated code holds no `__` at all, so that no name in it can reach Python's dunders.
        raise CellError(f"`{name}` cannot name {_article(what)}: names holding `__` are kept for "
                        "Python's special names", span, hint=_another_name(name))


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _another_name(name: str) -> str:
    stem = "_".join(part for part in name.split("_") if part) or "value"
    return f"call it `{stem}_` or another name"


def input_sizes(cell: st.Cell) -> Tuple[str, ...]:
    """The sizes the extra inputs introduce: names in their shapes that no ``size`` declares
    (``enc[context] per sequence`` makes ``context`` a size, set at build like ``input``)."""
    declared = set(BUILTIN_SIZES) | {d.name for d in cell.sizes}
    found = [name for decl in cell.inputs[1:] for name in _size_names(decl.shape) if name not in declared]
    return tuple(dict.fromkeys(found))


def _declarations(cell: st.Cell) -> Iterator[tuple]:
    for decl in cell.inputs:
        yield decl.name, "input", decl.span
    for decl in cell.states:
        yield decl.name, "state", decl.span
    for decl in cell.params:
        yield decl.name, "parameter", decl.span
    for decl in cell.buffers:
        yield decl.name, "buffer", decl.span
    for decl in cell.sizes:
        yield decl.name, "size", decl.span
    for decl in cell.hypers:
        yield decl.name, "hyper-parameter", decl.span


def _check_declarations(cell: st.Cell) -> None:
    declared: Dict[str, str] = {name: "size" for name in BUILTIN_SIZES}
    for name, what, span in _declarations(cell):
        _check_name(name, span, what)
        if name in declared:
            if name in BUILTIN_SIZES:
                raise CellError(f"`{name}` is the built-in size variable and cannot name {_article(what)}", span)
            raise CellError(f"`{name}` is declared twice (already {_article(declared[name])})", span)
        if what in ("parameter", "buffer", "size", "hyper-parameter") and name in _module_attributes():
            raise CellError(f"`{name}` cannot name {_article(what)}: it clashes with the attribute `{name}` "
                            "every cell module has", span, hint=_another_name(name))
        if what == "input" and name in CALL_ARGUMENTS and span != cell.inputs[0].span:
            raise CellError(f"`{name}` cannot name an input besides the first: the calls that take the others by "
                            f"name have an argument `{name}` of their own", span, hint=_another_name(name))
        if what in ("size", "hyper-parameter") and name in BUILD_ARGUMENTS:
            raise CellError(f"`{name}` cannot name {_article(what)}: it is an argument of CellSpec.build, "
                            f"which could not set this {what}", span, hint=_another_name(name))
        if what in ("parameter", "buffer", "size", "hyper-parameter") and name.startswith("_"):
            raise CellError(f"`{name}` cannot name {_article(what)}: names starting with `_` are kept for "
                            "torch.nn.Module's internals", span, hint=_another_name(name))
        declared[name] = what
    if cell.input.per_sequence:
        raise CellError(f"the first input, `{cell.input.name}`, is read at every step and cannot be "
                        "`per sequence`", cell.input.span,
                        hint=f"put `{cell.input.name}` after an input read at every step, as in "
                        f"`cell {cell.name}(x[input], {cell.input.name}[...] per sequence)`")
    for name in input_sizes(cell):
        span = next(d.span for d in cell.inputs[1:] if name in _size_names(d.shape))
        _check_name(name, span, "size")
        if name in declared:
            raise CellError(f"`{name}` names a size in this input's shape, but it is already "
                            f"{_article(declared[name])}", span)
        if name in _module_attributes() or name in BUILD_ARGUMENTS or name.startswith("_"):
            raise CellError(f"`{name}` cannot name a size: it is an argument of CellSpec.build or an "
                            "attribute every cell module has", span, hint=_another_name(name))
        declared[name] = "size"
    first_dim = cell.input.shape[0] if cell.input.shape else None
    if first_dim is not None and "input" in _size_names((first_dim,)) and \
            not (isinstance(first_dim, st.SizeName) and first_dim.name == "input"):
        # build's input_size is this dim: `x[2*input]` would ask input_size = 2 * input_size
        raise CellError("the first input's first dim is `input` itself, the input_size given at build; "
                        "`input` cannot be part of a larger size there", first_dim.span,
                        hint=f"write `{cell.input.name}[input]` and give the size at build")
    if not cell.states:
        raise CellError(f"cell `{cell.name}` declares no state", cell.name_span,
                        hint="add a line such as `state h[hidden]`")
    for decl in cell.params + cell.buffers:
        if decl.init is not None:
            _check_number(decl.init, decl.span)
    for decl in cell.hypers:
        _check_number(decl.default, decl.span)
    sizes = set(BUILTIN_SIZES) | {decl.name for decl in cell.sizes} | set(input_sizes(cell))
    earlier = set(BUILTIN_SIZES) | set(input_sizes(cell))
    for decl in cell.sizes:
        if decl.formula is not None:
            # Computed at build from sizes known by then: the built-in ones and those declared above.
            if decl.name in _size_names((decl.formula,)):
                raise CellError(f"size `{decl.name}` is defined by itself", decl.span,
                                hint="a size's default reads the sizes declared above it")
            _check_size(decl.formula, earlier, division=True,
                        later={d.name: d.span for d in cell.sizes if d.name not in earlier})
        elif not 1 <= decl.default <= MAX_DIMENSION:
            raise CellError(f"size `{decl.name}` must be from 1 to {MAX_DIMENSION:,}, got {decl.default}",
                            decl.span)
        earlier.add(decl.name)
    shapes = [d.shape for d in cell.inputs + cell.states] + [p.shape for p in cell.params + cell.buffers]
    for size in (size for shape in shapes for size in shape):
        _check_size(size, sizes)


def _size_names(shape: Tuple[st.SizeExpr, ...]) -> List[str]:
    """The size names in a shape, in the order they are written."""
    names, stack = [], list(reversed(shape))
    while stack:
        node = stack.pop()
        if isinstance(node, st.SizeBinary):
            stack.extend((node.right, node.left))
        elif isinstance(node, st.SizeName) and node.name not in names:
            names.append(node.name)
    return names


def _check_number(value: float, span: Span) -> None:
    if not math.isfinite(value):
        raise CellError("number is too large: it would be infinity (the largest is about 1.8e308)", span)


def hyper_value_problem(value: object, probability: bool) -> Optional[str]:
    """What is wrong with a hyper-parameter's value given at build, or None: the checker's rules
    for defaults (a finite number; a probability of dropout or zoneout lies in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number, got {value!r}"
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float (10**400)
        finite = False
    if not finite:
        return f"must be a finite number, got {value!r}"
    if probability and not 0 <= value <= 1:
        return f"is a probability of dropout or zoneout and must lie between 0 and 1, got {value!r}"
    return None


def _check_size(size: st.SizeExpr, sizes: Set[str], division: bool = False,
                later: Optional[Dict[str, Span]] = None) -> None:
    """Names known; ``/`` only where ``division`` (a size's default, computed at build: shapes
    stay polynomials so that they can be checked symbolically). ``later``: sizes declared below
    the one checked, by name."""
    stack = [size]
    while stack:
        node = stack.pop()
        if isinstance(node, st.SizeName) and later and node.name in later and node.name not in sizes:
            raise CellError(f"size `{node.name}` is declared below, at line {later[node.name].line}", node.span,
                            hint="a size's default reads the sizes declared above it: move its declaration up")
        if isinstance(node, st.SizeName) and node.name not in sizes:
            raise CellError(f"unknown size `{node.name}`", node.span,
                            hint=did_you_mean(node.name, sizes) or
                            f"sizes are {', '.join(sorted(sizes))}; declare others with `size {node.name} = ...`")
        if isinstance(node, st.SizeBinary):
            if node.op == "/" and not division:
                raise CellError("sizes divide only in a size's default, as in `size key = hidden / heads`",
                                node.span, hint="declare the quotient as a size and use its name here")
            stack.extend((node.left, node.right))


class _Scope:
    """What a name means at a point of the body."""

    def __init__(self, cell: st.Cell):
        self.cell = cell
        self.kinds: Dict[str, str] = {d.name: "input" for d in cell.inputs}
        self.kinds.update({d.name: "state" for d in cell.states})
        self.kinds.update({d.name: "parameter" for d in cell.params})
        self.kinds.update({d.name: "buffer" for d in cell.buffers})
        self.kinds.update({d.name: "hyper-parameter" for d in cell.hypers})
        self.sizes = set(BUILTIN_SIZES) | {d.name for d in cell.sizes} | set(input_sizes(cell))
        self.locals: Dict[str, Span] = {}
        self.updated: Dict[str, Span] = {}
        self.used: Set[str] = set()

    def visible(self) -> List[str]:
        return list(self.kinds) + list(self.locals)


def _check_body(cell: st.Cell) -> None:
    scope = _Scope(cell)
    for assign in cell.body:
        _check_value(assign, scope)
        for target in assign.targets:
            _bind(target, scope)
    for decl in cell.states:
        if decl.name not in scope.updated:
            raise CellError(f"state `{decl.name}` is never updated", decl.span,
                            hint=f"give its next value with `{decl.name}' = ...`")
    for output in cell.outputs:
        first = next(o for o in cell.outputs if o.name == output.name)
        if first is not output:
            raise CellError(f"output `{output.name}` is named twice (first at line {first.span.line})", output.span,
                            hint="each output is a value of its own; name another, or drop this one")
        if output.name not in scope.locals and scope.kinds.get(output.name) != "state":
            kind = scope.kinds.get(output.name)
            if kind is not None:  # declared, but not a value the cell computes
                raise CellError(f"output `{output.name}` is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
                                "value the cell computes", output.span,
                                hint="outputs name a state (its next value) or a value assigned in the cell")
            raise CellError(f"output `{output.name}` is never defined", output.span,
                            hint=did_you_mean(output.name, list(scope.locals) + [d.name for d in cell.states])
                            or "outputs name a state (its next value) or a value assigned in the cell")
        scope.used.add(output.name)
    for decl in cell.inputs[1:]:
        if decl.name not in scope.used:
            warn(f"input `{decl.name}` is never used", decl.span)
    for decl in cell.params + cell.buffers:
        if decl.name not in scope.used:
            warn(f"{'parameter' if decl in cell.params else 'buffer'} `{decl.name}` is never used", decl.span)
    for name, span in scope.locals.items():
        if name not in scope.used:
            warn(f"`{name}` is assigned but never used", span)


def _bind(target: st.Target, scope: _Scope) -> None:
    name = target.name
    if target.primed:
        if scope.kinds.get(name) != "state":
            raise CellError(f"`{name}'` gives a next value, but `{name}` is not a state", target.span,
                            hint=did_you_mean(name, [d.name for d in scope.cell.states]))
        if name in scope.updated:
            raise CellError(f"state `{name}` is updated twice (first at line {scope.updated[name].line})",
                            target.span)
        scope.updated[name] = target.span
        return
    _check_name(name, target.span, "value")
    if name in scope.kinds:
        kind = scope.kinds[name]
        hint = f"write `{name}' = ...` for its next value" if kind == "state" else None
        raise CellError(f"cannot assign to `{name}`: it is the cell's {kind}", target.span, hint=hint)
    if name in scope.sizes:
        raise CellError(f"cannot assign to `{name}`: it is a size", target.span)
    if name in scope.locals:
        raise CellError(f"`{name}` is assigned twice (first at line {scope.locals[name].line})",
                        target.span, hint="give each value its own name")
    scope.locals[name] = target.span


def _check_value(assign: st.Assign, scope: _Scope) -> None:
    value, targets = assign.value, assign.targets
    is_chunk = isinstance(value, st.Call) and value.function == "chunk"
    if len(targets) > 1 and not is_chunk:
        raise CellError(f"{len(targets)} names on the left need a `chunk(..., {len(targets)})` on the right",
                        assign.span)
    if is_chunk:
        _check_call_arity(value)
        parts = value.args[1]
        if not (isinstance(parts, st.Number) and math.isfinite(parts.value) and
                parts.value == int(parts.value) and parts.value >= 1):
            raise CellError("chunk's second argument must be a whole number of parts", parts.span)
        if int(parts.value) != len(targets):
            raise CellError(f"chunk into {int(parts.value)} parts, but {len(targets)} "
                            f"name{'s' if len(targets) != 1 else ''} on the left", value.span)
        _check_expr(value.args[0], scope)
    else:
        _check_expr(value, scope)


def _check_call_arity(call: st.Call) -> None:
    function = FUNCTIONS[call.function]
    count = len(call.args)
    if count < function.min_args or (function.max_args is not None and count > function.max_args):
        if function.max_args == function.min_args:
            wanted = f"{function.min_args} argument{'s' if function.min_args != 1 else ''}"
        elif function.max_args is None:
            wanted = f"at least {function.min_args} arguments"
        else:
            wanted = f"{function.min_args} to {function.max_args} arguments"
        raise CellError(f"`{call.function}` takes {wanted}, got {count}", call.span,
                        hint=function.doc)


def _check_expr(expr: st.Expr, scope: _Scope) -> None:
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, st.Name):
            _check_name_use(node, scope)
        elif isinstance(node, st.Number):
            _check_number(node.value, node.span)
        elif isinstance(node, st.Primed):
            if scope.kinds.get(node.name) != "state":
                raise CellError(f"`{node.name}'` is not a next state: `{node.name}` is not a state", node.span)
            if node.name not in scope.updated:
                raise CellError(f"`{node.name}'` is used before it is assigned", node.span,
                                hint=f"assign `{node.name}' = ...` on an earlier line")
        elif isinstance(node, st.Binary):
            stack.extend((node.right, node.left))
        elif isinstance(node, st.Neg):
            stack.append(node.operand)
        elif isinstance(node, st.Call):
            if node.function not in FUNCTIONS:
                raise CellError(f"unknown function `{node.function}`", node.name_span,
                                hint=did_you_mean(node.function, FUNCTIONS) or
                                f"functions are {', '.join(sorted(FUNCTIONS))}")
            if node.function == "chunk":
                raise CellError("chunk gives several values: use it alone on the right of "
                                "`a, b = chunk(v, 2)`", node.span)
            _check_call_arity(node)
            _check_probability(node, scope)
            sizes = FUNCTIONS[node.function].size_args
            for index in sizes:
                _check_size_arg(node, node.args[index], scope)
            stack.extend(reversed([arg for i, arg in enumerate(node.args) if i not in sizes]))


def _check_probability(call: st.Call, scope: _Scope) -> None:
    """A literal probability, or a hyper-parameter's default, must lie in [0, 1]."""
    if not FUNCTIONS[call.function].probability_last:
        return
    p = call.args[-1]
    if isinstance(p, st.Number):
        value = p.value
    elif isinstance(p, st.Neg) and isinstance(p.operand, st.Number):
        value = -p.operand.value
    elif isinstance(p, st.Name) and scope.kinds.get(p.name) == "hyper-parameter":
        value = next(d.default for d in scope.cell.hypers if d.name == p.name)
    else:
        return
    if not 0 <= value <= 1:
        raise CellError(f"`{call.function}` takes a probability between 0 and 1, got {value:g}", p.span)


def _check_size_arg(call: st.Call, arg: st.Expr, scope: _Scope) -> None:
    """An argument that names a size (``split(q, heads)``) must be a size's name."""
    if not (isinstance(arg, st.Name) and arg.name in scope.sizes):
        raise CellError(f"`{call.function}` takes the name of a size here", arg.span,
                        hint=did_you_mean(arg.name, scope.sizes) if isinstance(arg, st.Name) else
                        FUNCTIONS[call.function].doc)


def _check_name_use(node: st.Name, scope: _Scope) -> None:
    name = node.name
    if name in scope.kinds or name in scope.locals:
        scope.used.add(name)
        return
    if name in scope.sizes:
        raise CellError(f"`{name}` is a size: sizes appear only in shapes", node.span)
    if name in FUNCTIONS:
        raise CellError(f"`{name}` is a function: call it as `{name}(...)`", node.span)
    later = [a for a in scope.cell.body for t in a.targets if t.name == name and not t.primed]
    if later:
        raise CellError(f"`{name}` is used before it is assigned (line {later[0].span.line})", node.span)
    raise CellError(f"undefined name `{name}`", node.span, hint=did_you_mean(name, scope.visible()))
