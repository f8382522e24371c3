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


def test_a_misspelt_flag_names_the_nearest_one_of_its_command(tmp_path, capsys):
    assert main(["train", "--max-stpes", "3", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loraq: error: loraq train: unrecognized arguments: --max-stpes; did you mean --max-steps? "
                   "(see `loraq train --help`)"]
    assert not (tmp_path / "run").exists()
    assert main(["merge", "--adapter", "a", "--out", "o", "--dtpye", "bf16"]) == 2
    assert "did you mean --dtype?" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "loraq", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("loraq ")
