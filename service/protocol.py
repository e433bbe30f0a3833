"""The OpenAI wire format we serve: request models, the error body, and the chat template.

Requests follow OpenAI's `/v1/completions` and `/v1/chat/completions` schemas; unknown fields are ignored (clients
send many), fields we cannot honour (logprobs, echo, best_of, suffix, penalties, logit_bias) are refused with a
400 naming them rather than silently ignored. `top_k` is an extension (as vLLM's). Every error, ours or FastAPI's,
has OpenAI's body: {"error": {"message", "type", "param", "code"}}.
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


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

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
    # refused unless left at their defaults (see `unsupported`)
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first field set to something we cannot do, if any."""
        defaults = {"logprobs": (None, False, 0), "presence_penalty": (0.0,), "frequency_penalty": (0.0,),
                    "logit_bias": (None, {}), "echo": (False,), "best_of": (None, 1), "suffix": (None, "")}
        return next((k for k, ok in defaults.items() if getattr(self, k, ok[0]) not in ok), None)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # unset: 16 (OpenAI's default), or what the context leaves
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


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
