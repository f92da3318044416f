"""One registry per op (tokamax-style): the implementations of an op, the order they are
preferred in for the *target* platform of the compile, and the rules that say why one cannot
take the shapes it is given.

    OP = Op("csa_attention",
            [Implementation("reference", csa_reference),
             Implementation("xla", csa_xla),
             Implementation("pallas_tpu", run_tpu, platforms=("tpu",), interpretable=True,
                            check=tpu_tiles)],
            preference={"cpu": ("xla",), "tpu": ("pallas_tpu", "xla"), "gpu": ("xla",)},
            aliases={"tpu": "pallas_tpu"})
    out = OP(q, kv, ..., implementation=None, interpret=None, platform=None)

One vocabulary (`VOCABULARY`): "reference" (pure jnp, obviously correct), "xla" (the fast jnp
form), "pallas_tpu" (Mosaic TPU kernel), "pallas_gpu" (Pallas Triton kernel), plus op-specific
extras only where unavoidable ("tokamax" for the grouped matmul).

Selection. `implementation=None` walks the target platform's preference order: an
implementation that does not compile for the target (and is not interpreted), or whose `check`
names a reason on these shapes, is skipped with a WARNING logged once per (op, implementation,
reason), and the next one is tried. An explicitly requested implementation is never replaced:
if its `check` names a reason, ValueError with that reason (an explicit request may target
another platform than the host's: ahead-of-time compiles). Checks see the shapes the op is
called with, so under `shard_map` they are the per-shard shapes.

Target platform, in order: the `platform=` argument, the innermost `target_platform(...)`
context (ahead-of-time compiles from a CPU host), the platform of the mesh in context (a
concrete mesh's devices, else an abstract mesh's device kind), then `jax.default_backend()`.
`interpret=None` means: interpret the Pallas kernels iff the target platform is "cpu" (Pallas
cannot compile there).

Old names are aliases: each maps to a new name (or to a function of the target platform, e.g.
"pallas" -> "pallas_<target>") with one deprecation note logged per (op, old name).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

PLATFORMS = ("cpu", "gpu", "tpu")
VOCABULARY = ("reference", "xla", "pallas_tpu", "pallas_gpu")
PALLAS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}    # target platform -> its Pallas kernel

_log = logging.getLogger("kernels_pallas.registry")
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kernels_pallas_target_platform", default=None)
_logged: set[tuple] = set()

Alias = str | None | Callable[[str], str | None]   # a new name, or one chosen by the target


def _platform_name(platform: str) -> str:
    p = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if p not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is invalid: allowed values {PLATFORMS}")
    return p


@contextlib.contextmanager
def target_platform(platform: str):
    """Compile for `platform` ("cpu", "gpu", "tpu") inside the block, whatever the host is:
    selection and `interpret=None` follow it (e.g. TPU AOT lowering from a CPU host)."""
    token = _target.set(_platform_name(platform))
    try:
        yield
    finally:
        _target.reset(token)


def _mesh_platform() -> str | None:
    """The platform of the mesh in context, or None. (Mesh context APIs differ between JAX
    versions, hence the guarded lookups.)"""
    get_mesh = getattr(jax.sharding, "get_mesh", None)
    if get_mesh is not None:
        try:
            mesh = get_mesh()
        except Exception:   # noqa: BLE001 - no concrete mesh reachable in this context
            mesh = None
        if mesh is not None and not mesh.empty:
            return mesh.devices.flat[0].platform
    get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_abstract is not None:
        try:
            mesh = get_abstract()
        except Exception:   # noqa: BLE001
            mesh = None
        if mesh is not None and not mesh.empty:
            platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
            if platform:
                return platform
    return None


def current_platform(platform: str | None = None) -> str:
    """The target platform: `platform`, else `target_platform(...)`, else the mesh in context,
    else the default backend."""
    if platform is not None:
        return _platform_name(platform)
    p = _target.get() or _mesh_platform() or jax.default_backend()
    return _platform_name(p)


def resolve_interpret(interpret: bool | None, platform: str | None = None) -> bool:
    """`interpret=None` = interpret iff the target platform is "cpu"."""
    if interpret is None:
        return current_platform(platform) == "cpu"
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret={interpret!r} is invalid: allowed values True, False, None")
    return interpret


def pallas_for(platform: str) -> str:
    """The Pallas implementation name for a target platform ("pallas_tpu" also on CPU, where
    it runs interpreted)."""
    return "pallas_gpu" if _platform_name(platform) == "gpu" else "pallas_tpu"


def log_once(level: int, key: tuple, msg: str, *args) -> None:
    """Log `msg % args` once per `key` (on the `kernels_pallas` logger tree)."""
    if key in _logged:
        return
    _logged.add(key)
    _log.log(level, msg, *args)


def deprecated_name(op: str, old: str, new: str | None) -> None:
    """The one deprecation note of an old implementation name."""
    log_once(logging.WARNING, ("alias", op, old, new),
             "%s: implementation name %r is deprecated; use %r", op, old, new)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """name: from `VOCABULARY` (or an op-specific extra); fn(*args, **kw) runs it;
    platforms: where it compiles; interpretable: a Pallas kernel that takes `interpret=` and
    runs interpreted anywhere; check(*args, **kw) -> None or why it cannot take these inputs
    (given the same arguments as fn, `interpret` included when interpretable); takes_platform:
    fn (and check) also receive `platform=` (the target)."""
    name: str
    fn: Callable[..., Any]
    platforms: tuple[str, ...] = PLATFORMS
    check: Callable[..., str | None] | None = None
    interpretable: bool = False
    takes_platform: bool = False

    def _kwargs(self, kw, interpret, platform):
        kw = dict(kw)
        if self.interpretable:
            kw["interpret"] = interpret
        if self.takes_platform:
            kw["platform"] = platform
        return kw

    def problem(self, args, kw, interpret: bool, platform: str) -> str | None:
        return None if self.check is None else self.check(*args, **self._kwargs(kw, interpret,
                                                                                platform))

    def unavailable(self, platform: str, interpret: bool) -> str | None:
        if platform in self.platforms or (self.interpretable and interpret):
            return None
        how = " (interpret=True would run it interpreted)" if self.interpretable else ""
        return f"it compiles for {'/'.join(self.platforms)}, not for {platform}{how}"


@dataclasses.dataclass(frozen=True)
class Selection:
    implementation: Implementation
    platform: str
    interpret: bool

    @property
    def name(self) -> str:
        return self.implementation.name


class Op:
    """An op's registry: `Op(name, implementations, preference, aliases)`; call it like the
    implementations plus `implementation=`, `interpret=`, `platform=`."""

    def __init__(self, name: str, implementations: Sequence[Implementation],
                 preference: Mapping[str, Sequence[str]],
                 aliases: Mapping[str, Alias] | None = None):
        self.name = name
        self.implementations = {impl.name: impl for impl in implementations}
        if len(self.implementations) != len(implementations):
            raise ValueError(f"{name}: duplicate implementation names")
        missing = set(PLATFORMS) - set(preference)
        if missing:
            raise ValueError(f"{name}: no preference order for platform(s) {sorted(missing)}")
        for p, order in preference.items():
            unknown = [n for n in order if n not in self.implementations]
            if unknown or not order:
                raise ValueError(f"{name}: preference for {p!r} names {list(order)}; known "
                                 f"implementations {self.names}")
        self.preference = {p: tuple(order) for p, order in preference.items()}
        self.aliases = dict(aliases or {})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.implementations)

    def canonical(self, implementation: str | None, platform: str | None = None) -> str | None:
        """The vocabulary name of `implementation` (aliases resolved with their one deprecation
        note; None stays None); ValueError for an unknown name."""
        if implementation is None or implementation in self.implementations:
            return implementation
        if isinstance(implementation, str) and implementation in self.aliases:
            new = self.aliases[implementation]
            if callable(new):
                new = new(current_platform(platform))
            deprecated_name(self.name, implementation, new)
            return new
        raise ValueError(f"implementation={implementation!r} is invalid for {self.name}: "
                         f"allowed values {self.names + (None,)}")

    def default_implementation(self, platform: str | None = None) -> str:
        """The first preference of the target platform (no shape check)."""
        return self.preference[current_platform(platform)][0]

    def select(self, *args, implementation: str | None = None, interpret: bool | None = None,
               platform: str | None = None, **kw) -> Selection:
        """Which implementation runs these inputs (see the module docstring)."""
        platform = current_platform(platform)
        interpret = resolve_interpret(interpret, platform)
        name = self.canonical(implementation, platform)
        if name is not None:
            impl = self.implementations[name]
            why = impl.problem(args, kw, interpret, platform)
            if why:
                raise ValueError(f"{self.name}: implementation {name!r} cannot run these "
                                 f"inputs: {why}")
            return Selection(impl, platform, interpret)
        reasons = []
        for name in self.preference[platform]:
            impl = self.implementations[name]
            why = impl.unavailable(platform, interpret) or impl.problem(args, kw, interpret,
                                                                        platform)
            if not why:
                log_once(logging.INFO, ("chosen", self.name, platform, name),
                         "%s on %s: implementation %r", self.name, platform, name)
                return Selection(impl, platform, interpret)
            reasons.append(f"{name}: {why}")
            log_once(logging.WARNING, ("fallback", self.name, name, why),
                     "%s on %s: implementation %r cannot take these inputs (%s); trying the "
                     "next preference", self.name, platform, name, why)
        raise ValueError(f"{self.name} on {platform}: no implementation can run these inputs: "
                         + "; ".join(reasons))

    def __call__(self, *args, implementation: str | None = None, interpret: bool | None = None,
                 platform: str | None = None, **kw):
        sel = self.select(*args, implementation=implementation, interpret=interpret,
                          platform=platform, **kw)
        impl = sel.implementation
        return impl.fn(*args, **impl._kwargs(kw, sel.interpret, sel.platform))


def problem_of(fn: Callable[..., Any], *args, **kw) -> str | None:
    """Run a raising validator: None if it passes, else its ValueError's message (for checks
    built from a kernel config's `validate_for` / `check_tiling`)."""
    try:
        fn(*args, **kw)
    except ValueError as e:
        return str(e)
    return None


