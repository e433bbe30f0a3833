"""The error file: how a failing job tells the gateway why, without anyone reading its stderr.

Whoever starts a job sets $FLM_ERROR_FILE to a path of its choosing (the gateway: `jobs/<id>/errors/<submission>.json`,
one per attempt); a failing `flm` command (`flm.cli.main`), pipeline (`api.pipeline`) or deployment job
(`api.deploy`) writes an `ErrorReport` there, atomically, and exits with the same code:

    {"exit_code": 2, "type": "FLMConfigError", "message": "stages.1.tokens: ...", "step": null}

exit code 2 is a user error (the message says what to change), 1 anything else (its traceback still goes to stderr);
`step` names the pipeline step that failed. A process that succeeds writes nothing. No torch, no Ray: the gateway
reads it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from flm.config import FLMConfigError

ERROR_FILE_ENV = "FLM_ERROR_FILE"


class ErrorReport(BaseModel):
    exit_code: int  # the process's: 2 a user error, 1 a crash
    type: str  # the exception's class name
    message: str  # one line for a person: a user error's message, or "Type: message" of a crash
    step: str | None = None  # the pipeline step that failed, if a pipeline wrote it

    @classmethod
    def of(cls, exc: BaseException, exit_code: int, step: str | None = None) -> ErrorReport:
        message = str(exc) if exit_code == 2 else f"{type(exc).__name__}: {exc}"
        return cls(exit_code=exit_code, type=type(exc).__name__, message=message, step=step)


def write_error(report: ErrorReport, path: str | os.PathLike | None = None) -> None:
    """Write `report` to `path` (default $FLM_ERROR_FILE; nothing when neither is set). Never raises: a report that
    cannot be written must not hide the error it reports."""
    path = path or os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(report.model_dump_json())
        tmp.replace(path)
    except OSError:
        pass


def exit_code_of(command: Callable[[], object]) -> int:
    """Run a command the way every entrypoint of ours ends: 0 if it returns; a user error (FLMConfigError) printed as
    one `flm: error:` line and exit code 2; anything else re-raised (Python prints the traceback, exit code 1). A
    failure's report goes to $FLM_ERROR_FILE."""
    try:
        command()
    except FLMConfigError as e:
        print(f"flm: error: {e}", file=sys.stderr)
        write_error(ErrorReport.of(e, 2))
        return 2
    except Exception as e:
        write_error(ErrorReport.of(e, 1))
        raise
    return 0


def read_error(path: str | os.PathLike) -> ErrorReport | None:
    """The report at `path`, or None if there is none (or it is not one)."""
    try:
        return ErrorReport.model_validate_json(Path(path).read_text())
    except (OSError, ValidationError):
        return None
