"""The ``ucm`` command line: ``ucm config check FILE`` and ``ucm demo``."""
import argparse
import dataclasses
import sys

import yaml

from ucm_sparse.config import GSAConfig, load_gsa_fragment, load_ucm_config
from ucm_store.config import SECRET_KEYS, StoreConfig, read_document
from ucm_store.configspec import ConfigError, describe_fields


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ucm`` console script; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
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
        out += [f"### {title}", "", "| key | default | type | allowed | used by | meaning |", "|---|---|---|---|---|---|"]
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
