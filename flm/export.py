"""Export a checkpoint to a Hugging Face `GPTNeoXForCausalLM` directory, so `transformers`, vLLM and
`ray.serve.llm` can load it.

GPT-NeoX with sequential residuals, full rotary (rotate-half, as ours), tanh GELU and biased LayerNorms is our
RoPE model exactly, once the μP multipliers are folded into weights: input_mult into the input embedding and
output_mult / w into an untied output embedding. NeoX orders the fused QKV rows per head ([q k v] of head 0, of
head 1, ...) where we keep three projections: they are concatenated and permuted. xPos has no NeoX
equivalent, so xPos checkpoints are refused; so is a checkpoint caught mid-ramp (its masks are not a plain model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flm import mup
from flm.config import FLMConfigError, ModelConfig


def neox_state(cfg: ModelConfig, state: dict[str, torch.Tensor], head: str = "lm_head.weight") -> dict:
    """Our state dict as GPT-NeoX's (float32), multipliers folded in; `head` names the output embedding
    (`embed_out.weight` before transformers 5)."""
    def per_head(prefix: str, kind: str) -> torch.Tensor:
        t = torch.cat([state[f"{prefix}attn.{c}.{kind}"] for c in "qkv"])
        return t.view(3, cfg.n_head, cfg.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    d, out = cfg.d_model, {}
    wte = state["wte.weight"].float()
    out["gpt_neox.embed_in.weight"] = wte * cfg.input_mult
    out[head] = state.get("lm_head.weight", wte).float() * mup.logit_scale(cfg)
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[q + theirs + ".weight"] = state[p + ours + ".weight"]
            out[q + theirs + ".bias"] = bias(p + ours + ".bias", d)
        out[q + "attention.query_key_value.weight"] = per_head(p, "weight")
        out[q + "attention.dense.weight"] = state[p + "attn.proj.weight"]
        if cfg.bias:
            out[q + "attention.query_key_value.bias"] = per_head(p, "bias")
            out[q + "attention.dense.bias"] = state[p + "attn.proj.bias"]
        out[q + "mlp.dense_h_to_4h.weight"] = state[p + "mlp.fc.weight"]
        out[q + "mlp.dense_h_to_4h.bias"] = bias(p + "mlp.fc.bias", cfg.d_ffn)
        out[q + "mlp.dense_4h_to_h.weight"] = state[p + "mlp.proj.weight"]
        out[q + "mlp.dense_4h_to_h.bias"] = bias(p + "mlp.proj.bias", d)
    out["gpt_neox.final_layer_norm.weight"] = state["ln_f.weight"]
    out["gpt_neox.final_layer_norm.bias"] = bias("ln_f.bias", d)
    return {k: v.float().contiguous() for k, v in out.items()}


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` with config.json, model.safetensors and (if the checkpoint has one) the tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from flm.checkpoint import load_checkpoint
    from flm.model import MASK_NAMES

    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    if cfg.pos != "rope":
        raise FLMConfigError(f"{checkpoint}: pos={cfg.pos!r}; only RoPE checkpoints export to GPT-NeoX (xPos has no "
                             f"Hugging Face equivalent): train with `pos: rope` to export")
    if any(k.rsplit(".", 1)[-1] in MASK_NAMES for k in ck.model):
        raise FLMConfigError(f"{checkpoint}: a growth ramp is in progress (masks present); export a checkpoint "
                             f"from after the ramp")
    if cfg.attn_dim != cfg.d_model:
        raise FLMConfigError(f"{checkpoint}: n_head*head_dim={cfg.attn_dim} != d_model={cfg.d_model}; GPT-NeoX "
                             f"needs them equal")
    eot = None
    if (Path(checkpoint) / "tokenizer" / "tokenizer.json").is_file():
        from flm.data import EOT

        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(checkpoint) / "tokenizer" / "tokenizer.json"),
                                      eos_token=EOT, bos_token=EOT)
        eot = tok.eos_token_id
    hf_cfg = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ffn, hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=cfg.seq_len, layer_norm_eps=cfg.ln_eps, tie_word_embeddings=False,
        use_parallel_residual=False, attention_bias=cfg.bias, bos_token_id=eot, eos_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
    )
    model = GPTNeoXForCausalLM(hf_cfg)
    head = "lm_head.weight" if "lm_head.weight" in model.state_dict() else "embed_out.weight"
    model.load_state_dict(neox_state(cfg, ck.model, head), strict=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    if eot is not None:
        tok.save_pretrained(out)
    return out
