"""Masked Structural Growth (MSG): function-preserving growth of width, FFN, heads and depth (Yao et al., 2023).

Growth is tensor surgery on a state dict (old state + old config + new config -> new state) plus runtime masks.
Every old tensor is embedded as the leading slice of its grown tensor; new
coordinates get a fresh μP init: preservation comes from the masks installed at 0, not from the init.

The surgery works tensor by tensor: each grown tensor depends only on the old tensor it continues, and its random
init comes from a generator of its own, seeded by (the caller's generator seed, the operator's position, the
tensor's name). So a stage transition can be computed for one tensor at a time, in any order, on any rank
(`grown_tensor`, used by flm/offline_growth.py to grow a checkpoint on disk without holding the model), and gives the
same bits as `grow_state` on the whole state dict. The
one non-mask adjustment: μP logits carry output_mult / w and w = d_model / base_width grows with width, so the
final LayerNorm's weight and bias are scaled by w'/w on the old coordinates, which keeps the logits unchanged.

`MaskRamp` moves the masks linearly to 1 over ramp_steps optimizer steps and then removes them; the optimizer
state follows the same surgery (moments into the old slices, zeros elsewhere, step kept).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import torch

from flm import mup
from flm.config import DEFAULT_OPERATOR_ORDER, ModelConfig, Operator, growth_problem
from flm.model import GPT, MASK_NAMES

State = dict[str, torch.Tensor]
_OPERATOR_DIM = {"width": "d_model", "ffn": "d_ffn", "heads": "n_head", "depth": "n_layer"}


class GrowthError(ValueError):
    """A growth that cannot be function-preserving as asked (shrinking, changed head_dim, ramp in progress)."""


# --- the four operators ---------------------------------------------------------------------------------------
def grow_width(state: State, cfg: ModelConfig, d_model: int, generator=None) -> tuple[State, ModelConfig]:
    """Residual width d -> d': every matrix grows on its hidden side; masked LayerNorm keeps old coordinates."""
    return _grow_one(state, cfg, "d_model", d_model, "stack", generator)


def grow_ffn(state: State, cfg: ModelConfig, d_ffn: int, generator=None) -> tuple[State, ModelConfig]:
    """FFN f -> f': new rows of fc, new columns of proj, masked pre-activation."""
    return _grow_one(state, cfg, "d_ffn", d_ffn, "stack", generator)


def grow_heads(state: State, cfg: ModelConfig, n_head: int, generator=None) -> tuple[State, ModelConfig]:
    """Heads h -> h' at fixed head_dim: new q/k/v rows per chunk, new out-proj columns, masked q, k, v."""
    return _grow_one(state, cfg, "n_head", n_head, "stack", generator)


def grow_depth(state: State, cfg: ModelConfig, n_layer: int, placement: str = "stack",
               generator=None) -> tuple[State, ModelConfig]:
    """Layers L -> L': new gated blocks, stacked on top or interleaved between the old ones."""
    return _grow_one(state, cfg, "n_layer", n_layer, placement, generator)


_OPERATORS = {"width": grow_width, "ffn": grow_ffn, "heads": grow_heads}


def grow_state(state: State, old: ModelConfig, new: ModelConfig, order: Sequence[Operator] = DEFAULT_OPERATOR_ORDER,
               placement: str = "stack", generator=None) -> State:
    """A whole stage transition: apply each operator whose dimension changes, in `order`."""
    _check_masks_settled(state)
    steps = growth_steps(old, new, order, placement)
    ref = state["wte.weight"]
    seed = growth_seed(generator)
    final = steps[-1].after if steps else old
    out = {name: grown_tensor(state.__getitem__, steps, name, seed, ref.dtype, ref.device)
           for name in param_shapes(final)}
    out.update(grown_masks(state, steps, ref.dtype, ref.device))
    return out


def grow_model(model: GPT, new: ModelConfig, order: Sequence[Operator] = DEFAULT_OPERATOR_ORDER,
               placement: str = "stack", generator=None) -> GPT:
    """A new GPT of config `new` holding `model`'s function (masks at 0), on the same device and dtype."""
    state = grow_state(model.state_dict(), model.cfg, new, order, placement, generator)
    return GPT.from_state(new, state)


# --- surgery ----------------------------------------------------------------------------------------------------
def check_growth(old: ModelConfig, new: ModelConfig) -> None:
    if problem := growth_problem(old, new):
        raise GrowthError(f"{problem[0]}: {problem[1]}")


