"""Typed configuration: the model shape, one growth stage, and a whole growth plan.

Every config is a pydantic model with `extra="forbid"`, so a typo in a YAML preset is an error that names the
field, never a silently ignored key. `GrowthPlan.resolve()` turns stages given as deltas into full
`ModelConfig`s; validation guarantees that every stage only grows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GROWTH_DIMS = ("n_layer", "d_model", "n_head", "d_ffn")
Operator = Literal["width", "ffn", "heads", "depth"]
DEFAULT_OPERATOR_ORDER: tuple[Operator, ...] = ("width", "ffn", "heads", "depth")


class FLMConfigError(ValueError):
    """A configuration a user wrote is invalid; the message names the field and what to change."""


def flm_home() -> Path:
    """$FLM_HOME: where runs, prepared data, searches and the gateway's storage root live unless a path is given
    (default ./runs), absolute, since Ray jobs and workers run in other working directories. The one place that
    reads the variable (with `cache_dir`), importable without torch."""
    return Path(os.environ.get("FLM_HOME", "runs")).expanduser().absolute()


def cache_dir() -> Path:
    """Where downloaded corpora and vocabularies live: `$FLM_HOME/cache`, else `~/.cache/flm` (not flm_home()'s
    default ./runs: a download serves every working directory)."""
    return flm_home() / "cache" if os.environ.get("FLM_HOME") else Path("~/.cache/flm").expanduser()


class _Strict(BaseModel):
    # validators are built at a model's first use, not on import: `flm --help` starts ~150 ms sooner
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ModelConfig(_Strict):
    """Shape and parametrisation of the GPT-3 style decoder (flm/model.py).

    The attention width `n_head * head_dim` may differ from `d_model`: MSG grows the residual width and the
    head count independently (head_dim stays fixed). Presets keep them equal, as GPT-3 and FLM-101B do.
    """

    n_layer: int = Field(ge=1)
    d_model: int = Field(ge=1)
    n_head: int = Field(ge=1)
    head_dim: int = Field(default=0, ge=0, description="0: d_model // n_head")
    d_ffn: int = Field(default=0, ge=0, description="0: 4 * d_model")
    vocab_size: int = Field(ge=2)
    seq_len: int = Field(default=2048, ge=1)
    pos: Literal["xpos", "rope"] = "xpos"
    xpos_scale_base: float = Field(default=512.0, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    base_width: int = Field(default=256, ge=1, description="μP: width at which multipliers are 1")
    input_mult: float = Field(default=1.0, gt=0)
    output_mult: float = Field(default=1.0, gt=0, description="μP output softmax temperature")
    init_std: float = Field(default=0.02, gt=0)
    parametrization: Literal["mup", "sp"] = Field(
        default="mup", description="sp: standard parametrisation (no width scaling), for μP comparisons")
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = Field(default=0.0, ge=0, lt=1)
    ln_eps: float = Field(default=1e-5, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            d, h = data.get("d_model"), data.get("n_head")
            if not data.get("head_dim") and isinstance(d, int) and isinstance(h, int) and h > 0:
                if d % h:
                    raise ValueError(f"n_head: {h} heads do not divide d_model={d}; set head_dim explicitly "
                                     f"or choose n_head dividing d_model")
                data["head_dim"] = d // h
            if not data.get("d_ffn") and isinstance(d, int):
                data["d_ffn"] = 4 * d
        return data

    @field_validator("head_dim")
    @classmethod
    def _head_dim_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"head_dim: {v} must be even (rotary positions rotate pairs of channels)")
        return v

    @property
    def attn_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def width_mult(self) -> float:
        """μP width multiplier w = d_model / base_width (1 under standard parametrisation: nothing scales)."""
        return self.d_model / self.base_width if self.parametrization == "mup" else 1.0


class ModelDelta(_Strict):
    """The dimensions a stage changes, as new absolute values; the rest is inherited from the previous stage."""

    n_layer: int | None = Field(default=None, ge=1)
    d_model: int | None = Field(default=None, ge=1)
    n_head: int | None = Field(default=None, ge=1)
    d_ffn: int | None = Field(default=None, ge=1)


class ParallelLayout(_Strict):
    """Where a stage runs. `workers` may be (min, max) for elastic runs (ddp/zero). `backend: fsdp` shards the model
    over a (dp, tp) mesh of the workers (flm/parallelize.py): tp ranks split heads and FFN units, dp = workers / tp
    ranks shard everything else. Pipeline parallelism is not implemented: pp must be 1 (FSDP x TP fits every stage
    of the 101B plan: `flm plan configs/flm-101b.yaml --dry-run`)."""

    workers: int | tuple[int, int] = 1
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    dp: int | None = Field(default=None, ge=1, description="None: workers / tp")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    backend: Literal["ddp", "zero1", "zero2", "zero3", "fsdp"] = Field(
        default="ddp", description="torch DDP, DeepSpeed ZeRO stage 1/2/3, or FSDP2 x tensor parallelism")

    @model_validator(mode="after")
    def _mesh(self):
        if self.pp != 1:
            raise ValueError(f"pp: {self.pp}: pipeline parallelism is not implemented; set pp: 1 and use "
                             f"backend: fsdp with tp (FSDP shards what TP does not)")
        if self.tp > 1 and self.backend != "fsdp":
            raise ValueError(f"tp: {self.tp} needs backend: fsdp (ddp and zero keep whole layers on every rank)")
        lo, hi = (self.workers, self.workers) if isinstance(self.workers, int) else self.workers
        if self.backend == "fsdp" and lo != hi and self.tp != 1:
            raise ValueError(f"workers: {self.workers}: an elastic fsdp stage may only shrink its dp dimension; "
                             f"use tp: 1 or one worker count")
        if lo % self.tp:
            raise ValueError(f"tp: {self.tp} does not divide workers {lo}")
        if self.dp is not None and self.dp * self.tp != lo:
            raise ValueError(f"dp: {self.dp} x tp {self.tp} != workers {lo}; omit dp (it is workers / tp)")
        return self

    @property
    def data_parallel(self) -> int:
        lo = self.workers if isinstance(self.workers, int) else self.workers[0]
        return lo // self.tp

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.data_parallel


class GrowthStage(_Strict):
    """One stage of a growth plan: the model to train (full, or a delta from the previous stage) and its budget."""

    name: str | None = None
    model: ModelConfig | None = None
    grow: ModelDelta | None = None
    tokens: int = Field(gt=0, description="training tokens in this stage")
    lr: float = Field(gt=0, description="peak learning rate at base width (μP), as the paper's 'start LR'")
    batch_size: int = Field(gt=0, description="global batch, in sequences of seq_len tokens")
    warmup_samples: int = Field(default=0, ge=0, description="LR warmup, in sequences")
    ramp_steps: int = Field(default=0, ge=0, description="MSG mask ramp 0 -> 1, in optimizer steps")
    depth_placement: Literal["stack", "interleave"] = "stack"
    growth: Literal["offline", "online"] = Field(
        default="offline", description="offline: checkpoint -> grow -> reload (FLM-101B); online: grow in memory (MSG)")
    operator_order: tuple[Operator, ...] = DEFAULT_OPERATOR_ORDER
    layout: ParallelLayout = Field(default_factory=ParallelLayout)

    @model_validator(mode="after")
    def _one_shape(self):
        if self.model is not None and self.grow is not None:
            raise ValueError("give either 'model' (the full shape) or 'grow' (a delta), not both")
        if sorted(self.operator_order) != sorted(set(self.operator_order)):
            raise ValueError(f"operator_order: {list(self.operator_order)} repeats an operator")
        return self


class OptimConfig(_Strict):
    """AdamW as in FLM-101B."""

    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)


class TrainSettings(_Strict):
    """How a plan is trained: data, run directory, logging and checkpoint cadence (in optimizer steps)."""

    data: str = Field(default="shakespeare", description="a prepared dataset dir, or a source to prepare")
    tokenizer: Literal["bpe", "cl100k", "gpt2"] = "bpe"
    out: str = Field(default="", description="run directory; empty: $FLM_HOME/runs/<plan name>")
    micro_batch_size: int | None = Field(default=None, ge=1, description="per-rank micro batch; None: no accumulation")
    log_every: int = Field(default=10, ge=1)
    eval_every: int = Field(default=50, ge=1)
    eval_batches: int = Field(default=4, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="besides the stage-end checkpoints, always kept")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    activation_checkpointing: Literal["none", "full"] = Field(
        default="none", description="full: recompute each block in backward (backend fsdp), keeping block inputs only")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    peak_tflops: float | None = Field(default=None, gt=0, description="per device, for MFU; None: not reported")
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] | None = Field(
        default=None, description="experiment trackers (flm/loggers.py), jsonl always; None: jsonl + tensorboard "
        "where installed")
    optim: OptimConfig = Field(default_factory=OptimConfig)


class SearchedHparams(_Strict):
    """The best point of a μP proxy search (`best.yaml`, written by `flm tune`), as a growth plan includes it with
    `hparams_from`. `lr` is the base LR at `base_width`: it transfers only to models with the same base width and
    parametrisation."""

    lr: float = Field(gt=0)
    init_std: float = Field(gt=0)
    output_mult: float = Field(gt=0)
    base_width: int = Field(ge=1)
    parametrization: Literal["mup", "sp"] = "mup"
    val_loss: float | None = Field(default=None, description="the proxy's final validation loss at this point")
    source: dict = Field(default_factory=dict, description="provenance: search name, proxy width, tokens, ...")


class GrowthPlan(_Strict):
    """An ordered list of stages; stage k+1 starts from stage k's grown checkpoint.

    `hparams_from: path/to/best.yaml` (relative to the plan file) is resolved when the plan is loaded
    (`load_plan`): every stage without an `lr` takes the searched LR, every stage `model` without `init_std`,
    `output_mult`, `base_width` or `parametrization` takes the searched one. Values written in the plan win (as
    with any include, the including file has the last word), so stage 2 may still lower its LR; a written
    `base_width` or `parametrization` that differs from the search's is an error, because μP hyperparameters mean
    the same thing only at the same base width. After loading, the field holds the resolved absolute path."""

    name: str = Field(default="flm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    hparams_from: str | None = Field(default=None, description="best.yaml of a proxy search (see the docstring)")
    seed: int = 0
    min_lr: float = Field(default=6e-6, ge=0, description="end of the one cosine schedule across stages")
    stages: list[GrowthStage] = Field(min_length=1)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="after")
    def _check_stages(self):
        if self.stages[0].model is None:
            raise ValueError("stages.0.model: the first stage needs a full model config")
        prev: ModelConfig | None = None
        for k, (stage, cfg) in enumerate(zip(self.stages, _resolve(self.stages), strict=True)):
            steps = stage.tokens // (stage.batch_size * cfg.seq_len)
            if stage.ramp_steps > steps:
                raise ValueError(f"stages.{k}.ramp_steps: {stage.ramp_steps} is longer than the stage "
                                 f"({steps} steps of {stage.batch_size}x{cfg.seq_len} tokens)")
            if prev is not None:
                _check_growth(prev, cfg, k)
            prev = cfg
        return self

    def model_configs(self) -> list[ModelConfig]:
        """The full model config of every stage, deltas applied."""
        return _resolve(self.stages)

    def steps(self, k: int) -> int:
        """Optimizer steps of stage k."""
        stage = self.stages[k]
        return stage.tokens // (stage.batch_size * self.model_configs()[k].seq_len)

    def stage_starts(self) -> list[int]:
        """Global step at which each stage starts, plus the total number of steps at the end."""
        starts = [0]
        for k in range(len(self.stages)):
            starts.append(starts[-1] + self.steps(k))
        return starts


class ProxyFamily(_Strict):
    """The μP proxy: one shape at several widths (head_dim fixed), trained briefly with shared hyperparameters.
    The grid search runs at `model.d_model`; loss prediction fits over `widths`."""

    model: ModelConfig
    widths: list[int] = Field(min_length=1)
    tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)

    @model_validator(mode="after")
    def _widths(self):
        for w in self.widths:
            if w <= 0 or w % self.model.head_dim:
                raise ValueError(f"widths: {w} is not a positive multiple of head_dim={self.model.head_dim}")
        return self

    def at_width(self, width: int) -> ModelConfig:
        """The proxy shape at `width` (heads follow the width, head_dim and base_width stay)."""
        return ModelConfig(**{**self.model.model_dump(), "d_model": width, "n_head": width // self.model.head_dim,
                              "d_ffn": 4 * width})


def _resolve(stages: list[GrowthStage]) -> list[ModelConfig]:
    configs: list[ModelConfig] = []
    for k, stage in enumerate(stages):
        if stage.model is not None:
            configs.append(stage.model)
            continue
        if not configs:
            raise ValueError("stages.0.model: the first stage needs a full model config")
        prev = configs[-1]
        delta = stage.grow.model_dump(exclude_none=True) if stage.grow else {}
        if "d_model" in delta and "d_ffn" not in delta and prev.d_ffn == 4 * prev.d_model:
            delta["d_ffn"] = 4 * delta["d_model"]  # keep the 4·d ratio unless the stage says otherwise
        if prev.attn_dim == prev.d_model and ("d_model" in delta or "n_head" in delta):
            # heads follow the width at the fixed head_dim, as in GPT-3 shapes
            d = delta.get("d_model", prev.d_model)
            h = delta.setdefault("n_head", d // prev.head_dim)
            if h * prev.head_dim != d:
                raise ValueError(f"stages.{k}.head_dim: d_model={d} with n_head={h} would change head_dim "
                                 f"{prev.head_dim}; MSG keeps head_dim fixed, so use n_head={d // prev.head_dim}"
                                 f" and a d_model that is a multiple of {prev.head_dim}")
        try:
            configs.append(ModelConfig(**{**prev.model_dump(), **delta}))
        except ValidationError as e:
            raise ValueError(f"stages.{k}.grow: {_first_error(e)}") from None
    return configs


def growth_problem(old: ModelConfig, new: ModelConfig) -> tuple[str, str] | None:
    """(field, why) if `old` cannot grow into `new` by MSG, else None: the one rule for plans and growth alike."""
    for dim in GROWTH_DIMS:
        if getattr(new, dim) < getattr(old, dim):
            return dim, f"cannot shrink {getattr(old, dim)} -> {getattr(new, dim)}; growth may only grow"
    if new.head_dim != old.head_dim:
        return "head_dim", (f"{old.head_dim} -> {new.head_dim}; MSG grows heads at a fixed head_dim, so n_head and "
                            f"d_model must grow together")
    for f in ModelConfig.model_fields:
        if f not in (*GROWTH_DIMS, "head_dim", "init_std", "dropout") and getattr(new, f) != getattr(old, f):
            return f, f"{getattr(old, f)!r} -> {getattr(new, f)!r}; only {', '.join(GROWTH_DIMS)} may change"
    return None


def _check_growth(old: ModelConfig, new: ModelConfig, k: int) -> None:
    if problem := growth_problem(old, new):
        raise ValueError(f"stages.{k}.{problem[0]}: {problem[1]}")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def load_yaml(path: str | Path) -> dict:
    import yaml  # here: `flm --help` and the gateway's client commands start without it (~60 ms)

    p = Path(path)
    if not p.is_file():
        raise FLMConfigError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise FLMConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise FLMConfigError(f"{p}: expected a mapping at the top level")
    return data


def parse(model: type[BaseModel], data: dict, source: str = "config"):
    """Validate `data` as `model`, turning pydantic's report into one FLMConfigError line naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise FLMConfigError(f"{source}: {_first_error(e)}") from None


