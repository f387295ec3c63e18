"""The request bodies both completion routes accept, and the checks pydantic cannot express.

OpenAI's parameters come first, then our extras (sampler, branches, samples, ...). Models
are strict and forbid unknown fields, so a typo is an error rather than silently ignored.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..answer_format import AnswerFormatError, parse_answer_format, resolve_answer_format
from .errors import APIError, bad_request, validation_error

MAX_STOP_STRINGS = 16
MAX_PROMPTS = 32
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a body; json.loads would recurse past Python's limit
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class Params(_Strict):
    """Parameters shared by both completion routes (OpenAI's, then our extras)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extras
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    sampler: str | None = None
    sampler_config: dict[str, Any] | None = None
    branches: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1)
    token_budget: int | None = Field(None, ge=1)  # deepconf, sc-early: the most tokens a prompt's samples spend
    aggregate: bool | None = None
    answer_kind: Literal["number", "option", "text", "list"] | None = None  # answer_format's older name
    answer_format: str | None = None  # number | option | yes-no | list | text | regex:PATTERN
    metrics: bool | None = None
    ignore_eos: bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Params):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Params):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:N"
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# -- the body ----------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a JSON string (skipped whole), or a bracket


def json_depth(body: bytes, limit: int) -> bool:
    """Whether the arrays and objects in `body` nest deeper than `limit` (brackets inside strings
    do not count), found before any recursive parsing."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for m in _TOKENS.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


async def read_json(request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object (413 past `limit` bytes, 400 for anything else)."""
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                       None, "request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():  # a lying or absent content-length cannot get past the limit
        body += chunk
        if len(body) > limit:
            raise too_big
    if not body.strip():
        raise bad_request("The request body is empty; expected a JSON object.", None, "invalid_json")
    if json_depth(body, MAX_JSON_DEPTH):
        raise bad_request(f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
                          None, "invalid_json")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)  # NaN is not JSON
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). "
                          "The body must be valid JSON.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data


def parse_body(data: dict[str, Any], model_cls: type[Params]) -> Params:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# -- checks both routes share --------------------------------------------------------------

def check_common(p: Params) -> tuple[str, ...]:
    """Validate what pydantic cannot express; return the stop strings."""
    if p.presence_penalty or p.frequency_penalty:
        which = "presence_penalty" if p.presence_penalty else "frequency_penalty"
        raise bad_request(f"{which} is not supported by this server (only 0)", which, "unsupported_parameter")
    if p.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    if p.stream_options is not None and not p.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop",
                          "invalid_value")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop", "invalid_value")
    if p.sampler is not None and not p.sampler.strip():
        raise bad_request("sampler must not be empty", "sampler", "invalid_value")
    return tuple(stop)


def budget(max_context: int, prompt_len: int, asked: int | None, default: int, param: str,
           prompt_param: str) -> int:
    """max_tokens for one prompt, within the model's context."""
    ctx = max_context
    if prompt_len >= ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens, but the prompt has "
                          f"{prompt_len} tokens. Please shorten the prompt.", prompt_param,
                          "context_length_exceeded")
    if asked is None:
        return max(1, min(default, ctx - prompt_len))
    if prompt_len + asked > ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                          f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                          "Please reduce the prompt or the completion length.", param, "context_length_exceeded")
    return asked


# -- chat ------------------------------------------------------------------------------------

def check_chat(p: ChatRequest) -> None:
    if not p.messages:
        raise bad_request("messages must hold at least one message", "messages", "invalid_value")
    if p.top_logprobs is not None and not p.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
    if p.response_format is not None and p.response_format.get("type") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format",
                          "unsupported_parameter")


def message_text(m: ChatMessage, i: int) -> str:
    """A message's content as one string (text parts only)."""
    if m.content is None:
        raise bad_request(f"messages[{i}].content is required", f"messages[{i}].content", "invalid_value")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                              "are supported", f"messages[{i}].content[{j}]", "invalid_value")
        parts.append(part["text"])
    return "".join(parts)


def chat_prompt(p: ChatRequest, tokenizer: Any) -> list[int]:
    return chat_ids(p.messages, tokenizer)