def layer_sources(old_layers: int, new_layers: int, placement: str) -> list[int | None]:
    """For each new layer, the old layer it continues, or None for a new (gated) one.

    stack: old layers first, new ones on top. interleave: the new layers spread evenly, one (or more) after
    each old layer, e.g. 2 -> 4 gives [0, new, 1, new].
    """
    new = new_layers - old_layers
    if placement == "stack":
        return [*range(old_layers), *([None] * new)]
    if placement != "interleave":
        raise GrowthError(f"depth_placement: {placement!r} is not 'stack' or 'interleave'")
    out: list[int | None] = []
    for i in range(old_layers):
        out.append(i)
        out += [None] * ((i + 1) * new // old_layers - i * new // old_layers)
    return out


def source_name(name: str, sources: list[int | None]) -> str | None:
    """The old state-dict name a new tensor continues (None for tensors of new layers)."""
    if not name.startswith("blocks."):
        return name
    _, j, rest = name.split(".", 2)
    src = sources[int(j)]
    return None if src is None else f"blocks.{src}.{rest}"


def embed(new: torch.Tensor, old: torch.Tensor, name: str) -> torch.Tensor:
    """Copy `old` into the leading slice of `new` (in place)."""
    new[tuple(slice(0, s) for s in old.shape)] = old
    return new


def _grow_one(state: State, cfg: ModelConfig, dim: str, value: int, placement: str,
              generator) -> tuple[State, ModelConfig]:
    new_cfg = ModelConfig(**{**cfg.model_dump(), dim: value})
    op = next(o for o, d in _OPERATOR_DIM.items() if d == dim)
    return grow_state(state, cfg, new_cfg, (op,), placement, generator), new_cfg


@dataclasses.dataclass(frozen=True)
class GrowthStep:
    """One operator of a stage transition: configs before and after, and for each layer after, the layer before it
    continues (None: a new, gated layer)."""

    op: str
    before: ModelConfig
    after: ModelConfig
    sources: tuple[int | None, ...]


def growth_steps(old: ModelConfig, new: ModelConfig, order: Sequence[Operator] = DEFAULT_OPERATOR_ORDER,
                 placement: str = "stack") -> list[GrowthStep]:
    """The operators a stage transition applies, in `order`, skipping those whose dimension does not change."""
    check_growth(old, new)
    cfg = ModelConfig(**{**old.model_dump(), "init_std": new.init_std, "dropout": new.dropout})
    steps = []
    for op in order:
        dim = _OPERATOR_DIM[op]
        if getattr(new, dim) == getattr(cfg, dim):
            continue
        nxt = ModelConfig(**{**cfg.model_dump(), dim: getattr(new, dim)})
        check_growth(cfg, nxt)
        sources = layer_sources(cfg.n_layer, nxt.n_layer, placement if op == "depth" else "stack")
        steps.append(GrowthStep(op, cfg, nxt, tuple(sources)))
        cfg = nxt
    return steps


@functools.lru_cache(maxsize=16)
def param_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of a GPT of `cfg`, in module order (from a meta-device model: no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in GPT(cfg).named_parameters()}


def growth_seed(generator: torch.Generator | None) -> int:
    """The seed every grown tensor's own generator derives from: the caller's generator's, or a draw from torch's
    global RNG when none is given."""
    return generator.initial_seed() if generator is not None else int(torch.randint(0, 2**62, ()).item())


def _tensor_generator(seed: int, step: int, name: str, device) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{step}:{name}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def _through_steps(read, steps: Sequence[GrowthStep], name: str, grow):
    """Tensor `name` after every step. `grow(i, step, nm, shape, prev)` makes step i's tensor `nm` of `shape` from
    `prev`, the tensor it continues (None for a new layer's); `read(old_name)` gives the tensors before step 1."""
    def at(i: int, nm: str):
        if i == 0:
            return read(nm)
        step = steps[i - 1]
        src = source_name(nm, list(step.sources))
        return grow(i, step, nm, param_shapes(step.after)[nm], None if src is None else at(i - 1, src))

    return at(len(steps), name)


def grown_tensor(read, steps: Sequence[GrowthStep], name: str, seed: int, dtype=torch.float32,
                 device="cpu") -> torch.Tensor:
    """Parameter `name` after every step: `read(old_name)` gives the old tensors it continues (one per step at
    most is alive at a time). A step that changes the tensor's shape draws a fresh μP init from the tensor's own
    generator and embeds the previous tensor as its leading slice; a width step rescales the final LayerNorm."""
    def grow(i, step, nm, shape, prev):
        if prev is not None and prev.shape == shape:
            t = prev.clone()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
            mup.init_parameter(step.after, nm, t, _tensor_generator(seed, i, nm, device))
            if prev is not None:
                embed(t, prev, nm)
        if step.after.d_model != step.before.d_model and nm in ("ln_f.weight", "ln_f.bias"):
            t[: step.before.d_model] *= step.after.width_mult / step.before.width_mult  # output_mult / w fixed
        return t

    return _through_steps(read, steps, name, grow)


def grown_moment(read, steps: Sequence[GrowthStep], name: str, dtype=torch.float32, device="cpu"):
    """An AdamW moment of parameter `name` after every step: the old moment (`read(old_name)`, None if it has
    none) as the leading slice, zeros elsewhere; None when no old moment reaches it (a new layer's are zeros)."""
    def grow(i, step, nm, shape, prev):
        if prev is not None and prev.shape == shape:
            return prev
        t = torch.zeros(shape, dtype=dtype, device=device)
        return t if prev is None else embed(t, prev, nm)

    return _through_steps(read, steps, name, grow)


def grown_masks(state: State, steps: Sequence[GrowthStep], dtype=torch.float32, device="cpu") -> State:
    """The growth masks after every step (new coordinates at 0), from the old state's masks (small tensors)."""
    masks = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in MASK_NAMES}
    ref = torch.empty((), dtype=dtype, device=device)
    for step in steps:
        masks = _grown_masks(masks, step.before, step.after, list(step.sources), ref)
    return masks


