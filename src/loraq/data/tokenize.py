"""Samples to token ids and labels: chat templates and loss masks.

Contract (labels follow the Hugging Face convention: aligned with
``input_ids``, the model shifts them, ``-100`` = no loss):

* ``chat`` samples are rendered with the tokenizer's chat template (ChatML
  when it has none) and tokenized as one string, exactly as
  ``tokenizer.apply_chat_template(messages, tokenize=True)`` does. Trained
  tokens: every assistant turn's content plus the end-of-turn marker that
  closes it (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3, ...), but
  not the newline after it nor the ``<|im_start|>assistant\\n`` header. When
  the template closes the final assistant turn with nothing, EOS is appended
  (and trained) so that the model learns to stop.
* ``completion`` samples are ``prompt + completion`` as plain text (the
  tokenizer's own BOS, if it adds one) followed by EOS; trained: the
  completion's tokens and that EOS.
* ``train_on_inputs=True`` trains every token.
* ``text`` samples are joined, each followed by EOS, and cut into ``seq_len``
  chunks (see :func:`tokenize_documents`); every token is trained.

How assistant spans are found: the conversation is rendered in full once;
for each assistant turn the prompt up to it (``messages[:i]`` with the
generation prompt) is rendered too, and when it is a prefix of the full text
(true of every common template) the turn's content is located right after
it; otherwise it is searched for after the contents of the turns before it. Character
spans become token spans by tokenizing the text up to each span boundary and
comparing with the full tokenization (a token that straddles a boundary is
trained).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraq.data.formats import Sample
from loraq.errors import DataError

IGNORE_INDEX = -100

# used when a tokenizer has no chat template of its own
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"


@dataclass
class Example:
    """One tokenized example: ``labels[t]`` is ``input_ids[t]`` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """Tokens that carry loss: labelled positions after the first (the first is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or ChatML when it has none."""
    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def render_chat(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = False, where: str = "") -> str:
    """The conversation as text, through the tokenizer's chat template (ChatML if none)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template(tokenizer))
    except Exception as exc:  # jinja's TemplateError, or a template's raise_exception(...)
        raise DataError(f"{where or 'data'}: the model's chat template refuses this conversation "
                        f"({type(exc).__name__}: {exc}); fix the roles or pass --format") from None


def end_markers(tokenizer: Any) -> list[str]:
    """Strings that may close a turn: the tokenizer's special tokens (not BOS/UNK, nor a PAD other than
    EOS, which never close one), and ChatML's ``<|im_end|>``; longest first."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token.content))
    never = {tokenizer.bos_token, tokenizer.unk_token}
    if tokenizer.pad_token != tokenizer.eos_token:
        never.add(tokenizer.pad_token)
    return sorted((specials - never) | {CHATML_END}, key=len, reverse=True)


def _end_of_turn(text: str, end: int, markers: Sequence[str]) -> int:
    """Extend a content span over the end-of-turn marker that follows it (only whitespace between)."""
    rest = text[end:]
    gap = len(rest) - len(rest.lstrip())
    for marker in markers:
        if rest.startswith(marker, gap):
            return end + gap + len(marker)
    return end


