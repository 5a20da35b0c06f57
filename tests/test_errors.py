"""Every user mistake: exit code 2, one line on stderr naming what is wrong, no traceback,
and the earlier run folder given as ``--out`` left byte-for-byte as it was.

Each case builds its inputs in a fresh working folder and runs ``evalkit.cli.main`` in this
process. Cases that need torch use 8 tiny grey images and the demo CNN (random weights).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import write_image_folder
from helpers_cli import blobs, features_config, make_run_folder, run_cli, tree_digest, write_features

PREV = "prev"  # the earlier run folder every case passes as --out


def _cfg(path: str, cfg) -> str:
    Path(path).write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def _report(cfg) -> list:
    return ["report", cfg, "--out", PREV]


def _feats(name: str = "f.npz", n_per_class: int = 10) -> str:
    X, y = blobs(n_per_class=n_per_class)
    write_features(Path(name), X, y, ["a", "b", "c"])
    return name


def _with(base: dict, **changes) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in changes.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _features_cfg(**changes) -> dict:
    f = _feats()
    base = {"name": "t", "data": {"kind": "features", "path": f}, "models": [{"name": "m", "features": f}],
            "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 3}}
    return _with(base, **changes)


def _images(root: str = "imgs") -> str:
    write_image_folder(Path(root), classes=("a", "b"), n_per_class=4, size=(8, 8), mode="L")
    return root


def _image_cfg(model: dict, **changes) -> dict:
    base = {"name": "t", "data": {"kind": "imagefolder", "path": _images()},
            "models": [{"name": "m", "layers": ["fc"], **model}],
            "extract": {"device": "cpu", "cache": False}, "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 1}}
    return _with(base, **changes)


def _cnn_checkpoint(path: str, **kwargs) -> str:
    import torch

    from evalkit.models import create_model

    torch.save(create_model("demo:cnn", kwargs=kwargs).state_dict(), path)
    return path


# --- the cases: name -> build() returning (argv, [substrings the error line must hold]) -------------

def config_missing():
    return _report("nope.yaml"), ["nope.yaml", "not found"]


def config_is_a_folder():
    os.mkdir("cfg.yaml")
    return _report("cfg.yaml"), ["cfg.yaml", "is a folder"]


def config_not_text():
    Path("c.yaml").write_bytes(b"\xff\xfe\x00name: x")
    return _report("c.yaml"), ["c.yaml", "not UTF-8"]


def config_empty():
    return _report(_cfg("c.yaml", "")), ["c.yaml", "empty"]


def config_a_list():
    return _report(_cfg("c.yaml", "- name: x\n")), ["c.yaml", "expected a mapping", "list"]


def yaml_syntax_error():
    text = "name: x\nmodels:\n  - name: m\n    features: f.npz\n   source: demo:cnn\n"
    return _report(_cfg("c.yaml", text)), ["c.yaml", "YAML syntax error", "line 5"]


def yaml_python_tag():
    text = "name: !!python/object/apply:os.system ['touch pwned']\nmodels: [{name: m, features: f.npz}]\n"
    return _report(_cfg("c.yaml", text)), ["c.yaml", "line 1", "'!!python/object/apply:os.system' is not allowed"]


def yaml_duplicate_key():
    text = "name: x\nmodels: [{name: m, features: f.npz}]\nname: y\n"
    return _report(_cfg("c.yaml", text)), ["c.yaml", "line 3", "'name' appears twice"]


def unknown_top_level_key():
    return _report(_cfg("c.yaml", _with(_features_cfg(), embedd={}))), [
        "c.yaml: embedd: unknown key; did you mean 'embed'?", "valid keys here: name, data, models"]


def unknown_nested_key():
    cfg = _features_cfg()
    cfg["models"][0]["layer"] = "x"
    return _report(_cfg("c.yaml", cfg)), ["c.yaml: models[0].layer: unknown key; did you mean 'layers'?"]


def wrong_type():
    return _report(_cfg("c.yaml", _features_cfg(metrics={"n_neighbors": "ten"}))), [
        "c.yaml: metrics.n_neighbors: expected an integer (got 'ten')"]


def out_of_range():
    return _report(_cfg("c.yaml", _features_cfg(embed={"pca_dims": 1}))), [
        "c.yaml: embed.pca_dims: expected an integer >= 2 (got 1)"]


def unknown_method():
    return _report(_cfg("c.yaml", _features_cfg(embed={"methods": ["pca", "tnse"]}))), [
        "c.yaml: embed.methods[1]: expected one of 'tsne', 'umap', 'pca', 'pacmap' (got 'tnse'; did you mean 'tsne'?)"]


def union_value():
    return _report(_cfg("c.yaml", _features_cfg(embed={"tsne": {"learning_rate": "fast"}}))), [
        "c.yaml: embed.tsne.learning_rate: expected 'auto' or a number (got 'fast')"]


def seed_negative():
    return _report(_cfg("c.yaml", _features_cfg(embed={"methods": ["tsne"], "seeds": [-1]}))), [
        "c.yaml: embed.seeds[0]: expected an integer from 0 to 4294967295 (got -1)", "2**32"]


def seed_too_large():
    return _report(_cfg("c.yaml", _features_cfg(embed={"methods": ["umap"], "seeds": [5000000000]}))), [
        "c.yaml: embed.seeds[0]:", "(got 5000000000)", "0 <= seed < 2**32"]


def umap_min_dist_above_spread():
    return _report(_cfg("c.yaml", _features_cfg(embed={"methods": ["umap"], "umap": {"min_dist": 5}}))), [
        "c.yaml: embed.umap.min_dist: expected a number from 0 to 1 (got 5)", "min_dist <= spread"]


def tsne_learning_rate_negative():
    return _report(_cfg("c.yaml", _features_cfg(embed={"methods": ["tsne"], "tsne": {"learning_rate": -5}}))), [
        "c.yaml: embed.tsne.learning_rate: expected 'auto' or a number greater than 0 (got -5)"]


def unknown_data_kind():
    return _report(_cfg("c.yaml", _features_cfg(data={"kind": "imagefoldr"}))), [
        "data.kind: expected one of", "did you mean 'imagefolder'?"]


def data_path_missing_key():
    return _report(_cfg("c.yaml", {"data": {"kind": "features"}, "models": [{"name": "m", "features": "f.npz"}]})), [
        "c.yaml: data.path: required when kind is 'features'"]


def unknown_check_metric():
    return _report(_cfg("c.yaml", _features_cfg(checks=[{"metric": "knn_acc", "gte": 0.5}]))), [
        "c.yaml: checks[0].metric: expected one of", "(got 'knn_acc'; did you mean 'knn_accuracy'?)"]


def unknown_check_model():
    check = {"metric": "knn_accuracy", "gte": 0.5, "where": {"model": "mm", "method": "features"}}
    return _report(_cfg("c.yaml", _features_cfg(checks=[check]))), [
        "c.yaml: checks[0].where.model: no such model", "(got 'mm'; did you mean 'm'?)"]


def check_metric_not_computed_for_method():
    check = {"metric": "trustworthiness", "gte": 0.5, "where": {"method": "features"}}
    return _report(_cfg("c.yaml", _features_cfg(checks=[check]))), [
        "checks[0].metric: 'trustworthiness' is not computed for method 'features'"]


def check_where_glob_matches_no_model():
    check = {"metric": "knn_accuracy", "gte": 0.5, "where": {"model": "x*"}}
    return _report(_cfg("c.yaml", _features_cfg(checks=[check]))), ["checks[0].where.model: matches no model"]


def check_metric_not_computed_for_any_selected_method():
    check = {"metric": "trustworthiness", "gte": 0.5, "where": {"method": "feat*"}}
    return _report(_cfg("c.yaml", _features_cfg(checks=[check]))), [
        "checks[0].metric: 'trustworthiness' is not computed for method 'features'"]


def check_missing_condition():
    return _report(_cfg("c.yaml", _features_cfg(checks=[{"metric": "knn_accuracy"}]))), [
        "checks[0]: check on 'knn_accuracy' needs a condition"]


def model_name_with_slash():
    cfg = _features_cfg()
    cfg["models"][0]["name"] = "a/b"
    return _report(_cfg("c.yaml", cfg)), ["models: model name 'a/b' may not contain '/'"]


def model_name_with_a_control_character():
    cfg = _features_cfg()
    cfg["models"][0]["name"] = "a\x00b"
    return _report(_cfg("c.yaml", cfg)), ["models[0].name: model name 'a\\x00b' contains the control character"]


def unknown_source_prefix():
    return _report(_cfg("c.yaml", _image_cfg({"source": "dmeo:cnn"}))), ["model source prefix 'dmeo'", "'demo'"]


def unknown_demo_model():
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnm"}))), ["unknown demo model 'cnm'", "'cnn'"]


def unknown_torchvision_model():
    return _report(_cfg("c.yaml", _image_cfg({"source": "torchvision:resnet19"}))), [
        "unknown torchvision model 'resnet19'", "'resnet18'"]


def unknown_timm_model():
    return _report(_cfg("c.yaml", _image_cfg({"source": "timm:resnet19"}))), ["unknown timm model 'resnet19'", "resnet18"]


def unknown_layer():
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "layers": ["fc2"]}))), [
        "unknown layer 'fc2'", "evalkit layers"]


def bad_model_kwargs():
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "kwargs": {"widht": 4}}))), [
        "demo:cnn", "widht"]


def missing_checkpoint():
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": "nope.pt"}))), [
        "nope.pt", "not found"]


def checkpoint_wrong_shapes():
    ckpt = _cnn_checkpoint("small.pt", width=8)
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": ckpt}))), [
        "small.pt", "does not fit", "shape"]


def checkpoint_wrong_keys():
    import torch

    torch.save({"encoder.weight": torch.zeros(3, 3)}, "other.pt")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": "other.pt"}))), [
        "other.pt", "missing keys"]


def checkpoint_corrupt():
    Path("broken.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": "broken.pt"}))), [
        "broken.pt", "cannot read"]


def checkpoint_needs_unpickling():
    import torch

    from evalkit.models import create_model

    torch.save({"state_dict": create_model("demo:cnn").state_dict(), "args": argparse.Namespace(lr=0.1)}, "p.pt")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": "p.pt"}))), [
        "p.pt", "pickled Python objects", "unsafe_pickle: true"]


class _Evil:
    def __reduce__(self):  # unpickling this runs a shell command
        return (os.system, ("touch pwned",))


def checkpoint_that_runs_code():
    import torch

    torch.save({"state_dict": {}, "payload": _Evil()}, "evil.pt")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn", "checkpoint": "evil.pt"}))), ["evil.pt"]


def features_file_with_pickled_objects():
    cfg = _features_cfg()
    X, y = blobs()
    np.savez("f.npz", features=X, labels=y, label_names=np.array([_Evil(), "b", "c"], dtype=object))
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "cannot read"]


def python_source_missing_module():
    return _report(_cfg("c.yaml", _image_cfg({"source": "python:no_such_module_xyz:make"}))), [
        "cannot import 'no_such_module_xyz'"]


def python_source_missing_factory():
    Path("mymodels.py").write_text("import torch\n\ndef make_net():\n    return torch.nn.Linear(64, 2)\n")
    return _report(_cfg("c.yaml", _image_cfg({"source": "python:mymodels:make_nett"}))), [
        "make_nett", "did you mean 'make_net'"]


def forward_fails_on_the_input_size():
    # the MLP wants 64 inputs (8x8); resizing to 12x12 gives 144: a torch RuntimeError in the forward
    model = {"source": "demo:mlp", "layers": ["hidden2"], "preprocess": {"resize": 12, "channels": 1}}
    return _report(_cfg("c.yaml", _image_cfg(model))), ["model 'm'", "hidden1", "preprocess"]


def imagefolder_missing():
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn"}, data={"path": "nowhere"}))), [
        "data.path", "nowhere"]


def imagefolder_no_class_folders():
    os.mkdir("empty")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn"}, data={"path": "empty"}))), [
        "data.path", "empty"]


def imagefolder_no_images():
    for cls in ("a", "b"):
        os.makedirs(f"noimg/{cls}")
        Path(f"noimg/{cls}/readme.txt").write_text("x")
    return _report(_cfg("c.yaml", _image_cfg({"source": "demo:cnn"}, data={"path": "noimg"}))), [
        "data.path", "no images"]


def corrupt_image():
    cfg = _image_cfg({"source": "demo:cnn"})
    Path("imgs/b/zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return _report(_cfg("c.yaml", cfg)), ["zz-broken.png", "cannot read image"]


def torchvision_dataset_needs_more_arguments():
    cfg = _image_cfg({"source": "demo:cnn"}, data={"kind": "torchvision", "name": "CocoDetection", "path": "."})
    return _report(_cfg("c.yaml", cfg)), ["data.name: CocoDetection needs 'annFile'", "classification datasets"]


def grey_and_colour_images_mixed():
    cfg = _image_cfg({"source": "demo:mlp", "layers": ["hidden1"]})  # no conv: images keep their channels
    write_image_folder(Path("imgs"), classes=("c",), n_per_class=4, size=(8, 8), mode="RGB")
    return _report(_cfg("c.yaml", cfg)), ["images with 1 and 3 channels (grey and colour)", "channels: 3"]


def preprocess_std_zero():
    model = {"source": "demo:cnn", "preprocess": {"mean": [0.5], "std": [0]}}
    return _report(_cfg("c.yaml", _image_cfg(model))), ["models[0].preprocess.std", "must be > 0"]


def features_file_missing():
    return _report(_cfg("c.yaml", _features_cfg(data={"path": "none.npz"}))), ["none.npz", "not found"]


def features_file_corrupt():
    cfg = _features_cfg()
    Path("f.npz").write_bytes(b"PK\x03\x04garbage")
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "cannot read"]


def features_with_nan():
    cfg = _features_cfg()
    X, y = blobs()
    X[3, 1] = np.nan
    X[7, :2] = np.inf
    write_features(Path("f.npz"), X, y)
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "3 NaN or infinite values in 2 rows", "rows 3, 7"]


def features_not_2d():
    cfg = _features_cfg()
    write_features(Path("f.npz"), np.zeros(30, np.float32), np.repeat([0, 1, 2], 10))
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "2-D"]


def labels_length_mismatch():
    cfg = _features_cfg()
    X, y = blobs()
    write_features(Path("f.npz"), X, y[:-2])
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "28 labels for 30"]


def features_without_labels():
    cfg = _features_cfg()
    write_features(Path("f.npz"), blobs()[0])
    return _report(_cfg("c.yaml", cfg)), ["f.npz", "no labels"]


def model_features_row_mismatch():
    cfg = _features_cfg()
    write_features(Path("g.npz"), blobs(n_per_class=8)[0])
    cfg["models"][0]["features"] = "g.npz"
    return _report(_cfg("c.yaml", cfg)), ["g.npz", "24", "30"]


def too_few_samples():
    X, y = blobs(n_per_class=1)
    write_features(Path("f.npz"), X, y)
    return _report(features_config(Path("c.yaml"), "f.npz")), ["3 samples", "at least 4"]


def n_neighbors_too_large():
    return _report(_cfg("c.yaml", _features_cfg(metrics={"n_neighbors": 15}))), [
        "metrics.n_neighbors: 15 is too large for 30 samples", "at most 14"]


def knn_k_too_large():
    return _report(_cfg("c.yaml", _features_cfg(metrics={"knn_k": 30}))), ["metrics.knn_k: 30", "at most 29"]


def perplexity_too_large():
    cfg = _features_cfg(embed={"methods": ["tsne"], "tsne": {"perplexity": 12}})
    return _report(_cfg("c.yaml", cfg)), ["embed.tsne.perplexity: 12 is too large for 30 samples", "at most 9.67"]


def umap_neighbors_too_large():
    cfg = _features_cfg(embed={"methods": ["umap"], "umap": {"n_neighbors": 40}})
    return _report(_cfg("c.yaml", cfg)), ["embed.umap.n_neighbors: 40", "at most 29"]


def max_samples_too_small():
    return _report(_cfg("c.yaml", _features_cfg(data={"max_samples": 3}))), [
        "3 samples", "at least 4", "data.max_samples keeps 3 of 30"]


def out_is_a_file():
    Path("out.txt").write_text("x")
    return ["report", _cfg("c.yaml", _features_cfg()), "--out", "out.txt"], ["--out out.txt", "is a file"]


def out_parent_is_a_file():
    Path("blocker").write_text("x")
    return ["report", _cfg("c.yaml", _features_cfg()), "--out", "blocker/run"], ["blocker", "is a file"]


def out_is_not_a_run_folder():
    os.makedirs("mydata")
    Path("mydata/precious.csv").write_text("1,2,3\n")
    return ["report", _cfg("c.yaml", _features_cfg()), "--out", "mydata"], [
        "--out mydata", "not an evalkit run folder"]


def out_is_the_working_folder():
    return ["report", _cfg("c.yaml", _features_cfg()), "--out", "."], ["--out .", "working folder"]


def out_not_writable():
    if os.geteuid() != 0:
        os.makedirs("locked")
        os.chmod("locked", 0o500)
        out = "locked/run"
    elif os.path.isdir("/sys"):
        out = "/sys/evalkit-test-run"  # root may write anywhere but here
    else:
        pytest.skip("running as root without /sys: nothing is unwritable")
    return ["report", _cfg("c.yaml", _features_cfg()), "--out", out], ["cannot write in", "writable"]


def name_not_a_folder_name():
    return ["report", _cfg("c.yaml", _features_cfg(name="../escape"))], ["name: '../escape'", "--out"]


def junit_is_a_folder():
    os.mkdir("junit")
    return _report(_cfg("c.yaml", _features_cfg())) + ["--junit", "junit"], ["--junit junit", "is a folder"]


def cli_missing_argument():
    return ["report"], ["report: the following arguments are required: CONFIG"]


def cli_unknown_command():
    return ["reprot", "c.yaml"], ["invalid choice: 'reprot'"]


def cli_unknown_option():
    return ["report", "c.yaml", "--outt", "x"], ["unrecognized arguments: --outt"]


def check_not_a_run_folder():
    return ["check", "nowhere"], ["nowhere", "not found"]


def check_bad_metrics_json():
    os.mkdir("run")
    Path("run/metrics.json").write_text("{not json")
    return ["check", "run"], ["metrics.json", "not valid JSON"]


def check_metrics_json_number_too_large():
    os.mkdir("run")
    row = '{"model": "m", "layer": "features", "method": "features", "knn_accuracy": 1' + "0" * 400 + "}"
    Path("run/metrics.json").write_text('{"rows": [' + row + "]}")
    Path("run/config.yaml").write_text("name: x\nmodels: [{name: m, features: f.npz}]\n")
    return ["check", "run"], ["metrics.json: rows[0].knn_accuracy", "401 digits", "too large"]


def layers_unknown_source():
    return ["layers", "demo:cnm"], ["unknown demo model 'cnm'"]


def layers_bad_kwargs():
    return ["layers", "demo:cnn", "--kwargs", "{width: [}"], ["--kwargs", "not valid YAML"]


def layers_bad_input_size():
    return ["layers", "demo:cnn", "--input-size", "3x8x8"], ["--input-size", "C,H,W"]


CASES = [f for name, f in list(globals().items()) if callable(f) and not isinstance(f, type)
         and getattr(f, "__module__", None) == __name__ and not name.startswith(("_", "test"))]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run_folder(tmp_path / PREV)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_user_mistake_is_one_line_and_exit_2(case, workdir, capsys):
    argv, expected = case()
    before = tree_digest(workdir / PREV)
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("evalkit: error: ") and "Traceback" not in err
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert tree_digest(workdir / PREV) == before
    assert not (workdir / "pwned").exists()
    assert not (workdir / "reports").exists()


def test_debug_shows_the_traceback(workdir, capsys):
    with pytest.raises(Exception) as info:
        run_cli(["--debug", "report", "nope.yaml"], capsys)
    assert "nope.yaml" in str(info.value)
    with pytest.raises(Exception):
        run_cli(["report", "nope.yaml", "--debug"], capsys)


def test_a_bug_is_one_line_then_the_traceback(workdir, capsys, monkeypatch):
    import evalkit.pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(evalkit.pipeline, "run_report", broken)
    code, out, err = run_cli(_report(_cfg("c.yaml", _features_cfg())), capsys)
    lines = err.splitlines()
    assert code == 3
    assert lines[0].startswith("evalkit: internal error: ZeroDivisionError: boom")
    assert lines[1].startswith("Traceback")


def test_a_checkpoint_that_would_run_code_names_the_opt_in(workdir, capsys):
    argv, _ = checkpoint_that_runs_code()
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "pickled Python objects" in err and "unsafe_pickle: true" in err
    assert not (workdir / "pwned").exists()


def test_an_image_over_pils_pixel_limit_is_one_line_naming_it(workdir, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 14,000 x 14,000 image, scaled down
    cfg = _cfg("c.yaml", _image_cfg({"source": "demo:cnn"}))
    Image.new("L", (64, 64)).save("imgs/b/zz-huge.png")
    before = tree_digest(workdir / PREV)
    code, _, err = run_cli(_report(cfg), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "zz-huge.png: image too large to decode" in lines[0] and "downscale" in lines[0]
    assert tree_digest(workdir / PREV) == before


@pytest.mark.parametrize("fails", ["a file write", "the swap"])
def test_a_full_disk_while_writing_is_one_line_and_keeps_the_earlier_run(fails, workdir, capsys, monkeypatch):
    """The OSError of a full disk names no file: the message names the run folder and the reason."""
    import errno

    import evalkit.runfolder

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "a file write":
        monkeypatch.setattr(evalkit.runfolder, "_write_file", full)
    else:
        real_rename = os.rename

        def rename(src, dst):
            if ".tmp-" in Path(src).name:  # the new folder moving in
                full()
            real_rename(src, dst)

        monkeypatch.setattr(evalkit.runfolder.os, "rename", rename)
    cfg = _cfg("c.yaml", _features_cfg())
    before = tree_digest(workdir / PREV)
    code, _, err = run_cli(_report(cfg), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (f"evalkit: error: cannot write the run folder {workdir / PREV}: No space left on device; the "
                        f"earlier run folder is left as it was; free some space on that disk, or write the run "
                        f"elsewhere (--out DIR)")
    monkeypatch.undo()
    assert tree_digest(workdir / PREV) == before
