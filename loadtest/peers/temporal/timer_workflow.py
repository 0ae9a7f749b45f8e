"""The Temporal workflow of the peer: sleep until the timer's due time, then fire.

Kept in its own module: the worker's sandbox re-imports it for every workflow run, so it
imports nothing but temporalio. Firing is a local activity (the idiomatic place for a side
effect, run in the worker with no extra server round trip); it records when it ran.
"""

from datetime import timedelta

from temporalio import activity, workflow

# Set by the worker process: called with (seq, wall-clock ms) when a timer fires.
on_fire = None


@activity.defn
async def fire(seq: int) -> None:
    import time

    on_fire(seq, time.time() * 1000.0)


@workflow.defn
class TimerWorkflow:
    @workflow.run
    async def run(self, seq: int, due_ms: int, payload: str) -> None:
        # payload: the timer's bytes (unused), so a start carries what the other drivers send.
        wait_ms = due_ms - workflow.now().timestamp() * 1000.0
        if wait_ms > 0:
            await workflow.sleep(timedelta(milliseconds=wait_ms))
        await workflow.execute_local_activity(
            fire, seq, start_to_close_timeout=timedelta(seconds=30)
        )
