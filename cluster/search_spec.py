"""The proxy search's spec (`flm tune`'s SEARCH.yaml, see cluster/tune.py): pure data, validated by pydantic, importable
without torch or Ray, so that the gateway validates a tune request in its own process. Running a search (Ray Tune,
the trials' training) is cluster/tune.py's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flm.config import ProxyFamily, flm_home

AXES = ("lr", "init_std", "output_mult")
SEARCH_KINDS = ("grid", "random", "asha")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(_Strict):
    """The values of each hyperparameter; names as in the μP paper and FLM-101B."""

    lr: list[float] = Field(description="base learning rate (at base_width)")
    init_std: list[float] = Field(description="σ of the μP initialisation")
    output_mult: list[float] = Field(description="logit multiplier, the paper's output softmax temperature")

    @field_validator(*AXES)
    @classmethod
    def _values(cls, values: list[float], info) -> list[float]:
        if not values:
            raise ValueError(f"empty; give at least one {info.field_name} value")
        for v in values:
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{v} is not a positive number")
        if len(set(values)) != len(values):
            raise ValueError(f"{values} repeats a value")
        return sorted(float(v) for v in values)

    @property
    def size(self) -> int:
        return len(self.lr) * len(self.init_std) * len(self.output_mult)


class TrialResources(_Strict):
    """What one trial reserves on the cluster; fractions let several trials share a core."""

    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)

    @property
    def threads(self) -> int:
        """torch threads of a trial: its whole cores, at least one."""
        return max(1, int(self.cpu))


class Asha(_Strict):
    """ASHA (Li et al. 2020) in units of validation reports: every trial gets `grace_period` reports, then only
    the best 1/`reduction_factor` of each rung continues."""

    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)


class SearchConfig(_Strict):
    """A proxy hyperparameter search (see the module docstring). `proxy` is a ProxyFamily, inline or the path of its
    YAML relative to the search file; the trials train the family's model at `width` (default: its d_model) on
    `tokens` each (default: the family's), with its batch size."""

    name: str = Field(default="search", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    proxy: ProxyFamily
    width: int | None = Field(default=None, ge=1)
    grid: Grid
    search: str = "grid"
    samples: int = Field(default=1, ge=1, description="grid/asha: seeds per point; random: points drawn")
    tokens: int | None = Field(default=None, gt=0, description="training tokens per trial (default: the proxy's)")
    eval_every: int | None = Field(default=None, ge=1, description="steps between reports (default: at the end; "
                                                                   "asha: 4 reports per trial)")
    eval_batches: int = Field(default=4, ge=1)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    asha: Asha = Asha()
    resources: TrialResources = TrialResources()
    max_concurrent: int | None = Field(default=None, ge=1, description="trials at once (default: what fits)")
    data: str = Field(default="shakespeare", description="a prepared dataset dir, or a source to prepare")
    tokenizer: Literal["bpe", "cl100k", "gpt2"] = "bpe"
    out: str = Field(default="", description="results directory; empty: $FLM_HOME/tune/<name>")
    seed: int = 0

    @field_validator("search")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in SEARCH_KINDS:
            raise ValueError(f"{v!r} is not a search kind; use one of {', '.join(SEARCH_KINDS)}")
        return v

    @model_validator(mode="after")
    def _fits(self):
        hd = self.proxy.model.head_dim
        if self.width is not None and self.width % hd:
            raise ValueError(f"width: {self.width} is not a multiple of the proxy's head_dim {hd}; use a multiple "
                             f"such as {max(hd, self.width // hd * hd)}")
        if self.steps < 1:
            raise ValueError(f"tokens: {self.tokens} is less than one step of {self.proxy.batch_size} x "
                             f"{self.proxy.model.seq_len} tokens")
        if self.search == "asha" and self.reports < 2:
            raise ValueError(f"eval_every: {self.eval_every} leaves ASHA {self.reports} report per trial; it needs "
                             f"at least 2 to stop anything (lower eval_every)")
        return self

    @property
    def search_width(self) -> int:
        return self.width or self.proxy.model.d_model

    @property
    def steps(self) -> int:
        return (self.tokens or self.proxy.tokens) // (self.proxy.batch_size * self.proxy.model.seq_len)

    @property
    def report_every(self) -> int:
        if self.eval_every is not None:
            return min(self.eval_every, self.steps)
        return max(1, self.steps // 4) if self.search == "asha" else self.steps

    @property
    def reports(self) -> int:
        return self.steps // self.report_every + (self.steps % self.report_every > 0)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else flm_home() / "tune" / self.name

    def plan(self, point: dict, run_dir: str | Path):
        """The one-stage proxy plan of a trial."""
        from flm.scaling import proxy_plan  # torch: only where a search runs

        return proxy_plan(self.proxy, self.search_width, run_dir, lr=point["lr"], init_std=point["init_std"],
                          output_mult=point["output_mult"], tokens=self.tokens, data=self.data,
                          tokenizer=self.tokenizer, seed=point["seed"], eval_every=self.report_every,
                          eval_batches=self.eval_batches, warmup_fraction=self.warmup_fraction,
                          name=f"{self.name}-trial")
