"""The OpenAI wire format we serve: request models, the error body, and the chat template.

Requests follow OpenAI's `/v1/completions` and `/v1/chat/completions` schemas. A field we cannot honour is refused
with a 400 naming it (code `unsupported_parameter`), never silently ignored: OpenAI's fields we do not implement
(`response_format`, `tools`, `best_of`, `suffix`, penalties, `logit_bias`, chat `logprobs`, ...) when set to
anything but their default, and any field OpenAI does not define either. Extensions, as vLLM names them: `top_k`,
and `truncate_prompt_tokens` (keep only a prompt's last k tokens: a prompt longer than the context is cut from the
left instead of refused). Every error, ours or FastAPI's, has OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An HTTP error with OpenAI's error body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI's fields we do not implement, and the values that mean "not used" (accepted: they change nothing)
UNUSED = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
          "suffix": ("",), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
          "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (), "top_logprobs": (0,),
          "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
          "service_tier": ("auto", "default"), "store": (False,), "metadata": ({},)}


MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's: stop strings per request, characters per string


class SamplingFields(BaseModel):
    """What completions and chat completions share. Unknown fields are kept (extra="allow") so that
    `unsupported` can name them."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="extension: 0 is no top-k filter")
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, description="extension: keep only the "
                                                                                "prompt's last k tokens")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first field set to something we cannot do, if any: an OpenAI field we do not implement set to
        anything but "not used" (null, or its neutral value), or a field OpenAI does not define."""
        for k, v in (self.model_extra or {}).items():
            if k not in UNUSED or (v is not None and v not in UNUSED[k]):
                return k
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # unset: 16 (OpenAI's default), or what the context leaves; 0 with echo: scoring
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="the k most likely tokens at each "
                                                                        "position, beside the chosen one's")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (what lm-evaluation-harness sends); this tokenizer adds no special tokens."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False  # refused when true (see OpenAIServer.chat)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


# The chat template. The tiny models are not chat-tuned: the template only gives them a dialogue to continue.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # the model starting the user's next turn ends the answer


def render_chat(messages: list[ChatMessage]) -> str:
    """One "Role: content" paragraph per message, then "Assistant:" for the model to continue:

        System: You are terse.

        User: Who wrote Hamlet?

        Assistant:

    Generation also stops at "\\nUser:" (CHAT_STOP), besides the request's own stop strings."""
    turns = [f"{CHAT_ROLES[m.role]}: {m.text()}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"
