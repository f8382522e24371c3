"""A Hugging Face fast tokenizer as GGUF metadata (``tokenizer.*`` keys).

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2/3, SmolLM2, ...) become
``tokenizer.ggml.model = "gpt2"`` with:

* ``tokens``: the vocabulary by id, the byte-level strings as stored in
  tokenizer.json (added tokens by their content); ids the tokenizer lacks up
  to the embedding's row count are ``[PAD<id>]`` of type UNUSED;
* ``token_type``: NORMAL, CONTROL (special added tokens), USER_DEFINED (other
  added tokens), UNUSED;
* ``merges``: ``"left right"`` in rank order;
* ``pre``: the pre-tokenizer llama.cpp must run before BPE. It is read from
  what the tokenizer actually does (tokenizer.json's ``pre_tokenizer``), not
  from the model's name: a tokenizer converted from a GGUF by transformers
  (as loraq's offline default model is) may split text differently from the
  original tokenizer of the same model, and llama.cpp must split it the way
  the model was trained;
* special token ids, ``add_bos_token`` / ``add_eos_token`` as the tokenizer
  behaves when it encodes a text, and ``tokenizer.chat_template`` (the
  template loraq trains with: the tokenizer's, else ChatML).

SentencePiece-style BPE tokenizers (``byte_fallback`` with a ``▁`` word marker:
Llama 2, Mistral v0.1-v0.3, Phi-3) become ``tokenizer.ggml.model = "llama"``
with ``scores``: llama.cpp's SentencePiece tokenizer merges the adjacent pair
whose joined token has the highest score, so a token's score is minus the
rank of the first merge that makes it, which orders merges as the BPE merge
list does (tokens no merge makes score -1e9: never joined before a real
merge); ``<0xNN>`` tokens are of type BYTE, the unknown token UNKNOWN.
"""
from __future__ import annotations

import json
from typing import Any

from gguf import GGUFValueType, TokenType

from loraq.errors import ModelError
from loraq.exporting.gguf_arch import KV, array, boolean, string, u32

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

UNMERGED_SCORE = -1e9

# the pre-tokenizer steps of tokenizer.json (see _pre_steps) -> llama.cpp's name for the same splitting
PRE_TOKENIZERS: dict[tuple, str] = {
    (("bytelevel-regex",),): "gpt-2",
    (("digits",), ("bytelevel-regex",)): "smollm",  # single digits, then GPT-2's regex
    (("split", QWEN2_SPLIT), ("bytelevel",)): "qwen2",
    (("split", LLAMA3_SPLIT), ("bytelevel",)): "llama-bpe",
}


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json as a dict; a ModelError for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast tokenizer (tokenizer.json); this model's tokenizer has none")
    return json.loads(backend.to_str())


def tokenizer_metadata(tokenizer: Any, n_vocab: int, chat_template: str | None,
                       generation_config: Any = None) -> dict[str, KV]:
    """Every ``tokenizer.*`` key for ``tokenizer``, its token list padded to ``n_vocab`` (the embedding's rows)."""
    spec = tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    tokens, types = _tokens_and_types(spec, n_vocab)
    meta = {"tokenizer.ggml.tokens": array(tokens, GGUFValueType.STRING),
            "tokenizer.ggml.token_type": array(types, GGUFValueType.INT32)}
    if model.get("byte_fallback"):
        meta.update(_sentencepiece_keys(spec, tokens, types))
    else:
        meta["tokenizer.ggml.model"] = string("gpt2")
        meta["tokenizer.ggml.pre"] = string(pre_tokenizer_name(spec))
        meta["tokenizer.ggml.merges"] = array(merges(spec), GGUFValueType.STRING)
    meta.update(special_token_keys(tokenizer, generation_config))
    if chat_template:
        meta["tokenizer.chat_template"] = string(chat_template)
    return meta


