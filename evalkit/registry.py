"""Registries: each score and each embedding method is defined once, where it is computed.

A :class:`Metric` (registered at the bottom of :mod:`evalkit.score`) and a :class:`Method`
(registered at the bottom of :mod:`evalkit.embed`) carry everything the rest of evalkit needs
to know about them: config validation, the scoring loop, the report's tables and notes and the
check vocabulary all read these entries, so adding a score or a method is one module and one
test. The registries fill when those two light modules are imported (their heavy libraries
load inside the functions), which :func:`metrics` and :func:`methods` do on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from pydantic import BaseModel, ConfigDict

from evalkit.errors import unknown

T = TypeVar("T")

#: The ``method`` of the rows that score the raw (high-dimensional) features.
FEATURES = "features"


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Registry(Generic[T]):
    """Named entries in registration order; an unknown name lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        name = getattr(item, "name")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise unknown(self.kind, str(name), self._items) from None

    def names(self) -> tuple:
        return tuple(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        entries = ", ".join(f"{name} ({getattr(item, 'title', name)})" for name, item in self._items.items())
        return f"<evalkit {self.kind}s: {entries}>"


@dataclass(frozen=True)
class Metric:
    """One score.

    Attributes
    ----------
    name : str
        Key in metrics.json rows, checks and config (``knn_accuracy``).
    title, short : str
        Shown in the report's headings and narrow table columns.
    on : frozenset of {"features", "embedding"}
        Which rows it scores: the raw features, each 2-D embedding, or both.
    compute : callable
        ``compute(space) -> float | None`` where ``space`` is an :class:`evalkit.scoring.Space`;
        None (or nan) means undefined for this data.
    higher_is_better : bool
    needs_classes : bool
        Undefined when the data have fewer than two classes.
    needs_class_pairs : bool
        Undefined when every class has a single sample (no neighbour can share a class).
    params : tuple of str
        The ``metrics:`` config keys it reads (shown in the report's notes).
    description : str
        One or two sentences for the report's notes; ``{k}`` becomes the neighbour count.
    interval : callable, optional
        ``interval(value, n_samples) -> (lo, hi)``: a 95% interval of the score over the
        samples, from its (seed-mean) value. Rows then carry ``<name>_lo`` and ``<name>_hi``,
        and checks may test a bound (``on: lower`` / ``on: upper``).
    """

    name: str
    title: str
    short: str
    on: frozenset
    compute: Callable[[Any], Optional[float]]
    higher_is_better: bool = True
    needs_classes: bool = False
    needs_class_pairs: bool = False
    params: tuple = ()
    description: str = ""
    interval: Optional[Callable[[float, int], tuple]] = None

    def applies_to(self, method: str) -> bool:
        return ("features" if method == FEATURES else "embedding") in self.on


@dataclass(frozen=True)
class Method:
    """One 2-D embedding method.

    Attributes
    ----------
    name, title : str
        Config key (``embed.methods``, ``embed.<name>: {...}``) and display name.
    config : type of StrictModel
        Its settings, validated under ``embed.<name>``.
    create : callable
        ``create(settings) -> embedder`` with ``fit_transform(X, *, random_state, graph)``,
        ``graph_neighbors(n_samples)`` and ``params(n_samples, graph)``.
    input : {"reduced", "raw"}
        ``reduced``: PCA to ``embed.pca_dims`` first when the features are wider (t-SNE,
        UMAP); ``raw``: the features as they are (PCA itself).
    fit_sizes : callable, optional
        ``fit_sizes(settings, n_samples) -> (settings, notes)``: lowers defaults that do not
        fit few samples (raising :class:`~evalkit.errors.EvalkitError` for an explicit value
        that does not fit).
    seeded : bool
        Whether the result depends on the seed (PCA does not: one seed is enough).
    default : bool
        Part of the default ``embed.methods`` (an optional method is asked for by name).
    requires : tuple of str
        Modules an optional method imports; a run that asks for it without them fails early.
    extra : str, optional
        The pip extra that installs them (``pip install 'evalkit[NAME]'``).
    cost : int
        Its usual running time relative to the other methods (higher: longer). Methods that
        run side by side start the longest first, so the last to start is a short one.
    """

    name: str
    title: str
    config: type
    create: Callable[[Any], Any]
    input: str = "reduced"
    fit_sizes: Optional[Callable] = None
    seeded: bool = True
    default: bool = True
    requires: tuple = ()
    extra: Optional[str] = None
    cost: int = 0

    def missing(self) -> tuple:
        """The modules of :attr:`requires` that cannot be imported here."""
        import importlib.util

        return tuple(m for m in self.requires if importlib.util.find_spec(m) is None)


METRICS: Registry[Metric] = Registry("metric")
METHODS: Registry[Method] = Registry("embedding method")


def metrics() -> Registry[Metric]:
    """Every registered score (importing :mod:`evalkit.score` registers the built-in ones)."""
    import evalkit.score  # noqa: F401

    return METRICS


def methods() -> Registry[Method]:
    """Every registered embedding method (importing :mod:`evalkit.embed` registers them)."""
    import evalkit.embed  # noqa: F401

    return METHODS
