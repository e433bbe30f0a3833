"""`flm serve CHECKPOINT --tp 2 [--replicas N] [--port 8000]`: a checkpoint behind OpenAI-compatible routes on Ray
Serve, tensor-parallel shards on Ray actors.

Wired into `flm` through the `flm.cli` entry point group (`add_serve_cli`). This module imports only argparse at load
time: `flm` loads every plugin on start, and Ray Serve takes seconds to import.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cmd_serve(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flm.config import FLMConfigError, parse
    from flm.connect import connect, ray_address
    from service.spec import DeploymentRequest, check_request

    fields = dict(checkpoint=args.checkpoint, name=args.name, tp=args.tp, replicas=args.replicas,
                  max_batch=args.max_batch, cpus_per_shard=args.cpus_per_shard, gpus_per_shard=args.gpus_per_shard,
                  dtype=args.dtype, route_prefix=args.route_prefix)
    if args.max_replicas is not None:
        fields["autoscaling"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    request = parse(DeploymentRequest, fields, "flm serve")
    check_request(request)  # every input error before a cluster starts
    local = ray_address(args.address) == "local"  # a cluster of our own, which goes when we stop
    if local and not _port_free(args.host, args.port):
        raise FLMConfigError(f"--port: {args.host}:{args.port} is in use; choose another port")

    import ray
    from ray import serve

    from service.app import deploy, undeploy

    connected = connect(ray, args.address)
    try:
        url = deploy(request, host=args.host, port=args.port)
        print(f"serving {request.name!r} at {url} (OpenAI base_url {url}/v1, model {request.name!r}); "
              f"Ctrl-C stops", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(timeout=1.0):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        if local:
            serve.shutdown()  # our own local cluster: everything goes
        else:
            undeploy(request.name)  # a shared cluster: only our application
        if connected:
            ray.shutdown()


def add_serve_cli(subparsers) -> None:
    """Register `serve` on the `flm` command's subparsers."""
    p = subparsers.add_parser("serve", help="serve a checkpoint with Ray Serve behind OpenAI-compatible routes "
                                            "(tensor parallel, continuous batching)")
    p.add_argument("checkpoint", help="checkpoint directory (with its tokenizer/), e.g. a stage's last step_*")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: shard actors per replica (default 1)")
    p.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling lower bound (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, help="autoscale between --min-replicas and this")
    p.add_argument("--name", default="flm", help="the model id clients send (default flm)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the routes (default /)")
    p.add_argument("--address", help="Ray cluster to join ('auto', host:6379); default: start a local one")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per replica (default 16)")
    p.add_argument("--cpus-per-shard", type=float, default=1.0, help="CPUs reserved per shard actor (default 1)")
    p.add_argument("--gpus-per-shard", type=float, default=0.0, help="GPUs per shard actor (> 0: NCCL)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs and "
                   "CPUs with native bf16, else float32; default float32)")
    p.set_defaults(func=cmd_serve)
