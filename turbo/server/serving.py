"""The /v1/completions and /v1/chat/completions handlers over an AsyncEngine.

Each handler turns the body into prompt token ids and SamplingParams, checks
what the engine would only find out later (unknown model, prompt too long for
the context, token ids outside the vocabulary), waits for admission, and then
answers in one JSON body or as server-sent events:

    data: {chunk}\\n\\n ... data: [DONE]\\n\\n

Choice i of prompt p has index p * n + i, as in OpenAI's API.  An engine error
after the stream started arrives as a `data: {"error": {...}}` event before [DONE].
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from lmcompress.errors import LmcError
from lmcompress.turbo.async_engine import AsyncEngine
from lmcompress.turbo.outputs import CompletionOutput, RequestOutput
from lmcompress.turbo.sampler import TokenLogprobs
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason
from lmcompress.turbo.server.admission import AdmissionQueue, QueueFull
from lmcompress.turbo.server.chat_template import ChatRenderer
from lmcompress.turbo.server.generation import ClientGone, Generation, until_disconnect
from lmcompress.turbo.server.metrics import ServerMetrics
from lmcompress.turbo.server.openai_errors import OpenAIError, bad_value
from lmcompress.turbo.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatResponseMessage, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, ErrorBody, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob,
    _GenerationRequest,
)

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# What a response to a client that already left carries (nginx's "client closed request").
_CLIENT_CLOSED = 499
RETRY_AFTER_S = 1
_UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "echo", "suffix", "best_of", "tools")


@dataclass(frozen=True)
class ServedModel:
    """What the server tells clients about the model, and the limits it checks requests against.

    context_limit: most tokens (prompt + output) one request may reach: max_model_len,
    or the KV pool's capacity when that is smaller.
    """

    names: tuple[str, ...]
    max_model_len: int
    context_limit: int
    vocab_size: int
    created: int


def _sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


class _ChoiceFailed(Exception):
    """The engine ended a choice with an error (a failed forward pass)."""


def _finish_reason(choice: CompletionOutput) -> str | None:
    if choice.finish_reason is FinishReason.ERROR:
        raise _ChoiceFailed(choice.error or "the engine failed this request; retry it")
    return None if choice.finish_reason is None else choice.finish_reason.value


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: PreTrainedTokenizerBase, model: ServedModel,
                 admission: AdmissionQueue, metrics: ServerMetrics, chat: ChatRenderer):
        self.engine, self.tokenizer, self.model = engine, tokenizer, model
        self.admission, self.metrics, self.chat = admission, metrics, chat

    def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self.model.created, max_model_len=self.model.max_model_len)
                               for name in self.model.names])

    # --- /v1/completions ------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        name = self._check_common(body)
        prompts = self._completion_prompts(body.prompt)
        params = self._sampling_params(body, body.max_tokens, body.logprobs)
        for prompt in prompts:
            self._check_length(prompt, params.max_tokens)
        generation = await self._start(request, prompts, params, f"cmpl-{uuid.uuid4().hex}", body.stream)
        response = _CompletionAnswer(self, generation, name, params.n)
        if body.stream:
            return StreamingResponse(response.stream(_include_usage(body)), media_type="text/event-stream")
        return await self._answer_whole(request, response)

    def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            texts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            texts = [prompt]
        else:
            texts = prompt
        if not texts:
            raise OpenAIError(400, "prompt is an empty list; send a string, strings or token ids", param="prompt")
        prompts = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in texts]
        vocab = self.model.vocab_size
        for ids in prompts:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise OpenAIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab}); "
                                       "send ids from this model's tokenizer", param="prompt")
        return prompts

    # --- /v1/chat/completions -------------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        name = self._check_common(body)
        if body.response_format is not None and body.response_format.type != "text":
            raise OpenAIError(400, f"response_format {body.response_format.type!r} is not supported; "
                                   "remove response_format or use type 'text'", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true; set logprobs or drop top_logprobs",
                              param="top_logprobs")
        prompt = self.chat.token_ids(self._messages(body))
        room = self.model.context_limit - len(prompt)
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), max(room, 1))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._sampling_params(body, max_tokens, logprobs)
        self._check_length(prompt, params.max_tokens)
        generation = await self._start(request, [prompt], params, f"chatcmpl-{uuid.uuid4().hex}", body.stream)
        response = _ChatAnswer(self, generation, name, params.n)
        if body.stream:
            return StreamingResponse(response.stream(_include_usage(body)), media_type="text/event-stream")
        return await self._answer_whole(request, response)

    @staticmethod
    def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
        messages = []
        for i, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                kinds = {part.type for part in content}
                if kinds - {"text"}:
                    raise OpenAIError(400, f"messages[{i}] has {sorted(kinds - {'text'})} content; this "
                                           "server takes text only", param="messages")
                content = "\n".join(part.text or "" for part in content)
            messages.append({"role": message.role, "content": content or ""})
        return messages

    # --- shared steps ---------------------------------------------------------------------------

    def _check_common(self, body: _GenerationRequest) -> str:
        """The model name to answer with, after refusing what this server cannot honour."""
        name = body.model if body.model is not None else self.model.names[0]
        if name not in self.model.names:
            raise OpenAIError(404, f"model {name!r} is not served here; use one of {list(self.model.names)} "
                                   "(GET /v1/models)", param="model", code="model_not_found")
        for field in _UNSUPPORTED:
            value = getattr(body, field, None)
            if value not in (None, False, 0, 0.0, {}, []) and not (field == "best_of" and value == (body.n or 1)):
                raise OpenAIError(400, f"{field} is not supported by lmc serve; remove it from the request",
                                  param=field, code="unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise OpenAIError(400, "stream_options needs stream: true; set stream or drop stream_options",
                              param="stream_options")
        return name

    @staticmethod
    def _sampling_params(body: _GenerationRequest, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                     min_p=body.min_p, seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
                     n=body.n, ignore_eos=body.ignore_eos, repetition_penalty=body.repetition_penalty,
                     logprobs=logprobs)
        try:
            return SamplingParams(**{field: value for field, value in given.items() if value is not None})
        except LmcError as exc:
            raise bad_value(exc) from exc

    def _check_length(self, prompt: Sequence[int], max_tokens: int) -> None:
        limit = self.model.context_limit
        if not prompt:
            raise OpenAIError(400, "the prompt has no tokens; send at least one", param="prompt")
        if len(prompt) + max_tokens > limit:
            raise OpenAIError(
                400, f"this model's context holds {limit} tokens, but the request needs {len(prompt) + max_tokens} "
                     f"({len(prompt)} in the prompt, {max_tokens} to generate); shorten the prompt or lower "
                     "max_tokens", param="max_tokens" if len(prompt) < limit else "prompt",
                code="context_length_exceeded")

    async def _start(self, request: Request, prompts: list[list[int]], params: SamplingParams,
                     request_id: str, stream: bool) -> Generation:
        """Wait for admission (or answer 429/503), then start the engine requests (stream: the client reads
        text as it is made; else the engine decodes each choice's text once, at its end)."""
        weight = params.n * len(prompts)
        if weight > self.admission.slots:
            raise OpenAIError(400, f"n * number of prompts is {weight}, more than the {self.admission.slots} "
                                   "sequences this server runs at once; send fewer prompts or a smaller n",
                              param="n")
        self._check_alive()
        timer = self.metrics.timer()
        try:
            seconds_queued = await until_disconnect(request, self.admission.admit(weight))
        except QueueFull:
            raise OpenAIError(429, f"the server queue is full ({self.admission.max_waiting} requests wait "
                                   f"already); retry after {RETRY_AFTER_S} s", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        timer.admitted(seconds_queued)
        return Generation(self.engine, prompts, params, request_id, timer, self.admission.release, stream_text=stream)

    def _check_alive(self) -> None:
        if not self.engine.is_alive:
            raise OpenAIError(503, "the turbo engine is not running; restart lmc serve",
                              code="engine_dead")

    async def _answer_whole(self, request: Request, answer: _Answer) -> Response:
        try:
            body = await until_disconnect(request, answer.whole())
        except ClientGone:
            answer.generation.close()
            return Response(status_code=_CLIENT_CLOSED)
        except (_ChoiceFailed, LmcError) as exc:
            self._check_alive()
            raise OpenAIError(500, str(exc), code="engine_error") from exc
        return JSONResponse(body.model_dump())

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _include_usage(body: _GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class _Answer(ABC):
    """One response's shape: whole() builds the JSON body, stream() the SSE events."""

    def __init__(self, serving: OpenAIServing, generation: Generation, model_name: str, n: int):
        self.serving, self.generation, self.model_name, self.n = serving, generation, model_name, n
        self.created = int(time.time())

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for event in self._events(include_usage):
                yield event
        finally:  # also when the client left before the engine's first output was read
            self.generation.close()

    async def _events(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            for event in self.opening():
                yield _sse(event)
            async for index, out in self.generation.outputs():
                for choice in out.outputs:
                    if choice.text or choice.finished or choice.logprobs:
                        yield _sse(self.chunk(index * self.n + choice.index, choice))
            if include_usage:
                yield _sse(self.usage_chunk())
        except (_ChoiceFailed, LmcError) as exc:
            logger.warning("lmc serve: request %s failed mid-stream: %s", self.generation.request_id, exc)
            yield _sse(ErrorResponse(error=ErrorBody(message=str(exc), type="internal_server_error",
                                                     code="engine_error")))
        yield SSE_DONE

    def opening(self) -> Iterable[BaseModel]:
        return ()

    @abstractmethod
    async def whole(self) -> BaseModel:
        """The non-streamed response body."""

    @abstractmethod
    def chunk(self, index: int, choice: CompletionOutput) -> BaseModel:
        """The stream event for one choice's delta."""

    @abstractmethod
    def usage_chunk(self) -> BaseModel:
        """The last event with include_usage: usage and no choices."""

    def choices(self, outputs: dict[int, RequestOutput]) -> Iterable[tuple[int, CompletionOutput]]:
        for prompt_index in sorted(outputs):
            for choice in outputs[prompt_index].outputs:
                yield prompt_index * self.n + choice.index, choice


class _CompletionAnswer(_Answer):
    def __init__(self, *args):
        super().__init__(*args)
        self._text_offsets: dict[int, int] = {}  # choice index -> characters streamed so far

    async def whole(self) -> CompletionResponse:
        outputs = await self.generation.collect()
        choices = [CompletionChoice(index=index, text=choice.text, logprobs=self._logprobs(index, choice),
                                    finish_reason=_finish_reason(choice), stop_reason=choice.stop_reason)
                   for index, choice in self.choices(outputs)]
        return self._response(choices, usage=self.generation.usage())

    def chunk(self, index: int, choice: CompletionOutput) -> CompletionResponse:
        return self._response([CompletionChoice(index=index, text=choice.text, logprobs=self._logprobs(index, choice),
                                                finish_reason=_finish_reason(choice),
                                                stop_reason=choice.stop_reason)])

    def usage_chunk(self) -> CompletionResponse:
        return self._response([], usage=self.generation.usage())

    def _response(self, choices: list[CompletionChoice], usage=None) -> CompletionResponse:
        return CompletionResponse(id=self.generation.request_id, created=self.created, model=self.model_name,
                                  choices=choices, usage=usage)

    def _logprobs(self, index: int, choice: CompletionOutput) -> CompletionLogprobs | None:
        if choice.logprobs is None:
            return None
        result = CompletionLogprobs()
        offset = self._text_offsets.get(index, 0)
        for token_id, step in zip(choice.token_ids, choice.logprobs):
            text = self.serving.token_text(token_id)
            top = {self.serving.token_text(t): logprob for t, logprob in step.top}
            top.setdefault(text, step.logprob)
            result.tokens.append(text)
            result.token_logprobs.append(step.logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return result


class _ChatAnswer(_Answer):
    async def whole(self) -> ChatCompletionResponse:
        outputs = await self.generation.collect()
        choices = [ChatChoice(index=index, message=ChatResponseMessage(content=choice.text),
                              logprobs=self._logprobs(choice), finish_reason=_finish_reason(choice),
                              stop_reason=choice.stop_reason)
                   for index, choice in self.choices(outputs)]
        return ChatCompletionResponse(id=self.generation.request_id, created=self.created, model=self.model_name,
                                      choices=choices, usage=self.generation.usage())

    def opening(self) -> Iterable[ChatCompletionChunk]:
        # OpenAI streams the role first, once per choice, before any content.
        for index in range(self.n):
            yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])

    def chunk(self, index: int, choice: CompletionOutput) -> ChatCompletionChunk:
        delta = ChatDelta(content=choice.text or None)
        return self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(choice),
                                            finish_reason=_finish_reason(choice), stop_reason=choice.stop_reason)])

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], usage=self.generation.usage())

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.generation.request_id, created=self.created, model=self.model_name,
                                   choices=choices, usage=usage)

    def _logprobs(self, choice: CompletionOutput) -> ChatLogprobs | None:
        if choice.logprobs is None:
            return None
        steps = zip(choice.token_ids, choice.logprobs)
        return ChatLogprobs(content=[self._token_logprob(token_id, step) for token_id, step in steps])

    def _token_logprob(self, token_id: int, step: TokenLogprobs) -> TokenLogprob:
        text = self.serving.token_text(token_id)
        top = [self._top(t, logprob) for t, logprob in step.top]
        return TokenLogprob(token=text, logprob=step.logprob, bytes=list(text.encode()), top_logprobs=top)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.serving.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))
