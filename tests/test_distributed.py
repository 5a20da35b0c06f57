"""torchrun: exact slices, 2 CPU processes (gloo) equal one process, a failed rank, resume, ``evalkit extract``.

The torchrun runs are real subprocesses (``python -m torch.distributed.run --standalone``); each
start costs seconds, so one test walks through the scenarios in order.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import assert_same_rows, write_image_folder
from evalkit import distributed
from evalkit.config import ExtractConfig, ModelConfig, load_config
from evalkit.data import read_feature_file
from evalkit.distributed import slice_ranges
from evalkit.errors import EvalkitError
from evalkit.extract import ModelExtraction, extract_model
from helpers_cli import make_run_folder, run_cli, tree_digest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
USER = "python:usermodels:make_net"
N_IMAGES = 11  # odd: the two slices differ in size (6 and 5)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 11, 100])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_slice_ranges_cover_every_sample_once_without_padding(n, parts):
    ranges = slice_ranges(n, parts)
    assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
    sizes = [b - a for a, b in ranges]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_ranks_from_env():
    assert not distributed.ranks_from_env({}).active
    r = distributed.ranks_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.active, r.main) == (1, 2, 1, True, False)
    with pytest.raises(EvalkitError, match="RANK=2 and WORLD_SIZE=2"):
        distributed.ranks_from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.fixture
def folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4)
    (root / "c" / "011.png").unlink()
    assert sum(1 for _ in root.rglob("*.png")) == N_IMAGES
    return root


def _dataset(root):
    from evalkit.config import DataConfig
    from evalkit.data import load_dataset

    return load_dataset(DataConfig(kind="imagefolder", path=str(root)))


def test_a_single_process_reuses_finished_slices_and_computes_only_the_rest(folder, tmp_path):
    ds = _dataset(folder)
    mcfg = ModelConfig(name="u", source=USER, layers=("blocks.0", "penultimate"))
    ecfg = ExtractConfig(device="cpu", batch_size=2, cache_dir=str(tmp_path / "cache"))
    want = extract_model(mcfg, ds, ecfg.model_copy(update={"cache": False}))
    ModelExtraction(mcfg, ds, ecfg).run(0, 6)  # what rank 0 of a dead 2-rank job left behind
    assert [p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()] == ["0-6.npz"]
    logged = []
    got = extract_model(mcfg, ds, ecfg.model_copy(update={"slice_size": 2}), log=logged.append)
    assert "  u: images 0-5 from cache" in "\n".join(logged)
    computed = [line for line in logged if "img/s" in line]
    assert [re.search(r"images (\d+-\d+)", line).group(1) for line in computed] == ["6-7", "8-9", "10-10"]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.features, b.features, atol=1e-6)
    # the whole set replaces the slices in the cache
    assert [p.name.count(".") for p in (tmp_path / "cache").iterdir()] == [1]


def test_extract_folder_is_guarded_and_features_folders_are_read(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "models": [{"name": "m", "features": str(tmp_path / "f.npz")}]}))
    code, _, err = run_cli(["extract", cfg, "--out", other], capsys)
    assert code == 2 and "not an evalkit extract folder (no extract.json)" in err and len(err.splitlines()) == 1
    assert (other / "keep.txt").read_text() == "mine"
    folder = tmp_path / "layer"
    folder.mkdir()
    np.save(folder / "features.npy", np.ones((3, 2), np.float32))
    np.save(folder / "labels.npy", np.array([0, 1, 1]))
    feats, labels, names, ids = read_feature_file(folder, with_ids=True)
    assert feats.shape == (3, 2) and labels.tolist() == [0, 1, 1] and names is None and ids is None


def test_loader_workers_default(monkeypatch):
    from evalkit.extract import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    auto = ExtractConfig(batch_size=4)
    assert loader_workers(auto, 4) == 0  # one batch: workers cost more than they save
    assert loader_workers(auto, 5) == 4  # min(4, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks share the 8 cores
    assert loader_workers(auto, 5) == 1
    assert loader_workers(ExtractConfig(num_workers=3), 5) == 3


def test_compile_that_fails_falls_back_to_the_eager_model_with_a_note(monkeypatch):
    import torch

    from evalkit.config import PoolingConfig
    from evalkit.extract import resolve_layers, run_layers
    from usermodels import make_net

    model, x = make_net().eval(), torch.randn(4, 3, 8, 8)
    layer_map = resolve_layers(model, ["blocks.0", "penultimate"])
    kw = dict(device=torch.device("cpu"), pooling=PoolingConfig())
    want, _ = run_layers(model, [x], layer_map, **kw)

    def broken(module, **_):
        def run(_x):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    logged = []
    got, _ = run_layers(model, [x, x], layer_map, compile=True, log=logged.append, **kw)
    assert logged == ["  torch.compile failed (RuntimeError: no compiler here); running uncompiled"]
    for layer in want:
        np.testing.assert_array_equal(got[layer], np.concatenate([want[layer]] * 2))


# --- torchrun, two CPU processes ----------------------------------------------------------------


def _torchrun(args, cwd: Path, env_extra=None, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("EVALKIT_TEST_FAIL_RANK", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "evalkit",
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _write_config(path: Path, root: Path, cache: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "dist", "data": {"kind": "imagefolder", "path": str(root)},
        "models": [{"name": "u", "source": USER, "layers": ["blocks.0", "penultimate"]}],
        "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 3},
        "extract": {"device": "cpu", "batch_size": 2, "cache_dir": str(cache), "timeout_s": 120},
    }, sort_keys=False))
    return path


def _rows(run: Path) -> list:
    return json.loads((run / "metrics.json").read_text())["rows"]


def _cached(cache: Path) -> dict:
    (full,) = [p for p in cache.iterdir() if p.name.count(".") == 1]
    with np.load(full) as z:
        return {k: z[k] for k in z.files if not k.startswith("__")}


def test_two_ranks_equal_one_process_fail_cleanly_resume_and_extract(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single_cfg = _write_config(tmp_path / "single.yaml", folder, tmp_path / "cache-single")
    dist_cfg = _write_config(tmp_path / "dist.yaml", folder, tmp_path / "cache-dist")
    code, out, err = run_cli(["report", single_cfg, "--out", tmp_path / "single"], capsys)
    assert code == 0, err
    want_rows, want = _rows(tmp_path / "single"), _cached(tmp_path / "cache-single")
    assert json.loads((tmp_path / "single" / "metrics.json").read_text())["provenance"]["images_per_s"]["u"] > 0

    # rank 1 fails after its first batch: every rank fails, one line says why, the old report stays
    run = make_run_folder(tmp_path / "run")
    before = tree_digest(run)
    p = _torchrun(["report", dist_cfg, "--out", run], tmp_path, {"EVALKIT_TEST_FAIL_RANK": "1"})
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("evalkit: error:")]
    why = re.escape("model 'u' (python:usermodels:make_net): EVALKIT_TEST_FAIL_RANK: rank 1 stops after 1 batches "
                    "(a test)")
    assert len(ours) == 2, p.stderr  # one line from the rank that failed, one from rank 0: each whole
    assert any(re.fullmatch(f"evalkit: error: rank 1 of 2: {why}", line) for line in ours), p.stderr
    assert any(re.fullmatch(f"evalkit: error: rank 1 of 2 failed: {why}; slices that finished are in the feature "
                            f"cache: rerun the same command to compute only the missing ones", line)
               for line in ours), p.stderr
    assert tree_digest(run) == before
    slices = sorted(q.name.split(".", 1)[1] for q in (tmp_path / "cache-dist").iterdir())
    assert slices == ["0-6.npz"]  # rank 0 finished its slice; rank 1 wrote nothing

    # the same command again: rank 0's slice comes from the cache, rank 1 computes its own
    p = _torchrun(["report", dist_cfg, "--out", run], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "[rank 0/2]   u: images 0-5 from cache" in p.stdout
    assert re.search(r"\[rank 1/2\]   u: images 6-10 on cpu at [\d,]+ img/s", p.stdout)
    assert not re.search(r"\[rank 0/2\]   u: images 0-5 on cpu", p.stdout)
    assert "evalkit: rank 1 of 2: features extracted; rank 0 writes" in p.stdout
    assert_same_rows(_rows(run), want_rows)
    got = _cached(tmp_path / "cache-dist")
    assert set(got) == set(want) == {"blocks.0", "penultimate"}
    for layer in want:
        np.testing.assert_allclose(got[layer], want[layer], atol=1e-6)
    prov = json.loads((run / "metrics.json").read_text())["provenance"]
    assert prov["extract_ranks"] == 2 and prov["images_per_s"]["u"] > 0

    # evalkit extract under torchrun (recomputing), and in one process: files a features-only config reports on
    p = _torchrun(["extract", dist_cfg, "--out", tmp_path / "feats-npy", "--format", "npy", "--no-cache"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\[rank 1/2\]   u: images 6-10 on cpu", p.stdout)
    code, _, err = run_cli(["extract", single_cfg, "--out", tmp_path / "feats-npz"], capsys)
    assert code == 0, err
    for name, suffix in (("feats-npy", ""), ("feats-npz", ".npz")):
        manifest = json.loads((tmp_path / name / "extract.json").read_text())
        assert set(manifest["files"]) == {"u/blocks.0", "u/penultimate"}
        feats, labels, names, ids = read_feature_file(tmp_path / name / "u" / f"penultimate{suffix}", with_ids=True)
        np.testing.assert_allclose(feats, want["penultimate"], atol=1e-6)
        assert names == ["a", "b", "c"] and ids.tolist() == list(range(N_IMAGES))
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            "name": "again", "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 3},
            "models": [{"name": "u", "features": f"{name}/u/penultimate{suffix}", "layers": ["penultimate"]},
                       {"name": "u0", "features": f"{name}/u/blocks.0{suffix}", "layers": ["blocks.0"]}]}))
        load_config(cfg)
        code, _, err = run_cli(["report", cfg, "--out", tmp_path / f"again-{name}"], capsys)
        assert code == 0, err
        # the same rows but for the model's name, and `features` for `penultimate` (a features entry's default)
        again = [{**r, "layer": {"features": "penultimate"}.get(r["layer"], r["layer"])}
                 for r in _rows(tmp_path / f"again-{name}")]
        def unnamed(rows):
            return sorted(({k: v for k, v in r.items() if k != "model"} for r in rows),
                          key=lambda r: (r["layer"], r["method"]))

        assert_same_rows(unnamed(again), unnamed(want_rows))
