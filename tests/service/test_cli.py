"""service/cli.py: `flm serve` is registered on the `flm` command, and every input error exits 2 with one line before
a Ray cluster starts. (Serving itself is tested through `service.app.deploy`, which `flm serve` calls.)"""

import socket

import pytest

from flm.cli import build_parser, main


def test_serve_is_a_subcommand_of_flm():
    args = build_parser().parse_args(["serve", "CK", "--tp", "2", "--replicas", "3", "--port", "9000"])
    assert (args.checkpoint, args.tp, args.replicas, args.port) == ("CK", 2, 3, 9000)


@pytest.mark.parametrize("extra,message", [
    (["--tp", "3"], "--tp: 3 must divide the head count (4)"),
    (["--replicas", "0"], "replicas"),
    (["--dtype", "int8"], "dtype"),
    (["--min-replicas", "3", "--max-replicas", "2"], "min_replicas 3 is above max_replicas 2"),
])
def test_bad_arguments_exit_2_with_one_line(grown, capsys, extra, message):
    assert main(["serve", str(grown["final"]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flm: error:") and message in err and "\n" not in err


def test_missing_checkpoint_busy_port_and_unreachable_cluster_exit_2(grown, tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(grown["final"]), "--port", str(port)]) == 2
    assert f"--port: 127.0.0.1:{port} is in use" in capsys.readouterr().err
    assert main(["serve", str(grown["final"]), "--address", "127.0.0.1:1"]) == 2  # flm/connect.py: in seconds
    assert "--address: nothing answers at 127.0.0.1:1" in capsys.readouterr().err
