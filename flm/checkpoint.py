"""The one checkpoint format: a directory that is both a resumable training state and a servable model.

    config.json          the ModelConfig
    model.safetensors    weights, and the growth masks while a ramp is in progress
    optimizer.pt         AdamW state (optional)
    trainer_state.json   step, stage, data position, mask ramp, counters (optional)
    rng.pt               torch RNG state (optional)
    tokenizer/           the tokenizer the model was trained with (optional)
    checkpoint.json      size and sha256 of every file above: written last, so a checkpoint without it is partial

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place. A checkpoint
that fails verification (missing or truncated file, wrong hash) is skipped with a warning by `latest_checkpoint`,
which then falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flm.config import ModelConfig
from flm.manifest import MANIFEST, sha256, write_manifest  # noqa: F401 (write_manifest: part of this API)

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint directory is partial or corrupted."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: dict[str, torch.Tensor] | None  # None: a sharded checkpoint read without its tensors
    optimizer: dict | None
    trainer_state: dict
    rng: dict | None
    sharded: bool = False  # flm/sharded.py's format (DCP shards)


def save_checkpoint(directory: str | Path, config: ModelConfig, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None = None, trainer_state: dict | None = None, rng: dict | None = None,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Write a checkpoint atomically to `directory` (replacing an older one of the same name)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(config.model_dump_json(indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if trainer_state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if rng is not None:
        torch.save(rng, tmp / "rng.pt")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for p in (*files, tmp / MANIFEST):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    old = directory.parent / f".old-{directory.name}-{os.getpid()}"
    if directory.exists():  # rename-then-remove: a crash in between leaves one complete checkpoint
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CheckpointError unless every file listed in checkpoint.json is there with its size and hash."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (partial write)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({e})") from None
    for name, meta in manifest.items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or \
                (meta.get("sha256") is not None and sha256(p) != meta["sha256"]):
            raise CheckpointError(f"{directory}: {name} is missing or corrupted")


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", verify: bool = True,
                    tensors: bool = True) -> Checkpoint:
    """Read a checkpoint of either format. A sharded one (flm/sharded.py) is assembled in this process, unless
    `tensors=False`: then model and optimizer are None and a parallelized model loads its own shards."""
    from flm.model import split_fused_qkv
    from flm.sharded import is_sharded, read_whole

    directory = Path(directory)
    if verify:
        verify_checkpoint(directory)
    config = ModelConfig.model_validate_json((directory / "config.json").read_text())
    sharded = is_sharded(directory)
    state_path, rng_path = directory / "trainer_state.json", directory / "rng.pt"
    if sharded:
        model, optimizer = read_whole(directory) if tensors else (None, None)
        if model is not None:
            model = {k: v.to(map_location) for k, v in model.items()}
    elif tensors:
        model = {}
        for f in sorted(directory.glob("model*.safetensors")):  # one file, or a grown checkpoint's several
            model.update(load_file(f, device=str(map_location)))
        model = split_fused_qkv(model)
        optimizer = read_optimizer(directory, config, map_location)
    else:
        model = optimizer = None
    trainer_state = json.loads(state_path.read_text()) if state_path.exists() else {}
    rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    return Checkpoint(directory, config, model, optimizer, trainer_state, rng, sharded)


def read_optimizer(directory: str | Path, config: ModelConfig, map_location: str | torch.device = "cpu") -> dict | None:
    """A single-file checkpoint's AdamW state: optimizer.pt as torch saved it, or a grown checkpoint's optimizer/
    (moments by name, one step count) as a state-only dict by position ({"state": ...}, no param_groups: the
    optimizer it is loaded into keeps its own groups)."""
    directory = Path(directory)
    if (directory / "optimizer.pt").is_file():
        return torch.load(directory / "optimizer.pt", map_location=map_location, weights_only=True)
    step_file = directory / "optimizer" / "step.json"
    if not step_file.is_file():
        return None
    from flm.sharded import param_names

    step = torch.tensor(json.loads(step_file.read_text())["step"])
    moments = {}
    for f in sorted((directory / "optimizer").glob("*.safetensors")):
        moments.update(load_file(f, device=str(map_location)))
    state = {i: {"step": step.clone(), **{k: moments[f"{n}.{k}"] for k in ("exp_avg", "exp_avg_sq")}}
             for i, n in enumerate(param_names(config))}
    return {"state": state}


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """A checkpoint as something to run: (GPT in eval mode, its Tokenizer or None)."""
    from flm.data import Tokenizer
    from flm.model import GPT

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no config.json)")
    ck = load_checkpoint(directory, device, verify=(directory / MANIFEST).exists())
    tokenizer = Tokenizer.load(directory / "tokenizer") if (directory / "tokenizer").is_dir() else None
    return GPT.from_state(ck.config, ck.model).eval(), tokenizer


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary and foreign entries ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu",
                      tensors: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupted ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, map_location, tensors=tensors)
        except (CheckpointError, OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and every stage-end checkpoint (a stage's output)."""
    paths = list_checkpoints(run_dir)
    for path in paths[:-keep] if keep > 0 else paths:
        state = path / "trainer_state.json"
        if state.exists() and json.loads(state.read_text()).get("stage_end"):
            continue
        shutil.rmtree(path, ignore_errors=True)


def consolidate(directory: str | Path, out: str | Path) -> Path:
    """Write the single-file checkpoint (model.safetensors, optimizer.pt) of a sharded one."""
    from flm.sharded import read_whole

    directory = Path(directory)
    model, optim = read_whole(directory)
    cfg = ModelConfig.model_validate_json((directory / "config.json").read_text())
    state_path, rng_path = directory / "trainer_state.json", directory / "rng.pt"
    trainer_state = json.loads(state_path.read_text()) if state_path.exists() else None
    rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    tok = directory / "tokenizer"
    return save_checkpoint(out, cfg, model, optim, trainer_state, rng, tok if tok.is_dir() else None)
