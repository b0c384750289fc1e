"""OpenAI request bodies (and vLLM's adapter bodies) as pydantic models: FastAPI validates them
and publishes them in /openapi.json, which the fuzz test generates requests from.

Unknown fields are refused (400, as OpenAI does: "Unrecognized request argument"). Fields of
OpenAI's or vLLM's API that slimtune does not act on are declared and accepted at the value where
they change nothing (fields.py), and refused otherwise with one `unsupported_parameter` 400 that
names the field.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import fields

Float = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes
Stop = str | list[str] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is not a bool, "5" not an int


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's extension: usage so far in every chunk")


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
    presence_penalty: Float = Field(0.0, ge=-2, le=2, description="minus p for every token generated so far")
    frequency_penalty: Float = Field(0.0, ge=-2, le=2, description="minus f x times each token was generated")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="token id (as a string) -> added to its logit")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens tokens, EOS or not (benchmarks)")
    repetition_penalty: Float = Field(1.0, gt=0, le=10, description="vLLM's: seen tokens' logits divided by it (>1)")
    top_k: int | None = Field(None, ge=-1, description="keep the k most likely tokens (0 or -1: all)")
    min_p: Float | None = Field(None, ge=0, le=1, description="drop tokens below min_p x the top token's probability")
    # accepted where they change nothing (fields.COMMON)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool | None = None
    length_penalty: Float | None = None
    prediction: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for an option set to something slimtune does not do."""
        bad = fields.first_active(self, fields.COMMON)
        if bad:
            return bad
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    echo: bool = Field(False, description="the prompt in front of the text (and its log-probs, with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probs of each token and its top N alternatives")
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self):
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", f"best_of={self.best_of} is below n={self.n}; best_of must be at least n"
        if self.best_of is not None and self.best_of > self.n and self.stream:
            return "best_of", "best_of > n cannot stream (the best candidates are known only at the end); set stream: false"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported; leave it out"
        return super().unsupported()


class ContentPart(BaseModel):
    """A content part: text is read; any other type (image_url, input_audio, file) is a clear 400
    from generation.py rather than a validation error about the string form of `content`."""
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # fields of returned messages (refusal, ...) may come back
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (sent back with the results)
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # accepted where they change nothing (fields.CHAT)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    echo: bool | None = None
    add_special_tokens: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self):
        bad = fields.first_active(self, fields.CHAT)
        if bad:
            return bad
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
