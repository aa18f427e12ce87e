"""Scoring by prompt logprobs (vLLM, SGLang, ...): one request per response instead of one per
position.

The prompt is the chat template's rendering of the user prompt up to where the assistant's
answer starts (vLLM's ``/tokenize`` with ``messages`` and ``add_generation_prompt``), followed by
Model 1's response, all as token ids; ``prompt_logprobs`` then gives Model 2's top-k before
every token of the response — its distribution at every position — in one answer.

Which ids stand for the response:

- **the token path**: when the server's ``/tokenize`` of the response text gives exactly Model
  1's token ids (one tokenizer), Model 1's ids are sent and position ``p`` is prompt token
  ``template + p``: every position gets its value.
- **the text path**: otherwise the server's own tokens of the text are sent, and each of Model
  1's tokens is matched with the server token covering exactly the same characters. A position
  without such a token — the two tokenizers split the text differently there, or the server's
  decoded tokens stop reproducing the text — is recorded as a failure with the reason; it is
  never given the distribution of another position. ``--method prefill`` can fill those.

Model 1's first token without text after the response (an end-of-sequence token) gets the
distribution after the whole response: the logprobs of the one token the request generates.

A position whose top-k list is not what was asked for (too short without being the whole
distribution, a token twice: :mod:`klstream.backends.checks`) is recorded as a failure with the
reason. A response that does not fit the server's context (its ``max_model_len``, with the one token
generated) is a recorded failure for its positions. Results are rows of the same scores table as
the prefill method's (:func:`klstream.scoring.work.result_rows`); ``attempts`` and
``latency_ms`` are those of the response's request, ``chosen_*`` is Model 2's most likely token
there (nothing is generated at that position) and ``finish_reason`` is null; the request's
usage is on the first of its rows. The server's dialect (how it is asked,
:mod:`klstream.backends.dialects`) and what the first answer showed
(:func:`~klstream.preflight.scores_capabilities`) are recorded in ``run.json`` once the first
response is in.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from klstream.backends import checks, open_prompt_scoring
from klstream.backends.base import Answer, Generated, PromptScores, PromptScoring, Tokenized
from klstream.backends.prices import Usage
from klstream.backends.transport import Caller, Outcome, Retried
from klstream.preflight import scores_capabilities
from klstream.scoring.pool import work_through
from klstream.scoring.runconfig import save_config
from klstream.scoring.session import Scheduler, Session
from klstream.scoring.work import Response, WorkItem, pending_responses, result_rows

TEMPLATE_CACHE_SIZE = 1024
"""Prompts whose chat-template tokens are kept: responses arrive grouped by input file, and the
responses of one file share their prompt."""


def _spans(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Start and end character offsets of consecutive tokens."""
    lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
    ends = np.cumsum(lengths)
    return ends - lengths, ends


