"""The `fastguide` command line routes its subcommands."""

import pytest

from fastguide.tools import cli


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpp", "triton", "cuda"):
        assert name in out


def test_bench_owns_its_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "fastguide bench" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample-everything"])
    assert exc.value.code == 2