def _tokens_and_types(spec: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    by_id: dict[int, tuple[str, int]] = {int(i): (t, TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if by_id and max(by_id) >= n_vocab:
        raise ModelError(f"GGUF export: the tokenizer has token id {max(by_id)}, but the model's embedding has only "
                         f"{n_vocab} rows; the tokenizer does not belong to this model")
    sentencepiece = bool(spec["model"].get("byte_fallback"))
    unknown = spec["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        if sentencepiece and kind == TokenType.NORMAL and _is_byte_token(text):
            kind = TokenType.BYTE
        elif sentencepiece and text == unknown:
            kind = TokenType.UNKNOWN
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


def merges(spec: dict[str, Any]) -> list[str]:
    """BPE merges as ``"left right"`` strings (tokenizer.json stores strings or pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]


def _pre_steps(spec: dict[str, Any]) -> tuple[tuple, ...]:
    """The pre-tokenizer as comparable steps: ("bytelevel-regex",), ("digits",), ("split", regex), ..."""
    pre = spec.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    steps = []
    for item in items:
        kind = item.get("type")
        if kind == "ByteLevel" and not item.get("add_prefix_space", False):
            steps.append(("bytelevel-regex",) if item.get("use_regex", True) else ("bytelevel",))
        elif kind == "Digits" and item.get("individual_digits"):
            steps.append(("digits",))
        elif kind == "Split" and item.get("behavior") == "Isolated" and not item.get("invert"):
            steps.append(("split", (item.get("pattern") or {}).get("Regex")))
        else:
            steps.append((json.dumps(item, sort_keys=True),))
    return tuple(steps)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this byte-level tokenizer; a ModelError when none splits alike."""
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ModelError(f"GGUF export: tokenizer normalizer {normalizer.get('type')!r} has no llama.cpp "
                         "equivalent for a byte-level BPE tokenizer")
    name = PRE_TOKENIZERS.get(_pre_steps(spec))
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise ModelError(f"GGUF export: this tokenizer's pre-tokenizer matches none that loraq maps to llama.cpp "
                         f"({known}); llama.cpp would split its text differently")
    return name


def _sentencepiece_keys(spec: dict[str, Any], tokens: list[str], types: list[int]) -> dict[str, KV]:
    """``model = "llama"`` keys: scores from merge ranks, and whether a leading ``▁`` is added to the text."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges(spec)):
        left, right = merge.split(" ", 1)
        rank_of.setdefault(left + right, rank)
    scores = [-float(rank_of[t]) if t in rank_of else UNMERGED_SCORE for t in tokens]
    return {
        "tokenizer.ggml.model": string("llama"),
        "tokenizer.ggml.pre": string("default"),
        "tokenizer.ggml.scores": array(scores, GGUFValueType.FLOAT32),
        "tokenizer.ggml.add_space_prefix": boolean(_adds_space_prefix(spec)),
    }


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Prepend normalizer, or Metaspace that prepends)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    pre = spec.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in items)


def special_token_keys(tokenizer: Any, generation_config: Any = None) -> dict[str, KV]:
    """Special token ids (EOS, an end-of-turn token that also stops) and whether encoding a text adds BOS / EOS."""
    from loraq.data.prompts import stop_token_ids

    keys: dict[str, KV] = {}
    for role in ("bos", "eos", "unknown", "padding"):
        attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
        token_id = getattr(tokenizer, f"{attr}_token_id", None)
        if token_id is not None:
            keys[f"tokenizer.ggml.{role}_token_id"] = u32(token_id)
    extra_stops = [i for i in stop_token_ids(tokenizer, generation_config) if i != tokenizer.eos_token_id]
    if extra_stops:
        keys["tokenizer.ggml.eot_token_id"] = u32(extra_stops[0])
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_specials) > len(plain)
    keys["tokenizer.ggml.add_bos_token"] = boolean(added and with_specials[0] == tokenizer.bos_token_id)
    keys["tokenizer.ggml.add_eos_token"] = boolean(added and with_specials[-1] == tokenizer.eos_token_id)
    return keys
