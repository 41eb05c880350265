"""The parameter set over which gradients are taken (names, a predicate, or all trainable)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

ParamSpec = None | Iterable[str] | Callable[[str, nn.Parameter], bool]


def parameter_set(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter set to ``(name, parameter)`` pairs, each parameter once.

    ``None``: every parameter with ``requires_grad`` (tied weights appear once, under their first
    name). An iterable of names: exactly those; a tied weight may be named by any of its names
    (an unknown name is an error). A predicate ``f(name, param) -> bool``: the parameters it
    accepts. An empty set is an error.
    """
    named = list(model.named_parameters())  # de-duplicated: tied weights once
    if params is None:
        resolved = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        resolved = [(n, p) for n, p in named if params(n, p)]
    elif isinstance(params, str):
        raise TypeError(f"params must be an iterable of names, not the string {params!r}")
    else:
        wanted = list(params)
        by_name = dict(model.named_parameters(remove_duplicate=False))
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"unknown parameter name(s): {', '.join(map(repr, unknown))}")
        unique: dict[int, tuple[str, nn.Parameter]] = {}
        for n in wanted:  # first occurrence wins: order kept, tied aliases once
            unique.setdefault(id(by_name[n]), (n, by_name[n]))
        resolved = list(unique.values())
    if not resolved:
        raise ValueError("the parameter set is empty (no parameter requires grad or matched)")
    return resolved
