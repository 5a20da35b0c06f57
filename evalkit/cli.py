"""Command line: ``evalkit report | extract | check | compare | history | layers``. No logic lives here.

A user mistake (:class:`EvalkitError`, a wrong command line, an unreadable file) is one line
on stderr and exit code 2; ``--debug`` shows the traceback. A failing check is exit code 1.
Ctrl-C is exit code 130 (SIGTERM 143) with one line; the previous run folder is untouched
(during ``report`` the signal is recorded and acted on at the next stage boundary, see
:mod:`evalkit.interrupt`). A bug in evalkit is one line, then the traceback, and exit code 3.
"""
from __future__ import annotations

import argparse
import sys

from evalkit.errors import EvalkitError
from evalkit.interrupt import Terminated as _Terminated

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class _UsageError(Exception):
    """A wrong command line (argparse's own errors), shown as one line like any user mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        command = self.prog.partition(" ")[2]  # "report" for "evalkit report", "" for evalkit itself
        raise _UsageError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    from evalkit import __version__

    p = _Parser(
        prog="evalkit",
        description="Extract features from models, embed them (t-SNE, UMAP, PCA), score them and write one HTML report.",
    )
    p.add_argument("--version", action="version", version=f"evalkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("report", help="run the whole pipeline and write a run folder")
    r.add_argument("config", metavar="CONFIG", help="YAML config")
    r.add_argument("--out", metavar="DIR", help="run folder (default: reports/out/NAME)")
    r.add_argument("--no-cache", action="store_true", help="recompute features even when cached")
    r.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    e = sub.add_parser("extract", help="extract features only: one file per model and layer, for 'features:'")
    e.add_argument("config", metavar="CONFIG", help="YAML config (its embed, metrics and checks are not used)")
    e.add_argument("--out", metavar="DIR", required=True, help="folder for MODEL/LAYER.npz files and extract.json")
    e.add_argument("--format", choices=("npz", "npy"), default="npz",
                   help="npz: one file per layer (default); npy: a folder per layer, features.npy memory-mappable")
    e.add_argument("--no-cache", action="store_true", help="recompute features even when cached")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    c = sub.add_parser("check", help="re-evaluate the checks on an existing run folder (no recomputation)")
    c.add_argument("run_dir", metavar="DIR")
    c.add_argument("--config", metavar="CONFIG", help="take the checks from this config instead of DIR/config.yaml")
    c.add_argument("--baseline", metavar="DIR2", help="an earlier run folder, for max_drop conditions")
    c.add_argument("--junit", metavar="FILE", help="write JUnit XML")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    co = sub.add_parser("compare", help="compare two run folders: score deltas, aligned embeddings, config changes")
    co.add_argument("run_a", metavar="RUN_A", help="the earlier run folder (the baseline)")
    co.add_argument("run_b", metavar="RUN_B", help="the later run folder")
    co.add_argument("--out", metavar="DIR", help="output folder (default: reports/out/compare-A-vs-B)")
    co.add_argument("--config", metavar="CONFIG", help="take the checks from this config instead of RUN_B/config.yaml")
    co.add_argument("--junit", metavar="FILE", help="write RUN_B's checks (RUN_A as the baseline) as JUnit XML")
    co.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    hi = sub.add_parser("history", help="scores of many run folders in order: a page of line charts and a CSV")
    hi.add_argument("runs", metavar="RUN", nargs="+", help="run folders, in order (e.g. one per epoch)")
    hi.add_argument("--metric", metavar="NAME", action="append", default=[],
                    help="a score to show (repeat for several; default: all)")
    hi.add_argument("--out", metavar="DIR", help="output folder (default: reports/out/history-FIRST-to-LAST)")
    hi.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    la = sub.add_parser("layers", help="list the layer names a config may use for a model")
    la.add_argument("source", metavar="MODEL_SPEC", help="e.g. timm:resnet18, torchvision:resnet50, demo:cnn")
    la.add_argument("--kwargs", metavar="YAML", default=None, help="model keyword arguments, e.g. '{num_classes: 10}'")
    la.add_argument("--input-size", metavar="C,H,W", default=None, help="dummy input size (default from the model)")
    la.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _report(args) -> int:
    from pathlib import Path

    from evalkit.check import check_junit_path, describe, exit_code, write_junit
    from evalkit.config import load_config
    from evalkit.interrupt import check_interrupted, recording_signals
    from evalkit.pipeline import run_report
    from evalkit.runfolder import default_out_dir

    with recording_signals():  # Ctrl-C / SIGTERM: raised at the next stage boundary, never lost
        config = load_config(args.config)
        out = Path(args.out) if args.out else default_out_dir(config)
        if args.junit:
            check_junit_path(args.junit)  # before the run, not after it
        check_interrupted()
        result = run_report(config, out, use_cache=not args.no_cache, argv=["evalkit"] + args.argv)
        if result is None:  # a torchrun rank other than 0: its slices are in the cache
            print(f"evalkit: {_ranks()}: features extracted; rank 0 writes {out}")
            return EXIT_OK
        for r in result.checks:
            if r.status != "pass":
                print(describe(r), file=sys.stderr)
        if args.junit:
            write_junit(args.junit, result.checks)
        passed = sum(r.status == "pass" for r in result.checks)
        skipped = sum(r.status == "skip" for r in result.checks)
        print(f"evalkit: wrote {out}/index.html ({result.provenance['duration_s']:.1f} s); "
              f"checks: {passed} passed of {len(result.checks) - skipped}" + (f", {skipped} skipped" if skipped else ""))
        late = _late_signal(out)
    return exit_code(result.checks) if late is None else late


def _late_signal(out):
    """The exit code for a signal that came after the run folder was swapped in, else None."""
    import signal

    from evalkit.interrupt import pending_signal

    sig = pending_signal()
    if sig is None:
        return None
    what = "interrupted" if sig == signal.SIGINT else "terminated"
    print(f"evalkit: {what} after the run had finished; {out} holds the complete new run", file=sys.stderr)
    return EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_TERMINATED


def _extract(args) -> int:
    from pathlib import Path

    from evalkit.config import load_config
    from evalkit.export import run_extract
    from evalkit.interrupt import recording_signals

    with recording_signals():  # Ctrl-C / SIGTERM: raised at the next stage boundary, never lost
        config = load_config(args.config)
        out = Path(args.out)
        manifest = run_extract(config, out, fmt=args.format, use_cache=not args.no_cache,
                               argv=["evalkit"] + args.argv)
        if manifest is None:  # a torchrun rank other than 0
            print(f"evalkit: {_ranks()}: features extracted; rank 0 writes {out}")
            return EXIT_OK
        print(f"evalkit: wrote {len(manifest['files'])} feature files for {manifest['n_samples']:,} samples to "
              f"{out} ({manifest['duration_s']:.1f} s); name them in a config with 'features: {out}/MODEL/LAYER"
              f"{'.npz' if args.format == 'npz' else ''}'")
        late = _late_signal(out)
    return EXIT_OK if late is None else late


def _check(args) -> int:
    from pathlib import Path

    from evalkit.check import check_junit_path, describe, evaluate_checks, exit_code, read_rows, write_junit
    from evalkit.config import load_config

    if args.junit:
        check_junit_path(args.junit)
    rows = read_rows(args.run_dir)
    config_path = Path(args.config) if args.config else Path(args.run_dir) / "config.yaml"
    config = load_config(config_path)
    baseline = read_rows(args.baseline, what="baseline folder") if args.baseline else None
    results = evaluate_checks(rows, config.checks, baseline_rows=baseline)
    for r in results:
        print(describe(r), file=sys.stderr if r.status == "fail" else sys.stdout)
    if args.junit:
        write_junit(args.junit, results)
    if not results:
        print(f"evalkit: {config_path} has no checks")
    return exit_code(results)


def _compare(args) -> int:
    from evalkit.check import check_junit_path, describe, write_junit
    from evalkit.compare import checks_for, compare_runs, default_compare_dir, load_run
    from evalkit.compare_report import COMPARE_FILES, write_comparison
    from evalkit.runfolder import check_out_dir

    if args.junit:
        check_junit_path(args.junit)
    run_a, run_b = load_run(args.run_a, what="RUN_A"), load_run(args.run_b, what="RUN_B")
    out = check_out_dir(args.out or default_compare_dir(args.run_a, args.run_b), marker_files=COMPARE_FILES,
                        kind="evalkit comparison folder")
    checks, source = checks_for(run_b, args.config)
    comparison = compare_runs(run_a, run_b, checks=checks, checks_source=source)
    write_comparison(out, comparison)
    for r in comparison.checks:
        if r.status != "pass":
            print(describe(r), file=sys.stderr if r.status == "fail" else sys.stdout)
    if args.junit:
        write_junit(args.junit, comparison.checks)
    worse = [d for d in comparison.deltas if d.verdict == "worse"]
    for d in worse[:3]:
        print(f"  worse: {d.model}/{d.layer}/{d.method} {d.metric} {d.a:.4f} -> {d.b:.4f} ({d.delta:+.4f})")
    failed = sum(r.status == "fail" for r in comparison.checks)
    print(f"evalkit: wrote {out}/index.html; {len(comparison.deltas)} scores compared, {len(worse)} worse in B"
          + (f"; checks: {failed} failed of {len(comparison.checks)}" if comparison.checks else ""))
    return comparison.exit_code


def _history(args) -> int:
    from evalkit.compare import build_history, default_history_dir, load_run
    from evalkit.compare_report import HISTORY_FILES, write_history
    from evalkit.runfolder import check_out_dir

    runs = [load_run(path) for path in args.runs]
    history = build_history(runs, metrics=args.metric)
    out = check_out_dir(args.out or default_history_dir(args.runs), marker_files=HISTORY_FILES,
                        kind="evalkit history folder")
    write_history(out, history)
    print(f"evalkit: wrote {out}/index.html and {out}/history.csv ({len(runs)} runs, "
          f"{len(history.metrics)} scores)")
    return EXIT_OK


def _layers(args) -> int:
    import yaml

    from evalkit.extract import list_layers

    try:
        kwargs = yaml.safe_load(args.kwargs) if args.kwargs else {}
    except yaml.YAMLError as exc:
        raise EvalkitError(f"--kwargs: not valid YAML ({getattr(exc, 'problem', None) or exc}); expected a "
                           f"mapping like '{{num_classes: 10}}'") from None
    if not isinstance(kwargs, dict):
        raise EvalkitError(f"--kwargs: expected a mapping like '{{num_classes: 10}}'; got {args.kwargs!r}")
    size = None
    if args.input_size:
        try:
            size = (1,) + tuple(int(v) for v in args.input_size.split(","))
        except ValueError:
            raise EvalkitError(f"--input-size: expected C,H,W like 3,224,224; got {args.input_size!r}") from None
    rows = list_layers(args.source, kwargs=kwargs, input_size=size)
    width = max(len(r[0]) for r in rows)
    for name, kind, shape in rows:
        print(f"{name:<{width}}  {kind:<24} {shape}")
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (a DataLoader worker wraps it in a traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        return lines[-1].split(": ", 1)[-1] if lines[-1].startswith(("evalkit.", "EvalkitError")) else lines[-1]
    return " ".join(lines)


def _user_error(exc: BaseException):
    """The one-line message for an exception that is not a bug in evalkit, else None."""
    if isinstance(exc, EvalkitError):
        return _one_line(exc)
    if isinstance(exc, _UsageError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; lower data.max_samples (or extract.batch_size)"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "out of GPU memory; lower extract.batch_size, or set extract.device: cpu"
    if isinstance(exc, OSError) and exc.filename:  # disk full, permission denied, ...
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def _ranks():
    """This process's place under torchrun (None when the environment is not torchrun's)."""
    from evalkit.distributed import ranks_from_env

    try:
        return ranks_from_env()
    except EvalkitError:
        return None


def _on_sigterm(signum, frame):
    raise _Terminated()


def _log_to_stdout() -> None:
    """Progress (the "evalkit" logger, INFO) on stdout: stderr carries only problems."""
    import logging

    class StdoutHandler(logging.StreamHandler):
        """Writes to whatever ``sys.stdout`` is at the time (tests and notebooks swap it)."""

        @property
        def stream(self):
            return sys.stdout

        @stream.setter
        def stream(self, value):
            pass

    logger = logging.getLogger("evalkit")
    ranks = _ranks()
    prefix = f"[rank {ranks.rank}/{ranks.world_size}] " if ranks is not None and ranks.active else ""
    handler = next((h for h in logger.handlers if type(h).__name__ == "StdoutHandler"), None)
    if handler is None:
        handler = StdoutHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv=None) -> int:
    code = _main(argv)
    if argv is None and sys.getprofile() is None and sys.gettrace() is None:
        _leave(code)  # the evalkit program itself (not a call from Python, not under a profiler)
    return code


def _leave(code: int) -> None:
    """End the evalkit program: atexit handlers (the user's modules' included), flushed output,
    then exit without the interpreter's finalization, which tore down torch, numba and the
    rest in 0.6-1.0 s after every command (a 300-point report: 4.1-4.4 s -> 3.4-3.5 s).
    Everything is written and closed by now (files are written in ``with`` blocks, the run
    folder swapped in)."""
    import atexit
    import os

    from evalkit import distributed

    if not distributed.USED:
        # Under torchrun nothing more runs: gloo's worker threads can abort the process while
        # it shuts down (SIGABRT, pytorch #179291), turning a finished rank into a failed one.
        try:
            atexit._run_exitfuncs()
        except Exception:  # a handler's error must not change the exit code
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv=None) -> int:
    import os
    import signal
    import warnings

    # OpenMP threads that spin while they wait steal the cores that torch's, openTSNE's and
    # scikit-learn's separate OpenMP pools need next (t-SNE ran up to 1.7x slower after a torch
    # stage on 2 busy cores). Only before those libraries load, and only if the user chose nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    try:
        parser = _parser()
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"evalkit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_OK
    debug = getattr(args, "debug", False)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    handler = {"report": _report, "extract": _extract, "check": _check, "compare": _compare, "history": _history,
               "layers": _layers}[args.command]
    _log_to_stdout()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        with warnings.catch_warnings():
            if not debug:  # library warnings are noise on a terminal; --debug shows them
                warnings.simplefilter("ignore")
            return handler(args)
    except (KeyboardInterrupt, _Terminated) as exc:
        if argv is None:  # the evalkit program itself: a second Ctrl-C while exiting must not
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # end it with a traceback instead
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        ranks = _ranks()
        if ranks is not None and ranks.active:  # torchrun stops every rank when one of them fails
            print(f"evalkit: {ranks}: {what} (torchrun stops every rank when one fails or dies: its summary names "
                  f"the rank); nothing was written (an earlier run folder is left as it was); slices that finished "
                  f"are in the feature cache: rerun the same command to compute only the missing ones",
                  file=sys.stderr)
        else:
            print(f"evalkit: {what}; nothing was written (an earlier run folder is left as it was)", file=sys.stderr)
        code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_TERMINATED
        if argv is None:
            # The run has unwound (temp folders removed in finally blocks). Leave now, under a
            # profiler too: seen in CI, CPython's shutdown could still re-raise SIGINT on itself
            # (exit -2 instead of 130).
            _leave(code)
        return code
    except BrokenPipeError:  # `evalkit layers ... | head`: the reader has gone; so does the output
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Exception as exc:
        message = _user_error(exc)
        if debug:
            raise
        if message is not None and getattr(exc, "reported", False):  # said already (torchrun ranks)
            return EXIT_BAD_INPUT
        if message is not None:
            ranks = _ranks()
            where = f"{ranks}: " if ranks is not None and ranks.active and not message.startswith("rank ") else ""
            print(f"evalkit: error: {where}{message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        import traceback

        print(f"evalkit: internal error: {exc.__class__.__name__}: {_one_line(exc)[:300]} (a bug in evalkit: "
              f"please report it with the traceback below)", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
