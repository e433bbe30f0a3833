"""Masked Structural Growth (MSG): function-preserving growth of width, FFN, heads and depth (DESIGN §3).

Growth is tensor surgery on a state dict (old state + old config + new config -> new state) plus runtime masks.
Every old tensor is embedded as the leading slice of its grown tensor; new
coordinates get a fresh μP init: preservation comes from the masks installed at 0, not from the init. The
one non-mask adjustment: μP logits carry output_mult / w and w = d_model / base_width grows with width, so the
final LayerNorm's weight and bias are scaled by w'/w on the old coordinates, which keeps the logits unchanged.

`MaskRamp` moves the masks linearly to 1 over ramp_steps optimizer steps and then removes them; the optimizer
state follows the same surgery (moments into the old slices, zeros elsewhere, step kept).
"""

from __future__ import annotations

import dataclasses
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
    check_growth(old, new)
    cfg = ModelConfig(**{**old.model_dump(), "init_std": new.init_std, "dropout": new.dropout})
    for op in order:
        target = getattr(new, _OPERATOR_DIM[op])
        if target == getattr(cfg, _OPERATOR_DIM[op]):
            continue
        if op == "depth":
            state, cfg = grow_depth(state, cfg, target, placement, generator)
        else:
            state, cfg = _OPERATORS[op](state, cfg, target, generator)
    return state


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
    check_growth(cfg, new_cfg)
    _check_masks_settled(state)
    sources = layer_sources(cfg.n_layer, new_cfg.n_layer, placement)
    ref = state["wte.weight"]
    with torch.device("meta"):
        template = GPT(new_cfg)
    out: State = {}
    for name, p in template.named_parameters():
        t = torch.empty(p.shape, dtype=ref.dtype, device=ref.device)
        mup.init_parameter(new_cfg, name, t, generator)
        src = source_name(name, sources)
        out[name] = t if src is None else embed(t, state[src], name)
    if new_cfg.d_model != cfg.d_model:  # keep output_mult / w · ln_f(x) unchanged as w grows
        ratio = new_cfg.width_mult / cfg.width_mult
        for key in ("ln_f.weight", "ln_f.bias"):
            if key in out:
                out[key][: cfg.d_model] *= ratio
    out.update(_grown_masks(state, cfg, new_cfg, sources, ref))
    return out, new_cfg


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