def common_prefix_length(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    size = min(len(a), len(b))
    left = np.frombuffer(a[:size].encode("utf-32-le"), np.uint32)
    right = np.frombuffer(b[:size].encode("utf-32-le"), np.uint32)
    differ = np.flatnonzero(left != right)
    return int(differ[0]) if differ.size else size


def text_token_count(tokens: list[str]) -> int:
    """Tokens up to the last one with text: what follows (end of sequence) is not in the text."""
    count = len(tokens)
    while count and not tokens[count - 1]:
        count -= 1
    return count


def _with_end(match: np.ndarray, tokens: list[str], text_length: int, after: int) -> np.ndarray:
    """Model 1's first token without text after the text's end (its end of sequence, say) gets
    Model 2's distribution after the whole text, index ``after``."""
    count = text_token_count(tokens)
    if count < len(tokens):
        match = match.copy()
        match[count] = after
    return match


@dataclass(frozen=True)
class Alignment:
    """Model 1's tokens of a text against Model 2's tokens of the same text.

    ``match[p]`` is the index of Model 2's token covering exactly the characters of Model 1's
    token ``p``, ``len(model2)`` for Model 2's distribution after the whole text, or -1 where
    Model 2 has no distribution for the position. Model 2's tokens are trusted only as far as
    they reproduce the text (``reproduced`` characters). A match means both models condition on
    the same text before the token and predict the same span, so Model 2's distribution there
    belongs to Model 1's position.
    """

    model1: list[str]
    model2: list[str]
    reproduced: int
    match: np.ndarray

    @classmethod
    def of(cls, text: str, model1: list[str], model2: list[str]) -> Alignment:
        reproduced = common_prefix_length("".join(model2), text)
        match = np.full(len(model1), -1, np.int64)
        if model1 and model2:
            start1, end1 = _spans(model1)
            start2, end2 = _spans(model2)
            last = len(model2) - 1
            nearest = np.clip(np.searchsorted(start2, start1, side="right") - 1, 0, last)
            same = (start2[nearest] == start1) & (end2[nearest] == end1) & (end1 <= reproduced)
            match = np.where(same, nearest, -1)
        return cls(model1, model2, reproduced, _with_end(match, model1, len(text), len(model2)))

    @classmethod
    def identical(cls, tokens: list[str]) -> Alignment:
        """Model 2's tokens are Model 1's (same ids) up to the end of the text."""
        count = text_token_count(tokens)
        match = np.full(len(tokens), -1, np.int64)
        match[:count] = np.arange(count)
        text_length = sum(map(len, tokens))
        return cls(
            tokens, tokens[:count], text_length, _with_end(match, tokens, text_length, count)
        )

    def reason(self, position: int) -> str:
        """Why Model 1's token at ``position`` has no counterpart among Model 2's tokens."""
        start1, end1 = _spans(self.model1)
        start, end = int(start1[position]), int(end1[position])
        if start == end:
            return (
                "Model 1's token here has no text: prompt logprobs give a distribution for such "
                "a token only right after the response's text; score it with the prefill method"
            )
        if end > self.reproduced:
            return (
                "prompt logprobs cannot place this token: the server's decoded tokens stop "
                f"reproducing the response text at character {self.reproduced}, before this "
                f"token's end ({end}); score it with the prefill method"
            )
        start2, end2 = _spans(self.model2)
        first = int(np.searchsorted(end2, start, side="right"))
        last = int(np.searchsorted(start2, end, side="left"))
        return (
            f"Model 2's tokenizer splits this text differently: Model 1's token "
            f"{self.model1[position]!r} (characters {start}..{end}) against Model 2's "
            f"{self.model2[first:last]!r}; score it with the prefill method"
        )


NO_AFTER = (
    "the server returned no logprobs for the token after the response (the completion's own "
    "logprobs); score it with the prefill method"
)


class PromptLogprobsScheduler(Scheduler):
    """Scores pending responses one request each: the first response alone, as the probe,
    then up to ``max_concurrent`` at once."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.templates: OrderedDict[str, asyncio.Task[Retried[Tokenized]]] = OrderedDict()

    async def run(self) -> None:
        session = self.session
        options = session.options
        responses = pending_responses(session.run.root, options.model2, options.range_positions)
        async with open_prompt_scoring(session.endpoint, options.settings) as server:
            caller = session.caller()
            try:
                await self._probe_then_pipeline(caller, server, responses)
            finally:
                for task in self.templates.values():
                    task.cancel()
                await asyncio.gather(*self.templates.values(), return_exceptions=True)

    async def _probe_then_pipeline(
        self, caller: Caller, server: PromptScoring, responses: AsyncIterator[Response]
    ) -> None:
        probe = self.session.probe
        first = await anext(responses, None)
        if first is None:
            return
        probe.saw(await self.score_response(caller, server, first, probe.deadline))
        if not probe.succeeded:
            raise probe.failure()
        self._record_dialect(server.dialect)

        async def score(response: Response) -> None:
            await self.score_response(caller, server, response)

        options = self.session.options
        await work_through(
            responses,
            score,
            options.max_concurrent,
            self.session.checkpoint,
            options.checkpoint_seconds,
        )

    def _record_dialect(self, dialect: str | None) -> None:
        """Write the server's dialect into ``run.json`` (which way was found, when ``auto``)."""
        session = self.session
        if dialect is not None and session.config.get("dialect") != dialect:
            session.config["dialect"] = dialect
            save_config(session.run, session.options.model2, session.config)

    async def _template(
        self, caller: Caller, server: PromptScoring, prompt: str, probe_deadline: float | None
    ) -> Retried[Tokenized]:
        """The prompt's chat-template tokens, asked once for all the responses that share it."""
        task = self.templates.get(prompt)
        if task is None:
            task = asyncio.create_task(
                caller.retried(lambda: server.template_tokens(prompt), probe_deadline)
            )
            self.templates[prompt] = task
            if len(self.templates) > TEMPLATE_CACHE_SIZE:
                self.templates.popitem(last=False)
        result = await task
        if result.value is None and self.templates.get(prompt) is task:
            del self.templates[prompt]  # the next response asks again
        return result

    async def score_response(
        self,
        caller: Caller,
        server: PromptScoring,
        response: Response,
        probe_deadline: float | None = None,
    ) -> str | None:
        """Score the response's pending positions; the error text if its requests failed."""
        template = await self._template(caller, server, response.prompt, probe_deadline)
        if template.value is None:
            return await self._fail(response, template)
        text = response.text
        tokens = [token.text for token in response.tokens]
        server_ids = await caller.retried(lambda: server.text_tokens(text), probe_deadline)
        if server_ids.value is None:
            return await self._fail(response, server_ids)
        response_ids = server_ids.value.tokens
        model1_ids = [token.token_id for token in response.tokens]
        own_ids = response_ids == model1_ids[: text_token_count(tokens)]
        prompt_ids = template.value.tokens + response_ids
        limit = template.value.max_model_len
        if limit is not None and len(prompt_ids) + 1 > limit:
            error = (
                f"the prompt's {len(template.value.tokens)} tokens and the response's "
                f"{len(response_ids)} do not fit the server's context of {limit} tokens with "
                "the one token generated"
            )
            rows = self._failure_rows(response, Retried(None, error, 0, 0.0))
            await self.session.record(rows, answered=True)
            return None
        start = len(template.value.tokens)
        top_logprobs = self.session.options.top_logprobs
        answer = await caller.retried(
            lambda: server.prompt_logprobs(prompt_ids, top_logprobs, start), probe_deadline
        )
        if answer.value is None:
            return await self._fail(response, answer)
        if self.session.capabilities is None:
            options = self.session.options
            found = scores_capabilities(
                answer.value, options.top_logprobs, options.model2, server.dialect
            )
            self.session.judged(found)
        if own_ids:
            alignment = Alignment.identical(tokens)
        else:
            decoded = [token.token.token for token in answer.value.tokens]
            alignment = Alignment.of(text, tokens, decoded)
        await self._record(response, alignment, answer.value, answer)
        return None

    async def _record(
        self,
        response: Response,
        alignment: Alignment,
        scores: PromptScores,
        answer: Retried[PromptScores],
    ) -> None:
        """One row per pending position: Model 2's top-k there, or why it has none. The
        request's usage goes on the first row, so that sums over the table count it once."""
        tops = [token.top for token in scores.tokens] + [scores.after]
        dropped = [token.dropped for token in scores.tokens] + [scores.after_dropped]
        model2 = self.session.options.model2
        top_logprobs = self.session.options.top_logprobs
        usage = scores.usage
        rows = []
        for position in np.flatnonzero(np.asarray(response.pending, bool)).tolist():
            item = WorkItem(response.stem, response.response_index, position, response.prompt, "")
            match = int(alignment.match[position])
            top = tops[match] if match >= 0 else None
            problem = checks.list_problem(top, top_logprobs) if top else None
            if top and problem is None:
                step = Generated(top[0], top, dropped=dropped[match])
                scored = Answer([step], "", None, usage, scores.served_model)
                usage = Usage()
                outcome = Outcome(scored, None, answer.attempts, answer.latency_ms)
            else:
                reason = problem or (alignment.reason(position) if match < 0 else NO_AFTER)
                outcome = Outcome(None, reason, answer.attempts, answer.latency_ms)
            rows += result_rows(item, model2, outcome)
        await self.session.record(rows, answered=True, usage=scores.usage)

    def _failure_rows(self, response: Response, failed: Retried[Any]) -> list[dict[str, Any]]:
        """The same error at every pending position of the response."""
        outcome = Outcome(None, failed.error or "no answer", failed.attempts, failed.latency_ms)
        rows = []
        for position in np.flatnonzero(np.asarray(response.pending, bool)).tolist():
            item = WorkItem(response.stem, response.response_index, position, response.prompt, "")
            rows += result_rows(item, self.session.options.model2, outcome)
        return rows

    async def _fail(self, response: Response, failed: Retried[Any]) -> str:
        """A request of the response failed: record it at every pending position."""
        await self.session.record(self._failure_rows(response, failed), answered=False)
        return failed.error or "no answer"