def _grown_masks(state: State, old: ModelConfig, new: ModelConfig, sources, ref) -> State:
    masks: State = {}

    def grown(key_old: str, old_size: int, new_size: int) -> torch.Tensor | None:
        prev = state.get(key_old)
        if prev is None and new_size == old_size:
            return None
        mask = torch.zeros(new_size, dtype=ref.dtype, device=ref.device)
        mask[:old_size] = 1.0 if prev is None else prev
        return mask

    if (m := grown("hidden_mask", old.d_model, new.d_model)) is not None:
        masks["hidden_mask"] = m
    for j, src in enumerate(sources):
        if src is None:
            masks[f"blocks.{j}.gate"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
            continue
        if (m := grown(f"blocks.{src}.mlp.ffn_mask", old.d_ffn, new.d_ffn)) is not None:
            masks[f"blocks.{j}.mlp.ffn_mask"] = m
        if (m := grown(f"blocks.{src}.attn.head_mask", old.n_head, new.n_head)) is not None:
            masks[f"blocks.{j}.attn.head_mask"] = m
        if (g := state.get(f"blocks.{src}.gate")) is not None:
            masks[f"blocks.{j}.gate"] = g.clone()
    return masks


def _check_masks_settled(state: State) -> None:
    for name, t in state.items():
        if name.rsplit(".", 1)[-1] in MASK_NAMES and ((t != 0) & (t != 1)).any():
            raise GrowthError(f"{name}: a growth ramp is still in progress; finish it before growing again")


# --- optimizer state -------------------------------------------------------------------------------------------
@torch.no_grad()
def transfer_adamw_state(old_opt: torch.optim.Optimizer, old_model: GPT, new_opt: torch.optim.Optimizer,
                         new_model: GPT, placement: str = "stack") -> None:
    """Carry AdamW moments into the grown model: old slices keep their moments and step, new entries are zeros.

    New parameters get the old step too, so one step count (and one bias correction) holds for every parameter.
    """
    sources = layer_sources(old_model.cfg.n_layer, new_model.cfg.n_layer, placement)
    old_params = dict(old_model.named_parameters())
    steps = [s["step"] for s in old_opt.state.values() if "step" in s]
    if not steps:
        return
    step = max(steps, key=float)
    for name, p in new_model.named_parameters():
        src = source_name(name, sources)
        old_state = old_opt.state.get(old_params[src]) if src is not None else None
        new_state = {"step": (old_state["step"] if old_state else step).clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            z = torch.zeros_like(p, memory_format=torch.preserve_format)
            new_state[key] = embed(z, old_state[key], name) if old_state else z
        new_opt.state[p] = new_state


# --- ramp -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MaskRamp:
    """Linear mask schedule m(step) = (step - start_step) / ramp_steps, clipped to [0, 1]; in optimizer steps."""

    start_step: int
    ramp_steps: int

    def value(self, step: int) -> float:
        if self.ramp_steps <= 0:
            return 1.0
        return min(1.0, max(0.0, (step - self.start_step) / self.ramp_steps))

    def apply(self, model: GPT, step: int) -> bool:
        """Set the masks for `step`; at 1 they are removed. Returns True while the ramp is still active."""
        m = self.value(step)
        if m >= 1.0:
            model.clear_masks()
            return False
        model.set_mask_value(m)
        return True

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> MaskRamp:
        return cls(**state)


# --- checks -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preservation:
    max_abs: float  # max |Δlogits|
    max_rel: float  # max |Δlogits| / max |logits|
    dloss: float  # |Δ cross-entropy|


@torch.no_grad()
def check_preservation(old: GPT, new: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Preservation:
    """Compare two models' logits (and loss) on one batch, both in eval mode."""
    was = old.training, new.training
    old.eval()
    new.eval()
    targets = idx.roll(-1, dims=1) if targets is None else targets
    lo, loss_o = old(idx, targets)
    ln, loss_n = new(idx, targets)
    old.train(was[0])
    new.train(was[1])
    diff = (lo - ln).abs().max().item()
    return Preservation(diff, diff / lo.abs().max().item(), abs(loss_o.item() - loss_n.item()))
