"""Parse and validate a run config (YAML) into frozen pydantic models.

Nothing else in evalkit reads YAML. Every validation error becomes one line that names the
file, the key path (``models[1].layers``) and what was expected.
"""
from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evalkit.embed import PCAConfig, TSNEConfig, UMAPConfig  # noqa: F401  (re-exported)
from evalkit.errors import EvalkitError
from evalkit.registry import FEATURES, StrictModel as _Strict, methods as _methods, metrics as _metrics

_UNIONS = (Union, types.UnionType)


def metric_names(method: str | None = None) -> tuple:
    """Registered score names (those that apply to ``method``, when given)."""
    return tuple(m.name for m in _metrics() if method is None or m.applies_to(method))


def method_names(*, default_only: bool = False) -> tuple:
    """Registered embedding methods in registration order (``default_only``: those run when
    ``embed.methods`` is not given)."""
    return tuple(m.name for m in _methods() if m.default or not default_only)


class DataConfig(_Strict):
    kind: Literal["digits", "imagefolder", "torchvision", "features"] = "digits"
    path: Optional[str] = None
    name: Optional[str] = Field(None, description="torchvision dataset class, e.g. MNIST")
    split: Optional[str] = None
    labels: Optional[str] = Field(None, description="labels file for a .npy features file")
    max_samples: Optional[int] = Field(None, ge=2)
    seed: int = 0

    @field_validator("path", "labels")
    @classmethod
    def _expand_home(cls, v):
        return os.path.expanduser(v) if v else v

    @model_validator(mode="after")
    def _needs_path(self):
        what = {"imagefolder": "the folder of class sub-folders", "torchvision": "the dataset's root folder",
                "features": "the features file (.npz, .npy or .safetensors)"}
        if self.kind in what and not self.path:
            raise LocatedError("path", f"required when kind is {self.kind!r}: {what[self.kind]}")
        if self.kind == "torchvision" and not self.name:
            raise LocatedError("name", "required when kind is 'torchvision': the dataset class, e.g. MNIST, CIFAR10")
        return self


class PoolingConfig(_Strict):
    spatial: Literal["avg", "max", "flatten"] = "avg"
    tokens: Literal["cls", "mean", "flatten"] = "cls"


class PreprocessConfig(_Strict):
    resize: Optional[int] = Field(None, ge=1)
    crop: Optional[int] = Field(None, ge=1)
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    channels: Optional[Literal[1, 3]] = None  # 3 turns grey images into RGB, 1 the reverse
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if v is not None and any(not s > 0 for s in v):
            raise ValueError(f"every value must be > 0 (images are divided by it); got {list(v)}")
        return v


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    source: Optional[str] = None
    features: Optional[str] = None
    checkpoint: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    layers: tuple[str, ...] = ("penultimate",)
    pooling: PoolingConfig = PoolingConfig()
    preprocess: Optional[PreprocessConfig] = None
    unsafe_pickle: bool = Field(
        False, description="opt-in: load a checkpoint that needs unpickling (runs its code)"
    )
    strict: bool = True

    @field_validator("features", "checkpoint")
    @classmethod
    def _expand_home(cls, v):
        return os.path.expanduser(v) if v else v

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v):
        bad = sorted({c for c in v if not c.isprintable()})
        if bad:
            raise ValueError(f"model name {v!r} contains the control character{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(repr(c) for c in bad)}; use printable characters")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _one_layer(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v):
        if not v:
            raise ValueError("give at least one layer name")
        if len(set(v)) != len(v):
            raise ValueError("layer names must be unique")
        for name in v:
            if not name or "/" in name:
                raise ValueError(f"layer name {name!r}: expected a non-empty name without '/'")
        return v

    @model_validator(mode="after")
    def _source_xor_features(self):
        if bool(self.source) == bool(self.features):
            raise ValueError(f"model {self.name!r} needs exactly one of 'source' or 'features'")
        if self.features and self.checkpoint:
            raise LocatedError("checkpoint", f"applies to a 'source' model; model {self.name!r} reads 'features'")
        if self.features and len(self.layers) > 1:
            raise LocatedError("layers", f"model {self.name!r} reads one feature set from 'features'; give at most "
                                         f"one layer name (it labels the features in the report)")
        return self

    @property
    def layer_names(self) -> tuple:
        """The layer names this entry's rows carry (a ``features`` entry: one, ``features`` by default)."""
        if self.features:
            return ("features",) if self.layers == ("penultimate",) else self.layers[:1]
        return self.layers


