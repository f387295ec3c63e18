"""/tokenize and /detokenize, with vLLM's request and response fields.

An OpenAI-compatible client that drives decoding itself (token-id prompts, branches continued
from exact ids) needs the server's own tokenizer: these two routes give it, so an entropix
server can stand where a vLLM server would.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from pydantic import Field, ValidationError

from . import protocol
from .context import ServerContext
from .errors import bad_request, validation_error

router = APIRouter()


class TokenizeRequest(protocol._Strict):
    """A text prompt, or chat messages rendered by the model's template (one of the two)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[protocol.ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(protocol._Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


async def _body(request: HTTPRequest, model_cls: Any) -> tuple[ServerContext, Any]:
    ctx: ServerContext = request.app.state.entropix
    ctx.check_key(request)
    try:
        p = model_cls.model_validate(await protocol.read_json(request, ctx.max_body))
    except ValidationError as e:
        raise validation_error(e) from None
    if p.model is not None:
        ctx.check_model(p.model)
    return ctx, p


def _ids(p: TokenizeRequest, tokenizer: Any) -> list[int]:
    if (p.prompt is None) == (p.messages is None):
        raise bad_request("give either prompt or messages", "prompt", "invalid_value")
    if p.prompt is not None:
        return tokenizer.encode(p.prompt, add_bos=None if p.add_special_tokens in (None, True) else False)
    if p.add_generation_prompt is False or p.continue_final_message:
        raise bad_request("messages are rendered with the generation prompt only", "add_generation_prompt",
                          "unsupported_parameter")
    if p.add_special_tokens:  # the template writes the special tokens; more would double BOS
        raise bad_request("add_special_tokens is not supported with messages", "add_special_tokens",
                          "unsupported_parameter")
    return protocol.chat_ids(p.messages or [], tokenizer)


@router.post("/tokenize")
async def tokenize(request: HTTPRequest):
    ctx, p = await _body(request, TokenizeRequest)
    tok = ctx.lm.tokenizer
    ids = _ids(p, tok)
    strs = [tok.token_text(i) for i in ids] if p.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.max_context, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(request: HTTPRequest):
    ctx, p = await _body(request, DetokenizeRequest)
    tok = ctx.lm.tokenizer
    bad = [t for t in p.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", "tokens",
                          "invalid_value")
    return {"prompt": tok.decode(p.tokens)}
