"""Request bodies of the OpenAI-compatible routes, validated strictly.

Unknown fields are refused (a misspelt `max_token` must not be silently ignored), types are not
coerced ("5" is not 5), and every bound a client can exceed is a validation error: FastAPI answers
422 with the field's name. Server-side ceilings (max_tokens, n, prompt length) are checked in
app.py, where the configured limits are known. Fields OpenAI defines that we cannot honour
(penalties, logit_bias) are accepted only at their neutral value so existing clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


def _stop_list(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty")
    return stops


class Sampling(Strict):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1 (vLLM's spelling) = off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        _stop_list(value)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stops(self) -> list[str]:
        return _stop_list(self.stop)


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for "system"
    content: str
    name: str | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class TextsRequest(Strict):
    """classify, tag and embeddings: one text or a list of them."""

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)]
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingRequest(TextsRequest):
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default
    dimensions: None = None
