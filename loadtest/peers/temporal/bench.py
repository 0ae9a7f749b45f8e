#!/usr/bin/env python3
"""Temporal peer of `timerdb-loadtest steady` (and of ../bullmq/bench.mjs): starts one
workflow per timer at a target rate; each sleeps until its due time (workflow.sleep) and
then fires a local activity, whose run time in the worker is the receive time. Prints one
JSON object on stdout with the same figures as the other adapters (acked, failed,
acked_rate, lateness_ms, lost, early, duplicates, call_ms).

    python bench.py --target 127.0.0.1:17233 --rate 200 --duration 20

Processes, so that the number measures Temporal and not one Python interpreter:

- --producers N producer processes (default 2), each with its own client connection and
  --inflight concurrent StartWorkflowExecution calls (asyncio). Timer s is sent by producer
  s % N at start + s / rate, so together they offer --rate; a start counts as acknowledged
  when StartWorkflowExecution answered (there is no batch start in Temporal).
- --workers N worker processes (default 1) on one task queue, as consumers would be. Each
  reports (seq, wall-clock ms) pairs every 100 ms.

The parent keeps the books: due time (send time + uniform fire-min..fire-max, integer ms,
the same value the workflow sleeps until), acknowledgement, and every receive. Checked per
timer: lost (acknowledged, not received when the drain ended), early (received before its
due time), duplicates (received more than once: a local activity re-run on replay would
show here). Workflows run without the Python SDK's sandbox unless --sandbox (the sandbox
re-imports the workflow module for every run: worker CPU, not Temporal's timers).
"""

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import re
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:7233")
    p.add_argument("--namespace", default="default")
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--fire-min-ms", type=int, default=1000)
    p.add_argument("--fire-max-ms", type=int, default=5000)
    p.add_argument("--payload-bytes", type=int, default=64)
    p.add_argument("--batch", type=int, default=1000, help="accepted for the compare script; unused")
    p.add_argument("--producers", type=int, default=2, help="producer processes")
    p.add_argument("--inflight", type=int, default=200, help="concurrent starts per producer")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--drain", type=float, default=10)
    p.add_argument(
        "--max-send-s", type=float, default=0,
        help="stop starting timers this long after the start (default 2 * duration + 30)",
    )
    p.add_argument("--max-concurrent-workflow-tasks", type=int, default=100)
    p.add_argument("--max-concurrent-local-activities", type=int, default=200)
    p.add_argument("--workflow-task-polls", type=int, default=10)
    p.add_argument(
        "--sandbox", action="store_true",
        help="run workflows in the Python SDK's sandbox (its default; costs the worker CPU per run)",
    )
    return p.parse_args(argv)


def error_kind(e):
    return re.sub(r"\d+", "#", f"{type(e).__name__}: {e}")[:160]


def worker_main(args, task_queue, conn):
    """Child process: one Temporal worker. Sends ("ready",), then ("got", [seq, ms, ...])."""
    from temporalio.client import Client
    from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker

    import timer_workflow

    pending = []
    timer_workflow.on_fire = lambda seq, ms: pending.extend((seq, ms))

    async def main():
        client = await Client.connect(args.target, namespace=args.namespace)
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[timer_workflow.TimerWorkflow],
            activities=[timer_workflow.fire],
            max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
            max_concurrent_local_activities=args.max_concurrent_local_activities,
            workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(args.workflow_task_polls),
            **({} if args.sandbox else {"workflow_runner": UnsandboxedWorkflowRunner()}),
        ):
            conn.send(("ready",))
            while True:
                await asyncio.sleep(0.1)
                if pending:
                    got = pending[:]
                    del pending[:]
                    conn.send(("got", got))

    asyncio.run(main())


def producer_main(args, task_queue, run, index, conn, go):
    """Child process: starts timers index, index + N, ... at start + s / rate.
    Sends ("ready",), then ("ack", [s, due_ms, ack_ms, call_ms, ...]), ("fail", {kind: n}),
    and ("done", unsent) at the end."""
    from temporalio.client import Client

    import timer_workflow

    n = args.producers
    total = int(round(args.rate * args.duration))
    pad = "x" * max(0, args.payload_bytes)
    span = args.fire_max_ms - args.fire_min_ms
    max_send = args.max_send_s or 2 * args.duration + 30

    async def main():
        client = await Client.connect(args.target, namespace=args.namespace)
        conn.send(("ready",))
        start = await asyncio.get_running_loop().run_in_executor(None, go.recv)
        seqs = iter(range(index, total, n))
        acks, fails = [], {}
        unsent = [0]

        async def flush():
            while True:
                await asyncio.sleep(0.05)
                if acks:
                    conn.send(("ack", acks[:]))
                    del acks[:]
                if fails:
                    conn.send(("fail", dict(fails)))
                    fails.clear()

        async def sender():
            for s in seqs:
                if time.time() - start > max_send:
                    unsent[0] += 1
                    continue
                await asyncio.sleep(max(0.0, start + s / args.rate - time.time()))
                due = int(time.time() * 1000) + args.fire_min_ms + random.randint(0, span)
                t0 = time.perf_counter()
                try:
                    await client.start_workflow(
                        timer_workflow.TimerWorkflow.run,
                        args=[s, due, pad],
                        id=f"{run}-{s}",
                        task_queue=task_queue,
                    )
                except Exception as e:  # counted by kind, like the other adapters
                    k = error_kind(e)
                    fails[k] = fails.get(k, 0) + 1
                    continue
                acks.extend((s, due, time.time() * 1000.0, (time.perf_counter() - t0) * 1000.0))

        flusher = asyncio.create_task(flush())
        await asyncio.gather(*(sender() for _ in range(args.inflight)))
        await asyncio.sleep(0.1)
        flusher.cancel()
        if acks:
            conn.send(("ack", acks[:]))
        if fails:
            conn.send(("fail", dict(fails)))
        conn.send(("done", unsent[0]))

    asyncio.run(main())


