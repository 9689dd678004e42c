"""The decision API on every worker: ``POST /v1/decide`` (or ``GET`` with the request as
query parameters), ``GET /v1/customers/{id}``, ``GET /v1/catalog`` (docs/architecture.md,
"The decision API").

A customer's context lives on the worker that owns its clickstream partition
(``partition_of``, Kafka's murmur2; the context table is co-partitioned). That
worker answers; any other forwards the request, body and all, to the owner's
canonical URL (``RTIM_WEB_CANONICAL_URL``) as Faust's assignor last published it,
with the header :data:`FORWARDED` so that a request is forwarded once at most.
A worker asked for a partition it does not own at that moment (a rebalance, a
forward that raced one) answers 503 with ``Retry-After``: it never decides on
a partition it does not own.

On the owner, a request is decided in a batch, like the clickstream's events:
what it did to the customer's context (an open decision, a contact) goes to the
changelog and the store with that batch, and its decision record to
``rtim.decisions``. ``RTIM_API_ANSWER`` says when it is answered:

- ``decided`` (the default): at once. It is decided in the batch being built
  (between two parts of its core), or in one begun for it while the previous
  batch is being published (:meth:`ClickstreamProcessor.request_run`), which the
  next clickstream batch, or a batch of its own, then publishes and stores. A
  worker that loses the partition in those milliseconds hands the decision over
  to the customer's owner (:meth:`ClickstreamProcessor._lost`); one that dies
  then forgets it.
- ``stored``: once its batch is stored. Requests waiting when a batch (of the
  clickstream, or an idle tick) has applied its records ride it
  (:meth:`DecisionApi.ride`), otherwise they get a batch of their own; so a
  request waits for the batch in progress and then for its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from faust.web import Request, Response, View, Web
from yarl import URL

from rtim import metrics
from rtim.decide.explain import recent_decisions
from rtim.decide.policy import counters
from rtim.decide.request import (
    DecideRequest,
    InvalidRequest,
    check_customer_id,
    parse_query,
    parse_request,
)
from rtim.engine import Answer
from rtim.names import CLICKSTREAM_TOPIC, CONTEXT_TABLE
from rtim.stream.catalog import LiveCatalog
from rtim.stream.models import Throttled

log = logging.getLogger("rtim.api")

#: The header of a forwarded request: the URL of the worker that forwarded it.
FORWARDED = "X-RTIM-Forwarded-By"
#: The header naming the worker that answered.
ANSWERED_BY = "X-RTIM-Worker"
#: The header of a request's decision record on rtim.decisions: the worker that decided.
DECIDED_BY = "rtim.worker"
#: Seconds a client is asked to wait before it tries again (a rebalance takes a few).
RETRY_AFTER_S = 1
#: Seconds a forwarded request may take.
FORWARD_TIMEOUT_S = 5.0
#: Context fields the contact policy and the trigger cool-downs keep (the policy state).
POLICY_FIELDS = ("fired", "tz", "consent", "consent_cat", "contacts", "dismissed")


class NotOwner(Exception):
    """This worker does not own the customer's partition now."""


def _check_placement(engine: Any, request: DecideRequest) -> None:
    """Raise :class:`InvalidRequest` if the request's placement is why deciding it failed:
    one the catalog does not have, or one not on the request's channel (what
    ``Engine.request_catalog`` raises KeyError and ValueError for, and nothing else).
    Called only once deciding raised one of those, so a request decided costs nothing."""
    try:
        engine.request_catalog(request.placement, request.channel)
    except KeyError:
        raise InvalidRequest(
            "placement", f"no placement {request.placement!r} in the catalog"
        ) from None
    except ValueError as exc:
        raise InvalidRequest("channel", str(exc)) from None


