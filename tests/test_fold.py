"""The activity fold (bus.tracking._fold): a version-2 completion that carries its announcement folds to the
same record as the announcement and the completion folded one after the other."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bus.tracking._fold import announcement, fold_activity_event, fold_completed, fold_started
from schemas import ActivityCompleted, ActivityLevel, ActivityStart, ActivityStatus, MessageEntry, utcnow

_TEXT = st.text(max_size=20)
_STATUS = st.sampled_from([ActivityStatus.SUCCESS, ActivityStatus.FAILED, ActivityStatus.CANCELLED])


@settings(max_examples=200, deadline=None)
@given(status=_STATUS, message=_TEXT, step=_TEXT, final=st.none() | _TEXT, final_seq=st.integers(0, 3),
       final_step=st.none() | _TEXT, progress=st.floats(-10, 150), error=st.none() | _TEXT,
       took=st.floats(0, 100), host_lost=st.booleans())  # fmt: skip
def test_a_completion_with_its_announcement_folds_like_the_two_events(
    status: ActivityStatus, message: str, step: str, final: str | None, final_seq: int, final_step: str | None,
    progress: float, error: str | None, took: float, host_lost: bool,
) -> None:  # fmt: skip
    begun = utcnow()
    start = ActivityStart(started_at=begun, activity_type="t", message=message, step=step, progress=progress,
                          worker_id="w1", session_id="s1", metadata={"k": 1})  # fmt: skip
    done = ActivityCompleted(
        activity_id="a1", status=status, time=begun + timedelta(seconds=took), error=error, start=start,
        final=None if final is None else MessageEntry(level=ActivityLevel.INFO, message=final),
        final_seq=final_seq, step=final_step, result={"x": 1}, host_lost=host_lost,
    )  # fmt: skip
    one_step = fold_completed(None, done)
    two_steps = fold_completed(fold_started(None, announcement("a1", start)), done.model_copy(update={"start": None}))
    assert one_step is not None and two_steps is not None
    assert one_step.model_dump() == two_steps.model_dump()
    # Folding the same completion again changes nothing (first terminal wins, a redelivery is stale).
    assert fold_activity_event(one_step, done) is None


def test_a_quick_activity_kept_as_its_body_holds_nothing_the_collector_walks_and_folds_the_same() -> None:
    """A reader keeps a quick activity's one event as the bytes it came in (given them): nothing the
    garbage collector walks (the model would be seven objects it does), decoded again on first use,
    and folded into the same record as the model would be."""
    import gc

    from bus.tracking._fold import FirstEvent, StreamFold

    start = ActivityStart(started_at=utcnow(), activity_type="t", environment_id="env", session_id="s1",
                          metadata={"k": [1, 2]})  # fmt: skip
    done = ActivityCompleted(event_id="q.completed", activity_id="q", status=ActivityStatus.SUCCESS,
                             result={"x": [1.5, "é", None]}, start=start)  # fmt: skip
    body = done.model_dump_json().encode()
    as_body, as_model = StreamFold(keep_finished=None), StreamFold(keep_finished=None)
    kept, model_kept = as_body.apply(done, 1, body), as_model.apply(done, 1)
    assert isinstance(kept, FirstEvent) and isinstance(model_kept, FirstEvent)
    assert [o for o in gc.get_referents(kept) if gc.is_tracked(o) and not isinstance(o, type)] == []
    assert [o for o in gc.get_referents(model_kept) if gc.is_tracked(o) and not isinstance(o, type)] != []  # can fail
    assert (kept.activity_id, kept.environment_id, kept.ended_at) == ("q", "env", done.time)
    assert not kept.folded_yet
    assert kept.event == done
    assert kept.record == model_kept.record and kept.fold == model_kept.fold
