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
