"""Request bodies of the OpenAI-compatible API (pydantic models; they become the OpenAPI document).

Every model forbids fields it does not declare, so an unknown parameter is a 400 that names it. The
parameters OpenAI defines but lorafleet does not serve (``n`` > 1, ``logprobs``, ``tools``, penalties...)
are declared so the document shows them, and ``unsupported`` refuses any of them set to a value that
would change the answer: a request is served as asked or refused, never served differently in silence.

Integer, number and boolean fields are strict (``true`` or ``"5"`` is not a count, ``"0.5"`` not a
temperature, ``1`` or ``"yes"`` not ``stream``; a JSON integer is a number), and ``null`` for ``stream``,
``stream_options.include_usage`` and ``encoding_format`` means their default, as in OpenAI's API.

Lists and maps are bounded (messages, logit_bias, tools, functions): validating each of a body's
entries runs on the event loop the HTTP and gRPC streams share, so a 4 MiB body of 100,000 empty
messages held every stream ~0.7 s before the engine refused it for its length.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from lorafleet_server.engine.types import MAX_CHAT_TURNS

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; frameworks sometimes send a few more)
MAX_EMBED_INPUTS = 64  # texts per embeddings request (each is one engine request)
MAX_LOGIT_BIAS = 1024  # logit_bias entries (only an empty one is served; bounded all the same)
MAX_TOOLS = 128  # tools and functions (OpenAI's limit; none is served)

PositiveInt = Annotated[int, Field(ge=1, strict=True)]
Count = Annotated[int, Field(strict=True)]
# OpenAI takes any int64; the engine's generator takes an unsigned 64-bit seed: a negative seed is used
# as its two's complement (``seed & (2**64 - 1)``, ``unsigned_seed``), so -1 and 2**64 - 1 are one seed.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1, strict=True)]
Number = Annotated[float, Field(strict=True)]  # a JSON number (an integer too), never a string or a boolean
SEED_MASK = 2**64 - 1


def unsigned_seed(seed: int | None) -> int | None:
    """The engine's seed for a request's ``seed``: negative ones as their unsigned 64-bit value."""
    return None if seed is None else seed & SEED_MASK


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool | None = Field(default=False, description="null is false")


class TextPart(Strict):
    """A text content part; image, audio and file parts are refused (the served models read text)."""

    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(Strict):
    """The sampling parameters both endpoints share, OpenAI's and lorafleet's extras (``top_k``,
    ``repetition_penalty``), plus the OpenAI parameters refused unless neutral."""

    model: str = Field(description="the base model's id (GET /v1/models) or an adapter: tenant/name[@version]")
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, strict=True)] | None = Field(
        default=None, description="0 is greedy; unset is 1.0, as in OpenAI's API"
    )
    top_p: Annotated[float, Field(gt=0.0, le=1.0, strict=True)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = Field(
        default=None, description="any int64 (OpenAI's range) or up to 2**64 - 1; a negative seed is seed & (2**64 - 1)"
    )
    stream: StrictBool | None = Field(default=False, description="null is false")
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = Field(default=None, description="accepted, logged nowhere")
    top_k: Annotated[int, Field(ge=0, strict=True)] | None = Field(
        default=None, description="lorafleet extra; 0 is off"
    )
    repetition_penalty: Annotated[float, Field(gt=0.0, strict=True)] | None = Field(
        default=None, description="lorafleet extra"
    )
    # OpenAI parameters not served: refused unless neutral (``unsupported``).
    n: Count | None = Field(default=None, description="only 1")
    presence_penalty: Number | None = Field(default=None, description="only 0")
    frequency_penalty: Number | None = Field(default=None, description="only 0")
    logit_bias: Annotated[dict[str, Number], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        default=None, description="only empty"
    )


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_TURNS)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = Field(default=None, description="only false")
    top_logprobs: Count | None = Field(default=None, description="not supported")
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="not supported"
    )
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="only none")
    functions: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="not supported"
    )
    function_call: str | dict[str, Any] | None = Field(default=None, description="only none")
    parallel_tool_calls: StrictBool | None = Field(default=None, description="accepted; there are no tools")
    response_format: dict[str, Any] | None = Field(default=None, description='only {"type": "text"}')


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one string is accepted; token-id prompts are not)"
    )
    logprobs: Count | None = Field(default=None, description="not supported")
    echo: StrictBool | None = Field(default=None, description="only false")
    suffix: str | None = Field(default=None, description="not supported")
    best_of: Count | None = Field(default=None, description="only 1")

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _neutral_tool_choice(value: str | dict[str, Any] | None) -> bool:
    return value is None or value == "none"


def unsupported(req: ChatCompletionRequest | CompletionRequest) -> tuple[str, str] | None:
    """The first parameter set to something lorafleet does not serve, and why; None when all are fine."""
    checks: list[tuple[str, bool, str]] = [
        ("n", req.n not in (None, 1), "only n=1 is supported"),
        ("presence_penalty", req.presence_penalty not in (None, 0), "not supported (use repetition_penalty)"),
        ("frequency_penalty", req.frequency_penalty not in (None, 0), "not supported (use repetition_penalty)"),
        ("logit_bias", bool(req.logit_bias), "not supported"),
    ]
    if isinstance(req, ChatCompletionRequest):
        checks += [
            ("logprobs", bool(req.logprobs), "log probabilities are not supported"),
            ("top_logprobs", req.top_logprobs is not None, "log probabilities are not supported"),
            ("tools", bool(req.tools), "tools and function calling are not supported"),
            ("tool_choice", not _neutral_tool_choice(req.tool_choice), "tools and function calling are not supported"),
            ("functions", bool(req.functions), "tools and function calling are not supported"),
            ("function_call", not _neutral_tool_choice(req.function_call), "function calling is not supported"),
            (
                "response_format",
                req.response_format is not None and req.response_format != {"type": "text"},
                'only {"type": "text"} is supported',
            ),
        ]
    else:
        checks += [
            ("logprobs", req.logprobs is not None, "log probabilities are not supported"),
            ("echo", bool(req.echo), "echo is not supported"),
            ("suffix", req.suffix is not None, "suffix (insertion) is not supported"),
            ("best_of", req.best_of not in (None, 1), "only best_of=1 is supported"),
        ]
    for name, refused, why in checks:
        if refused:
            return name, why
    return None


class EmbeddingRequest(Strict):
    """``POST /v1/embeddings``: the mean-pooled last hidden state (gRPC ``Embed``), one per input."""

    model: str = Field(description="the base model's id or an adapter: tenant/name[@version]")
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] = Field(
        description=f"a text, or up to {MAX_EMBED_INPUTS} texts (token-id inputs are not supported)"
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float",
        description="base64: the little-endian float32 bytes (what the openai SDK asks for); null is float",
    )
    user: Annotated[str, Field(max_length=256)] | None = None
    dimensions: Count | None = Field(default=None, description="not supported (the model's hidden size)")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input