def chat_ids(messages: list[ChatMessage], tokenizer: Any) -> list[int]:
    """The messages rendered with the model's chat template (developer counts as system).

    Only the template writes special tokens: message contents are tokenized as plain text, so
    "<|im_end|>" typed by a user stays text and cannot open a system or assistant turn.
    """
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
            for i, m in enumerate(messages)]
    try:
        if hasattr(tokenizer, "encode_plain") and hasattr(tokenizer, "render_chat"):
            return plain_content_chat(tokenizer, msgs)
        return tokenizer.encode_chat(msgs)
    except APIError:
        raise
    except Exception as e:
        raise bad_request(f"could not render the messages with the model's chat template: {e}", "messages") from None


def plain_content_chat(tokenizer: Any, msgs: list[dict[str, str]]) -> list[int]:
    """Render with a marker in place of each content, then tokenize the template's text with its special
    tokens and each content as plain text."""
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(msgs))]
    text = tokenizer.render_chat([{**m, "content": mk} for m, mk in zip(msgs, marks)])
    ids: list[int] = []
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    for j, piece in enumerate(pieces):
        if j % 2:  # a marker: the content it stands for
            ids += tokenizer.encode_plain(msgs[int(piece)]["content"])
        elif piece:
            ids += tokenizer.encode(piece, add_bos=False)
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def chat_budget(p: ChatRequest, max_context: int, prompt_len: int, default: int) -> int:
    asked = p.max_completion_tokens if p.max_completion_tokens is not None else p.max_tokens
    param = "max_completion_tokens" if p.max_completion_tokens is not None else "max_tokens"
    return budget(max_context, prompt_len, asked, default, param, "messages")


# -- completions -------------------------------------------------------------------------------

def check_completion(p: CompletionRequest) -> None:
    if p.suffix:
        raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
    if p.best_of is not None and p.best_of != (p.n or 1):
        raise bad_request("best_of must equal n on this server", "best_of", "unsupported_parameter")
    if p.echo and p.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported", "echo", "unsupported_parameter")


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return []
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


def completion_prompts(p: CompletionRequest, tokenizer: Any) -> tuple[list[str | list[int]], list[list[int]]]:
    """(the prompts as given, their token ids), each checked."""
    prompts = prompt_list(p.prompt)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt", "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt", "invalid_value")
    ids = []
    for j, pr in enumerate(prompts):
        if isinstance(pr, str):
            ids.append(tokenizer.encode(pr))
        else:
            bad = [t for t in pr if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} in prompt[{j}] is outside the vocabulary "
                                  f"(0..{tokenizer.vocab_size - 1})", "prompt", "invalid_value")
            ids.append(list(pr))
        if not ids[-1]:
            raise bad_request("prompt must not be empty", "prompt", "invalid_value")
    return prompts, ids


# -- the answer multi-row samplers look for -------------------------------------------------------

def given_answer_format(p: Params) -> str | None:
    """The request's answer format (answer_format, or answer_kind, its older name), checked;
    None: read it from the prompt."""
    if p.answer_format is not None and p.answer_kind is not None:
        raise bad_request("give answer_format or answer_kind (its older name), not both", "answer_format",
                          "invalid_value")
    if p.answer_format is None:
        return p.answer_kind
    try:
        return parse_answer_format(p.answer_format)
    except AnswerFormatError as e:
        raise bad_request(str(e), "answer_format", "invalid_value") from None


def reader_texts(p: Params, tokenizer: Any) -> list[str]:
    """What the answer reader reads: a chat's last user message (what `entropix generate` is given),
    or each completion prompt (token ids decoded)."""
    if isinstance(p, ChatRequest):
        users = [i for i, m in enumerate(p.messages) if m.role == "user"] or [len(p.messages) - 1]
        return [message_text(p.messages[users[-1]], users[-1])] if p.messages else []
    if isinstance(p, CompletionRequest):
        return [pr if isinstance(pr, str) else tokenizer.decode(pr) for pr in prompt_list(p.prompt)]
    return []


def answer_format(p: Params, tokenizer: Any) -> tuple[str, str | None]:
    """(kind, pattern) for a multi-row request, through the reader the CLI and `entropix eval` use."""
    given = given_answer_format(p)
    found = list(dict.fromkeys(resolve_answer_format(t, given) for t in reader_texts(p, tokenizer)))
    if len(found) > 1:  # one strategy run looks for one kind of answer in every prompt
        raise bad_request("these prompts ask for different answer formats; send them apart or set answer_format",
                          "answer_format", "invalid_value")
    return found[0] if found else ("number", None)
