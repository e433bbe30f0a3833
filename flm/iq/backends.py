"""Model backends for the IQ suite: our checkpoints (local decoding with the KV cache), Hugging Face causal LMs, and
any OpenAI-compatible completions endpoint (a deployed model, ours or anyone's). Greedy decoding, as the paper scores
exact matches.

Every backend keeps a prompt within the model's context (`prompt_budget`): a longer prompt loses its start, as
in lm-evaluation-harness, rather than running the model at positions it was never trained on. With the paper's 2048
tokens nothing is cut; a tiny model (128 tokens) sees only the end of the long prompts (Multiple Key Retrieval,
the bAbI stories, most few-shot blocks), which is what it could use anyway. An endpoint cuts them itself when it
says its context (`max_model_len` in GET /models, as ours and vLLM do) and takes vLLM's `truncate_prompt_tokens`;
as it must fit prompt and answer in the context, the answer may then be shorter than locally
(`max_tokens` = context - kept prompt). `kept_prompt_tokens(max_tokens)` says how many a backend keeps (None: no
limit known), and the suite's report says so.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from flm.config import FLMConfigError
from flm.generate import SamplingParams, generate


def prompt_budget(context: int, max_tokens: int) -> int:
    """Prompt tokens kept by a model of `context` tokens that may generate `max_tokens`: the context the generation
    leaves, but at least half of it."""
    return max(context - max_tokens, context // 2)


class LastTokens:
    """A text codec that encodes a prompt to its last `keep` tokens (an empty prompt to `<|endoftext|>` alone)."""

    def __init__(self, tokenizer, keep: int):
        self.tokenizer, self.keep, self.eot_id = tokenizer, keep, tokenizer.eot_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)[-self.keep:] or [self.eot_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class FLMBackend:
    """A checkpoint directory of ours (config.json + model.safetensors + tokenizer/)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        from flm.checkpoint import CheckpointError, load_model

        try:
            self.model, self.tokenizer = load_model(checkpoint, device)
        except (CheckpointError, OSError) as e:
            raise FLMConfigError(str(e)) from None
        if self.tokenizer is None:
            raise FLMConfigError(f"{checkpoint}: the checkpoint has no tokenizer/ to read prompts with")

    def kept_prompt_tokens(self, max_tokens: int) -> int:
        return prompt_budget(self.model.cfg.seq_len, max_tokens)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, stop=stop)
        codec = LastTokens(self.tokenizer, prompt_budget(self.model.cfg.seq_len, max_tokens))
        return [c.text for c in generate(self.model, codec, prompts, params)]


class HFBackend:
    """Any local Hugging Face causal LM directory, through `transformers` (the [hf] extra)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
        except OSError as e:
            raise FLMConfigError(f"{path}: not a Hugging Face model directory ({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def kept_prompt_tokens(self, max_tokens: int) -> int | None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        return prompt_budget(context, max_tokens) if context else None

    @torch.no_grad()
    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        keep = self.kept_prompt_tokens(max_tokens)
        self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=keep is not None,
                               max_length=keep).to(self.model.device)
        out = self.model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [min((t.split(s, 1)[0] for s in stop), key=len) if stop else t for t in texts]


class OpenAIBackend:
    """POST {base_url}/completions with the batch of prompts (OpenAI legacy completions schema). The model's
    context comes from GET {base_url}/models (`max_model_len`); where it is known, prompts are cut to
    `prompt_budget` tokens by the endpoint (`truncate_prompt_tokens`), and max_tokens to what the context leaves."""

    def __init__(self, base_url: str, model: str = "", api_key: str | None = None, timeout: float = 60.0):
        self.base = base_url.rstrip("/")
        self.url = self.base + "/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self._context: int | None = None
        self._asked = False

    def _call(self, url: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise FLMConfigError(f"{url}: HTTP {e.code} {e.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise FLMConfigError(f"{url}: endpoint unreachable ({getattr(e, 'reason', e)})") from None
        except ValueError as e:
            raise FLMConfigError(f"{url}: not a JSON answer ({e})") from None

    def context(self) -> int | None:
        """The model's context in tokens, as GET /models says it (`max_model_len`); None if it does not."""
        if not self._asked:
            self._asked = True
            try:
                models = self._call(self.base + "/models").get("data", [])
            except FLMConfigError:  # an endpoint without /models: its own limit applies
                models = []
            match = [m for m in models if isinstance(m, dict) and (m.get("id") == self.model or not self.model)]
            length = match[0].get("max_model_len") if match else None
            self._context = length if isinstance(length, int) and length > 1 else None
        return self._context

    def kept_prompt_tokens(self, max_tokens: int) -> int | None:
        context = self.context()
        return prompt_budget(context, max_tokens) if context else None

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "stop": stop or None,
                "temperature": 0.0}
        keep = self.kept_prompt_tokens(max_tokens)
        if keep is not None:
            body.update(truncate_prompt_tokens=keep, max_tokens=min(max_tokens, self.context() - keep))
        try:
            choices = self._call(self.url, body)["choices"]
        except (KeyError, TypeError) as e:
            raise FLMConfigError(f"{self.url}: not an OpenAI completions response ({e})") from None
        texts = [""] * len(prompts)
        for i, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0))):
            texts[choice.get("index", i)] = choice["text"]
        return texts


def backend_for(model: str, api_key: str | None = None, model_name: str = ""):
    """An http(s) URL is an endpoint; a directory with model.safetensors + config.json of ours a checkpoint;
    any other directory a Hugging Face model."""
    if model.startswith(("http://", "https://")):
        return OpenAIBackend(model, model_name, api_key)
    if not Path(model).is_dir():  # never a hub id: transformers would go looking for it online
        raise FLMConfigError(f"{model}: no such directory (a checkpoint, a Hugging Face model) nor an http(s) URL")
    if (Path(model) / "trainer_state.json").exists() or (Path(model) / "checkpoint.json").exists():
        return FLMBackend(model)
    return HFBackend(model)
