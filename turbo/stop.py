"""Streamed output text and stop conditions of one sequence.

Three layers, one per role:
- IncrementalDetokenizer turns one token at a time into new text.  It decodes a
  short window of ids with some tokens of left context (prefix-offset decoding,
  as vLLM and TGI do), so decoders that depend on context (a Metaspace leading
  space) stay right, and it holds back text that ends in U+FFFD: with byte-level
  BPE a multi-byte UTF-8 character can be split over several tokens, and until
  its last byte arrives the decoder can only show a replacement character.
- StopStringMatcher finds stop strings in the text stream, also across token
  boundaries, and holds back any tail that may still grow into a stop string, so
  streamed text never contains part of a stop string that matches later.
- StopChecker combines the two with the token-level stops: stop_token_ids, eos
  (unless ignore_eos) and max_tokens.  A stop token or stop string wins over
  max_tokens when both happen on the same token.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmcompress.errors import LmcError
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason

# Prompt tokens decoded as left context of the first output token (vLLM uses 5).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of a sequence's output tokens, one token at a time.

    `_ids` holds a few tokens of left context whose text is already shown
    (ids[:read]), then the tokens whose text is not shown yet.  A step decodes
    ids[:read] and all of ids; the second's extra characters are the new text,
    shown once they no longer end in U+FFFD.  Older ids are dropped, so every
    decode is a few tokens long.

    Decoding calls the tokenizers backend directly (4-5x faster per call than
    tokenizer.decode, which wraps it) and so never cleans up tokenization spaces:
    that rewrite (" ." -> ".") looks across token boundaries and cannot be streamed.
    The result equals tokenizer.decode(ids, clean_up_tokenization_spaces=False).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise LmcError(
                f"{type(tokenizer).__name__} is not backed by the tokenizers library; "
                f"load the model's tokenizer.json with AutoTokenizer (a fast tokenizer)"
            )
        self._backend = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        context = [t for t in prompt_token_ids[-_CONTEXT_TOKENS:] if t not in self._special_ids]
        self._ids = context
        self._read = len(context)

    def step(self, token_id: int) -> str:
        """New text made visible by `token_id`; "" while it is held back or skipped."""
        if token_id in self._special_ids:
            return ""
        self._ids.append(token_id)
        return self._advance(hold_incomplete=True)

    def finish(self, unread: Iterable[int] = ()) -> str:
        """The held-back text, replacement characters included: nothing more will complete it.

        unread: tokens never passed to step(); their text comes out too, from the same one
        decode, so step() over them and then finish() would return the same text in pieces.
        """
        self._ids.extend(t for t in unread if t not in self._special_ids)
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        decode, skip = self._backend.decode, self._skip_special_tokens
        shown, extended = decode(self._ids[: self._read], skip), decode(self._ids, skip)
        if len(extended) <= len(shown) or (hold_incomplete and extended.endswith(_REPLACEMENT_CHAR)):
            return ""
        # The ids just shown become the left context of the next step.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return extended[len(shown) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text and says how much text is safe to show."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text fed, cut after a match at the end of the output
        self._shown = 0  # len(text) already returned

    def feed(self, new_text: str, final: bool = False) -> tuple[str, str | None]:
        """Add `new_text`; return (text safe to show now, the matched stop string or None).

        final: no more text follows, so nothing needs holding back.
        """
        if not self._stop:  # nothing to find or hold back
            self.text += new_text
            self._shown = len(self.text)
            return new_text, None
        # A new match must end inside new_text, so it starts at most longest - 1 characters earlier.
        search_from = max(len(self.text) - self._longest + 1, 0)
        self.text += new_text
        matches = [(at, s) for s in self._stop if (at := self.text.find(s, search_from)) >= 0]
        if matches:
            at, stop = min(matches, key=lambda match: match[0])
            self.text = self.text[: at + len(stop) if self._include else at]
            return self._show(len(self.text)), stop
        held = 0 if final else self._partial_stop_length()
        return self._show(len(self.text) - held), None

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        tail = self.text[-(self._longest - 1) :] if self._longest > 1 else ""
        return max(
            (k for s in self._stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
            default=0,
        )

    def _show(self, end: int) -> str:
        shown = self.text[self._shown : end]
        self._shown = end
        return shown


# Built per sequence per step: slotted and unfrozen, a quarter of a frozen dataclass's construction time.
@dataclass(slots=True)
class StreamDelta:
    """What one token added to a sequence's output."""

    text: str  # new output text to stream; "" while held back
    finish_reason: FinishReason | None  # STOP or LENGTH once the sequence is done
    stop_reason: str | int | None = None  # the stop string or stop token id; None for eos and length


class StopChecker:
    """One sequence's output text and stop decision, fed one sampled token at a time.

    eos_token_ids: the model's end tokens (generation_config may list several);
    they stop the sequence unless params.ignore_eos.  The text of a stop token or
    eos is left out of the output unless params.include_stop_str_in_output.
    stream_text: False when nobody reads the text before the sequence ends; then,
    unless stop strings need it, the text is decoded once at the end (the last delta
    carries all of it) instead of twice per token.
    """

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        eos_token_ids: Collection[int] = (),
        stream_text: bool = True,
    ) -> None:
        self._params = params
        self._stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        # Output tokens awaiting their one decode at the end; None while text streams.
        self._unread: list[int] | None = None if stream_text or params.stop else []
        self.num_output_tokens = 0
        self.finish_reason: FinishReason | None = None

    @property
    def output_text(self) -> str:
        """All output text so far, with any tail still held back from the stream (none of it before the
        end without stream_text); once finished, the output."""
        return self._matcher.text

    def append(self, token_id: int) -> StreamDelta:
        """Account for one sampled token; the sequence is done when finish_reason is set."""
        if self.finish_reason is not None:
            raise ValueError(f"sequence already finished ({self.finish_reason.value}); stop feeding it tokens")
        self.num_output_tokens += 1
        is_stop_token = token_id in self._stop_token_ids
        at_length = self.num_output_tokens >= self._params.max_tokens
        new_text = ""
        if not is_stop_token or self._params.include_stop_str_in_output:
            new_text = self._step_text(token_id)
        if is_stop_token or at_length:
            new_text += self._finish_text()
        text, stop_string = self._matcher.feed(new_text, final=is_stop_token or at_length)
        if stop_string is not None:
            return self._finish(text, FinishReason.STOP, stop_string)
        if is_stop_token:
            stop_reason = token_id if token_id in self._params.stop_token_ids else None
            return self._finish(text, FinishReason.STOP, stop_reason)
        if at_length:
            return self._finish(text, FinishReason.LENGTH, None)
        return StreamDelta(text, None)

    def flush(self) -> str:
        """The text still held back, for a sequence ended elsewhere (max_model_len, abort)."""
        text, _ = self._matcher.feed(self._finish_text(), final=True)
        return text

    def _step_text(self, token_id: int) -> str:
        if self._unread is None:
            return self._detokenizer.step(token_id)
        self._unread.append(token_id)
        return ""

    def _finish_text(self) -> str:
        text = self._detokenizer.finish(self._unread or ())
        if self._unread:
            self._unread.clear()
        return text

    def _finish(self, text: str, reason: FinishReason, stop_reason: str | int | None) -> StreamDelta:
        self.finish_reason = reason
        return StreamDelta(text, reason, stop_reason)
