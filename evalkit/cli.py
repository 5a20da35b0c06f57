"""Command line: ``evalkit report | check | layers``. No logic lives here.

A user mistake (:class:`EvalkitError`) is one line on stderr and exit code 2; ``--debug``
shows the traceback. A failing check is exit code 1.
"""
from __future__ import annotations

import argparse
import sys

from evalkit.errors import EvalkitError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from evalkit import __version__

    p = argparse.ArgumentParser(
        prog="evalkit",
        description="Extract features from models, embed them (t-SNE, UMAP, PCA), score them and write one HTML report.",
    )
    p.add_argument("--version", action="version", version=f"evalkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("report", help="run the whole pipeline and write a run folder")
    r.add_argument("config", metavar="CONFIG", help="YAML config")
    r.add_argument("--out", metavar="DIR", help="run folder (default: reports/out/NAME)")
    r.add_argument("--no-cache", action="store_true", help="recompute features even when cached")
    r.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    c = sub.add_parser("check", help="re-evaluate the checks on an existing run folder (no recomputation)")
    c.add_argument("run_dir", metavar="DIR")
    c.add_argument("--config", metavar="CONFIG", help="take the checks from this config instead of DIR/config.yaml")
    c.add_argument("--baseline", metavar="DIR2", help="an earlier run folder, for max_drop conditions")
    c.add_argument("--junit", metavar="FILE", help="write JUnit XML")
    c.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    la = sub.add_parser("layers", help="list the layer names a config may use for a model")
    la.add_argument("source", metavar="MODEL_SPEC", help="e.g. timm:resnet18, torchvision:resnet50, demo:cnn")
    la.add_argument("--kwargs", metavar="YAML", default=None, help="model keyword arguments, e.g. '{num_classes: 10}'")
    la.add_argument("--input-size", metavar="C,H,W", default=None, help="dummy input size (default from the model)")
    la.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _report(args) -> int:
    from pathlib import Path

    from evalkit.check import describe, exit_code, write_junit
    from evalkit.config import load_config
    from evalkit.pipeline import run_report

    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("reports/out") / config.name
    result = run_report(config, out, use_cache=not args.no_cache, argv=["evalkit"] + sys.argv[1:])
    for r in result.checks:
        if r.status != "pass":
            print(describe(r), file=sys.stderr)
    if args.junit:
        write_junit(args.junit, result.checks)
    passed = sum(r.status == "pass" for r in result.checks)
    print(f"evalkit: wrote {out}/index.html ({result.provenance['duration_s']:.1f} s); "
          f"checks: {passed} passed of {len(result.checks)}", file=sys.stderr)
    return exit_code(result.checks)


def _check(args) -> int:
    from pathlib import Path

    from evalkit.check import describe, evaluate_checks, exit_code, read_rows, write_junit
    from evalkit.config import load_config

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
        print(f"evalkit: {config_path} has no checks", file=sys.stderr)
    return exit_code(results)


def _layers(args) -> int:
    import yaml

    from evalkit.extract import list_layers

    kwargs = yaml.safe_load(args.kwargs) if args.kwargs else {}
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


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_OK
    handler = {"report": _report, "check": _check, "layers": _layers}[args.command]
    try:
        return handler(args)
    except EvalkitError as exc:
        if args.debug:
            raise
        print(f"evalkit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("evalkit: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
