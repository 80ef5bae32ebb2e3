"""The OpenAI wire format: response and stream-chunk bodies for completions and chat completions.

Pure functions of what was generated, so the shapes are tested without a model.
"""

from __future__ import annotations

import json
import time
import uuid

from budgetlm.serve.scheduler import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line ("[DONE]" is sent verbatim)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built up token by token."""

    def __init__(self, offset: int = 0):
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, lp: TokenLogprob) -> None:
        self.tokens.append(lp.token)
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append(dict(lp.top))
        self.text_offset.append(self.offset)
        self.offset += len(lp.token)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def chat_logprob(lp: TokenLogprob) -> dict:
    """One entry of chat's `logprobs.content`."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def completion_body(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return _answer("text_completion", rid, model, choices, prompt_tokens, completion_tokens)


def _answer(obj: str, rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole (non-streamed) answer of OpenAI's object type `obj`."""
    answer = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    return {**answer, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason=None, logprobs=None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_body(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return _answer("chat.completion", rid, model, choices, prompt_tokens, completion_tokens)


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, obj: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, the totals."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
