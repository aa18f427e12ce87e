"""Scoring by prefill, with speculative lookahead, in one global async pipeline.

Each response's pending positions form chains (:mod:`klstream.scoring.lookahead`): a request at
the chain's next position asks for up to N tokens, and every step whose generated predecessors
are Model 1's tokens is stored as that position's result, so the next request starts at the
first position not yet covered. Requests within a chain go in increasing position (each prefix
extends the last, which the service's implicit cache rewards); many chains run at once, sharing
the session's adaptive limiter. The first requests are probes
(:class:`~klstream.scoring.pool.Probe`). Before greedy lookahead is used, a consistency probe
checks that the service's logprobs do not depend on the sampling settings.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from klstream.backends import checks, open_prefill
from klstream.backends.base import Answer, Prefill
from klstream.backends.prices import USAGE_FIELDS, Price
from klstream.backends.transport import Caller
from klstream.errors import GreedyInconsistent
from klstream.scoring import acceptance, lookahead
from klstream.scoring.acceptance import AcceptanceModel
from klstream.scoring.greedy_probe import GreedyProbeLog, ProbeSite
from klstream.scoring.lookahead import Token
from klstream.scoring.pool import work_through
from klstream.scoring.runconfig import save_config
from klstream.scoring.session import Scheduler, Session
from klstream.scoring.work import (
    Response,
    acceptance_so_far,
    chosen_tokens,
    pending_responses,
    prefill_request,
    result_rows,
    usage_columns,
)

AUTO_PRICES_FALLBACK = "gemini-2.5-flash"
"""Whose prices ``--lookahead auto`` weighs input against output tokens with when Model 2 has no
entry in the price table (the toy models of the emulator, say)."""
PROBE_SITES = 3
"""Chains the greedy consistency probe starts with: one greedy request each, the only requests
spent on the probe alone."""
PROBE_STEPS = 4
"""Tokens each greedy probe request asks for: its accepted steps are compared with one-token
answers at the same prefixes."""
FIRST_PROBES = 3
"""Probe requests at most before the run goes concurrent, if none has had a prefill yet (a
model that refuses prefill must show it before thousands of requests are in flight)."""
WORKERS_PER_SLOT = 8
"""Chains in progress per slot of ``max_concurrent``: while some wait out a back-off, others
use the slots; the limiter alone bounds the requests in flight."""


@dataclass
class Chain:
    """Pending positions ``next`` to ``end`` of one response, covered request after request."""

    response: Response
    next: int
    end: int

    @property
    def done(self) -> bool:
        return self.next >= self.end


async def pending_chains(
    responses: AsyncIterator[Response],
    cap: int,
    predict: Callable[[np.ndarray], np.ndarray],
) -> AsyncIterator[Chain]:
    """The chains over the positions without a successful result, in key order: each
    response's runs of pending positions, cut into pieces of at most ``cap`` where a run of
    accepted steps is likely to break anyway (``predict`` gives the chance of acceptance from
    a response's :attr:`~klstream.scoring.work.Response.features`, as the run knows it when the
    response comes up)."""
    async for response in responses:
        accept = predict(response.features)
        for start, end in lookahead.segments(response.pending, cap, accept):
            yield Chain(response, start, end)


class PrefillScheduler(Scheduler):
    """Prefill requests with lookahead, one chain of requests per run of pending positions."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        price: Price | None = session.price
        self.auto_price = price or session.prices.get(AUTO_PRICES_FALLBACK)
        self.models = {decoding: AcceptanceModel(decoding) for decoding in acceptance.PRIORS}
        """Per decoding, the chance of acceptance at each position, calibrated on every
        answer of the run (:mod:`klstream.scoring.acceptance`)."""
        self.saved = 0.0
        """What the run's requests for more than one token have saved over one token per
        position, at the prices ``auto`` weighs with: the requests their accepted steps made
        unnecessary, less the tokens they asked for past a disagreement."""

    async def run(self) -> None:
        session = self.session
        options = session.options
        stats = session.stats
        pending = stats.total - stats.already_done
        cap = lookahead.segment_cap(pending, options.max_concurrent, options.lookahead == 1)
        responses = pending_responses(session.run.root, options.model2, options.range_positions)
        if options.lookahead == "auto" and stats.already_done:
            self.models = await asyncio.to_thread(
                acceptance_so_far, session.run.root, options.model2
            )
        async with open_prefill(session.endpoint, session.settings) as prefill:
            await self._probe_then_pipeline(
                session.caller(), prefill, pending_chains(responses, cap, self._predict)
            )

    def _observe(
        self, decoding: str, response: Response, position: int, chosen: list[Token | None]
    ) -> None:
        """Calibrate ``decoding``'s acceptance model on an answer's accepted chosen tokens from
        ``position``: whether each is Model 1's there (one-token answers included)."""
        agreed = lookahead.compared(chosen, response.tokens, position)
        self.models[decoding].observe(response.features[position : position + len(agreed)], agreed)

    def _predict(self, rows: np.ndarray) -> np.ndarray:
        """The chance of acceptance at positions with these features, for the decoding used."""
        return self.models[self.decoding].predict(rows)

    def _lookahead_for(self, chain: Chain) -> int:
        """Tokens to ask for at the chain's next position: the fixed lookahead, or under
        ``auto`` the least expected cost (:func:`~klstream.scoring.acceptance.best_lookahead`)
        from the predicted acceptance at the positions ahead and the prices; never past the
        chain's end, at most :data:`~klstream.scoring.lookahead.WARM_UP_LOOKAHEAD` tokens
        until the run has seen a few comparisons, and while the run's lookahead has cost more
        than it saved (:attr:`saved`), more than one token only where that is expected to save
        a good share of a request (:data:`~klstream.scoring.lookahead.LOSING_HURDLE`)."""
        options = self.session.options
        left = chain.end - chain.next
        if options.lookahead != "auto":
            return min(options.lookahead, left)
        costs = self._costs(chain)
        if costs is None:
            return min(2, left)
        request_cost, token_cost = costs
        model = self.models[self.decoding]
        warm = model.observations >= lookahead.WARM_UP_TOKENS
        hurdle = 0.0 if self.saved >= 0 else lookahead.LOSING_HURDLE * request_cost
        ahead = min(lookahead.AUTO_MAX_LOOKAHEAD if warm else lookahead.WARM_UP_LOOKAHEAD, left)
        rows = chain.response.features[chain.next : chain.next + ahead]
        return acceptance.best_lookahead(
            model.predict(rows), request_cost, token_cost, left, hurdle
        )

    def _costs(self, chain: Chain) -> tuple[float, float] | None:
        """What a request at the chain's next position costs beyond its output (its input at
        the cached share so far, the thoughts per answer so far) and what an output token
        costs, at the prices ``auto`` weighs with; None without prices."""
        price = self.auto_price
        if price is None:
            return None
        usage, answers = self.session.stats.usage, max(self.session.stats.answers, 1)
        cached = usage.cached_share
        input_price = price.input * (1.0 - cached) + price.cached_input * cached
        thinking = usage.thoughts_tokens / answers * price.output
        return chain.response.input_tokens(chain.next) * input_price + thinking, price.output

    async def step(
        self,
        caller: Caller,
        prefill: Prefill,
        chain: Chain,
        max_tokens: int | None = None,
        probe_deadline: float | None = None,
    ) -> Answer | None:
        """One request at the chain's next position (asking for ``max_tokens``, else what the
        lookahead says); its accepted steps are stored together and the chain moves past them
        (past the position alone when the request failed). With a ``probe_deadline`` the request
        is a probe."""
        session = self.session
        response = chain.response
        tokens = self._lookahead_for(chain) if max_tokens is None else max_tokens
        costs = self._costs(chain)
        item = response.request(chain.next, tokens, self.decoding)
        request = prefill_request(session.options, item)
        outcome = await caller.generate(prefill, request, probe_deadline)
        answer = outcome.value
        covered = 1
        if answer:
            session.answered(prefill, answer)
            chosen = chosen_tokens(answer)
            accepted = lookahead.accept(
                len(answer.steps), chosen, response.tokens, item.position, tokens
            )
            self._observe(item.decoding, response, item.position, chosen[: accepted.steps])
            if answer.usage.prompt_tokens:
                response.measured = (item.position, answer.usage.prompt_tokens)
            covered = accepted.steps
            if costs is not None and tokens > 1:
                request_cost, token_cost = costs
                self.saved += request_cost * (covered - 1) - token_cost * (tokens - covered)
        chain.next += covered
        rows = result_rows(item, session.options.model2, outcome, covered)
        await session.record(
            rows, answered=answer is not None, usage=answer.usage if answer else None
        )
        return answer

    async def _probe_then_pipeline(
        self, caller: Caller, prefill: Prefill, chains: AsyncIterator[Chain]
    ) -> None:
        """The first requests go one at a time, as probes, until one with a prefill has
        succeeded (a model that refuses prefill stops the run there) or a few have; then, after
        the greedy consistency probe where greedy decoding may be used, every chain goes."""
        probe = self.session.probe
        probed_prefill = False

        def probing() -> bool:
            return not (probed_prefill or probe.tried >= FIRST_PROBES or probe.spent)

        first: Chain | None = None
        exhausted = True
        async for first in chains:
            while not first.done and probing():
                probed_prefill = probed_prefill or bool(first.response.offsets[first.next])
                answer = await self.step(caller, prefill, first, probe_deadline=probe.deadline)
                probe.saw(None if answer else self.session.last_error)
            if not probing():
                exhausted = False
                break
        if first is None or exhausted:
            return
        if not probe.succeeded:
            raise probe.failure()
        started = [first]
        if self._greedy_probe_needed():
            sites = [] if first.done else [first]
            async for chain in chains:
                started.append(chain)
                sites.append(chain)
                if len(sites) >= PROBE_SITES:
                    break
            await self._choose_decoding(caller, prefill, sites)

        async def chains_to_go() -> AsyncIterator[Chain]:
            for chain in started:
                if not chain.done:
                    yield chain
            async for chain in chains:
                yield chain

        async def cover(chain: Chain) -> None:
            while not chain.done:
                await self.step(caller, prefill, chain)

        options = self.session.options
        await work_through(
            chains_to_go(),
            cover,
            WORKERS_PER_SLOT * options.max_concurrent,
            self.session.checkpoint,
            options.checkpoint_seconds,
        )

    def _greedy_probe_needed(self) -> bool:
        options = self.session.options
        return options.lookahead != 1 and options.decoding != "sample"

    async def _choose_decoding(self, caller: Caller, prefill: Prefill, sites: list[Chain]) -> None:
        """Sample, or greedy where the consistency probe (run once per Model 2 and run
        directory, its outcome kept in ``run.json``) finds greedy steps' logprobs equal to
        one-token answers' at the run's temperature."""
        session = self.session
        found = session.config.get("greedy_probe")
        if found is None:
            log = GreedyProbeLog(session.run.greedy_probe_log(session.options.model2))
            found = await self._probe_greedy(caller, prefill, sites, log)
            if found["decoding"] is not None:
                session.config["greedy_probe"] = found
                save_config(session.run, session.options.model2, session.config)
                log.clear()
        if found["decoding"] == "greedy":
            self.decoding = "greedy"
        elif session.options.decoding == "greedy":
            raise GreedyInconsistent(
                f"greedy lookahead needs logprobs that do not depend on the sampling "
                f"temperature, and {session.options.model2}'s do not pass that check: "
                f"{found['finding']}"
            )

    async def _probe_greedy(
        self, caller: Caller, prefill: Prefill, sites: list[Chain], log: GreedyProbeLog
    ) -> dict[str, Any]:
        """At the next position of each chain in ``sites``, a greedy request, then one-token
        requests at the run's temperature at its accepted steps' positions (stored as those
        positions' results, as any one-token answer). Greedy passes when the median deviation
        of their logprobs (:func:`~klstream.backends.checks.deviation`) is within the
        tolerance. Only the greedy requests are spent on the probe alone, and each is paid
        once: the answers and comparisons a killed probe made (``log``) are taken up where they
        were (a site whose chain has moved on keeps the comparisons it has)."""
        failed = False
        fresh = PROBE_SITES - len(log.sites)
        plan: list[tuple[Chain, ProbeSite | None]] = []
        for chain in sites:
            response = chain.response
            saved = log.continued_at(response.stem, response.response_index, chain.next)
            if saved is not None:
                plan.append((chain, saved))
            elif fresh > 0:
                fresh -= 1
                plan.append((chain, None))

        async def compare(chain: Chain, site: ProbeSite | None) -> None:
            nonlocal failed
            if site is None:
                site = await self._greedy_site(caller, prefill, chain, log)
                if site is None:
                    failed = True
                    return
            for step in range(len(site.deviations), len(site.greedy)):
                if chain.done or chain.next != site.next_position:
                    return
                single = await self.step(caller, prefill, chain, max_tokens=1)
                if single is None:
                    failed = True
                    return
                log.add_deviation(site, checks.deviation(site.top(step), single.steps[0].top))

        await asyncio.gather(*(compare(chain, site) for chain, site in plan))
        deviations = [value for site in log.sites.values() for value in site.deviations]
        record: dict[str, Any] = {
            "decoding": None,
            "compared": len(deviations),
            "median_deviation": None,
            "tolerance": checks.JITTER_NATS,
            "requests": sum(site.attempts for site in log.sites.values()),
            **usage_columns(log.usage()),
        }
        if failed or not deviations:
            record["finding"] = "the probe's requests failed, so nothing could be compared"
            return record
        median = statistics.median(deviations)
        missing = sum(d == math.inf for d in deviations)
        record.update(
            decoding="greedy" if median <= checks.JITTER_NATS else "sample",
            median_deviation=None if median == math.inf else median,
            finding=(
                f"the one-token answers' top tokens are missing from the greedy answers' "
                f"logprobs at {missing} of {len(deviations)} positions"
                if median == math.inf
                else f"the median largest deviation is {median:.3g} nats over "
                f"{len(deviations)} positions (tolerance {checks.JITTER_NATS:g})"
            ),
        )
        return record

    async def _greedy_site(
        self, caller: Caller, prefill: Prefill, chain: Chain, log: GreedyProbeLog
    ) -> ProbeSite | None:
        """A greedy request at the chain's next position, logged the moment it is answered;
        None when it failed."""
        item = chain.response.request(chain.next, PROBE_STEPS, "greedy")
        outcome = await caller.generate(prefill, prefill_request(self.session.options, item))
        greedy = outcome.value
        if greedy is None:
            return None
        self.session.stats.usage.add(greedy.usage)
        chosen = chosen_tokens(greedy)
        accepted = lookahead.accept(
            len(greedy.steps), chosen, chain.response.tokens, item.position, PROBE_STEPS
        )
        self._observe("greedy", chain.response, item.position, chosen[: accepted.steps])
        site = ProbeSite(
            item.stem,
            item.response_index,
            item.position,
            [
                [(c.token, c.token_id, c.logprob) for c in step.top]
                for step in greedy.steps[: accepted.steps]
            ],
            outcome.attempts,
            {name: getattr(greedy.usage, name) for name in USAGE_FIELDS},
        )
        log.add_site(site)
        return site
