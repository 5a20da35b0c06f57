"""Parse and validate a run config (YAML) into frozen pydantic models.

Nothing else in evalkit reads YAML. Every validation error becomes one line that names the
file, the key path (``models[1].layers``) and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evalkit.errors import EvalkitError, closest

METHODS = ("tsne", "umap", "pca")
FEATURE_METRICS = ("silhouette", "knn_accuracy", "weighted_knn_accuracy")
EMBEDDING_METRICS = ("trustworthiness", "continuity", "silhouette", "knn_accuracy")
ALL_METRICS = tuple(dict.fromkeys(EMBEDDING_METRICS + FEATURE_METRICS))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    kind: Literal["digits", "imagefolder", "torchvision", "features"] = "digits"
    path: Optional[str] = None
    name: Optional[str] = Field(None, description="torchvision dataset class, e.g. MNIST")
    split: Optional[str] = None
    labels: Optional[str] = Field(None, description="labels file for a .npy features file")
    max_samples: Optional[int] = Field(None, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _needs_path(self):
        if self.kind in ("imagefolder", "torchvision", "features") and not self.path:
            raise ValueError(f"data.kind {self.kind!r} needs data.path")
        if self.kind == "torchvision" and not self.name:
            raise ValueError("data.kind 'torchvision' needs data.name (e.g. MNIST, CIFAR10)")
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
        return v

    @model_validator(mode="after")
    def _source_xor_features(self):
        if bool(self.source) == bool(self.features):
            raise ValueError(f"model {self.name!r} needs exactly one of 'source' or 'features'")
        if self.features and self.checkpoint:
            raise ValueError(f"model {self.name!r}: 'checkpoint' applies to 'source', not 'features'")
        return self


class ExtractConfig(_Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    bf16: bool = False
    cache: bool = True
    cache_dir: str = ".evalkit-cache"


class TSNEConfig(_Strict):
    backend: Literal["opentsne", "sklearn"] = "opentsne"
    perplexity: float = Field(30.0, gt=0)
    learning_rate: Union[Literal["auto"], float] = "auto"
    early_exaggeration: float = Field(12.0, gt=0)
    n_iter: int = Field(750, ge=50, description="total iterations, early exaggeration included")
    n_jobs: int = -1


class UMAPConfig(_Strict):
    n_neighbors: int = Field(15, ge=2)
    min_dist: float = Field(0.1, ge=0)
    n_epochs: Optional[int] = Field(None, ge=1)


class EmbedConfig(_Strict):
    methods: tuple[Literal["tsne", "umap", "pca"], ...] = METHODS
    pca_dims: int = Field(50, ge=2)
    seeds: tuple[int, ...] = (0,)
    tsne: TSNEConfig = TSNEConfig()
    umap: UMAPConfig = UMAPConfig()

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, v):
        if not v:
            raise ValueError("give at least one")
        if len(set(v)) != len(v):
            raise ValueError("entries must be unique")
        return v


class MetricsConfig(_Strict):
    n_neighbors: int = Field(10, ge=1)
    knn_k: Optional[int] = Field(None, ge=1, description="k of kNN accuracy; n_neighbors if unset")
    weighted_knn_k: int = Field(20, ge=1)
    silhouette_max_samples: Optional[int] = Field(
        20000, ge=2, description="above this N, silhouette uses a seeded stratified sample"
    )


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

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        if v not in ALL_METRICS:
            near = closest(v, ALL_METRICS)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown metric {v!r}{hint}; expected one of {', '.join(ALL_METRICS)}")
        return v

    @model_validator(mode="after")
    def _has_condition(self):
        if not any(getattr(self, k) is not None for k in CONDITIONS):
            raise ValueError(f"check on {self.metric!r} needs a condition: one of {', '.join(CONDITIONS)}")
        return self


CONDITIONS = ("gt", "gte", "lt", "lte", "eq", "approx", "max_drop")


class Config(_Strict):
    name: str = Field("evalkit-run", min_length=1)
    data: DataConfig = DataConfig()
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    extract: ExtractConfig = ExtractConfig()
    embed: EmbedConfig = EmbedConfig()
    metrics: MetricsConfig = MetricsConfig()
    checks: tuple[CheckConfig, ...] = ()

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

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100
        )


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys valid at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = _unwrap_model(ann)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _unwrap_model(ann):
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: key.path: what is wrong`` (+ how many more problems)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    where = _loc(loc)
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(Config, loc[:-1])
        near = closest(key, allowed)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        msg = f"unknown key{hint} (valid keys here: {', '.join(allowed)})"
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and first["type"] not in ("value_error", "assertion_error"):
            got = first["input"]
            text = repr(got) if not isinstance(got, dict) else "a mapping"
            if len(text) > 60:
                text = text[:57] + "..."
            msg += f" (got {text})"
    more = f" [and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}]" if len(errors) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def parse_config(raw: Any, *, source: str = "config") -> Config:
    """Validate an already-parsed mapping (e.g. from a notebook) into a :class:`Config`."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise EvalkitError(f"{source}: expected a mapping with keys name, data, models, ...; the file is {kind}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise EvalkitError(format_validation_error(err, source)) from None


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
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalkitError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise EvalkitError(f"{path}: YAML syntax error at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise EvalkitError(f"{path}: not valid YAML ({exc})") from None
    return parse_config(raw, source=str(path))