# The usual shape of a kernel op: an XLA form everywhere, the platform's Pallas kernel first
# where there is one, and the old per-family names as aliases.
KERNEL_PREFERENCE = {"cpu": ("xla",), "tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla")}
KERNEL_ALIASES: Mapping[str, Alias] = {"tpu": "pallas_tpu", "gpu": "pallas_gpu",
                                        "pallas": pallas_for}


# ------------------------------------------------------------------ shared input checks
def check_query(q, layout: str = "[B, S, H, D]") -> tuple[int, ...]:
    """q must be a 4-D floating array; returns its shape."""
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}: expected {layout}")
    if not jax.numpy.issubdtype(q.dtype, jax.numpy.floating):
        raise TypeError(f"q has dtype {q.dtype}: expected a floating dtype")
    return tuple(q.shape)


def check_positive_int(name: str, value) -> None:
    """value must be a Python or NumPy int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")


def check_segment_ids(segment_ids, b: int, s: int) -> None:
    """segment_ids None or an integer [B, S] array."""
    if segment_ids is None:
        return
    if segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}: expected [B, S] = {(b, s)}")
    if not jax.numpy.issubdtype(segment_ids.dtype, jax.numpy.integer):
        raise TypeError(f"segment_ids has dtype {segment_ids.dtype}: expected an integer dtype")
