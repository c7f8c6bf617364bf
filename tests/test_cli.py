"""`mosaic-ray` for a user: `--version`, a top-level help that says what the tool does, and every
subcommand's help showing its defaults."""

from __future__ import annotations

import pytest

from mosaic_ray import __version__
from mosaic_ray.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mosaic-ray {__version__}"


def test_the_top_level_help_is_for_users():
    text = build_parser().format_help()
    assert "Serve a vision-language model over live video streams" in text
    for command in ("mosaic-ray demo", "mosaic-ray serve", "--version"):
        assert command in text
    assert "add a row to SUBCOMMANDS" not in text  # the module's note for developers stays out
    assert "python scaling_bench/fidelity.py" in " ".join(text.split())  # where the benchmarks went


def test_the_package_has_no_bench_subcommand(capsys):
    """Benchmarks are not in the installed package: `mosaic-ray bench` is no command."""
    with pytest.raises(SystemExit) as done:
        main(["bench", "fidelity"])
    assert done.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_help_texts_show_defaults(capsys):
    demo = _help("demo", capsys=capsys)
    for shown in ("(default: 4.0)", "(default: cluster)", "(default: 24)", "(default: auto)", "--question TEXT",
                  "(default: 8000)"):
        assert shown in demo, shown
    assert "(default: None)" not in demo and "(default: False)" not in demo
    serve = _help("serve", capsys=capsys)
    for shown in ("--model NAME_OR_DIR", "(default: local)", "dino-smollm2", "--log-dir DIR", "local_tiny"):
        assert shown in serve, shown
    assert "(default: None)" not in serve
