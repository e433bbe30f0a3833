"""flm/error_file.py: a failing command leaves its report in $FLM_ERROR_FILE (exit code, type, message), a command
that succeeds leaves none, and a crash is reported before its traceback."""

from pathlib import Path

import pytest

from flm.cli import main
from flm.error_file import ERROR_FILE_ENV, exit_code_of, read_error

ROOT_PLAN = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def test_a_user_error_is_reported_with_exit_code_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "errors" / "job.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    assert main(["check", ROOT_PLAN]) == 0 and not path.exists()
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    report = read_error(path)
    assert (report.exit_code, report.type, report.step) == (2, "FLMConfigError", None)
    assert capsys.readouterr().err.strip() == f"flm: error: {report.message}" and "no such file" in report.message


def test_a_crash_is_reported_and_raised(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    with pytest.raises(ZeroDivisionError):
        exit_code_of(lambda: 1 / 0)
    report = read_error(path)
    assert (report.exit_code, report.type, report.message) == (1, "ZeroDivisionError",
                                                                 "ZeroDivisionError: division by zero")
