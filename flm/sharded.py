"""Sharded checkpoints (torch.distributed.checkpoint, DCP): every rank writes only its own shards.

    step_00000100/
      config.json  trainer_state.json  rng.pt  tokenizer/      as in flm/checkpoint.py
      masks.safetensors     the whole growth masks, while a ramp is in progress (a few KB)
      sharded/              DCP: model parameters ("model.<name>") and AdamW state ("optim.state.<name>.exp_avg"
                            ...), one file per rank plus .metadata naming every shard's global offset
      checkpoint.json       written last, by rank 0, after every rank has written: size of every file, sha256 of the
                            small ones (hashing terabytes of shards would take longer than writing them)

DCP reshards on load: a checkpoint written at tp 2 x dp 2 loads at dp 4, or into one process (`consolidate` turns it
into the single-file format, which export, eval and serving read; `load_checkpoint` does it in memory). Writes are
atomic as before: everything goes to a temporary sibling directory, renamed into place once complete.

The optimizer's state is keyed by parameter name here (DCP's form), by position in the single-file format; the
positions are those of flm/mup.py's parameter groups, so `optimizer_by_name` / `optimizer_by_position` convert.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as td
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from flm import mup
from flm.config import ModelConfig

SHARDED = "sharded"
MASKS = "masks.safetensors"
HASH_LIMIT = 64 << 20  # files above this size are listed with their size only


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDED).is_dir()


def param_names(cfg: ModelConfig, weight_decay: float = 0.0) -> list[str]:
    """Parameter names in the order the single-process optimizer numbers them (mup.param_groups over a GPT)."""
    from flm.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for g in mup.param_groups(model, cfg, 1.0, weight_decay) for p in g["params"]]


def optimizer_by_name(cfg: ModelConfig, state: dict) -> dict:
    """A single-process AdamW state dict (integer ids) keyed by parameter name, DCP's form."""
    names = param_names(cfg)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_by_position(cfg: ModelConfig, state: dict) -> dict:
    """The inverse of optimizer_by_name."""
    index = {n: i for i, n in enumerate(param_names(cfg))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _manifest(directory: Path) -> dict:
    from flm.checkpoint import sha256

    out = {}
    for p in sorted(q for q in directory.rglob("*") if q.is_file()):
        size = p.stat().st_size
        out[str(p.relative_to(directory))] = {"bytes": size, "sha256": sha256(p) if size <= HASH_LIMIT else None}
    return out


def save_sharded(directory: str | Path, cfg: ModelConfig, model, optimizer, masks: dict[str, torch.Tensor],
                 trainer_state: dict, rng: dict | None, tokenizer_dir: str | Path | None, is_main: bool) -> Path:
    """Write a sharded checkpoint; collective (every rank calls it, with the same `directory`). The run directory
    must be one filesystem every rank sees (a local path on one node, or a shared mount)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from flm.checkpoint import MANIFEST

    directory = Path(directory)
    tmp = directory.parent / f".tmp-{directory.name}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    td.barrier()
    model_state = {k: v for k, v in get_model_state_dict(model).items() if k.rsplit(".", 1)[-1] not in _mask_names()}
    dcp.save({"model": model_state, "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(tmp / SHARDED))
    td.barrier()
    if is_main:
        (tmp / "config.json").write_text(cfg.model_dump_json(indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if masks:
            save_file({k: v.contiguous() for k, v in masks.items()}, tmp / MASKS)
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=2))
        _fsync_tree(tmp)
        old = directory.parent / f".old-{directory.name}"
        if directory.exists():  # rename-then-remove: a crash in between leaves one complete checkpoint
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    td.barrier()
    return directory


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _mask_names() -> tuple[str, ...]:
    from flm.model import MASK_NAMES

    return MASK_NAMES


def read_masks(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / MASKS
    return load_file(path) if path.is_file() else {}


def load_sharded(directory: str | Path, model, optimizer=None, params: bool = True) -> None:
    """Load a sharded checkpoint's parameters (`params`) and AdamW state (`optimizer`) into a parallelized model
    of any layout: each rank reads only the pieces of the shards it holds. Collective. Masks: read_masks."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {}
    if params:
        state["model"] = {k: v for k, v in get_model_state_dict(model).items()
                          if k.rsplit(".", 1)[-1] not in _mask_names()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED))
    if params:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def load_full(model, cfg: ModelConfig, model_state: dict | None, optimizer=None,
              optimizer_state: dict | None = None) -> None:
    """A single-file checkpoint's state (whole tensors, on every rank) into a parallelized model: each rank keeps
    its shards. For small models (the single-file format is what one process wrote); masks are left out."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if model_state is not None:
        params = {k: v for k, v in model_state.items() if k.rsplit(".", 1)[-1] not in _mask_names()}
        set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_by_name(cfg, optimizer_state),
                                 options=StateDictOptions(full_state_dict=True))


def read_whole(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A sharded checkpoint assembled in this process: (model state with masks, single-process optimizer state).
    Needs no process group; memory: the whole model and its AdamW state."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    directory = Path(directory)
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(directory / SHARDED)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    cfg = ModelConfig.model_validate_json((directory / "config.json").read_text())
    model = {**state["model"], **read_masks(directory)}
    optim = state.get("optim")
    return model, (optimizer_by_position(cfg, optim) if optim and optim.get("state") else None)


def consolidate(directory: str | Path, out: str | Path) -> Path:
    """Write the single-file checkpoint (model.safetensors, optimizer.pt) of a sharded one."""
    from flm.checkpoint import save_checkpoint

    directory = Path(directory)
    model, optim = read_whole(directory)
    cfg = ModelConfig.model_validate_json((directory / "config.json").read_text())
    state_path, rng_path = directory / "trainer_state.json", directory / "rng.pt"
    trainer_state = json.loads(state_path.read_text()) if state_path.exists() else None
    rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    tok = directory / "tokenizer"
    return save_checkpoint(out, cfg, model, optim, trainer_state, rng, tok if tok.is_dir() else None)
