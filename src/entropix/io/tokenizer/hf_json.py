"""HF ``tokenizer.json`` files (+ ``tokenizer_config.json``): decode mode, token bytes, BOS / EOS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from .vocab import byte_level_to_bytes, sentencepiece_to_bytes


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def walk(node: Any):
    """Every dict inside a JSON value (to find decoder / post-processor parts in a Sequence)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def json_decode_mode(spec: dict) -> tuple[str, bool]:
    """How a tokenizer.json's tokens map to bytes ("byte_level", "sentencepiece" or
    "engine"), and whether decoding drops the leading space SentencePiece writes."""
    decoder_parts = list(walk(spec.get("decoder")))
    decoder_types = {d.get("type") for d in decoder_parts}
    model = spec.get("model") or {}
    if "ByteLevel" in decoder_types:
        return "byte_level", False
    if not (decoder_types & {"Metaspace", "ByteFallback"} or model.get("byte_fallback")):
        return "engine", False
    strip = False
    for d in decoder_parts:
        if d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) >= 1:
            strip = True
        if d.get("type") == "Metaspace" and (
            d.get("prepend_scheme") in ("first", "always") or d.get("add_prefix_space")
        ):
            strip = True
    return "sentencepiece", strip


def json_token_bytes(engine: tokenizers.Tokenizer, added: dict[int, dict], mode: str) -> list[bytes]:
    """The raw bytes behind every id of a tokenizer.json vocabulary."""
    size = engine.get_vocab_size(with_added_tokens=True)
    if added:
        size = max(size, max(added) + 1)
    token_bytes = []
    for i in range(size):
        if i in added:
            # Added tokens are stored as the text they match.
            token_bytes.append(added[i]["content"].encode("utf-8"))
            continue
        tok = engine.id_to_token(i)
        if tok is None:
            token_bytes.append(b"")
        elif mode == "byte_level":
            token_bytes.append(byte_level_to_bytes(tok))
        elif mode == "sentencepiece":
            token_bytes.append(sentencepiece_to_bytes(tok))
        else:
            token_bytes.append(engine.decode([i], skip_special_tokens=False).encode("utf-8"))
    return token_bytes


def _template_first(engine: tokenizers.Tokenizer, spec: dict) -> int | None:
    """The token (if any) the post-processor, i.e. the model's own tokenizer, prepends."""
    for node in walk(spec.get("post_processor")):
        if node.get("type") == "TemplateProcessing":
            single = node.get("single") or []
            if single and "SpecialToken" in single[0]:
                return engine.token_to_id(single[0]["SpecialToken"]["id"])
            return None
    return None


def json_bos_eos(engine: tokenizers.Tokenizer, spec: dict, cfg: dict) -> tuple[int | None, int | None, Any]:
    """(bos_id, eos_id, add_bos) from tokenizer_config.json, else from the post-processor."""

    def cfg_id(key):
        name = token_content(cfg.get(key))
        return engine.token_to_id(name) if name is not None else None

    template_first = _template_first(engine, spec)
    bos_id = cfg_id("bos_token")
    if bos_id is None:
        bos_id = template_first
    eos_id = cfg_id("eos_token")
    if eos_id is None:
        # No config: fall back on the usual end-of-sequence spellings.
        found = (engine.token_to_id(n) for n in ("</s>", "<|end_of_text|>", "<|endoftext|>"))
        eos_id = next((i for i in found if i is not None), None)
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_id is not None and template_first == bos_id
    return bos_id, eos_id, add_bos


def json_tokenizer_args(path, tokenizer_config: dict | None = None) -> dict[str, Any]:
    """TextTokenizer arguments from an HF ``tokenizer.json`` (+ the ``tokenizer_config.json`` dict)."""
    path = Path(path)
    engine = tokenizers.Tokenizer.from_file(str(path))
    # Padding / truncation settings saved with the file would alter plain encode() calls.
    engine.no_padding()
    engine.no_truncation()
    spec = json.loads(path.read_text(encoding="utf-8"))
    cfg = tokenizer_config or {}

    mode, strip = json_decode_mode(spec)
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    bos_id, eos_id, add_bos = json_bos_eos(engine, spec, cfg)
    return dict(
        engine=engine,
        token_bytes=json_token_bytes(engine, added, mode),
        special_ids=[i for i, a in added.items() if a.get("special")],
        added_ids=added,
        bos_id=bos_id,
        eos_id=eos_id,
        chat_template=pick_template(cfg.get("chat_template")),
        add_bos=bool(add_bos),
        strip_leading_space=strip,
        engine_decode=mode == "engine",
    )


def read_config(root: Path) -> dict:
    """A model folder's tokenizer_config.json, with the chat template from
    chat_template.jinja when the config has none (newer HF repos keep it there)."""
    cfg: dict = {}
    if (root / "tokenizer_config.json").is_file():
        cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not cfg.get("chat_template") and (root / "chat_template.jinja").is_file():
        cfg["chat_template"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    return cfg
