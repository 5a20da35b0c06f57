"""The command line end to end: exit codes, where output goes, the atomic run folder, and
hostile inputs (markup in names, pickles, python: sources) that must run nothing.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from conftest import write_image_folder
from helpers_cli import blobs, features_config, make_run_folder, run_cli, tree_digest, write_features


def _features(tmp_path, monkeypatch, **kw):
    monkeypatch.chdir(tmp_path)
    X, y = blobs()
    write_features(tmp_path / "f.npz", X, y, ["a", "b", "c"])
    return features_config(tmp_path / "c.yaml", "f.npz", **kw)


def test_report_then_check_exit_codes_and_streams(tmp_path, monkeypatch, capsys):
    checks = [{"name": "separates", "metric": "knn_accuracy", "where": {"model": "m", "method": "features"}, "gte": 0.5}]
    cfg = _features(tmp_path, monkeypatch, checks=checks)
    code, out, err = run_cli(["report", cfg, "--out", "run", "--junit", "checks.xml"], capsys)
    assert code == 0 and err == ""  # stderr carries only problems
    assert "evalkit: wrote run/index.html" in out and "checks: 1 passed of 1" in out
    assert "<failure" not in (tmp_path / "checks.xml").read_text()

    strict = yaml.safe_load(cfg.read_text())
    strict["checks"] = [{**checks[0], "name": "impossible", "gt": 1.0, "gte": None},
                        {**checks[0], "name": "only a warning", "gt": 1.0, "gte": None, "severity": "warn"}]
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict))
    code, out, err = run_cli(["check", "run", "--config", "strict.yaml", "--junit", "strict.xml"], capsys)
    assert code == 1
    assert [line.split()[0] for line in err.splitlines()] == ["FAIL"] and "impossible" in err
    assert "WARN" in out and "<failure" in (tmp_path / "strict.xml").read_text()


def test_report_replaces_the_earlier_run_and_keeps_the_users_files(tmp_path, monkeypatch, capsys):
    cfg = _features(tmp_path, monkeypatch)
    out = make_run_folder(tmp_path / "run")  # evalkit's four files plus a user's extra/note.txt
    old_html = (out / "index.html").read_bytes()
    code, _, err = run_cli(["report", cfg, "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "embeddings.npz", "extra", "index.html",
                                                     "metrics.json", "point_scores.npz"]
    assert (out / "index.html").read_bytes() != old_html and (out / "extra" / "note.txt").read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((out / "metrics.json").read_text())["rows"]


def test_hostile_names_are_shown_as_text(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    X, y = blobs(n_per_class=10, n_classes=2)
    names = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(3)>"]
    write_features(tmp_path / "f.npz", X, y, names)
    cfg = {"name": "<b>run</b>", "data": {"kind": "features", "path": "f.npz"},
           "models": [{"name": "<img src=x onerror=alert(2)>", "features": "f.npz", "layers": ["<svg onload=alert(4)>"]}],
           "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["report", "c.yaml", "--out", "run"], capsys)
    assert code == 0, err
    html = (tmp_path / "run" / "index.html").read_text()
    for raw in ("<script>alert(1)", "<img src=x", "<b>run</b>", "<svg onload"):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # only ours: vendored libraries, explorer.js, report.js and the explorer's JSON data
    assert html.count("<script") == html.count("</script>") == 4


def test_unsafe_pickle_is_an_explicit_opt_in(tmp_path, monkeypatch, capsys):
    import torch

    from evalkit.models import create_model

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=4, size=(8, 8), mode="L")
    torch.save({"state_dict": create_model("demo:cnn").state_dict(), "args": argparse.Namespace(lr=0.1)}, "p.pt")
    model = {"name": "m", "source": "demo:cnn", "checkpoint": "p.pt", "layers": ["fc"]}
    cfg = {"data": {"kind": "imagefolder", "path": "imgs"}, "models": [model],
           "extract": {"device": "cpu", "cache": False}, "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["report", "c.yaml", "--out", "run"], capsys)
    assert code == 2 and "unsafe_pickle: true" in err and not (tmp_path / "run").exists()
    model["unsafe_pickle"] = True
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["report", "c.yaml", "--out", "run"], capsys)
    assert code == 0, err


def test_python_source_imports_only_the_module_it_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = "import pathlib; pathlib.Path('imported-{}').touch()\n"
    (tmp_path / "evk_models.py").write_text(marker.format("evk_models") + "import torch\n\ndef make_net():\n"
                                           "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))\n")
    (tmp_path / "evk_evil.py").write_text(marker.format("evk_evil"))
    write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=4, size=(8, 8), mode="L")
    cfg = {"data": {"kind": "imagefolder", "path": "imgs"},
           "models": [{"name": "m", "source": "python:evk_models:make_net", "layers": ["1"]}],
           "extract": {"device": "cpu", "cache": False}, "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 1}}

    # a config that fails validation imports nothing at all
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "embed": {"methods": ["tnse"]}}))
    code, _, err = run_cli(["report", "bad.yaml", "--out", "run"], capsys)
    assert code == 2 and not (tmp_path / "imported-evk_models").exists()

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["report", "c.yaml", "--out", "run"], capsys)
    assert code == 0, err
    assert (tmp_path / "imported-evk_models").exists()
    assert not (tmp_path / "imported-evk_evil").exists() and "evk_evil" not in sys.modules


def test_hostile_yaml_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\n"
                                     "models: [{name: m, features: f.npz}]\n")
    code, _, err = run_cli(["report", "c.yaml"], capsys)
    assert code == 2 and "not allowed" in err
    assert not (tmp_path / "pwned").exists()


def test_main_restores_the_sigterm_handler(tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    run_cli(["report", tmp_path / "nope.yaml"], capsys)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_program_runs_atexit_handlers_and_flushes_before_its_fast_exit(tmp_path):
    """`evalkit` leaves without the interpreter's finalization (0.6-1.0 s of teardown), but
    after the atexit handlers (a user's module may have some) and with its output flushed into
    a pipe; the exit code is the command's."""
    marker = tmp_path / "atexit-ran"
    script = ("import atexit, sys\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
              "from evalkit.cli import main\n"
              "sys.argv = ['evalkit'] + sys.argv[1:]\n"
              "main()\n"
              "print('not reached')\n")
    ok = subprocess.run([sys.executable, "-c", script, "layers", "demo:cnn"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "fc" in ok.stdout and "not reached" not in ok.stdout  # flushed into the pipe, then gone
    assert marker.read_text() == "yes"
    marker.unlink()
    bad = subprocess.run([sys.executable, "-c", script, "report", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and marker.read_text() == "yes"


def test_help_and_version_are_instant_and_exit_0(capsys):
    code = subprocess.run([sys.executable, "-c", "import sys; from evalkit.cli import main; rc = main(['--help']); "
                           "sys.exit(rc if 'torch' not in sys.modules and 'numpy' not in sys.modules else 99)"],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert run_cli(["--version"], capsys)[0] == 0
    assert np is not None
