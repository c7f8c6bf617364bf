"""`mosaic-ray`: one entry point, one function per subcommand (add a row to SUBCOMMANDS)."""

from __future__ import annotations

import argparse
import sys


def _demo(sub: argparse._SubParsersAction) -> None:
    from mosaic_ray import demo

    p = sub.add_parser("demo", help="play a real video into a local stream and ask questions")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark: fidelity | needle")
    p.add_argument("name", choices=["fidelity", "needle"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    def run(args) -> int:
        import importlib

        return importlib.import_module(f"mosaic_ray.bench.{args.name}").main(args.rest) or 0

    p.set_defaults(func=run)


def _serve(sub: argparse._SubParsersAction) -> None:
    from mosaic_ray.serve import command

    p = sub.add_parser("serve", help="run the HTTP API on Ray Serve (config: cluster_configs/local.yaml)")
    command.add_arguments(p)
    p.set_defaults(func=command.run)


SUBCOMMANDS = [_demo, _bench, _serve]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosaic-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
