"""Walk a jaxpr and every jaxpr nested in its equations' parameters (scan / cond / remat /
custom_vjp / pjit / shard_map bodies), yielding each equation with the primitives it sits in."""
from __future__ import annotations

from typing import Iterator



def _subjaxprs(value) -> Iterator:
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):      # ClosedJaxpr
        yield value.jaxpr
    elif hasattr(value, "eqns"):                                   # Jaxpr
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _subjaxprs(v)


def equations(jaxpr, inside: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(equation, names of the enclosing primitives, outermost first) for every equation."""
    if hasattr(jaxpr, "consts"):
        jaxpr = jaxpr.jaxpr
    for eqn in jaxpr.eqns:
        yield eqn, inside
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from equations(sub, inside + (eqn.primitive.name,))