class ExtractConfig(_Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: int = Field(128, ge=1)
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = Field(
        "auto", description="DataLoader workers; auto: min(4, cores - 1) (cores shared among torchrun's ranks on "
                            "a machine), none for a single batch")
    bf16: bool = False
    channels_last: bool = Field(True, description="CUDA only: model and batches in channels_last memory format")
    compile: bool = Field(False, description="torch.compile the model (falls back to eager with a note)")
    cache: bool = True
    cache_dir: str = ".evalkit-cache"
    slice_size: int = Field(10000, ge=1, description="images per cached slice: a killed run resumes from the "
                                                     "last finished slice")
    timeout_s: float = Field(3600, gt=0, description="under torchrun, how long ranks wait for each other")


#: numpy's RandomState (behind openTSNE, umap-learn and scikit-learn) takes seeds 0 <= seed < 2**32.
SEED_LIMIT = 2**32


def _embed_config_class():
    """``EmbedConfig`` with one ``embed.<method>`` settings key per registered method."""
    from pydantic import create_model

    names = method_names()
    per_method = {m.name: (m.config, m.config()) for m in _methods()}

    class _EmbedBase(_Strict):
        methods: tuple[Literal[names], ...] = method_names(default_only=True)  # type: ignore[valid-type]
        pca_dims: int = Field(50, ge=2)
        seeds: tuple[int, ...] = (0,)

        @field_validator("methods", "seeds")
        @classmethod
        def _unique(cls, v):
            if not v:
                raise ValueError("give at least one")
            if len(set(v)) != len(v):
                raise ValueError("entries must be unique")
            return v

        @field_validator("seeds")
        @classmethod
        def _in_range(cls, v):
            for i, seed in enumerate(v):
                if not 0 <= seed < SEED_LIMIT:
                    raise LocatedError(f"[{i}]", f"expected an integer from 0 to {SEED_LIMIT - 1} (got {seed}): "
                                                 f"numpy, openTSNE and umap-learn take seeds 0 <= seed < 2**32")
            return v

    return create_model("EmbedConfig", __base__=_EmbedBase, **per_method)


EmbedConfig = _embed_config_class()


class MetricsConfig(_Strict):
    n_neighbors: int = Field(10, ge=1)
    knn_k: Optional[int] = Field(None, ge=1, description="k of kNN accuracy; n_neighbors if unset")
    weighted_knn_k: int = Field(20, ge=1)
    silhouette_max_samples: Optional[int] = Field(
        20000, ge=2, description="above this N, silhouette uses a seeded stratified sample"
    )
    rnx_max_k: int = Field(1000, ge=1, description="largest K of the R_NX curves and of rnx_auc (at most N - 2)")
    rnx_max_samples: Optional[int] = Field(
        10000, ge=2, description="above this N, R_NX averages its co-ranking counts over a seeded uniform sample "
                                 "of this many points (ranks still against all N); unset: every point")
    cka: Literal["debiased", "biased"] = Field(
        "debiased", description="HSIC estimator of linear CKA: unbiased (Song et al. 2012) or Kornblith's biased one")
    cka_batch_size: Optional[int] = Field(
        None, ge=4, description="minibatch CKA (Nguyen et al. 2021) with batches of this many samples; "
                                "unset: all samples at once")


class ReportConfig(_Strict):
    """The report's interactive explorer: hover thumbnails, stored once per report."""

    thumbnails: bool = True
    thumbnail_size: int = Field(24, ge=4, le=128, description="side of a thumbnail in pixels")
    max_thumbnails: int = Field(20_000, ge=0, description="no thumbnails above this many samples")


class WhereConfig(_Strict):
    model: str = "*"
    layer: str = "*"
    method: str = "*"


class ApproxConfig(_Strict):
    value: float
    relative: float = Field(1e-6, ge=0)
    absolute: float = Field(1e-12, ge=0)


class CheckConfig(_Strict):
    metric: str
    name: Optional[str] = None
    where: WhereConfig = WhereConfig()
    gt: Optional[float] = None
    gte: Optional[float] = None
    lt: Optional[float] = None
    lte: Optional[float] = None
    eq: Optional[float] = None
    approx: Optional[ApproxConfig] = None
    max_drop: Optional[float] = Field(None, ge=0, description="against --baseline")
    severity: Literal["fail", "warn"] = "fail"
    on: Literal["value", "lower", "upper"] = Field(
        "value", description="test the value, or the lower / upper end of its 95% interval")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        if v not in metric_names():
            raise ValueError(_unknown_message(v, metric_names()))
        return v

    @model_validator(mode="after")
    def _has_interval(self):
        if self.on != "value" and _metrics().get(self.metric).interval is None:
            with_interval = [m.name for m in _metrics() if m.interval is not None]
            raise LocatedError("on", f"{self.metric!r} has no interval, so it has no {self.on} bound to test; use "
                                     f"on: value, or a score with an interval: {', '.join(map(repr, with_interval))}")
        return self

    @model_validator(mode="after")
    def _has_condition(self):
        if not any(getattr(self, k) is not None for k in CONDITIONS):
            raise ValueError(f"check on {self.metric!r} needs a condition: one of {', '.join(CONDITIONS)}")
        return self


CONDITIONS = ("gt", "gte", "lt", "lte", "eq", "approx", "max_drop")

# Names users type for a valid value; a typo is matched by spelling instead.
_ALIASES = {"gpu": "cuda", "cuda:0": "cuda", "t-sne": "tsne", "umap-learn": "umap", "folder": "imagefolder",
            "npz": "features", "knn": "knn_accuracy", "accuracy": "knn_accuracy"}


def _near(name: str, choices) -> list:
    """Valid names close to ``name``: an alias users type, else errors.closest with a stricter
    cut-off (no 'fast' -> 'auto') and one suggestion."""
    from evalkit.errors import closest

    choices = [str(c) for c in choices]
    alias = _ALIASES.get(name.lower())
    if alias in choices:
        return [alias]
    return closest(name, choices, n=1, cutoff=0.6, substrings=False)


def _unknown_message(name, choices) -> str:
    choices = list(choices)
    near = _near(str(name), choices)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"expected one of {', '.join(map(repr, choices))} (got {name!r}{hint})"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class Config(_Strict):
    name: str = Field("evalkit-run", min_length=1)
    data: Optional[DataConfig] = Field(None, description="required unless every model reads a 'features' file")
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    extract: ExtractConfig = ExtractConfig()
    embed: EmbedConfig = EmbedConfig()
    metrics: MetricsConfig = MetricsConfig()
    checks: tuple[CheckConfig, ...] = ()
    report: ReportConfig = ReportConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v):
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        for n in names:
            if "/" in n:
                raise ValueError(f"model name {n!r} may not contain '/'")
        return v

    @model_validator(mode="after")
    def _data_unless_features_only(self):
        """Only a config whose models all read ``features`` files takes its samples from them."""
        # memory: sources record models that lived in a Python process (evalkit.evaluate's config.yaml)
        extracting = next((m for m in self.models if m.source and not m.source.startswith("memory:")), None)
        if self.data is None and extracting is not None:
            raise LocatedError("data", f"required when a model has a 'source' (model {extracting.name!r} extracts "
                                       f"features from it); only a config whose models all read 'features' files "
                                       f"may leave it out")
        return self

    @model_validator(mode="after")
    def _checks_select_rows(self):
        """A check's ``where`` must be able to match a row: a misspelt name is a mistake."""
        from evalkit.check import select_names  # an exact name wins over a glob, as when checks run

        models = {m.name: m for m in self.models}
        methods = (FEATURES,) + tuple(self.embed.methods)
        for i, check in enumerate(self.checks):
            w = check.where
            at = f"checks[{i}].where"
            selected = select_names(models, w.model)
            if not selected:
                why = "matches no model; " if _is_glob(w.model) else "no such model; "
                raise LocatedError(f"{at}.model", why + _unknown_message(w.model, models))
            chosen = select_names(methods, w.method)
            if not chosen:
                why = "matches no method in this run; " if _is_glob(w.method) else "no such method in this run; "
                raise LocatedError(f"{at}.method", why + _unknown_message(w.method, methods))
            layers = list(dict.fromkeys(layer for name in selected for layer in models[name].layer_names))
            if not select_names(layers, w.layer):
                why = "matches no layer" if _is_glob(w.layer) else "no such layer"
                raise LocatedError(f"{at}.layer", f"{why} in the selected models; " + _unknown_message(w.layer, layers))
            computed = [m for m in chosen if check.metric in metric_names(m)]
            if not computed:
                valid = metric_names(chosen[0]) if len(chosen) == 1 else metric_names()
                raise LocatedError(f"checks[{i}].metric", f"{check.metric!r} is not computed for method "
                                   f"{', '.join(map(repr, chosen))}; expected one of {', '.join(map(repr, valid))}")
        return self

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100
        )