class DecisionApi:
    """Decides requests on the owner, and finds the owner for the others."""

    def __init__(self, app: Any, processor: Any, live: LiveCatalog) -> None:
        self.app = app
        self.processor = processor
        self.live = live
        self.url = str(app.conf.canonical_url).rstrip("/")
        #: Answer as soon as decided (RTIM_API_ANSWER=decided), not once stored.
        self.answer_early = processor.settings.api_answer == "decided"
        self._owned: frozenset[int] = frozenset()
        self._owned_generation: int | None = None
        self._waiting: list[tuple[DecideRequest, asyncio.Future[Answer]]] = []
        #: An owner down fails every request forwarded to it: ten lines a minute of that.
        self._forward_failed = Throttled(log)
        self._flusher: asyncio.Task[None] | None = None

    # -- owners ------------------------------------------------------------------

    def partition(self, customer_id: str) -> int:
        return int(self.processor._partition_of(customer_id.encode()))

    def owns(self, partition: int) -> bool:
        """Whether this worker owns the partition now (and its contexts are recovered)."""
        app = self.app
        generation = app.consumer_generation_id
        if app.rebalancing or app.should_stop or generation is None:
            return False
        try:
            if not app.tables.recovery.completed.is_set():
                return False
            if generation != self._owned_generation:
                # A generation's assignment does not change: read it once.
                self._owned = frozenset(
                    tp.partition
                    for tp in app.consumer.assignment()
                    if tp.topic == CLICKSTREAM_TOPIC
                )
                self._owned_generation = generation
        except Exception:  # not started yet
            return False
        return partition in self._owned

    def leased(self) -> bool:
        """Whether the group coordinator confirmed this worker's membership so lately that
        no other worker can own its partitions yet (``BatchConsumer.membership_lease``:
        each stored batch renews it). A worker paused past its session timeout (a long
        GC, SIGSTOP) still believes it owns them until its next heartbeat tells it."""
        generation = self.app.consumer_generation_id
        return generation is not None and bool(self.app.consumer.membership_lease(generation))

    async def confirmed(self) -> bool:
        """Ask the group coordinator whether this worker is still a member (when the lease
        has run out: an idle worker stores no batch); False if refused or unanswered."""
        generation = self.app.consumer_generation_id
        if generation is None:
            return False
        return await self.app.consumer.confirm_membership(generation) is True

    def owner_url(self, partition: int) -> str | None:
        """The canonical URL of the partition's owner, as the group's leader last
        assigned it (None while it is not known)."""
        try:
            hosts = self.app.router.table_metadata(CONTEXT_TABLE)
        except Exception:
            return None
        topic = self.processor.changelog_topic
        for url, topics in hosts.items():
            if partition in topics.get(topic, ()):
                return str(url).rstrip("/")
        return None

    # -- deciding ----------------------------------------------------------------

    async def decide(self, request: DecideRequest) -> Answer:
        """Decide on this worker (which must own the customer); raises NotOwner, or
        InvalidRequest for a placement or channel the catalog does not have."""
        answer = self.decide_now(request)
        if answer is not None:
            return answer
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    def decide_now(self, request: DecideRequest) -> Answer | None:
        """With ``decided``, the request decided at once in the batch that may take it
        (None: none may now, or answers wait for storage)."""
        if not self.answer_early:
            return None
        run = self.processor.request_run()
        if run is None:
            return None
        answer, made = self._decide_in(run, request)
        if made is not None:
            run.answered_early.append(made)
        return answer

    async def _flush(self) -> None:
        """Decide the waiting requests in a batch of their own when no clickstream batch
        takes them first (:meth:`ride`)."""
        processor = self.processor
        # Decided with the live catalog, as the clickstream is.
        await processor.catalog_loaded.wait()
        while self._waiting:
            async with processor._lock:
                before = list(self._waiting)
                generation = self.app.consumer_generation_id
                if before and generation is not None:
                    await processor.handle_requests(generation)
                # Those no batch took (it was not this worker's any more): not decided here.
                for _, future in before:
                    if not future.done():
                        future.set_exception(NotOwner())
                self._waiting = [(r, f) for r, f in self._waiting if not f.done()]

    def ride(self, run: Any) -> Callable[[bool], None]:
        """Decide the waiting requests in a batch about to finish (the processor's lock is
        held); returns what settles them once the batch is stored, or not."""
        waiting, self._waiting = self._waiting, []
        decided: list[tuple[Answer, asyncio.Future[Answer]]] = []
        for request, future in waiting:
            if future.done():
                continue
            if not self.owns(self.partition(request.customer_id)):
                future.set_exception(NotOwner())
                continue
            try:
                decided.append((self._decide_in(run, request)[0], future))
            except InvalidRequest as exc:
                future.set_exception(exc)
            except Exception as exc:  # one bad request must not stop the batch
                log.exception("decision request for %r failed", request.customer_id)
                future.set_exception(exc)

        def settle(stored: bool) -> None:
            for answer, future in decided:
                if future.done():
                    continue
                if stored:
                    future.set_result(answer)
                else:
                    future.set_exception(NotOwner())

        return settle

    def _decide_in(self, run: Any, request: DecideRequest) -> tuple[Answer, Any]:
        """Decide a request in a batch being built, its record naming this worker; the
        record is None for a request asked again (answered as before, nothing recorded)."""
        try:
            answer: Answer = run.decide(request)
        except (KeyError, ValueError):
            # The request's fault only if its placement is (the engine's request_catalog
            # says so, as run.decide asked it first); anything else is a defect: a 500.
            _check_placement(run.engine, request)
            raise
        if answer.repeated:
            return answer, None
        made = run.result.decisions[-1]
        made.headers.append((DECIDED_BY, self.url.encode()))
        return answer, made

    # -- routing -----------------------------------------------------------------

    async def serve_decide(self, body: bytes, forwarded_by: str | None) -> Reply:
        """``POST /v1/decide``: checked, then decided here or forwarded to the owner."""
        return await self._serve_decide(
            lambda: self.parse(body), forwarded_by, "POST", "/v1/decide", body
        )

    async def serve_decide_query(
        self, query: Iterable[tuple[str, str]], path_qs: str, forwarded_by: str | None
    ) -> Reply:
        """``GET /v1/decide?customer_id=...``: the same request as query parameters
        (:func:`~rtim.decide.request.parse_query`), decided and recorded the same way."""
        return await self._serve_decide(
            lambda: parse_query(query, **self._clock()), forwarded_by, "GET", path_qs, None
        )

    async def _serve_decide(
        self,
        parse: Callable[[], DecideRequest],
        forwarded_by: str | None,
        method: str,
        path_qs: str,
        body: bytes | None,
    ) -> Reply:
        try:
            parsed = parse()
        except InvalidRequest as exc:
            metrics.API_REQUESTS.labels("decide", "invalid").inc()
            return json(exc.as_json(), 400)
        except Exception:  # a defect of the checks: still an answer, and said
            log.exception("decide request could not be checked")
            metrics.API_REQUESTS.labels("decide", "error").inc()
            return json({"error": "internal_error"}, 500)

        async def here() -> Reply:
            return self.answer(await self.decide(parsed))

        return await self.route(
            "decide", parsed.customer_id, forwarded_by, method, path_qs, body, here
        )

    def parse(self, body: bytes) -> DecideRequest:
        return parse_request(body, **self._clock())

    def _clock(self) -> dict[str, int]:
        """What a request's time is checked against: now, and how far ahead it may be."""
        return {
            "now_ms": int(time.time() * 1000),
            "max_future_skew_ms": int(self.processor.settings.max_future_skew_s * 1000),
        }

    def decide_at_once(self, body: bytes) -> Reply | None:
        """``POST /v1/decide`` answered without waiting, when it can be: a valid request
        for a customer this worker owns, decided now (``decided``). None: it needs
        :meth:`serve_decide` (an invalid request, one to forward, one that waits for a
        batch)."""
        if not self.answer_early:
            return None
        started = time.perf_counter()
        try:
            request = self.parse(body)
            if not (self.owns(self.partition(request.customer_id)) and self.leased()):
                return None  # not this worker's, or its membership to confirm first
            answer = self.decide_now(request)
            if answer is None:
                return None
            reply = self.answer(answer)
            result = reply.counted_as
        except InvalidRequest:
            return None  # said by serve_decide (nothing was decided)
        except Exception:
            log.exception("decide request failed")
            reply, result = json({"error": "internal_error"}, 500), "error"
        # Counted only when answered here (serve_decide counts the others).
        metrics.API_REQUESTS.labels("decide", result).inc()
        metrics.API_SECONDS.labels("decide").observe(time.perf_counter() - started)
        return reply

    async def route(
        self,
        endpoint: str,
        customer_id: str,
        forwarded_by: str | None,
        method: str,
        path_qs: str,
        body: bytes | None,
        here: Callable[[], Awaitable[Reply]],
    ) -> Reply:
        """Answer here if this worker owns the customer, else forward to the owner."""
        started = time.perf_counter()
        partition = self.partition(customer_id)
        result = "decided"
        try:
            if self.owns(partition) and (self.leased() or await self.confirmed()):
                try:
                    reply = await here()
                    result = reply.counted_as
                    return reply
                except NotOwner:
                    pass  # lost it meanwhile: forward, or 503 below
            owner = self.owner_url(partition)
            if forwarded_by is not None or owner is None or owner == self.url:
                result = "unavailable"
                return self.unavailable(partition)
            result = "forwarded"
            return await self._forward(method, owner, path_qs, body, partition)
        except InvalidRequest as exc:
            result = "invalid"
            return json(exc.as_json(), 400)
        except Exception:
            result = "error"
            log.exception("%s request for %r failed", endpoint, customer_id)
            return json({"error": "internal_error"}, 500)
        finally:
            metrics.API_REQUESTS.labels(endpoint, result).inc()
            metrics.API_SECONDS.labels(endpoint).observe(time.perf_counter() - started)

    async def _forward(
        self, method: str, owner: str, path_qs: str, body: bytes | None, partition: int
    ) -> Reply:
        headers = {FORWARDED: self.url}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.app.http_client.request(
                method,
                # Sent on as received, percent-escapes and all: a decoded ``%3F`` or
                # ``%2F`` in a customer id would make another customer's, or path's.
                URL(owner + path_qs, encoded=True),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S),
            ) as answer:
                content = await answer.read()
                out = {ANSWERED_BY: answer.headers.get(ANSWERED_BY, owner)}
                if "Retry-After" in answer.headers:
                    out["Retry-After"] = answer.headers["Retry-After"]
                return Reply(answer.status, content, out, answer.content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._forward_failed.warning("forwarding to %s failed (%r)", owner, exc)
            return self.unavailable(
                partition,
                f"partition {partition}'s owner ({owner}) did not answer within "
                f"{FORWARD_TIMEOUT_S:g} s",
            )

    def unavailable(self, partition: int, why: str | None = None) -> Reply:
        said = why or f"partition {partition}'s owner is not known now (a rebalance?)"
        return json(
            {"error": "unavailable", "message": f"{said}: try again"},
            503,
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    # -- the views -----------------------------------------------------------------

    def answer(self, answer: Answer) -> Reply:
        body = answer.as_json()
        body["worker"] = self.url
        reply = json(body, 200, {ANSWERED_BY: self.url})
        if answer.repeated:
            reply.counted_as = "repeated"
        return reply

    def customer(self, customer_id: str) -> Reply:
        """The customer's stored context, its policy state and its last decisions."""
        partition = self.partition(customer_id)
        if not self.owns(partition):
            raise NotOwner()
        ctx = self.processor.engine.stored(partition, customer_id.encode())
        body: dict[str, Any] = {
            "customer_id": customer_id,
            "known": ctx is not None,
            "partition": partition,
            "worker": self.url,
        }
        if ctx is not None:
            body["policy"] = {f: ctx[f] for f in POLICY_FIELDS if f in ctx}
            # Where the customer stands against each cap, at its latest event time.
            at_ms = ctx["last_ms"] if ctx["last_ms"] is not None else int(time.time() * 1000)
            body["policy"]["counters"] = counters(self.processor.engine.catalog, ctx, at_ms)
            body["decisions"] = recent_decisions(ctx)
            body["open_decisions"] = [
                {"decision_id": p[0], "offer_id": p[1], "at": p[3], "window_end": p[4]}
                for p in ctx.get("pending", ())
            ]
            body["context"] = {k: v for k, v in ctx.items() if k != "recent"}
        return json(body, 200, {ANSWERED_BY: self.url})

    def catalog(self) -> Reply:
        catalog = self.processor.engine.catalog
        body = self.live.current.as_json()
        body["loaded"] = self.live.loaded.is_set()
        body["catalog"] = {
            "source": catalog.source,
            "triggers": [t.id for t in catalog.triggers],
            "offers": [
                {"id": o.id, "name": o.name, "channels": list(o.channels)} for o in catalog.offers
            ],
            "placements": [
                {"id": p.id, "channels": list(p.channels), "offers": p.offers}
                for p in catalog.placements
            ],
        }
        return json(body, 200)


@dataclass(slots=True)
class Reply:
    """An answer of the API, whichever server writes it (aiohttp's views, or the decision
    API's fast path in :mod:`rtim.stream.fastpath`)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    #: Its result in ``rtim_api_requests_total`` when answered here: ``repeated`` for a
    #: request asked again (:attr:`~rtim.engine.Answer.repeated`).
    counted_as: str = "decided"


def json(body: Any, status: int, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(body), headers or {})


def response(web: Web, reply: Reply) -> Response:
    """A reply as aiohttp's views give it."""
    return web.bytes(
        reply.body, content_type=reply.content_type, status=reply.status, headers=reply.headers
    )


def install_api(app: Any, api: DecisionApi) -> None:
    """The views of the decision API."""

    @app.page("/v1/decide")
    class Decide(View):
        async def post(self, request: Request) -> Response:
            try:
                body = await request.read()
            except ConnectionError:  # the client went before its body came: no one to answer
                return response(self.web, json({"error": "bad_request"}, 400))
            forwarded_by = request.headers.get(FORWARDED)
            return response(self.web, await api.serve_decide(body, forwarded_by))

        async def get(self, request: Request) -> Response:
            reply = await api.serve_decide_query(
                request.query.items(),
                request.rel_url.raw_path_qs,  # as sent: the owner decodes it as this did
                request.headers.get(FORWARDED),
            )
            # Each GET decides anew (and may count a contact): never from a cache.
            reply.headers["Cache-Control"] = "no-store"
            return response(self.web, reply)

        async def head(self, request: Request) -> Response:
            # Faust answers HEAD with GET: a link checker's HEAD would then decide.
            reply = json(
                {"error": "method_not_allowed", "message": "GET or POST decides; HEAD does not"},
                405,
                {"Allow": "GET, POST"},
            )
            return response(self.web, reply)

    @app.page("/v1/customers/{customer_id}")
    class Customer(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            try:
                check_customer_id(customer_id)  # the ids the clickstream and decide take
            except InvalidRequest as exc:
                return response(self.web, json(exc.as_json(), 400))

            async def here() -> Reply:
                return api.customer(customer_id)

            reply = await api.route(
                "customer",
                customer_id,
                request.headers.get(FORWARDED),
                request.method,
                request.rel_url.raw_path_qs,  # as sent: the owner decodes it as this did
                None,
                here,
            )
            return response(self.web, reply)

    @app.page("/v1/catalog")
    class CatalogView(View):
        async def get(self, request: Request) -> Response:
            return response(self.web, api.catalog())
