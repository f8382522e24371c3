"""The CLI contract: a user mistake is one line on stderr and exit code 2."""
import subprocess
import sys

from loraq.cli import main


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frobnicate" in err[0]


def test_unknown_flag_is_one_line_exit_2(capsys):
    assert main(["models", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0]


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "loraq", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("loraq ")