def chat_spans(tokenizer: Any, messages: Sequence[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of each assistant turn's content + end-of-turn marker)."""
    full = render_chat(tokenizer, messages, where=where)
    prompts = {i: render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where)
               for i in prompt_turns(messages)}
    return full, assistant_spans(full, prompts, messages, end_markers(tokenizer), where)


def prompt_turns(messages: Sequence[dict]) -> list[int]:
    """Indices ``i`` of the assistant turns whose prompt (``messages[:i]`` + generation prompt) locates them."""
    return [i for i, message in enumerate(messages) if i > 0 and message["role"] == "assistant"]


def assistant_spans(full: str, prompts: dict[int, str], messages: Sequence[dict], markers: Sequence[str],
                    where: str = "") -> list[tuple[int, int]]:
    """Character spans of each assistant turn (content + end-of-turn marker) in the rendered ``full`` text.

    ``prompts[i]`` is ``messages[:i]`` rendered with the generation prompt, for
    each ``i`` of :func:`prompt_turns` (see the module docstring for how they are used).
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        content, start = _find_content(full, message["content"], cursor)
        if message["role"] != "assistant":
            # walking past the other turns keeps an answer that repeats the question from matching inside it
            cursor = cursor if start < 0 else start + len(content)
            continue
        if i > 0:
            prompt = prompts[i]
            if full.startswith(prompt) and len(prompt) > cursor:
                content, start = _find_content(full, message["content"], len(prompt))
        if start < 0:
            raise DataError(f"{where}: the chat template does not reproduce assistant turn {i + 1} verbatim, so its "
                            f"tokens cannot be found; use a model whose template keeps the content")
        end = _end_of_turn(full, start + len(content), markers)
        spans.append((start, end))
        cursor = end
    return spans


def _find_content(text: str, content: str, start: int) -> tuple[str, int]:
    """(the content as the template wrote it, its position at or after ``start``, or -1)."""
    at = text.find(content, start)
    if at < 0:  # templates often trim the content
        content = content.strip()
        at = text.find(content, start)
    return content, at


def _closed(text: str, span: tuple[int, int], markers: Sequence[str]) -> bool:
    return any(text.endswith(marker, 0, span[1]) for marker in markers)


def common_prefix(*sequences: Sequence[int]) -> int:
    """How many leading items every one of ``sequences`` shares."""
    n = 0
    for items in zip(*sequences):
        if any(item != items[0] for item in items):
            break
        n += 1
    return n


def tokenize_with_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool,
                        train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels that are trained on the character ``spans`` (all, with train_on_inputs)."""
    boundaries = sorted({c for span in spans for c in span})
    encoded = tokenizer([text] + [text[:c] for c in boundaries], add_special_tokens=add_special_tokens)["input_ids"]
    ids = list(encoded[0])
    if train_on_inputs:
        return ids, list(ids)
    start_token, end_token = {}, {}
    for c, prefix in zip(boundaries, encoded[1:]):
        shared = common_prefix(ids, prefix)
        start_token[c] = shared  # a token straddling a span start is trained
        end_token[c] = shared if shared == len(prefix) else shared + 1  # ... and one straddling its end too
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for t in range(start_token[start], min(end_token[end], len(ids))):
            labels[t] = ids[t]
    return ids, labels


def tokenize_sample(sample: Sample, tokenizer: Any, train_on_inputs: bool = False) -> Example:
    """A ``chat`` or ``completion`` sample as one Example (not truncated); text goes through tokenize_documents."""
    if sample.kind == "chat":
        text, spans = chat_spans(tokenizer, sample.messages, sample.where)
        # the template writes BOS itself where the model wants one, as apply_chat_template(tokenize=True) assumes
        ids, labels = tokenize_with_spans(tokenizer, text, spans, add_special_tokens=False,
                                          train_on_inputs=train_on_inputs)
        if sample.messages[-1]["role"] == "assistant" and not _closed(text, spans[-1], end_markers(tokenizer)):
            _end_with_eos(ids, labels, tokenizer.eos_token_id)
        return Example(ids, labels, sample.where)
    if sample.kind == "completion":
        text = sample.prompt + sample.completion
        ids, labels = tokenize_with_spans(tokenizer, text, [(len(sample.prompt), len(text))], add_special_tokens=True,
                                          train_on_inputs=train_on_inputs)
        _end_with_eos(ids, labels, tokenizer.eos_token_id)
        return Example(ids, labels, sample.where)
    raise ValueError(f"tokenize_sample takes chat or completion samples, not {sample.kind!r}")


def _end_with_eos(ids: list[int], labels: list[int], eos: int | None) -> None:
    """Make the sequence end in a trained EOS (appended unless the tokenizer already put one there)."""
    if eos is None:
        return
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    else:
        labels[-1] = eos


def truncate(example: Example, seq_len: int) -> tuple[Example, bool]:
    """(the first ``seq_len`` tokens, whether anything was cut)."""
    if len(example) <= seq_len:
        return example, False
    return Example(example.input_ids[:seq_len], example.labels[:seq_len], example.where), True


def tokenize_documents(samples: Sequence[Sample], tokenizer: Any, seq_len: int) -> list[Example]:
    """Plain text: every document (+ EOS) one after another, cut into chunks of ``seq_len`` tokens.

    Every token is trained. The last chunk may be shorter; a chunk of one token
    (nothing to predict) is left out.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    if samples:
        for ids in tokenizer([s.text for s in samples], add_special_tokens=True)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    chunks = []
    for start in range(0, len(stream), seq_len):
        ids = stream[start:start + seq_len]
        if len(ids) > 1:
            chunks.append(Example(ids, list(ids),
                                  f"{samples[0].where.rsplit(':', 1)[0]}: tokens {start}..{start + len(ids)}"))
    return chunks
