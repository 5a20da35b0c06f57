"""Nothing is lost: Ctrl-C, SIGTERM, SIGKILL or a crash mid-run leaves the earlier run folder
byte-for-byte as it was and no temporary folder beside it; a later run cleans what a killed
one could not.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_cli import blobs, features_config, make_run_folder, run_cli, tree_digest, write_features

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _slow_config(tmp_path: Path) -> Path:
    """A run that spends many seconds in t-SNE after it has printed its first progress line."""
    X, y = blobs(n_per_class=250, n_classes=4, dim=20)
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "slow.yaml", "f.npz", name="slow", methods=("tsne",),
                          embed={"tsne": {"n_iter": 20000, "n_jobs": 1}})
    return cfg


def _start(tmp_path: Path, cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "evalkit", "report", str(cfg), "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _default_signals():
    """A shell's background job ignores SIGINT, and a child keeps that: undo it for the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wait_until_working(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once the run has loaded its data (its first progress line), plus a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "samples" in line:
            time.sleep(1.5)  # now inside feature scoring / t-SNE
            assert proc.poll() is None, "the run ended before it could be interrupted"
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no progress line; stderr: {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_the_earlier_run_untouched(sig, tmp_path):
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    proc = _start(tmp_path, _slow_config(tmp_path), out)
    _wait_until_working(proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("evalkit: interrupted" if sig == signal.SIGINT else "evalkit: terminated")
    assert tree_digest(out) == before


def test_sigkill_leaves_the_earlier_run_untouched(tmp_path):
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    proc = _start(tmp_path, _slow_config(tmp_path), out)
    _wait_until_working(proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tree_digest(out) == before


def test_a_later_run_removes_what_a_killed_run_left(tmp_path, monkeypatch, capsys):
    """SIGKILL during the final write leaves ``.run.tmp-*``: the next run removes it (only when older
    than itself); a ``.run.old-*`` whose run folder is gone is the earlier run, put back first."""
    monkeypatch.chdir(tmp_path)
    X, y = blobs()
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz")
    out = make_run_folder(tmp_path / "run")
    stale = tmp_path / ".run.tmp-0badc0de"
    stale.mkdir()
    (stale / "index.html").write_text("half written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    other = tmp_path / ".other.tmp-0badc0de"  # another run folder's: not ours to touch
    other.mkdir()
    os.utime(other, (time.time() - 3600, time.time() - 3600))

    code, _, err = run_cli(["report", cfg, "--out", out], capsys)
    assert code == 0, err
    assert not stale.exists() and other.exists()
    assert "earlier run" not in (out / "index.html").read_text()

    # killed between moving the earlier run aside and moving the new one in: the earlier run is put back
    from evalkit.runfolder import clean_stale_siblings

    out.rename(tmp_path / ".run.old-0badc0de")
    clean_stale_siblings(out, older_than=time.time() + 1)
    assert (out / "metrics.json").is_file() and not (tmp_path / ".run.old-0badc0de").exists()


@pytest.mark.parametrize("when", ["while scoring", "while writing"])
def test_ctrl_c_in_process_exits_130_and_keeps_the_earlier_run(when, tmp_path, monkeypatch, capsys):
    import evalkit.runfolder
    import evalkit.scoring

    monkeypatch.chdir(tmp_path)
    X, y = blobs()
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz")
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(args)
        if when == "while writing" and len(calls) == 1:
            return real_write(*args, **kwargs)  # one file in the temporary folder, then Ctrl-C
        raise KeyboardInterrupt

    if when == "while scoring":
        monkeypatch.setattr(evalkit.scoring, "score_feature_set", interrupt)
    else:
        real_write = evalkit.runfolder._write_file
        monkeypatch.setattr(evalkit.runfolder, "_write_file", interrupt)
    code, _, err = run_cli(["report", cfg, "--out", out], capsys)
    assert code == 130 and calls
    assert err.strip().splitlines() == ["evalkit: interrupted; nothing was written (an earlier run folder is left as it was)"]
    assert tree_digest(out) == before


# --------------------------------------------------------------------------- no signal is lost
# The handlers only record a signal; the run raises it at the next stage boundary. A handler that
# raised could raise inside a C library's callback (numba compiling, a ctypes callback), which
# prints "Exception ignored" and drops the exception: the run went on, exited 0 and replaced the
# earlier run folder.

_SWALLOWING_RUNNER = '''
import ctypes, sys, time
import evalkit.scoring

real = evalkit.scoring.score_feature_set

def in_a_c_callback(*args, **kwargs):
    def callback():  # what numba's compiler or any C library calling back into Python does
        print("in the C callback", flush=True)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            time.sleep(0.02)
    ctypes.CFUNCTYPE(None)(callback)()  # an exception raised in here is printed and dropped
    return real(*args, **kwargs)

evalkit.scoring.score_feature_set = in_a_c_callback
from evalkit.cli import main
sys.argv[0] = "evalkit"
raise SystemExit(main())
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_c_callback_is_not_lost(sig, tmp_path):
    X, y = blobs()
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz")
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    (tmp_path / "runner.py").write_text(_SWALLOWING_RUNNER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), "report", str(cfg), "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "in the C callback" in line or (not line and proc.poll() is not None):
                break
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert tree_digest(out) == before


def _two_set_config(tmp_path: Path) -> Path:
    """Two feature sets, each a few seconds of t-SNE: progress lines mark the stage boundaries."""
    import yaml

    X, y = blobs(n_per_class=100, n_classes=4, dim=20)
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "two.yaml", "f.npz", name="two", methods=("tsne", "pca"), model_name="m1",
                          embed={"tsne": {"n_iter": 2000, "n_jobs": 1}})
    data = yaml.safe_load(cfg.read_text())
    data["models"].append({"name": "m2", "features": "f.npz"})
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


@pytest.mark.parametrize("moment", ["after loading the data", "after the first feature set"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_stage_ends_the_run_and_keeps_the_earlier_one(sig, moment, tmp_path):
    marker = "samples" if moment == "after loading the data" else "m1/features"
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    proc = _start(tmp_path, _two_set_config(tmp_path), out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if marker in line or (not line and proc.poll() is not None):
                break
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert err.strip().splitlines() == [("evalkit: interrupted" if sig == signal.SIGINT else "evalkit: terminated")
                                        + "; nothing was written (an earlier run folder is left as it was)"]
    assert tree_digest(out) == before


@pytest.mark.parametrize("when", ["in a stage that swallows exceptions", "while writing the run folder"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_recorded_signal_is_raised_at_the_next_boundary(sig, when, tmp_path, monkeypatch, capsys):
    """The handler fires where a library catches and ignores every exception, or after the last
    file is written: the run still ends with 130/143 before the swap, the earlier run intact."""
    import evalkit.runfolder
    import evalkit.scoring

    monkeypatch.chdir(tmp_path)
    X, y = blobs()
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz")
    out = make_run_folder(tmp_path / "run")
    before = tree_digest(out)
    fired = []

    def send():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler runs here
        except BaseException:  # what a C callback does with the exception
            pass
        fired.append(sig)

    if when == "in a stage that swallows exceptions":
        real_score = evalkit.scoring.score_feature_set

        def score(*args, **kwargs):
            send()
            return real_score(*args, **kwargs)

        monkeypatch.setattr(evalkit.scoring, "score_feature_set", score)
    else:
        real_write = evalkit.runfolder._write_file

        def write(path, data):
            real_write(path, data)
            if path.name == "config.yaml":  # the last file
                send()

        monkeypatch.setattr(evalkit.runfolder, "_write_file", write)
    code, _, err = run_cli(["report", cfg, "--out", out], capsys)
    assert fired and code == (130 if sig == signal.SIGINT else 143), err
    assert len(err.strip().splitlines()) == 1 and "nothing was written" in err
    assert tree_digest(out) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_python_api_leaves_signal_handling_alone(tmp_path):
    """In a notebook Ctrl-C is the usual KeyboardInterrupt: evaluate installs no handler."""
    import evalkit

    X, y = blobs()
    seen = []
    real = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def spy(*args, **kwargs):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        raise KeyboardInterrupt

    import evalkit.scoring

    original = evalkit.scoring.score_feature_set
    evalkit.scoring.score_feature_set = spy
    try:
        with pytest.raises(KeyboardInterrupt):
            evalkit.evaluate({"m": X}, y, methods=["pca"])
    finally:
        evalkit.scoring.score_feature_set = original
    assert seen == [real]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == real


def test_ctrl_c_stops_extraction_at_the_next_batch():
    """Recorded, not raised: the extraction loop checks it once per batch."""
    import torch

    from evalkit.config import PoolingConfig
    from evalkit.extract import resolve_layers, run_layers
    from evalkit.interrupt import recording_signals

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    served = []

    def endless():
        while True:
            served.append(1)
            if len(served) == 3:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            yield torch.zeros(2, 1, 2, 2)

    with recording_signals(), pytest.raises(KeyboardInterrupt):
        run_layers(model, endless(), resolve_layers(model, ["1"]), device=torch.device("cpu"), pooling=PoolingConfig())
    assert len(served) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
