"""Our checkpoints as an lm-evaluation-harness model: `flm lm-eval --model flm --model_args checkpoint=PATH ...`.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so its stock `lm_eval` command cannot
see ours; `flm lm-eval ARGS` imports this module, which registers the model as "flm", and then runs lm-eval's own
command line with ARGS unchanged (every lm-eval option works: --tasks, --include_path, --num_fewshot, ...). In
Python, `import flm.lm_eval_model` and then `lm_eval.simple_evaluate(model="flm", ...)`.

The three request types run on our code: loglikelihood and loglikelihood_rolling through
`flm.perplexity.continuation_logprobs` (the rolling windows are the held-out perplexity's, with `<|endoftext|>` as
the first token's context, as lm-eval prescribes), generate_until through `flm.generate.generate`.
Model arguments: checkpoint (required), device (cuda falls back to cpu on a machine without a GPU), batch_size
(default 16), max_gen_toks (default 256). Importing this module needs the `eval` extra (lm-eval); `flm` does not.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval loads its own models only into an empty one)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from flm.checkpoint import CheckpointError, load_model
from flm.config import FLMConfigError
from flm.generate import SamplingParams, generate
from flm.iq.backends import LastTokens, prompt_budget
from flm.perplexity import continuation_logprobs, windows


@register_model("flm")
class FLMLM(TemplateLM):
    """A checkpoint directory of ours (config.json + model.safetensors + tokenizer/), scored in float32."""

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str | None = 16,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's default is cuda:0, GPU or not
        try:
            self.model, self.tokenizer = load_model(Path(checkpoint).expanduser(), device)
        except (CheckpointError, OSError) as e:
            raise FLMConfigError(str(e)) from None
        if self.tokenizer is None:
            raise FLMConfigError(f"{checkpoint}: the checkpoint has no tokenizer/ to read prompts with")
        self._device = torch.device(device)
        # lm-eval's --batch_size is a string and may be "auto"; we take a number or keep our default
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"flm-{self.tokenizer.spec.kind}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per (key, context ids, continuation ids); a context longer than
        the model's is cut on the left, as lm-eval's own models do."""
        seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        scored = [min(len(cont), self.max_length) for _, _, cont in requests]
        results = []
        for b in tqdm(range(0, len(seqs), 4 * self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            results += continuation_logprobs(self.model, seqs[b:b + 4 * self.batch_size],
                                             scored[b:b + 4 * self.batch_size], self.batch_size)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | <|endoftext|>), every token predicted once with up to the model's context before it."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = [self.eot_token_id, *self.tok_encode(text)]
            spans = list(windows(len(ids), self.max_length, self.max_length))
            scores = continuation_logprobs(self.model, [ids[s:e] for s, _, e in spans],
                                           [e - f for _, f, e in spans], self.batch_size) if spans else []
            out.append(sum(lp for lp, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations that end before the first `until` string; requests
        with the same generation settings are batched."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idx in groups.values():
            kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            params = SamplingParams(max_tokens=kw["max_gen_toks"], stop=list(kw["until"]),
                                    temperature=kw.get("temperature", 0.0),
                                    top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0))
            codec = LastTokens(self.tokenizer, prompt_budget(self.max_length, params.max_tokens))
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b:b + self.batch_size]
                prompts = [requests[i].args[0] for i in batch]
                for i, prompt, c in zip(batch, prompts, generate(self.model, codec, prompts, params), strict=True):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", (prompt, requests[i].args[1]), c.text)
                bar.update(len(batch))
        bar.close()
        return out
