"""Chat templates: the built-in formats and sandboxed Jinja rendering of a model's own template.

Templates come from model files, i.e. from anyone: they are rendered in jinja2's
``ImmutableSandboxedEnvironment``, and what the sandbox refuses becomes a one-line
``EntropixError``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from entropix import EntropixError

# Tokens that end a turn in the common chat formats; any found in a vocabulary stops generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "</s>",
    "<|eom_id|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek-V2's chat format: "User: ...\n\nAssistant: ...<eos>", a system prompt as a plain paragraph
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# the format a family's model was tuned on, for files that carry no template (others: ChatML)
FAMILY_TEMPLATES = {"deepseek_v2": DEEPSEEK_TEMPLATE, "deepseek2": DEEPSEEK_TEMPLATE}

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would corrupt prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=1)
def jinja_env():
    """The sandboxed Jinja environment chat templates are compiled in."""
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        # jinja2 gives an unsafe attribute as an undefined that fails only once used (printed
        # bare it is ""); refuse at the access itself, so every attempt is reported.
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    class GenerationTag(Extension):
        # Some templates mark assistant text with {% generation %}; we only need its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    # Chat templates come from model files, so they run sandboxed; the whitespace options
    # are the ones the templates are written for (as HF renders them).
    env = StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def flatten_content(messages: list[dict]) -> list[dict]:
    """OpenAI-style content lists as plain text, for the built-in templates."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            m = {**m, "content": text}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


class ChatTemplate:
    """One template text compiled once in the sandbox; rendering what the sandbox refuses
    (attribute walks such as ``__class__.__mro__``, mutating calls) raises EntropixError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled = jinja_env().from_string(source)

    def render(self, context: dict[str, Any]) -> str:
        from jinja2.exceptions import SecurityError

        try:
            return self._compiled.render(**context)
        except SecurityError as e:
            first = (str(e).splitlines() or [""])[0]
            raise EntropixError(f"the chat template tried an unsafe operation and was refused ({first})") from None
