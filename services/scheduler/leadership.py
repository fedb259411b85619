"""Leader election among scheduler replicas, through a JetStream key-value lease.

Every replica follows the load reports; one, the leader, places requests, holds the wait
queue and runs the role controller. Life of a replica:

  1. ``start()`` opens the lease bucket (``sched_lease_bucket()``, every entry expires
     ``lease_s`` after it was written) and the state bucket (``sched_state_bucket()``, no
     expiry), creating them if they are missing;
  2. a follower tries ``create("leader")`` every ``lease_s / 10``: it succeeds only when
     no lease exists, because the leader deleted it on a clean stop or stopped renewing it
     (crash, lost connection) and it expired. A replica whose own lease from its last term
     is still there (it stepped down while a renew it thought failed had been applied)
     takes it back by compare-and-set instead of waiting for it to expire;
  3. the winner takes its epoch from the state key (above every earlier leader's, and
     above the time in milliseconds, so it grows even if the broker lost the buckets),
     writes it there by compare-and-set, and only then acts as leader (``on_elected``);
  4. the leader renews with ``update("leader", last=revision)`` every ``lease_s / 5``.
     It leads only while its lease is certain: until ``lease_s`` (less a tenth) after it
     *sent* its last successful renew. When that time has passed (the renew failed, or
     came late: a busy machine may run the event loop seconds late), it renews again at
     once, and its term goes on if the broker takes it: a renew by compare-and-set on its
     own revision, or, when its lease expired meanwhile and nobody took it, a new lease
     while the state key still holds the revision it last wrote (every new leader writes
     that key before it acts, so nobody led in between). A renew refused because another
     replica holds the lease, or two attempts in a row failing once the lease is not
     certain, end its term (``on_deposed``); one that led in between starts a new term;
  5. every change of the state key (a role flip started or ended) is a compare-and-set on
     the revision the leader itself last wrote: a deposed leader's write fails, so it
     never starts a role flip after a new leader took over;
  6. ``close()``: a leader deletes its lease, so a follower takes over within one poll.

A broker without JetStream leaves the replica leading alone (``enabled`` False; logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from libs.protocol import messages, subjects
from libs.protocol.messages import LeaderLease, LeaderState

log = logging.getLogger(__name__)

LEADER_KEY = "leader"
STATE_KEY = "state"
JS_TEMPORARILY_UNAVAILABLE = 10008  # JetStream's error code while its cluster has no leader
_QUIET_S = 5.0  # failed lease rounds are logged quietly for this long


class NotLeader(Exception):
    """A compare-and-set of the state key failed: another replica leads now."""


class Leadership:
    """One replica's side of the election.

    Args:
        nc: the scheduler's NATS connection.
        scheduler_id: this replica's id (unique among the replicas).
        lease_s: how long a lease lasts without renewal (the failover time, about).
        replicas: JetStream replicas of the two buckets (the number of nats-servers
            that must fail before the lease is lost; 1 on a single server).
        on_elected: awaited with the new epoch once this replica leads.
        on_deposed: awaited with the reason once it no longer does.
    """

    def __init__(self, nc: Client, scheduler_id: str, lease_s: float, replicas: int,
                 on_elected: Callable[[int], Awaitable[None]], on_deposed: Callable[[str], Awaitable[None]]) -> None:
        self.nc = nc
        self.scheduler_id = scheduler_id
        self.lease_s = lease_s
        self.replicas = replicas
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.enabled = True
        self.is_leader = False
        self.epoch = 0
        self.state = LeaderState(scheduler_id=scheduler_id, epoch=0)
        self._lease: KeyValue | None = None
        self._store: KeyValue | None = None
        self._lease_rev = 0
        self._state_rev = 0
        self._valid_until = 0.0  # monotonic: the lease is certainly ours until then
        self._since = 0.0
        self._settled = asyncio.Event()  # set (and replaced) whenever the lease is renewed or lost
        self._failing_since: float | None = None  # since when lease rounds fail with no lease held
        self._last_said = 0.0

    async def start(self, ready_timeout_s: float = 60.0) -> bool:
        """Open (or create) the buckets. Returns False when the broker has no JetStream.

        A JetStream cluster that is still electing its metadata leader (servers started a
        moment ago; an election can take several seconds) answers nothing: that is retried
        for up to ``ready_timeout_s`` before the error is raised."""
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                await self._open()
                return self.enabled
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
                if getattr(exc, "err_code", None) != JS_TEMPORARILY_UNAVAILABLE:
                    self.enabled = False
                    log.warning("the broker has no JetStream: this scheduler leads alone (run a single replica, "
                                "or enable JetStream for leader election)")
                    return self.enabled
                problem: Exception = exc
            except asyncio.TimeoutError as exc:  # nats.errors.TimeoutError too
                problem = exc
            if time.monotonic() >= deadline:
                raise problem
            log.warning("JetStream is not ready (%s): its cluster may still be electing; trying again", problem)
            await asyncio.sleep(0.5)

    async def _open(self) -> None:
        """Create the buckets if missing (a restarted broker may have lost them), then bind
        them to a JetStream context whose requests time out well within a lease."""
        setup = self.nc.jetstream(timeout=5.0)
        await _bucket(setup, subjects.sched_lease_bucket(), self.lease_s, self.replicas)
        await _bucket(setup, subjects.sched_state_bucket(), None, self.replicas)
        ops = self.nc.jetstream(timeout=max(0.2, self.lease_s / 3))
        self._lease = await ops.key_value(subjects.sched_lease_bucket())
        self._store = await ops.key_value(subjects.sched_state_bucket())

    async def run(self) -> None:
        """Campaign and renew forever (a background task)."""
        retried = False  # the lease is not certain and one attempt to renew it failed already
        while True:
            renewed = False
            try:
                if self.is_leader:
                    renewed = await self._renew()
                else:
                    await self.campaign()
                self._failing_since = None  # the broker answered
            except asyncio.CancelledError:
                raise
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError, nats.js.errors.NotFoundError):
                # No stream behind the bucket: a restarted broker lost it. Make it again.
                with contextlib.suppress(Exception):
                    await self._open()
            except Exception as exc:  # the broker is unreachable or electing: try again next round
                self._round_failed(exc)
            if self.is_leader and time.monotonic() > self._valid_until:
                # Not certain any more: the renew failed or its answer came late (the event
                # loop ran late). Placement waits; renew again at once, and give the term up
                # only when that fails too.
                if renewed or not retried:
                    retried = not renewed
                    await asyncio.sleep(0)
                    continue
                await self._step_down(f"could not renew the lease within {self.lease_s:g}s")
            retried = False
            await asyncio.sleep(self.lease_s / (5 if self.is_leader else 10))

    def _round_failed(self, exc: Exception) -> None:
        """Log a failed lease round: at debug level, but a replica that has had no lease for
        longer than ``_QUIET_S`` (a broker slow to answer, a machine too busy) says why,
        every ``_QUIET_S``: nobody places requests meanwhile unless another replica leads."""
        now = time.monotonic()
        if self.is_leader:
            self._failing_since = None
        elif self._failing_since is None:
            self._failing_since = now
        if self._failing_since is not None and now - self._failing_since > _QUIET_S \
                and now - self._last_said > _QUIET_S:
            self._last_said = now
            log.warning("no lease for %.0fs: the last round failed with %s: %s", now - self._failing_since,
                        type(exc).__name__, exc)
        else:
            log.debug("lease round failed: %s: %s", type(exc).__name__, exc)

    def leads(self) -> bool:
        """Whether this replica leads now (its lease is certain)."""
        return self.is_leader and (not self.enabled or time.monotonic() < self._valid_until)

    async def certain(self, timeout: float) -> bool:
        """Whether this replica leads, waiting (at most ``timeout`` seconds) while its term
        goes on but its lease is not certain: a late renew is being repeated, and the
        answer is either a renewed lease or the end of the term."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.is_leader and not self.leads() and loop.time() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._settled.wait(), max(0.0, deadline - loop.time()))
        return self.leads()

    def _notify(self) -> None:
        """Wake the ``certain()`` waiters: the lease was renewed or lost."""
        self._settled.set()
        self._settled = asyncio.Event()

    async def lead_alone(self) -> None:
        """No election (no JetStream): lead at once with epoch 0."""
        self.is_leader = True
        await self.on_elected(0)

    async def campaign(self) -> None:
        """One try at the lease (a no-op while another replica holds it)."""
        assert self._lease is not None
        sent = time.monotonic()
        lease = LeaderLease(scheduler_id=self.scheduler_id, since=time.time())
        try:
            rev = await self._lease.create(LEADER_KEY, messages.encode(lease))
        except nats.js.errors.KeyWrongLastSequenceError:
            # Held. By this replica's own last term (it stepped down, but a renew it counted
            # as failed had been applied)? Then take it back by compare-and-set instead of
            # waiting out the lease with nobody placing; anyone else's: follow.
            if not (self._since and await self._still_ours()):
                return
            lease = LeaderLease(scheduler_id=self.scheduler_id, since=self._since)
            rev = await self._lease.update(LEADER_KEY, messages.encode(lease), last=self._lease_rev)
        self._lease_rev, self._valid_until, self._since = rev, sent + self.lease_s * 0.9, lease.since
        await self._elect()

    async def _elect(self) -> None:
        """The lease is ours: start a term (a new epoch in the state key), then lead."""
        try:
            await self._take_state()
        except Exception:
            await self._release()
            raise
        self.is_leader = True
        self._notify()
        log.info("leading the schedulers (epoch %d)", self.epoch)
        await self.on_elected(self.epoch)

    async def _take_state(self) -> None:
        """Write a new epoch into the state key (compare-and-set), keeping the flip in flight."""
        assert self._store is not None
        for _ in range(5):
            try:
                entry = await self._store.get(STATE_KEY)
                old = messages.decode(entry.value or b"")
                rev = entry.revision or 0
            except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                old, rev = None, 0
            prev = old.epoch if isinstance(old, LeaderState) else 0
            epoch = max(int(time.time() * 1000), prev + 1)
            new = (msgspec.structs.replace(old, scheduler_id=self.scheduler_id, epoch=epoch)
                   if isinstance(old, LeaderState) else LeaderState(scheduler_id=self.scheduler_id, epoch=epoch))
            try:
                if rev:
                    self._state_rev = await self._store.update(STATE_KEY, messages.encode(new), last=rev)
                else:
                    self._state_rev = await self._store.create(STATE_KEY, messages.encode(new))
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # a deposed leader wrote in between: read again
            self.epoch, self.state = epoch, new
            return
        raise NotLeader("the state key kept changing while taking over")

    async def write_state(self, state: LeaderState) -> None:
        """Replace the state key by compare-and-set on the revision this leader last wrote.

        Raises:
            NotLeader: another replica wrote it since (this one is deposed: it steps down).
        """
        if not self.enabled:
            self.state = state
            return
        assert self._store is not None
        if not self.leads():
            raise NotLeader("the lease is not certain")
        try:
            self._state_rev = await self._store.update(STATE_KEY, messages.encode(state), last=self._state_rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._step_down("another scheduler wrote the leader state")
            raise NotLeader("another scheduler wrote the leader state") from None
        self.state = state

    async def _renew(self) -> bool:
        """One renew. Returns whether the broker took it (the lease is ours from when it was
        sent); False when the term ended, or when the revision of an earlier renew that
        seemed to fail was adopted (the next round renews on it)."""
        assert self._lease is not None
        sent = time.monotonic()
        lease = LeaderLease(scheduler_id=self.scheduler_id, since=self._since)
        try:
            self._lease_rev = await self._lease.update(LEADER_KEY, messages.encode(lease), last=self._lease_rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            if await self._still_ours():
                return False
            if not await self._retake(sent):
                await self._step_down("another scheduler holds the lease")
            return self.is_leader
        self._valid_until = sent + self.lease_s * 0.9
        self._notify()
        return True

    async def _retake(self, sent: float) -> bool:
        """After a refused renew, when the lease is not held by another replica: it expired
        (the renew came too late: a busy machine, a stalled event loop) or was deleted.
        Create it again; the term goes on when nobody led meanwhile (the state key still
        has the revision this replica last wrote: every new leader writes it before it
        acts), else this replica starts a new term. Returns False when another replica
        holds the lease (it took it first)."""
        assert self._lease is not None and self._store is not None
        lease = LeaderLease(scheduler_id=self.scheduler_id, since=self._since)
        try:
            rev = await self._lease.create(LEADER_KEY, messages.encode(lease))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        self._lease_rev = rev
        try:
            same = (await self._store.get(STATE_KEY)).revision == self._state_rev
        except Exception:  # gone (a restarted broker) or not readable now: not known, so a new term
            same = False
        if same:
            self._valid_until = sent + self.lease_s * 0.9
            log.warning("the lease lapsed (no renew reached the broker within %gs) and nobody took it: "
                        "took it again, the term goes on (epoch %d)", self.lease_s, self.epoch)
            self._notify()
            return True
        await self._step_down("another scheduler led while the lease had lapsed")
        self._valid_until = sent + self.lease_s * 0.9  # the new lease is ours: a new term on it
        await self._elect()
        return True

    async def _still_ours(self) -> bool:
        """After a refused renew: a renew that timed out may have been applied (our lease,
        a newer revision). Adopt that revision; anything else means the lease is lost."""
        assert self._lease is not None
        try:
            entry = await self._lease.get(LEADER_KEY)
        except nats.js.errors.NotFoundError:  # expired or deleted
            return False
        held = messages.decode(entry.value or b"")
        if isinstance(held, LeaderLease) and held.scheduler_id == self.scheduler_id and held.since == self._since:
            self._lease_rev = entry.revision or 0
            return True
        return False

    async def _step_down(self, reason: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self._notify()
        log.warning("no longer leading the schedulers: %s", reason)
        await self.on_deposed(reason)

    async def _release(self) -> None:
        if self._lease is not None and self._lease_rev:
            with contextlib.suppress(Exception):
                await self._lease.delete(LEADER_KEY, last=self._lease_rev)
        self._lease_rev = 0

    async def successor(self, timeout: float) -> bool:
        """Whether another replica takes the lease within ``timeout`` seconds (after ``close``)."""
        assert self._lease is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                held = messages.decode((await self._lease.get(LEADER_KEY)).value or b"")
                if isinstance(held, LeaderLease) and held.scheduler_id != self.scheduler_id:
                    return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        """Give the lease up (a follower takes over at its next poll)."""
        if self.is_leader and self.enabled:
            self.is_leader = False
            self._notify()
            await self._release()


async def _bucket(js, name: str, ttl: float | None, replicas: int) -> KeyValue:  # type: ignore[no-untyped-def]
    """The bucket ``name``, created with these settings if it does not exist yet."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.MEMORY, replicas=replicas)
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # another replica created it first, or a different config exists
        return await js.key_value(name)
