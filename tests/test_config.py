"""Config validation: one line per problem that names the key and what was expected."""
from __future__ import annotations

import pytest

from evalkit.config import load_config, parse_config
from evalkit.errors import EvalkitError

F = {"name": "m", "features": "f.npz"}


def _error(raw) -> str:
    with pytest.raises(EvalkitError) as info:
        parse_config(raw, source="x.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def _cfg(**top):
    return {"models": [dict(F)], **top}


@pytest.mark.parametrize("raw, expected", [
    (_cfg(embed={"methods": ["tsne", "tnse"]}),
     "x.yaml: embed.methods[1]: expected one of 'tsne', 'umap', 'pca', 'pacmap' (got 'tnse'; did you mean 'tsne'?)"),
    # a union: one message for both members, no member tag in the path, no far-fetched hint
    (_cfg(embed={"tsne": {"learning_rate": "fast"}}),
     "x.yaml: embed.tsne.learning_rate: expected 'auto' or a number (got 'fast')"),
    (_cfg(embed={"tsne": {"learning_rate": [1]}}),
     "x.yaml: embed.tsne.learning_rate: expected 'auto' or a number (got [1])"),
    # settings the libraries would reject (or accept and misuse) only after extraction
    (_cfg(embed={"seeds": [-1]}),
     "x.yaml: embed.seeds[0]: expected an integer from 0 to 4294967295 (got -1): numpy, openTSNE and umap-learn "
     "take seeds 0 <= seed < 2**32"),
    (_cfg(embed={"seeds": [0, 5000000000]}),
     "x.yaml: embed.seeds[1]: expected an integer from 0 to 4294967295 (got 5000000000): numpy, openTSNE and "
     "umap-learn take seeds 0 <= seed < 2**32"),
    (_cfg(embed={"umap": {"min_dist": 5}}),
     "x.yaml: embed.umap.min_dist: expected a number from 0 to 1 (got 5): umap-learn requires min_dist <= spread, "
     "and evalkit uses umap-learn's spread of 1"),
    (_cfg(embed={"tsne": {"learning_rate": -5}}),
     "x.yaml: embed.tsne.learning_rate: expected 'auto' or a number greater than 0 (got -5): it is the gradient "
     "step size, so 0 or less gives a meaningless embedding"),
    (_cfg(embed={"tsne": {"learning_rate": 0}}),
     "x.yaml: embed.tsne.learning_rate: expected 'auto' or a number greater than 0 (got 0): it is the gradient "
     "step size, so 0 or less gives a meaningless embedding"),
    # an Optional nested model
    ({"models": [{"name": "m", "source": "demo:cnn", "preprocess": {"channels": 2}}]},
     "x.yaml: models[0].preprocess.channels: expected one of 1, 3 (got 2)"),
    ({"models": [{"name": "m", "source": "demo:cnn", "preprocess": {"mean": "x"}}]},
     "x.yaml: models[0].preprocess.mean: expected a list (got 'x')"),
    ({"models": [{"name": "m", "source": "demo:cnn", "kwargs": [1]}]},
     "x.yaml: models[0].kwargs: expected a mapping (got [1])"),
    ({"models": [{"name": "m", "source": "demo:cnn", "kwargs": {1: 2}}]},
     "x.yaml: models[0].kwargs: key 1: keys must be strings"),
    # a list whose item failed: no spurious "at least 1 item" problem
    ({"models": ["m"]},
     "x.yaml: models[0]: expected a mapping with keys name, source, features, checkpoint, kwargs, layers, "
     "pooling, preprocess, unsafe_pickle, strict (got 'm')"),
    ({"models": []}, "x.yaml: models: expected a list of at least 1 item (got [])"),
    ({"name": "x"}, "x.yaml: models: required key is missing"),
    (_cfg(name=None), "x.yaml: name: expected a string (got nothing)"),
    (_cfg(name=""), "x.yaml: name: expected a non-empty string (got '')"),
    (_cfg(extract={"bf16": "maybe"}), "x.yaml: extract.bf16: expected true or false (got 'maybe')"),
    (_cfg(extract={"device": "gpu"}),
     "x.yaml: extract.device: expected one of 'auto', 'cpu', 'cuda', 'mps' (got 'gpu'; did you mean 'cuda'?)"),
    (_cfg(data={"kind": "digits", "max_samples": 10.5}), "x.yaml: data.max_samples: expected an integer (got 10.5)"),
    (_cfg(metrics={"n_neighbors": 0}), "x.yaml: metrics.n_neighbors: expected an integer >= 1 (got 0)"),
    (_cfg(metrics={"n_neighbours": 5}),
     "x.yaml: metrics.n_neighbours: unknown key; did you mean 'n_neighbors'? (valid keys here: n_neighbors, "
     "knn_k, weighted_knn_k, silhouette_max_samples, rnx_max_k, rnx_max_samples, cka, cka_batch_size)"),
    (_cfg(checks=[{"metric": "knn_accuracy", "gte": 0.5, "where": {"modle": "m"}}]),
     "x.yaml: checks[0].where.modle: unknown key; did you mean 'model'? (valid keys here: model, layer, method)"),
    (_cfg(checks=[{"metric": "knn_accuracy", "approx": 0.5}]),
     "x.yaml: checks[0].approx: expected a mapping with keys value, relative, absolute (got 0.5)"),
    ({1: 2, "models": [dict(F)]}, "x.yaml: (top level): key 1: keys must be strings"),
    ({"data": {"kind": "torchvision", "path": "d"}, "models": [dict(F)]},
     "x.yaml: data.name: required when kind is 'torchvision': the dataset class, e.g. MNIST, CIFAR10"),
    ({"models": [{"name": "m", "features": "f.npz", "checkpoint": "c.pt"}]},
     "x.yaml: models[0].checkpoint: applies to a 'source' model; model 'm' reads 'features'"),
    ({"models": [{"name": "m", "features": "f.npz", "layers": ["a", "b"]}]},
     "x.yaml: models[0].layers: model 'm' reads one feature set from 'features'; give at most one layer name"),
    ({"models": [{"name": "m", "source": "demo:cnn", "layers": ["a/b"]}]},
     "x.yaml: models[0].layers: layer name 'a/b': expected a non-empty name without '/'"),
    (_cfg(checks=[{"metric": "knn_accuracy", "gte": 0.5, "where": {"layer": "fc"}}]),
     "x.yaml: checks[0].where.layer: no such layer in the selected models; expected one of 'features' (got 'fc')"),
    (_cfg(checks=[{"metric": "knn_accuracy", "gte": 0.5, "where": {"method": "umap"}}], embed={"methods": ["pca"]}),
     "x.yaml: checks[0].where.method: no such method in this run; expected one of 'features', 'pca' (got 'umap')"),
    (_cfg(checks=[{"metric": "weighted_knn_accuracy", "gte": 0.5, "where": {"method": "pca"}}]),
     "x.yaml: checks[0].metric: 'weighted_knn_accuracy' is not computed for method 'pca'"),
])
def test_one_line_names_the_key(raw, expected):
    assert _error(raw).startswith(expected)


def test_more_problems_are_counted():
    message = _error(_cfg(metrics={"n_neighbors": "x", "knn_k": "y"}, extract={"bf16": "z"}))
    assert message.startswith("x.yaml: extract.bf16: expected true or false")
    assert message.endswith("[and 2 more problems]")


def test_globs_in_where_need_not_name_a_model():
    cfg = parse_config({"data": {"kind": "digits"},
                        "models": [{"name": "cnn", "source": "demo:cnn", "layers": ["fc", "features"]}],
                        "checks": [{"metric": "knn_accuracy", "gte": 0.5, "where": {"model": "c*", "layer": "f*"}},
                                   {"metric": "trustworthiness", "gte": 0.5, "where": {"layer": "fc", "method": "t*"}}]})
    assert len(cfg.checks) == 2
    assert parse_config({"models": [dict(F)]}).models[0].layer_names == ("features",)


def test_resolved_config_loads_again(tmp_path):
    raw = {"name": "x", "data": {"kind": "digits", "max_samples": 50},
           "models": [{"name": "cnn", "source": "demo:cnn", "layers": ["fc"], "kwargs": {"width": 4}}],
           "embed": {"methods": ["pca", "tsne"], "tsne": {"learning_rate": 200}},
           "checks": [{"metric": "knn_accuracy", "gte": 0.9, "where": {"model": "cnn", "method": "features"}}]}
    cfg = parse_config(raw)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg


def test_data_is_required_unless_every_model_reads_features():
    message = _error({"models": [dict(F), {"name": "cnn", "source": "demo:cnn"}]})
    assert message == ("x.yaml: data: required when a model has a 'source' (model 'cnn' extracts features from it); "
                       "only a config whose models all read 'features' files may leave it out")
    assert _error({"data": None, "models": [{"name": "cnn", "source": "demo:cnn"}]}).startswith("x.yaml: data: required")
    assert parse_config({"models": [dict(F)]}).data is None
    assert parse_config({"data": None, "models": [dict(F)]}).data is None


def test_a_features_only_config_round_trips(tmp_path):
    cfg = parse_config({"name": "x", "models": [dict(F), {"name": "n", "features": "g.npz"}]})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("text, expected", [
    ("name: x\nmodels:\n  - name: m\n    features: f\n   source: s\n", "YAML syntax error at line 5"),
    ("a:\n\tb: 1\n", "YAML syntax error at line 2, column 1: a character YAML does not allow here"),
    ("name: x\nname: y\nmodels: []\n", "line 2, column 1: key 'name' appears twice in one mapping (first on line 1)"),
    ("models: [{name: m, features: f, name: n}]\n", "key 'name' appears twice"),
    ("name: !!python/name:os.system\nmodels: []\n", "the tag '!!python/name:os.system' is not allowed"),
    ("!!python/object/new:os.system [echo]\n", "is not allowed"),
    ("name: !custom x\n", "the tag '!custom' is not allowed"),
    ("", "the file is empty"),
    ("just a string\n", "the file is a str"),
])
def test_yaml_problems(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(EvalkitError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    (tmp_path / "c.yaml").write_text("base: &b {name: m, features: f.npz}\n"
                                     "models: [{<<: *b, name: n}]\n".replace("base: &b", "name: run\nx-base: &b"))
    with pytest.raises(EvalkitError) as info:  # an unknown key, but no duplicate-key complaint
        load_config(tmp_path / "c.yaml")
    assert "x-base: unknown key" in str(info.value)


def test_tagged_and_untagged_unions_of_models():
    """The config has no union of models today; the formatter must still read their locations."""
    from typing import Annotated, Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from evalkit.config import format_validation_error

    class A(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["a"]
        x: int = 0

    class B(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["b"]
        y: int = 0

    Tagged = Annotated[Union[A, B], Field(discriminator="kind")]

    class Top(BaseModel):
        item: Optional[Tagged] = None
        items: list[Tagged] = []
        plain: Union[A, B, None] = None

    def line(raw):
        with pytest.raises(ValidationError) as info:
            Top.model_validate(raw)
        return format_validation_error(info.value, "s.yaml", model=Top)

    assert line({"item": {"kind": "c"}}) == "s.yaml: item.kind: expected one of 'a', 'b' (got 'c')"
    assert line({"item": {}}) == "s.yaml: item.kind: required key is missing"
    assert line({"item": {"kind": "b", "z": 1}}) == "s.yaml: item.z: unknown key (valid keys here: kind, y)"
    assert line({"items": [{"kind": "a"}, {"kind": "b", "y": "no"}]}) == "s.yaml: items[1].y: expected an integer (got 'no')"
    assert line({"plain": {"kind": "a", "x": "q"}}) == "s.yaml: plain.x: expected an integer (got 'q')"
    assert line({"plain": {"kind": "b", "x": 1}}) == "s.yaml: plain.x: unknown key (valid keys here: kind, y)"


def test_the_edges_of_the_ranges_are_valid():
    cfg = parse_config(_cfg(embed={"seeds": [0, 2**32 - 1], "umap": {"min_dist": 1.0},
                                   "tsne": {"learning_rate": 1e-3}}), source="x.yaml")
    assert cfg.embed.seeds == (0, 2**32 - 1) and cfg.embed.umap.min_dist == 1.0
    assert cfg.embed.tsne.learning_rate == 1e-3
    assert parse_config(_cfg(embed={"tsne": {"learning_rate": "auto"}}), source="x.yaml").embed.tsne.learning_rate == "auto"
