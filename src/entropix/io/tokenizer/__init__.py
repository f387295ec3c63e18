"""Tokenizers: the `Tokenizer` protocol and our implementation over GGUF, tokenizer.json and tiktoken.

- protocol: `Tokenizer` (what entropix calls of any tokenizer), `ChatTemplateTokenizer`, `Detokenizer`
- text: `TextTokenizer`, the concrete tokenizer built from model files
- vocab: byte tables, merges and split patterns shared by every format
- gguf / hf_json / tiktoken: reading each vocabulary format
- chat: built-in chat templates and sandboxed rendering of a model's own
- detokenizer: `StreamingDetokenizer`
"""

from .chat import (
    CHATML_TEMPLATE,
    DEEPSEEK_TEMPLATE,
    END_OF_TURN_TOKENS,
    FAMILY_TEMPLATES,
    LLAMA3_TEMPLATE,
)
from .detokenizer import StreamingDetokenizer
from .protocol import ChatTemplateTokenizer, Detokenizer, Tokenizer
from .text import TextTokenizer
from .vocab import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, bytes_to_unicode

__all__ = [
    "CHATML_TEMPLATE",
    "DEEPSEEK_TEMPLATE",
    "END_OF_TURN_TOKENS",
    "FAMILY_TEMPLATES",
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
    "LLAMA3_TEMPLATE",
    "QWEN2_PATTERN",
    "ChatTemplateTokenizer",
    "Detokenizer",
    "StreamingDetokenizer",
    "TextTokenizer",
    "Tokenizer",
    "bytes_to_unicode",
]
