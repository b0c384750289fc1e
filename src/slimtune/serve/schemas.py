"""OpenAI request bodies (and vLLM's adapter bodies) as pydantic models: FastAPI validates them
and publishes them in /openapi.json, which the fuzz test generates requests from.

Unknown fields are refused (400, as OpenAI does: "Unrecognized request argument"); OpenAI fields
slimtune does not implement are accepted at their neutral value and refused otherwise, with a
message naming the field.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Float = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes
Stop = str | list[str] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is not a bool, "5" not an int


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1, description="an adapter's name, an A/B route's name, or the base model's name")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: Float | None = Field(None, ge=0, le=2, description="0 (or omitted) = greedy")
    top_p: Float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    user: str | None = Field(None, description="end-user id: A/B routes pick the same arm for the same user")
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    logit_bias: dict[str, Float] | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens tokens, EOS or not (benchmarks)")

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for an OpenAI option set to something slimtune does not do."""
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return name, f"{name} is not supported; leave it at 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; leave it out"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported; leave it false"
        if self.logprobs:
            return "logprobs", "logprobs are not supported; leave it out"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported; use n"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported; leave it out"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # fields of returned messages (refusal, ...) may come back
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self):
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported; leave it out"
        if self.tools:
            return "tools", "tool calls are not supported; leave tools out"
        return super().unsupported()


class LoadLoraRequest(_Strict):
    """vLLM's body for POST /v1/load_lora_adapter."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="adapter folder on the server (adapter_config.json + weights)")
    load_inplace: bool = False


class UnloadLoraRequest(_Strict):
    """vLLM's body for POST /v1/unload_lora_adapter."""
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class RouteBody(_Strict):
    arms: dict[str, Float] = Field(min_length=1, description="adapter name -> weight (normalized to sum 1)")
