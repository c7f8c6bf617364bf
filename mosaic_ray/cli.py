"""`mosaic-ray`: one entry point, one function per subcommand (add a row to SUBCOMMANDS).

Every parser uses `DefaultsHelpFormatter`, so each option's help ends with its default."""

from __future__ import annotations

import argparse
import sys

from mosaic_ray import __version__

DESCRIPTION = """\
Serve a vision-language model over live video streams: push frames and text into a stream, ask
questions about everything it has seen, with hours of context per stream (clustered KV cache,
sharded over GPUs with Ray). Runs on a CPU machine with the real small model (dino-smollm2).

  mosaic-ray demo                  play a sample video into a stream and ask about it
  mosaic-ray serve                 the HTTP API (OpenAI-compatible chat included) on :8000
  mosaic-ray serve --model tiny    the same with a tiny random model (for tests)
"""
SERVE_DESCRIPTION = """\
Serve the HTTP API (streams, frames, questions, OpenAI-compatible chat, realtime WebSocket) on
Ray Serve, until Ctrl-C. With no flags: a private Ray cluster on this machine, two CPU shards
running the real small model (dino-smollm2), http://127.0.0.1:8000 (docs/api.md).

  mosaic-ray serve --model tiny                 a tiny random model, for tests (local_tiny)
  mosaic-ray serve --model /path/to/Qwen2-VL    a local transformers checkpoint
  mosaic-ray serve --config my.yaml             a LaunchConfig file (mosaic_ray/serve/config.py)
"""
EPILOG = ("Docs: README.md, docs/api.md, docs/configuration.md. `mosaic-ray COMMAND --help` for each command. "
          "Benchmarks run from a checkout, e.g. `python scaling_bench/fidelity.py --help`, "
          "`python scaling_bench/needle.py --help` (docs/benchmarks.md).")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, descriptions printed as written. No "(default: None)"
    or "(default: False)": a None default is described in the help's own words (the config's),
    and a flag's default is that it is off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _demo(sub: argparse._SubParsersAction) -> None:
    from mosaic_ray import demo

    p = sub.add_parser("demo", help="play a real video into a local stream and ask questions",
                       description="\n\n".join(demo.__doc__.split("\n\n")[:2]),
                       formatter_class=DefaultsHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def _serve(sub: argparse._SubParsersAction) -> None:
    from mosaic_ray.serve import command

    p = sub.add_parser("serve", help="run the HTTP API on Ray Serve (default: the real small model on the CPU)",
                       description=SERVE_DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    command.add_arguments(p)
    p.set_defaults(func=command.run)


SUBCOMMANDS = [_demo, _serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic-ray", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mosaic-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
