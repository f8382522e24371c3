"""Batched tokenization with loss masks: the fast path of tokenize.py, many samples at a time.

For a batch of samples of one kind it computes what :func:`~loraq.data.tokenize.tokenize_sample`
followed by :func:`~loraq.data.tokenize.truncate` computes for each (``chat``,
``completion``), or the EOS-terminated token stream of
:func:`~loraq.data.tokenize.tokenize_documents` before it is cut (``text``),
as flat arrays (:class:`Encoded`): token ids, a trained flag per token (label
!= -100; a trained label is always its own input id), and per sample its
length, trained-token count and whether it was truncated.

Where the time goes, and what is done about it:

* chat templates: every conversation of the batch is rendered in one
  ``apply_chat_template`` call, and every prompt that locates an assistant
  turn in another; the spans come from the same
  :func:`~loraq.data.tokenize.assistant_spans` as the per-sample path;
* tokenization: one ``encode_batch`` call of the fast (Rust) tokenizer for the
  whole batch, which also knows each token's characters;
* the mask, without a second pass: a span boundary at character ``c``
  becomes a token index from those offsets. With ``k`` the number of tokens
  that end at or before ``c``, a span starts at token ``k`` and ends at ``k``
  (exclusive), or at ``k + 1`` when a token straddles ``c`` (a straddling
  token is trained). The per-sample path finds the same ``k`` by tokenizing
  ``text[:c]`` and comparing with the full tokenization; the two agree
  whenever tokenizing the prefix leaves the tokens before ``c`` unchanged (a
  test holds them equal on varied data and on transformers' own assistant
  masks, which are offset-based too). Offsets are read from a copy of the
  tokenizer whose post-processor does not trim whitespace off them, so that
  whitespace tokens keep their characters.

Tokenizers without a fast backend go through the per-sample path.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraq.data.formats import Sample
from loraq.data.tokenize import (
    _closed,
    assistant_spans,
    chat_template,
    end_markers,
    prompt_turns,
    tokenize_sample,
    truncate,
)
from loraq.errors import DataError


@dataclass
class Encoded:
    """A batch of tokenized samples as flat arrays (sample ``s`` is ``ids[starts[s]:starts[s] + lengths[s]]``)."""

    ids: np.ndarray  # int64, every sample's tokens one after another
    trained: np.ndarray  # bool, per token: the label is the token itself (else -100)
    lengths: np.ndarray  # int64, per sample
    num_trained: np.ndarray  # int64, per sample: trained labels after the first position
    truncated: np.ndarray  # bool, per sample

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


class FastEncoder:
    """The tokenizer's fast backend, set up for offsets (see the module docstring); None-safe via :meth:`of`."""

    def __init__(self, tokenizer: Any, backend: Any):
        self.tokenizer = tokenizer
        self.backend = backend
        self.markers = end_markers(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.template = chat_template(tokenizer)
        self._variables = {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()}
        try:  # transformers' own compiled template (its sandbox, extensions and globals)
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(self.template)
        except (ImportError, AttributeError):
            self._compiled = None

    @classmethod
    def of(cls, tokenizer: Any) -> FastEncoder | None:
        """A FastEncoder for ``tokenizer``, or None when it has no fast (Rust) backend."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", True):
            return None
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        if not _untrim_offsets(spec.get("post_processor")) and backend.truncation is None and backend.padding is None:
            return cls(tokenizer, backend)  # nothing to change, so no copy (parsing one takes a while)
        copy = Tokenizer.from_str(json.dumps(spec))
        copy.no_truncation()  # a tokenizer.json may carry them; transformers switches them off per call too
        copy.no_padding()
        return cls(tokenizer, copy)

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """Each conversation through the chat template, as ``apply_chat_template(tokenize=False)`` renders it.

        The template is compiled once and rendered directly with the variables
        ``apply_chat_template`` gives it (the special tokens, ``tools`` and
        ``documents`` None): its per-call work of turning message objects into
        plain dicts is a no-op for samples, which already are plain dicts of
        strings, and costs about as much as the rendering itself.
        """
        if not conversations:
            return []
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=self.template,
                                                      add_generation_prompt=add_generation_prompt)
        return [self._compiled.render(messages=messages, tools=None, documents=None,
                                      add_generation_prompt=add_generation_prompt, **self._variables)
                for messages in conversations]


def _untrim_offsets(node: Any) -> bool:
    """Set every ``trim_offsets`` in a post-processor spec (nested in Sequence processors too) to False;
    True when there was one to change."""
    changed = False
    if isinstance(node, dict):
        if node.get("trim_offsets"):
            node["trim_offsets"] = False
            changed = True
        for value in node.values():
            changed = _untrim_offsets(value) or changed
    elif isinstance(node, list):
        for value in node:
            changed = _untrim_offsets(value) or changed
    return changed


def encode_samples(samples: Sequence[Sample], tokenizer: Any, seq_len: int, train_on_inputs: bool = False,
                   encoder: FastEncoder | None = None) -> Encoded:
    """Tokenize ``samples`` (all of one kind) into flat arrays; DataError for the first sample that fails, in order."""
    if not samples:
        return _pack_arrays([], [], seq_len)
    kind = samples[0].kind
    if kind == "text":
        return _encode_documents(samples, tokenizer)
    if encoder is None:
        return _reference(samples, tokenizer, seq_len, train_on_inputs)
    try:
        if kind == "chat":
            pairs = _encode_chats(samples, encoder, train_on_inputs)
        else:
            pairs = _encode_completions(samples, encoder, train_on_inputs)
    except DataError:
        # the batch renders every conversation before finding spans: take the samples one by one, so that the
        # error raised is the first sample's in file order, exactly as the per-sample path reports it
        return _reference(samples, tokenizer, seq_len, train_on_inputs)
    return _pack_arrays([p[0] for p in pairs], [p[1] for p in pairs], seq_len)


def _reference(samples: Sequence[Sample], tokenizer: Any, seq_len: int, train_on_inputs: bool) -> Encoded:
    examples = [tokenize_sample(sample, tokenizer, train_on_inputs) for sample in samples]
    return _pack_arrays([e.input_ids for e in examples], [[label != -100 for label in e.labels] for e in examples],
                        seq_len)


def _encode_chats(samples: Sequence[Sample], encoder: FastEncoder, train_on_inputs: bool) -> list[tuple]:
    conversations = [s.messages for s in samples]
    fulls = encoder.render(conversations, add_generation_prompt=False)
    wanted = [(k, i) for k, messages in enumerate(conversations) for i in prompt_turns(messages)]
    rendered = encoder.render([conversations[k][:i] for k, i in wanted], add_generation_prompt=True)
    prompts: list[dict[int, str]] = [{} for _ in samples]
    for (k, i), text in zip(wanted, rendered):
        prompts[k][i] = text
    spans = [assistant_spans(full, prompts[k], conversations[k], encoder.markers, samples[k].where)
             for k, full in enumerate(fulls)]
    encodings = encoder.backend.encode_batch(fulls, add_special_tokens=False)
    out = []
    for full, sample_spans, encoding, sample in zip(fulls, spans, encodings, samples):
        ids, mask = _ids_and_mask(encoding, len(full), sample_spans, train_on_inputs)
        if sample.messages[-1]["role"] == "assistant" and not _closed(full, sample_spans[-1], encoder.markers):
            _end_with_eos(ids, mask, encoder.eos)
        out.append((ids, mask))
    return out


def _encode_completions(samples: Sequence[Sample], encoder: FastEncoder, train_on_inputs: bool) -> list[tuple]:
    texts = [s.prompt + s.completion for s in samples]
    encodings = encoder.backend.encode_batch(texts, add_special_tokens=True)
    out = []
    for text, sample, encoding in zip(texts, samples, encodings):
        ids, mask = _ids_and_mask(encoding, len(text), [(len(sample.prompt), len(text))], train_on_inputs)
        _end_with_eos(ids, mask, encoder.eos)
        out.append((ids, mask))
    return out


def _ids_and_mask(encoding: Any, n_chars: int, spans: Sequence[tuple[int, int]],
                  train_on_inputs: bool) -> tuple[list[int], list[bool]]:
    ids = encoding.ids
    if train_on_inputs:
        return ids, [True] * len(ids)
    mask = [False] * len(ids)
    for start, end in spans:
        first, _ = _boundary(encoding, n_chars, len(ids), start)
        _, stop = _boundary(encoding, n_chars, len(ids), end)
        mask[first:min(stop, len(ids))] = [True] * max(0, min(stop, len(ids)) - first)
    return ids, mask


def _boundary(encoding: Any, n_chars: int, n_tokens: int, c: int) -> tuple[int, int]:
    """(k, k or k + 1): tokens ending at or before character ``c``; k + 1 when token k straddles ``c``."""
    if c >= n_chars:
        return n_tokens, n_tokens
    j = encoding.char_to_token(c)
    if j is None:  # a character no token covers (a normaliser dropped it): count by the offsets
        offsets = encoding.offsets
        k = sum(1 for _, end in offsets if end <= c)
        return k, k + 1 if k < n_tokens and offsets[k][0] < c else k
    start, _ = encoding.token_to_chars(j)
    return j, j + 1 if start < c else j


def _end_with_eos(ids: list[int], mask: list[bool], eos: int | None) -> None:
    """As tokenize._end_with_eos, on a mask: the sequence ends in a trained EOS."""
    if eos is None:
        return
    if not ids or ids[-1] != eos:
        ids.append(eos)
        mask.append(True)
    else:
        mask[-1] = True


def _encode_documents(samples: Sequence[Sample], tokenizer: Any) -> Encoded:
    """Each document's ids (the tokenizer's special tokens included) followed by EOS; every token trained."""
    eos = tokenizer.eos_token_id
    docs = tokenizer([s.text for s in samples], add_special_tokens=True)["input_ids"]
    if eos is not None:
        docs = [list(ids) + [eos] for ids in docs]
    lengths = np.array([len(ids) for ids in docs], dtype=np.int64)
    ids = np.fromiter((t for doc in docs for t in doc), dtype=np.int64, count=int(lengths.sum()))
    return Encoded(ids, np.ones(len(ids), dtype=bool), lengths, np.maximum(lengths - 1, 0),
                   np.zeros(len(docs), dtype=bool))


def _pack_arrays(id_lists: list[list[int]], mask_lists: list[list[bool]], seq_len: int) -> Encoded:
    """Truncate each sample to ``seq_len`` and concatenate (the per-sample counts as ``Example.num_trained``)."""
    full = np.array([len(ids) for ids in id_lists], dtype=np.int64)
    lengths = np.minimum(full, seq_len)
    flat_ids: list[int] = []
    flat_mask: list[bool] = []
    for ids, mask, n in zip(id_lists, mask_lists, lengths.tolist()):
        flat_ids.extend(ids[:n] if len(ids) > n else ids)
        flat_mask.extend(mask[:n] if len(mask) > n else mask)
    ids = np.array(flat_ids, dtype=np.int64)
    trained = np.array(flat_mask, dtype=bool)
    starts = np.cumsum(lengths) - lengths
    counted = trained.copy()
    counted[starts[lengths > 0]] = False  # the first position is never predicted
    running = np.concatenate([[0], np.cumsum(counted, dtype=np.int64)])
    num_trained = running[starts + lengths] - running[starts]
    return Encoded(ids, trained, lengths, num_trained, full > seq_len)


def examples_of(encoded: Encoded, wheres: Sequence[str]):
    """The batch as :class:`~loraq.data.tokenize.Example` objects (for tests and small data)."""
    from loraq.data.tokenize import IGNORE_INDEX, Example

    out = []
    for s, start in enumerate(encoded.starts):
        n = int(encoded.lengths[s])
        ids = encoded.ids[start:start + n].tolist()
        mask = encoded.trained[start:start + n].tolist()
        out.append(Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], wheres[s]))
    return out


__all__ = ["Encoded", "FastEncoder", "encode_samples", "examples_of", "truncate"]