def load_plan(path: str | Path) -> GrowthPlan:
    data = load_yaml(path)
    if data.get("hparams_from") is not None:
        data = apply_hparams(data, Path(path).parent, str(path))
    return parse(GrowthPlan, data, str(path))


HPARAM_MODEL_FIELDS = ("init_std", "output_mult", "base_width", "parametrization")


def apply_hparams(data: dict, base_dir: str | Path, source: str = "plan") -> dict:
    """Plan data with its `hparams_from` file merged in (see GrowthPlan); values written in the plan win."""
    ref = data["hparams_from"]
    if not isinstance(ref, str) or not ref:
        raise FLMConfigError(f"{source}: hparams_from: expected the path of a best.yaml, got {ref!r}")
    path = Path(ref).expanduser()
    path = (path if path.is_absolute() else Path(base_dir) / path).resolve()
    best = parse(SearchedHparams, load_yaml(path), str(path))
    data = {**data, "hparams_from": str(path)}
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data  # validation reports the missing stages
    merged = []
    for k, stage in enumerate(stages):
        if not isinstance(stage, dict):
            merged.append(stage)
            continue
        stage = {"lr": best.lr, **stage}
        if isinstance(stage.get("model"), dict):
            model = stage["model"]
            for f in ("base_width", "parametrization"):
                if f in model and model[f] != getattr(best, f):
                    raise FLMConfigError(
                        f"{source}: stages.{k}.model.{f}: {model[f]!r}, but {path} was searched at {f} "
                        f"{getattr(best, f)!r}; μP hyperparameters transfer only at the same {f}: remove it from "
                        f"the plan or search again")
            stage["model"] = {**{f: getattr(best, f) for f in HPARAM_MODEL_FIELDS}, **model}
        merged.append(stage)
    return {**data, "stages": merged}