def percentiles(values):
    if not values:
        return dict(count=0, p50=0, p90=0, p99=0, p999=0, max=0)
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]
    return dict(count=len(v), p50=q(0.5), p90=q(0.9), p99=q(0.99), p999=q(0.999), max=v[-1])


def produce(args):
    run = uuid.uuid4().hex[:8]
    task_queue = f"timerdb-peer-{run}"
    total = int(round(args.rate * args.duration))
    fire_at = [0] * total  # due ms; 0 = not acknowledged
    recv_at = [0.0] * total
    hits = [0] * total
    call_ms = []
    lock = threading.Lock()
    state = dict(matched=0, acked=0, first_ack=0.0, last_ack=0.0, max_due=0, unsent=0, done=0)
    failures = {}
    ctx = mp.get_context("spawn")

    def recv_worker(conn):
        while True:
            try:
                kind, got = conn.recv()
            except (EOFError, OSError):
                return
            with lock:
                for i in range(0, len(got), 2):
                    s, ms = int(got[i]), got[i + 1]
                    if 0 <= s < total:
                        hits[s] += 1
                        if hits[s] == 1:
                            recv_at[s] = ms
                            if fire_at[s]:
                                state["matched"] += 1

    def recv_producer(conn):
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            with lock:
                if msg[0] == "ack":
                    got = msg[1]
                    for i in range(0, len(got), 4):
                        s, due, at, ms = int(got[i]), int(got[i + 1]), got[i + 2], got[i + 3]
                        fire_at[s] = due
                        call_ms.append(ms)
                        state["acked"] += 1
                        state["first_ack"] = min(state["first_ack"] or at, at)
                        state["last_ack"] = max(state["last_ack"], at)
                        state["max_due"] = max(state["max_due"], due)
                        if hits[s]:
                            state["matched"] += 1
                elif msg[0] == "fail":
                    for k, v in msg[1].items():
                        failures[k] = failures.get(k, 0) + v
                elif msg[0] == "done":
                    state["unsent"] += msg[1]
                    state["done"] += 1
                    return

    workers = []
    for _ in range(args.workers):
        parent, child = ctx.Pipe()
        w = ctx.Process(target=worker_main, args=(args, task_queue, child), daemon=True)
        w.start()
        workers.append((w, parent))
    for w, parent in workers:
        msg = parent.recv()
        assert msg[0] == "ready", msg
        threading.Thread(target=recv_worker, args=(parent,), daemon=True).start()

    producers = []
    for i in range(args.producers):
        parent, child = ctx.Pipe()
        go_r, go_w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=producer_main, args=(args, task_queue, run, i, child, go_r), daemon=True)
        p.start()
        producers.append((p, parent, go_w))
    for p, parent, _ in producers:
        msg = parent.recv()
        assert msg[0] == "ready", msg
    start = time.time() + 0.2
    for p, parent, go_w in producers:
        go_w.send(start)
        threading.Thread(target=recv_producer, args=(parent,), daemon=True).start()
    for p, _, _ in producers:
        p.join()
    time.sleep(0.2)  # the last acknowledgements through the pipes
    sent_end = time.time() * 1000.0
    while time.time() * 1000.0 < max(state["max_due"], sent_end) + args.drain * 1000:
        with lock:
            if state["matched"] >= state["acked"] and time.time() * 1000.0 >= state["max_due"]:
                break
        time.sleep(0.05)
    time.sleep(0.3)  # the workers' last report
    for w, _ in workers:
        w.kill()

    lateness, lost, early, duplicates, unacked_received = [], 0, 0, 0, 0
    with lock:
        for s in range(total):
            if hits[s] > 1:
                duplicates += hits[s] - 1
            if not fire_at[s]:
                unacked_received += hits[s] > 0
                continue
            if not hits[s]:
                lost += 1
                continue
            if recv_at[s] < fire_at[s]:
                early += 1
            lateness.append(max(0.0, recv_at[s] - fire_at[s]))
        first, last, acked = state["first_ack"], state["last_ack"], state["acked"]
        failed = sum(failures.values())
        return dict(
            system="temporal",
            rate=args.rate, total=total, acked=acked, failed=failed, unsent=state["unsent"],
            lost=lost, early=early, duplicates=duplicates,
            # started although the start call failed (e.g. timed out): received, not counted
            unacked_received=unacked_received,
            acked_rate=acked * 1000.0 / (last - first) if last > first else acked,
            lateness_ms=percentiles(lateness),
            call_ms=percentiles(call_ms),
            failures=failures,
            client=dict(producers=args.producers, inflight_per_producer=args.inflight,
                        workers=args.workers, sandbox=args.sandbox,
                        max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
                        max_concurrent_local_activities=args.max_concurrent_local_activities,
                        workflow_task_polls=args.workflow_task_polls),
        )


if __name__ == "__main__":
    out = produce(parse_args())
    print(json.dumps(out), flush=True)
    os._exit(0)
