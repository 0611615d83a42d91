"""The `fastguide` command line routes its subcommands, says what it can do, and shows progress only where
someone is watching (stderr a terminal, no --quiet)."""

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading

import pytest

import fastguide
from fastguide.tools import bench, cli


class FakeTTY(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def _subcommands(parser):
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


def _help(capsys, monkeypatch, argv=("--help",)):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


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


def test_help_lists_every_subcommand_on_one_line_in_plain_text(capsys, monkeypatch):
    out = _help(capsys, monkeypatch)
    assert "``" not in out and "fastguide: fused" in out
    names = list(_subcommands(cli.build_parser()).choices)
    assert {"demo", "bench", "backends", "train-digits", "generate", "evaluate", "serve"} <= set(names)
    lines = out.splitlines()
    for name in names:  # the listing is built from the subparsers: a new one is checked here too
        hits = [i for i, line in enumerate(lines) if line.split()[:1] == [name] and len(line.split()) > 1]
        assert len(hits) == 1, (name, out)
        following = lines[hits[0] + 1]
        # the next line is blank or the next command, never the rest of this command's help
        assert not following.strip() or following.split()[0] in names, (name, following)


def test_bare_fastguide_prints_the_help_and_exits_0(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main([]) == 0
    bare = capsys.readouterr().out
    assert bare == _help(capsys, monkeypatch)
    assert "commands:" in bare and "train-digits" in bare


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"fastguide {fastguide.__version__}\n"


def test_every_command_and_option_has_help():
    parsers = {"fastguide": cli.build_parser()}
    parsers.update({f"fastguide {n}": p for n, p in _subcommands(parsers["fastguide"]).choices.items()})
    parsers["fastguide bench (its own)"] = bench.build_parser()
    for choice in _subcommands(parsers["fastguide"])._choices_actions:
        assert choice.help, choice.dest
    for name, parser in parsers.items():
        assert parser.description and "``" not in parser.description, name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
    for name in ("demo", "train-digits"):
        assert "--quiet" in parsers[f"fastguide {name}"].format_help()
    assert "--quiet" in bench.build_parser().format_help()


def test_bench_help_promises_no_skipped_contender():
    text = bench.build_parser().format_help()
    assert "diffusers, k-diffusion and fastguide side by side" not in text
    assert "k-diffusion joins only where it is installed" in text


def _env():
    env = dict(os.environ, COLUMNS="80")
    env.pop("PYTHONWARNINGS", None)
    return env


def _console_script():
    exe = shutil.which("fastguide")
    if exe:
        return [exe]
    # not installed as a console script here: what the entry point runs
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'fastguide'; from fastguide.tools.cli import main; "
                                  "sys.exit(main())"]


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"], []])
def test_python_m_fastguide_is_the_fastguide_command(argv):
    a = subprocess.run(_console_script() + argv, capture_output=True, text=True, env=_env(), timeout=300)
    b = subprocess.run([sys.executable, "-m", "fastguide"] + argv, capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.startswith("usage: fastguide")


# ---- progress ------------------------------------------------------------------------------------------

MIXTURE = ["-m", "fastguide", "demo", "--mixture", "--samples", "64", "--steps", "4"]


def _run_with_tty_stderr(args):
    """Run ``python args`` with stderr a pseudo-terminal (24 x 100) and stdout a pipe; (rc, stdout, stderr)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE, stderr=slave, env=_env())
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    out = proc.stdout.read().decode()
    proc.wait(timeout=300)
    reader.join(timeout=60)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_and_not_with_quiet():
    rc, out, err = _run_with_tty_stderr(MIXTURE)
    assert rc == 0 and "discriminator guidance" in out
    assert "fastguide demo --mixture" in err and "ADM classifier s=4" in err   # the stages, on stderr
    assert "fastguide demo --mixture" not in out and "\r" not in out          # the results stay clean
    rc, out_quiet, err_quiet = _run_with_tty_stderr(MIXTURE + ["--quiet"])
    assert rc == 0 and "discriminator guidance" in out_quiet
    assert "fastguide demo" not in err_quiet and "\r" not in err_quiet


def test_no_progress_when_stderr_is_not_a_terminal():
    proc = subprocess.run([sys.executable] + MIXTURE, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and "discriminator guidance" in proc.stdout
    assert "fastguide demo" not in proc.stderr and "\r" not in proc.stderr


def test_progress_enabled_only_for_a_terminal_without_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not cli.progress_enabled()
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert cli.progress_enabled() and not cli.progress_enabled(quiet=True)


def test_progress_without_tqdm_prints_a_line_per_stage(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)   # `from tqdm import tqdm` now raises ImportError
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with cli.Progress(2, "job", enabled=True) as progress:
        progress.stage("first")
        progress.advance()
        progress.stage("second")
        progress.advance()
    assert err.getvalue().splitlines() == ["job [0/2] first", "job [1/2] second"]
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with cli.Progress(2, "job", enabled=False) as progress:
        progress.stage("first")
        progress.advance()
    assert err.getvalue() == ""


def test_train_digits_progress_goes_to_stderr_and_quiet_silences_it(tmp_path, monkeypatch, capsys):
    from fastguide.examples.digits import train

    def fake_train_all(out_dir, cfg, log=print):
        (log or (lambda _: None))("  denoiser: step 1/1")
        return {"model": os.path.join(out_dir, "unet.safetensors")}

    monkeypatch.setattr(train, "train_all", fake_train_all)
    for quiet, expect in ((False, "  denoiser: step 1/1\n"), (True, "")):
        err = FakeTTY()
        monkeypatch.setattr(sys, "stderr", err)
        assert cli.main(["train-digits", "--out", str(tmp_path)] + (["--quiet"] if quiet else [])) == 0
        assert err.getvalue() == expect
        out = capsys.readouterr().out
        assert "unet.safetensors" in out and "denoiser" not in out
