"""Request bodies of the OpenAI-compatible API, and the OpenAI error shape.

Every model forbids unknown fields, so a typo (`max_token`) is a 400 naming the
field instead of being silently ignored. Bounds here are the static ones; limits
that depend on the model (context length, vocabulary) are checked in app.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request (and prompts per completions request)
MAX_STOP = 4
MAX_STOP_CHARS = 200
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETIONS = 5
MAX_MESSAGES = 512
MAX_TOKENS_FIELD = 1 << 20  # far above any context; the context check gives the real bound
MAX_TOOLS = 128

Int64 = Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)]
StopField = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool | None = None


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 20, description="extension: 0 or -1 disables")
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: StopField | list[StopField] | None = Field(None, max_length=MAX_STOP)
    seed: Int64 | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    user: str | None = Field(None, max_length=256)  # accepted, ignored
    stream: bool | None = False
    stream_options: StreamOptions | None = None


PromptIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)] | PromptIds | \
        Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_N)]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS_COMPLETIONS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = Field(None, max_length=0, description="not supported; must be empty")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1 << 20)  # JSON text, as the model wrote it


class ToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)  # accepted, ignored
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool result: the call it answers
    refusal: str | None = None  # echoed back by clients that replay whole assistant messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


# -- /v1/responses (stateless subset) --------------------------------------------------

class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # echoed back by clients replaying earlier output


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str
    id: str | None = None
    status: str | None = None


class ResponsesTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class ResponsesTextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(Strict):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutputItem],
                           Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = False
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    store: bool | None = None  # nothing is stored here: accepted, reported as false
    previous_response_id: str | None = Field(None, description="not supported: the API is stateless")
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)
    truncation: Literal["disabled"] | None = None


class TokenizeRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, max_length=MAX_MESSAGES)  # rendered as chat would
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # with messages: described as chat would
    add_special_tokens: bool | None = None  # accepted; exaflop adds none to a plain prompt


class DetokenizeRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    tokens: list[Annotated[int, Field(ge=0, lt=1 << 31)]] = Field(max_length=1 << 20)


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)] | PromptIds | \
        Annotated[list[PromptIds], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


class APIError(Exception):
    """A 4xx/5xx answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after = param, code, retry_after

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line (and the offending field) from pydantic/FastAPI validation errors."""
    if not errors:
        return "invalid request body", None
    # Prefer the error that names an unknown field: it is the most actionable.
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    err = extra[0] if extra else errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Unions report one error per branch under the branch's type name; drop those segments.
    loc = [p for p in loc if not _is_union_branch(p)]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON ({err.get('msg', '')})", None
    if err.get("type") == "missing":
        if param is None:
            return "request body is missing; send a JSON object", None
        return f"Missing required parameter: {param}", param
    where = f"{param}: " if param else "request body: "
    return where + str(err.get("msg", "invalid value")), param


def _is_union_branch(part: str) -> bool:
    return any(c in part for c in "[]()") or part in {"str", "int", "list", "float", "bool", "dict"} \
        or part.startswith(("constrained-", "function-"))
