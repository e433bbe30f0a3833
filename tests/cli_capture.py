"""`flm` commands in-process with their output captured: for the tests that run them in a subprocess of their own
(which modules a command imports, or may not), where pytest's capsys is not at hand. Imports nothing but flm.cli."""

import contextlib
import io


def run_captured(argv: list[str]) -> tuple[int | str, str, str]:
    """(exit code, stdout, stderr) of `flm argv`; an exception other than SystemExit gives code "raised <Type>" and
    its traceback on stderr."""
    from flm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            import traceback

            traceback.print_exc()
            code = f"raised {type(e).__name__}"
    return code, out.getvalue(), err.getvalue()
