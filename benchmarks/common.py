"""What every benchmark script shares: progress on stderr (stdout is the JSON) and comma-list arguments."""

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]
