"""The OpenAI request bodies the server takes, checked field by field, and the error JSON it answers with.

A body that does not fit is answered 400 with OpenAI's error object, naming the field
(`param`: "messages[0].role", "temperature") and what it allows. Fields of OpenAI's API that this
server does not implement (penalties, logit_bias, tools) are refused by name rather than ignored,
so a client never believes it got what it asked for; fields it does not know are ignored, as
clients send extras. `top_k` and `ignore_eos` are extensions (vLLM's).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per request
MAX_STOPS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"), "param": self.param, "code": self.code}}


def param_name(location) -> str:
    """pydantic's error location ('body', 'messages', 0, 'role') as OpenAI writes a param: messages[0].role."""
    parts = [p for p in location if p != "body"]
    # pydantic names the union member it tried ('str', 'list[int]'): not part of the field's name
    parts = [p for p in parts if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or p.startswith(("list[", "function-"))))]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Options):
    include_usage: bool = False


class TextPart(Options):
    type: Literal["text"]
    text: str


class ChatMessage(Options):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampled(Options):
    """What both endpoints share: the model, the sampling settings and the stop conditions."""

    model: str | None = None  # None: the first served model
    temperature: float | None = Field(None, ge=0, le=2)  # None: the server's default (serve.temperature)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k filtering
    ignore_eos: bool = False  # extension (vLLM's): generate past EOS, to max_tokens (fixed-length benchmarks)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name}: not supported by this server (leave it out or 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        return self


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.tools:
            raise ValueError("tools: not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default; 0 with echo scores the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a prompt of token ids must not be empty")
        if isinstance(value, list) and any(isinstance(p, str) and not p for p in value):
            raise ValueError("prompts must not be empty strings")
        return value

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo=true (scoring the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)
