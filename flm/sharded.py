"""Sharded checkpoints (torch.distributed.checkpoint, DCP): every rank writes only its own shards.

    step_00000100/
      config.json  trainer_state.json  rng.pt  tokenizer/      as in flm/checkpoint.py
      masks.safetensors     the whole growth masks, while a ramp is in progress (a few KB)
      sharded/              DCP: model parameters ("model.<name>") and AdamW state ("optim.state.<name>.exp_avg"
                            ...), one file per rank plus .metadata naming every shard's global offset
      checkpoint.json       written last, by rank 0, after every rank has written: size of every file, sha256 of the
                            small ones (hashing terabytes of shards would take longer than writing them)

DCP reshards on load: a checkpoint written at tp 2 x dp 2 loads at dp 4, or into one process (`read_whole`, which
flm/checkpoint.py's `load_checkpoint` uses; its `consolidate` writes the single-file format). Writes are atomic as
before: everything goes to a temporary sibling directory, renamed into place once complete.

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
from flm.manifest import write_manifest

SHARDED = "sharded"
MASKS = "masks.safetensors"


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


def save_sharded(directory: str | Path, cfg: ModelConfig, model, optimizer, masks: dict[str, torch.Tensor],
                 trainer_state: dict, rng: dict | None, tokenizer_dir: str | Path | None, is_main: bool) -> Path:
    """Write a sharded checkpoint; collective (every rank calls it, with the same `directory`). The run directory
    must be one filesystem every rank sees (a local path on one node, or a shared mount)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

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
        write_manifest(tmp)
        old = directory.parent / f".old-{directory.name}"
        if directory.exists():  # rename-then-remove: a crash in between leaves one complete checkpoint
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    td.barrier()
    return directory


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


def load_full(model, cfg: ModelConfig, optimizer, optimizer_state: dict) -> None:
    """A single-process AdamW state dict (whole tensors, on every rank) into the optimizer of a parallelized model:
    each rank keeps its shards. For optimizer.pt of a single-file checkpoint (what one process wrote: small)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if "param_groups" not in optimizer_state:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        named = optimizer_by_name(cfg, {"state": optimizer_state["state"], "param_groups": []})
        state = {"state": named["state"], "param_groups": groups}
    else:
        state = optimizer_by_name(cfg, optimizer_state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_safetensors(directory: str | Path, model) -> None:
    """The parameters of a safetensors checkpoint (model.safetensors, or a grown checkpoint's model-*.safetensors)
    into a parallelized model of any layout through DCP's HuggingFaceStorageReader: each rank reads only the
    pieces of its shards. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from flm.model import split_fused_qkv

    directory = Path(directory)
    if any(".attn.qkv." in k for k in safetensors_keys(directory)):  # an older checkpoint: small, read whole
        state = {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}
        params = {k: v for k, v in split_fused_qkv(state).items() if k.rsplit(".", 1)[-1] not in _mask_names()}
        set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True))
        return
    state = {k: v for k, v in get_model_state_dict(model).items() if k.rsplit(".", 1)[-1] not in _mask_names()}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(directory)))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def load_safetensors_moments(directory: str | Path, model, optimizer) -> None:
    """A grown checkpoint's AdamW moments (optimizer/*.safetensors, "<name>.exp_avg") and step into the optimizer of
    a parallelized model, each rank reading its pieces. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    state = get_optimizer_state_dict(model, optimizer)
    step = json.loads((directory / "optimizer" / "step.json").read_text())["step"]
    flat = {f"{name}.{key}": s[key] for name, s in state["state"].items() for key in ("exp_avg", "exp_avg_sq")}
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(directory / "optimizer")))
    for s in state["state"].values():
        s["step"] = torch.tensor(float(step))
    set_optimizer_state_dict(model, optimizer, state)


def safetensors_keys(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the model*.safetensors file of `directory` that holds it (one file, or a grown checkpoint's)."""
    from safetensors import safe_open

    keys = {}
    for f in sorted(Path(directory).glob("model*.safetensors")):
        with safe_open(f, framework="pt") as h:
            keys.update({k: f for k in h.keys()})  # noqa: SIM118
    return keys


def read_safetensors_masks(directory: str | Path) -> dict[str, torch.Tensor]:
    """The growth masks stored in a safetensors checkpoint (a few small tensors)."""
    from safetensors import safe_open

    out = {}
    for k, f in safetensors_keys(directory).items():
        if k.rsplit(".", 1)[-1] in _mask_names():
            with safe_open(f, framework="pt") as h:
                out[k] = h.get_tensor(k)
    return out


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
