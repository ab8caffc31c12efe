"""What is known of a conversation's runs that ended, kept between its lookups.

A run whose stream ends with `end` stops changing, so its facts are read once; each later
lookup only checks that the stream is still the one read (`unchanged`: its `XINFO STREAM`
alone, without the `GET` and `PTTL` of its status a full read adds). The live index keeps
one `EndedRuns` per conversation it knows, made and dropped with the conversation (a resync
starts them all afresh), and reports every event of a run's stream to it (`changed`). A
per-request SCAN keeps none: nothing would tell it that a stream was deleted and written
again.

A lookup asks `known` for its runs, reads the others, and hands all it read to `remember`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from session_sidecar.derive import RunFacts


class Known(NamedTuple):
    """What a lookup starts from."""

    facts: dict[str, RunFacts]  # the facts kept of the runs asked for, by run id
    since: int  # hand back to `remember`: what it read is kept only if no event came since


class EndedRuns:
    """One conversation's facts of runs that ended, and the guard that keeps out a read that
    raced a stream event."""

    __slots__ = ("_epoch", "_facts", "_others", "_writing")

    def __init__(self) -> None:
        self._facts: dict[str, RunFacts] = {}
        # A read's facts are kept only if no stream event of their run came after the read
        # began. An epoch per run would cost memory per run; instead `_epoch` moves on every
        # stream event, `_writing` is the run of the latest ones, and `_others` is the epoch of
        # the last event of any other run. A live run written beside ended ones (the usual
        # case, with `xadd` events: one per chunk) then spoils none of their facts.
        self._epoch = self._others = 0
        self._writing: str | None = None

    def known(self, run_ids: Iterable[str]) -> Known:
        facts = self._facts
        return Known({run_id: facts[run_id] for run_id in run_ids if run_id in facts}, self._epoch)

    def remember(self, facts: Iterable[RunFacts], since: int) -> None:
        """Keep the facts, read by a lookup that began at `since`, of the runs that ended.

        Never those of a run that has not ended: its status and TTL change without its
        stream, which is all `unchanged` looks at. An ended run's answer comes from its
        stream alone (derive.py: the `end` entry finishes it, entry ids date it).
        """
        for fact in facts:
            if fact.last_entry_type == "end" and self.unchanged_since(fact.run_id, since):
                self._facts[fact.run_id] = fact

    def changed(self, run_id: str) -> None:
        """An event of `run_id`'s stream: created, written, deleted, renamed, expired."""
        self._facts.pop(run_id, None)
        if run_id != self._writing:
            self._others, self._writing = self._epoch, run_id
        self._epoch += 1

    def unchanged_since(self, run_id: str, since: int) -> bool:
        """No stream event of `run_id` came after `since` (the epoch a read began at)."""
        return self._epoch <= since or (self._others <= since and run_id != self._writing)


def unchanged(kept: RunFacts, length: int, last_entry_id: str | None) -> bool:
    """Whether a stream still holds the entries `kept` was read from, by its length and last
    entry id now.

    Either alone can be fooled: an exact trim on append (`XADD ... MAXLEN 1000` on a full
    stream) keeps the length while the entries change, and a trim alone (`XTRIM`) keeps the
    last entry while the first goes. Entry ids only grow, so an append always moves the last
    id and a removal without an append always moves the length: together they hold still only
    while the entries do. (Short of the stream deleted and written again under the same ids:
    the index hears that as key events, which drop the kept facts.)
    """
    return length == kept.stream_length and last_entry_id == kept.last_entry_id
