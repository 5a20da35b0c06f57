"""Check semantics against hand-written metrics files, baselines and JUnit XML."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml

from evalkit.check import evaluate_checks, exit_code, junit_xml
from evalkit.cli import main
from evalkit.config import CheckConfig
from evalkit.errors import EvalkitError

ROWS = [
    {"model": "cnn", "layer": "fc", "method": "features", "knn_accuracy": 0.95, "silhouette": 0.40},
    {"model": "cnn", "layer": "fc", "method": "tsne", "trustworthiness": 0.99, "knn_accuracy": 0.96},
    {"model": "cnn", "layer": "conv", "method": "tsne", "trustworthiness": 0.90, "knn_accuracy": 0.80},
    {"model": "vit", "layer": "blocks.1", "method": "features", "knn_accuracy": 0.70, "silhouette": None},
]


def check(**kw) -> CheckConfig:
    return CheckConfig(**kw)


@pytest.mark.parametrize(
    "cond, expected",
    [
        ({"gt": 0.95}, "fail"),   # 0.95 > 0.95 is false
        ({"gte": 0.95}, "pass"),
        ({"lt": 0.95}, "fail"),
        ({"lte": 0.95}, "pass"),
        ({"eq": 0.95}, "pass"),
        ({"eq": 0.9}, "fail"),
        ({"approx": {"value": 0.951, "absolute": 0.002}}, "pass"),
        ({"approx": {"value": 0.951, "absolute": 0.0005}}, "fail"),
        ({"approx": {"value": 1.0, "relative": 0.06}}, "pass"),
        ({"approx": {"value": 1.0, "relative": 0.04}}, "fail"),
        ({"gte": 0.9, "lte": 0.94}, "fail"),  # every condition must hold
        ({"gte": 0.9, "lte": 0.96}, "pass"),
    ],
)
def test_conditions(cond, expected):
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"model": "cnn", "layer": "fc", "method": "features"}, **cond)])
    assert len(res) == 1
    assert res[0].status == expected
    assert res[0].value == pytest.approx(0.95)


def test_where_globs_expand_to_every_matching_row():
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"method": "tsne"}, gte=0.85)])
    assert [(r.layer, r.status) for r in res] == [("fc", "pass"), ("conv", "fail")]
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"model": "c*", "layer": "f?"}, gte=0.0)])
    assert {(r.method) for r in res} == {"features", "tsne"}


def test_warn_severity_never_fails_the_run():
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"model": "vit"}, gte=0.9, severity="warn")])
    assert [r.status for r in res] == ["warn"]
    assert exit_code(res) == 0
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"model": "vit"}, gte=0.9)])
    assert exit_code(res) == 1


def test_undefined_value_is_skipped_and_unmatched_selector_is_an_error():
    res = evaluate_checks(ROWS, [check(metric="silhouette", where={"model": "vit"}, gte=0.1)])
    assert res[0].status == "skip" and "not defined" in res[0].message and exit_code(res) == 0
    with pytest.raises(EvalkitError, match=r"checks\[0\].where: no metrics row matches model='nope'"):
        evaluate_checks(ROWS, [check(metric="silhouette", where={"model": "nope"}, gte=0.1)])


def test_a_check_without_method_skips_rows_where_its_metric_is_not_computed():
    res = evaluate_checks(ROWS, [check(metric="trustworthiness", gte=0.5)])
    assert [(r.method, r.status) for r in res] == [("features", "skip"), ("tsne", "pass"), ("tsne", "pass")]
    assert "2 rows skipped: trustworthiness is not computed for method features" in res[0].message
    assert exit_code(res) == 0
    with pytest.raises(EvalkitError, match=r"checks\[0\].metric: 'trustworthiness' is not computed for any row"):
        evaluate_checks(ROWS, [check(metric="trustworthiness", where={"method": "feat*"}, gte=0.5)])


def test_an_exact_name_wins_over_reading_it_as_a_glob():
    rows = [{"model": "cnn[v2]", "layer": "fc", "method": "features", "knn_accuracy": 0.9},
            {"model": "cnnv", "layer": "fc", "method": "features", "knn_accuracy": 0.1}]
    res = evaluate_checks(rows, [check(metric="knn_accuracy", where={"model": "cnn[v2]"}, gte=0.5)])
    assert [(r.model, r.status) for r in res] == [("cnn[v2]", "pass")]
    res = evaluate_checks(rows, [check(metric="knn_accuracy", where={"model": "cnn[v]"}, gte=0.5)])
    assert [(r.model, r.status) for r in res] == [("cnnv", "fail")]  # not a name: read as a glob


def test_exact_names_with_glob_characters_pass_config_validation():
    from evalkit.config import Config

    models = [{"name": "cnn[v2]", "features": "f.npz"}, {"name": "cnn*", "features": "g.npz"}]
    for name in ("cnn[v2]", "cnn*", "c*"):
        Config(models=models, checks=[{"metric": "knn_accuracy", "where": {"model": name}, "gte": 0.5}])
    with pytest.raises(ValueError, match=r"matches no model"):
        Config(models=models, checks=[{"metric": "knn_accuracy", "where": {"model": "x*"}, "gte": 0.5}])
    with pytest.raises(ValueError, match=r"'trustworthiness' is not computed for method 'features'"):
        Config(models=models, embed={"methods": ["pca"]},
               checks=[{"metric": "trustworthiness", "where": {"method": "f*"}, "gte": 0.5}])


def test_max_drop_against_baseline():
    base = [dict(r) for r in ROWS]
    base[1]["trustworthiness"] = 0.999   # drop 0.009
    base[2]["trustworthiness"] = 0.95    # drop 0.05: planted regression
    c = check(metric="trustworthiness", where={"method": "tsne"}, max_drop=0.01)
    res = evaluate_checks(ROWS, [c], baseline_rows=base)
    assert [(r.layer, r.status) for r in res] == [("fc", "pass"), ("conv", "fail")]
    assert "drop -0.0500" not in res[1].message and "+0.0500" in res[1].message
    # without a baseline the max_drop condition is skipped, not failed
    res = evaluate_checks(ROWS, [c])
    assert {r.status for r in res} == {"skip"} and exit_code(res) == 0
    # a baseline that lacks the feature set, or where the metric is undefined, fails the row
    res = evaluate_checks(ROWS, [c], baseline_rows=[base[1], {**base[2], "trustworthiness": None}])
    assert [r.status for r in res] == ["pass", "fail"] and "not defined in the baseline" in res[1].message
    res = evaluate_checks(ROWS, [c], baseline_rows=[])
    assert {r.status for r in res} == {"fail"} and "the baseline run has no row cnn/fc/tsne" in res[0].message


def test_junit_xml_counts_failures():
    res = evaluate_checks(ROWS, [check(metric="knn_accuracy", where={"method": "tsne"}, gte=0.85, name="knn <tsne> & co")])
    root = ET.fromstring(junit_xml(res))
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert len(cases) == 2
    assert cases[0].find("failure") is None
    assert cases[1].find("failure") is not None
    assert "knn <tsne> & co" in cases[1].get("name")


def _run_dir(tmp_path, rows, checks, name="run"):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"rows": rows, "checks": [], "provenance": {}}))
    cfg = {"name": "x", "data": {"kind": "digits"},
           "models": [{"name": "cnn", "source": "demo:cnn", "layers": ["fc", "conv"]}], "checks": checks}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_cli_check_with_baseline_and_junit(tmp_path, capsys):
    checks = [{"metric": "trustworthiness", "where": {"method": "tsne"}, "max_drop": 0.01},
              {"metric": "knn_accuracy", "where": {"model": "cnn", "layer": "fc", "method": "features"}, "gte": 0.9}]
    new = _run_dir(tmp_path, ROWS, checks, "new")
    base_rows = [dict(r) for r in ROWS]
    base_rows[2]["trustworthiness"] = 0.95
    old = _run_dir(tmp_path, base_rows, checks, "old")
    assert main(["check", str(new)]) == 0                       # no baseline: drop checks skipped
    junit = tmp_path / "out" / "junit.xml"
    assert main(["check", str(new), "--baseline", str(old), "--junit", str(junit)]) == 1
    err = capsys.readouterr().err
    assert "FAIL" in err and "cnn/conv/tsne" in err
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1"


def test_cli_check_with_a_baseline_that_lacks_the_feature_set_fails(tmp_path, capsys):
    checks = [{"metric": "trustworthiness", "where": {"model": "cnn", "method": "tsne"}, "max_drop": 0.01}]
    new = _run_dir(tmp_path, ROWS, checks, "new")
    old = _run_dir(tmp_path, [r for r in ROWS if r["layer"] != "conv"], checks, "old")
    assert main(["check", str(new), "--baseline", str(old)]) == 1
    err = capsys.readouterr().err
    assert "cnn/conv/tsne" in err and "the baseline run has no row cnn/conv/tsne" in err


def test_cli_check_bad_folder_is_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_junit_path_is_checked_before_a_run(tmp_path):
    import os

    from evalkit.check import check_junit_path

    check_junit_path(tmp_path / "new" / "deeper" / "checks.xml")  # folders are made when writing
    (tmp_path / "dir").mkdir()
    with pytest.raises(EvalkitError, match=r"--junit .*dir: is a folder"):
        check_junit_path(tmp_path / "dir")
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(EvalkitError, match=r"blocker is a file, not a folder"):
        check_junit_path(tmp_path / "blocker" / "checks.xml")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(EvalkitError, match=r"cannot write in .*locked \(not writable\)"):
            check_junit_path(locked / "checks.xml")


# --------------------------------------------------------------------------- interval bounds

BOUNDED = [  # 0.912 over 899 samples: Wilson 95% interval [0.892, 0.929]
    {"model": "cnn", "layer": "fc", "method": "features", "knn_accuracy": 0.912,
     "knn_accuracy_lo": 0.8921, "knn_accuracy_hi": 0.9287, "silhouette": 0.4},
    {"model": "cnn", "layer": "conv", "method": "features", "knn_accuracy": 0.95, "silhouette": 0.3},  # an older row
]


def test_a_check_on_a_bound_tests_that_bound():
    fc = {"model": "cnn", "layer": "fc"}
    on_value = evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where=fc, gte=0.9)])
    lower = evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where=fc, gte=0.9, on="lower")])
    upper = evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where=fc, gte=0.92, on="upper")])
    assert [r.status for r in on_value] == ["pass"] and on_value[0].value == pytest.approx(0.912)
    # the point value passes 0.9, but 0.9 is inside the interval: a gate on the lower bound fails
    assert [r.status for r in lower] == ["fail"] and lower[0].value == pytest.approx(0.8921)
    assert lower[0].condition == "lower 95% bound >= 0.9" and lower[0].name == "knn_accuracy lower 95% bound >= 0.9"
    # "not clearly below 0.92": 0.912 fails gte 0.92, its upper bound passes it
    assert [r.status for r in upper] == ["pass"] and upper[0].value == pytest.approx(0.9287)
    # max_drop compares the same bound of the baseline
    base = [{**BOUNDED[0], "knn_accuracy_lo": 0.91}]
    res = evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where=fc, max_drop=0.01, on="lower")], baseline_rows=base)
    assert [r.status for r in res] == ["fail"] and "baseline 0.9100" in res[0].message
    # a row without the bound (an older metrics.json) is skipped and says why
    res = evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where={"model": "cnn"}, gte=0.5, on="lower")])
    assert [(r.layer, r.status) for r in res] == [("fc", "pass"), ("conv", "skip")]
    assert "no knn_accuracy_lo" in res[1].message
    with pytest.raises(EvalkitError, match="no row the check selects has the lower bound"):
        evaluate_checks(BOUNDED, [check(metric="knn_accuracy", where={"layer": "conv"}, gte=0.5, on="lower")])


def test_on_a_bound_needs_a_score_with_an_interval():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'silhouette' has no interval.*'knn_accuracy'"):
        check(metric="silhouette", gte=0.2, on="lower")
    with pytest.raises(ValidationError):
        check(metric="knn_accuracy", gte=0.2, on="middle")
    assert check(metric="knn_accuracy", gte=0.2).on == "value"


def test_on_lower_survives_yaml(tmp_path):
    """YAML 1.1 reads a bare ``on`` as True; the config loader keeps it a key (and config.yaml
    written back reads the same)."""
    from evalkit.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - {name: m, features: f.npz}\n"
                    "checks:\n  - {metric: knn_accuracy, gte: 0.9, on: lower}\n"
                    "  - metric: knn_accuracy\n    lte: 0.99\n    on: upper\n", encoding="utf-8")
    cfg = load_config(path)
    assert [c.on for c in cfg.checks] == ["lower", "upper"]
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml(), encoding="utf-8")
    assert [c.on for c in load_config(again).checks] == ["lower", "upper"]