class LocatedError(ValueError):
    """A validator's error about one key below the model that raises it.

    pydantic places a model validator's error at the model itself; ``path`` (e.g.
    ``"path"`` or ``"checks[0].where.model"``) names the offending key relative to it.
    """

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


_UNION_TAG_CHARS = ("[", "(")


def _strip_none(ann):
    """``Optional[X]`` -> ``X`` (pydantic puts no tag in the location for it)."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) in _UNIONS and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
        return typing.Union[tuple(rest)]
    return ann


def _model_class(ann):
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unwrap(ann):
    """``Optional[X]`` -> ``X`` and ``Annotated[X, ...]`` -> ``X``."""
    while True:
        while typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        stripped = _strip_none(ann)
        if stripped is ann:
            return ann
        ann = stripped


def _member(members, tag):
    """The union member a location tag names: a model's class name, or a discriminator value
    (a value of one of the model's ``Literal`` fields)."""
    for m in members:
        model = _model_class(m)
        if model is None:
            continue
        if model.__name__ == tag:
            return m
        for field in model.model_fields.values():
            if typing.get_origin(_unwrap(field.annotation)) is Literal and tag in typing.get_args(_unwrap(field.annotation)):
                return m
    return None


def _walk(loc: tuple, root=None):
    """Where a pydantic ``loc`` points: ``(display path, annotation there, model holding the
    last key, union branches taken)``.

    The annotations guide the walk, so union-member tags (``literal['auto']``, ``float``,
    ``ApproxConfig``, a discriminator value), validator wrappers and dict-key markers are left
    out of the path. ``branches`` lists ``(loc prefix, member)`` for each union of models the
    location goes through, so errors from the members the input was not meant for can be
    told apart.
    """
    root = root or Config
    path, ann, holder, branches = "", root, None, []
    for i, part in enumerate(loc):
        ann = _unwrap(ann)
        origin = typing.get_origin(ann)
        model = _model_class(ann)
        if model is not None:
            holder = model
            if isinstance(part, str) and part in model.model_fields:
                ann = model.model_fields[part].annotation
            else:  # an unknown key (extra_forbidden) or a non-string key
                ann = None
            path += ("." if path else "") + str(part) if isinstance(part, str) else f"[{part!r}]"
        elif origin in (tuple, list) and isinstance(part, int):
            args = [a for a in typing.get_args(ann) if a is not Ellipsis]
            ann = args[0] if args else Any
            path += f"[{part}]"
        elif origin is dict:
            if part == "[key]":
                continue
            args = typing.get_args(ann)
            ann = args[1] if len(args) == 2 else Any
            path += ("." if path else "") + str(part)
        elif origin in _UNIONS:
            members = [_unwrap(a) for a in typing.get_args(ann)]
            ann = _member(members, part)
            if ann is not None:
                branches.append((tuple(loc[:i]), part))
        elif isinstance(part, str) and (part == "[key]" or any(c in part for c in _UNION_TAG_CHARS)):
            continue
        else:
            path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
            ann = None
    return path, _unwrap(ann) if ann is not None else None, holder, branches


def _likely_branches(errors: list, model) -> list:
    """Keep, for each union of models, the errors of the member the input was most likely
    written for: the fewest mismatched ``Literal`` fields (a ``kind: b`` says "not A"), then
    the fewest errors."""
    per_union: dict = {}
    for e in errors:
        for prefix, tag in _walk(tuple(e["loc"]), model)[3]:
            literal, total = per_union.setdefault(prefix, {}).get(tag, (0, 0))
            per_union[prefix][tag] = (literal + (e["type"] == "literal_error"), total + 1)
    best = {prefix: min(scores, key=lambda t: (*scores[t], list(scores).index(t))) for prefix, scores in per_union.items()}
    kept = [e for e in errors if all(best[prefix] == tag for prefix, tag in _walk(tuple(e["loc"]), model)[3])]
    return kept or errors


def _show(value) -> str:
    """A config value as YAML spells it, shortened."""
    if value is None:
        text = "nothing"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a mapping"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plural(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
    "iterable_type": "a list", "dict_type": "a mapping", "mapping_type": "a mapping",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _expected(err: dict, ann) -> tuple[str, list]:
    """``(what was expected, close valid names)`` for one pydantic error."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        choices = list(typing.get_args(ann)) if typing.get_origin(ann) is Literal else []
        if not choices:
            choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        text = ", ".join(repr(c) for c in choices) or str(ctx.get("expected"))
        near = _near(err["input"], choices) if isinstance(err.get("input"), str) else []
        return (f"one of {text}" if len(choices) > 1 else text), near[:1]
    if kind in _EXPECTED:
        return _EXPECTED[kind], []
    if kind in ("model_type", "model_attributes_type"):
        model = _model_class(ann)
        keys = f" with keys {', '.join(model.model_fields)}" if model else ""
        return f"a mapping{keys}", []
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        number = "an integer" if ann is int else "a number"
        return f"{number} {_BOUNDS[kind]} {bound}", []
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        side = "at least" if kind == "too_short" else "at most"
        return f"a list of {side} {_plural(n, 'item')}", []
    if kind in ("string_too_short", "string_too_long"):
        if kind == "string_too_short" and ctx.get("min_length") == 1:
            return "a non-empty string", []
        n = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        return f"a string of {'at least' if kind == 'string_too_short' else 'at most'} {_plural(n, 'character')}", []
    msg = err["msg"]
    return msg[:1].lower() + msg[1:], []


def _describe(group: list, source_model) -> tuple[str, str]:
    """``(key path, message)`` for the errors at one key (several for a union)."""
    first = group[0]
    where, ann, holder, _ = _walk(tuple(first["loc"]), source_model)
    kind = first["type"]
    if kind == "extra_forbidden":
        key = str(first["loc"][-1])
        allowed = list(holder.model_fields) if holder is not None else []
        near = _near(key, allowed)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return where, f"unknown key{hint} (valid keys here: {', '.join(allowed)})"
    if kind == "missing":
        return where, "required key is missing"
    if first["loc"] and first["loc"][-1] == "[key]":  # a mapping key of the wrong type
        where = _walk(tuple(first["loc"])[:-2], source_model)[0]
        return where, f"key {_show(first.get('input'))}: keys must be strings"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = first.get("ctx") or {}
        key = str(ctx.get("discriminator", "")).strip("'\"")
        where = f"{where}.{key}" if where else key
        if kind == "union_tag_not_found":
            return where, "required key is missing"
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        near = _near(str(ctx.get("tag")), tags)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return where, f"expected one of {', '.join(map(repr, tags))} (got {_show(ctx.get('tag'))}{hint})"
    if kind == "invalid_key":
        where = _walk(tuple(first["loc"])[:-1], source_model)[0]
        return where, f"key {_show(first.get('input'))}: keys must be strings"
    if kind in ("value_error", "assertion_error"):
        exc = (first.get("ctx") or {}).get("error")
        msg = str(exc) if exc is not None else first["msg"].removeprefix("Value error, ")
        if isinstance(exc, LocatedError):
            sep = "" if exc.path.startswith("[") or not where else "."
            where = f"{where}{sep}{exc.path}"
        return where, msg
    phrases, near = [], []
    for err in group:
        member_ann = _walk(tuple(err["loc"]), source_model)[1]
        phrase, close = _expected(err, member_ann)
        if phrase not in phrases:
            phrases.append(phrase)
        near += [c for c in close if c not in near]
    expected = " or ".join(phrases)
    got = _show(first.get("input"))
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return where, f"expected {expected} (got {got}{hint})"


def format_validation_error(err: ValidationError, source: str, *, model=None) -> str:
    """One line: ``source: key.path: what is wrong`` (+ how many more problems).

    Errors at the same key are merged (a union such as ``learning_rate: auto | number``
    yields one error per member). pydantic also reports a spurious ``too_short`` for a list
    whose items failed; it is dropped when the list has other errors.
    """
    model = model or Config
    errors = err.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    errors = [e for e in errors if not (e["type"] == "too_short" and any(
        len(other) > len(e["loc"]) and other[:len(e["loc"])] == tuple(e["loc"]) for other in locs))] or errors
    errors = _likely_branches(errors, model)
    groups: dict = {}
    for e in errors:
        key = _walk(tuple(e["loc"]), model)[0] if e["type"] != "extra_forbidden" else tuple(e["loc"])
        groups.setdefault(key, []).append(e)
    ordered = list(groups.values())
    where, msg = _describe(ordered[0], model)
    n_more = len(ordered) - 1
    more = f" [and {_plural(n_more, 'more problem')}]" if n_more else ""
    return f"{source}: {where or '(top level)'}: {msg}{more}"


def parse_config(raw: Any, *, source: str = "config") -> Config:
    """Validate an already-parsed mapping (e.g. from a notebook) into a :class:`Config`."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise EvalkitError(f"{source}: expected a mapping with keys name, data, models, ...; the file is {kind}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise EvalkitError(format_validation_error(err, source)) from None


def _yaml_loader():
    """``yaml.SafeLoader`` (plain data only: no tags that build Python objects) that also
    refuses a key given twice in one mapping, which plain YAML silently resolves to the last,
    and reads a plain key such as ``on`` as the string it looks like (YAML 1.1 makes ``on``,
    ``off``, ``yes``, ``no`` booleans; a check's ``on: lower`` must stay a key named ``on``)."""
    import yaml

    bool_tag = "tag:yaml.org,2002:bool"

    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == bool_tag and isinstance(key_node, yaml.ScalarNode) and not key_node.style:
                        key_node.tag = "tag:yaml.org,2002:str"
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key]})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeySafeLoader


def _yaml_error(path, exc) -> EvalkitError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
    problem = str(getattr(exc, "problem", "") or exc)
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return EvalkitError(f"{path}: {where}: the tag {name!r} is not allowed; evalkit reads plain YAML data "
                            f"(mappings, lists, strings, numbers), never Python objects")
    if "appears twice" in problem:
        return EvalkitError(f"{path}: {where}: {problem}")
    for pyyaml_says, meaning in _YAML_HINTS.items():
        if pyyaml_says in problem:
            problem = f"{meaning} ({problem})"
            break
    return EvalkitError(f"{path}: YAML syntax error at {where}: {problem}")


_YAML_HINTS = {
    "expected <block end>": "the indentation does not line up with the lines above",
    "mapping values are not allowed here": "a ':' where none is expected (quote a value that holds ': ')",
    "cannot start any token": "a character YAML does not allow here (tabs cannot indent YAML)",
}


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file.

    Relative paths inside it (data, checkpoints, feature files) are relative to the directory
    evalkit runs in, as in every command-line tool; ``make report`` runs from the repo root.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalkitError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise EvalkitError(f"{path}: is a folder; expected a YAML config file") from None
    except UnicodeDecodeError as exc:
        raise EvalkitError(f"{path}: not a text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                           f"is not UTF-8); expected a YAML config file") from None
    except OSError as exc:
        raise EvalkitError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    return parse_config(raw, source=str(path))
