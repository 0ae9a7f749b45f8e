#!/usr/bin/env python3
"""Temporal peer of `timerdb-loadtest steady` (and of ../bullmq/bench.mjs): starts one
workflow per timer at a target rate; each sleeps until its due time (workflow.sleep) and
then fires a local activity, whose run time in the worker is the receive time. Prints one
JSON object on stdout with the same figures as the other adapters (acknowledged rate, fire
lateness, lost, early, duplicates).

    python bench.py --target 127.0.0.1:17233 --rate 200 --duration 20

The worker runs in a child process (as a consumer would) and reports (seq, time) pairs to
the producer every 100 ms. Workflows run without the Python SDK's sandbox unless --sandbox
(the sandbox re-imports the workflow module for every run: worker CPU, not Temporal's timers). A start counts as acknowledged when StartWorkflowExecution
answered; there is no batch start, so --inflight starts may be unanswered at once.
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
    p.add_argument("--inflight", type=int, default=200)
    p.add_argument("--drain", type=float, default=10)
    p.add_argument("--max-concurrent-workflow-tasks", type=int, default=100)
    p.add_argument(
        "--sandbox", action="store_true",
        help="run workflows in the Python SDK's sandbox (its default; costs the worker CPU per run)",
    )
    return p.parse_args(argv)


def worker_main(args, task_queue, conn):
    """Child process: the Temporal worker. Sends ("ready",), then ("got", [seq, ms, ...])."""
    from temporalio.client import Client
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

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


def percentiles(values):
    if not values:
        return dict(count=0, p50=0, p90=0, p99=0, p999=0, max=0)
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]
    return dict(count=len(v), p50=q(0.5), p90=q(0.9), p99=q(0.99), p999=q(0.999), max=v[-1])


async def produce(args):
    from temporalio.client import Client

    import timer_workflow

    run = uuid.uuid4().hex[:8]
    task_queue = f"timerdb-peer-{run}"
    total = int(round(args.rate * args.duration))
    fire_at = [0.0] * total  # 0 = not acknowledged
    recv_at = [0.0] * total
    hits = [0] * total
    lock = threading.Lock()
    state = dict(matched=0, acked=0, failed=0, first_ack=0.0, last_ack=0.0, max_due=0.0)
    failures = {}

    parent, child = mp.Pipe()
    worker = mp.get_context("spawn").Process(target=worker_main, args=(args, task_queue, child), daemon=True)
    worker.start()
    msg = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    assert msg[0] == "ready", msg

    def receive():
        while True:
            try:
                kind, got = parent.recv()
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

    threading.Thread(target=receive, daemon=True).start()

    client = await Client.connect(args.target, namespace=args.namespace)
    pad = "x" * max(0, args.payload_bytes)
    span = args.fire_max_ms - args.fire_min_ms
    call_ms = []
    start = time.time()
    max_time = 2 * args.duration + 30
    nxt = [0]

    async def sender():
        while True:
            s = nxt[0]
            nxt[0] += 1
            if s >= total or time.time() - start > max_time:
                return
            await asyncio.sleep(max(0.0, start + s / args.rate - time.time()))
            due = time.time() * 1000.0 + args.fire_min_ms + random.randint(0, span)
            t0 = time.perf_counter()
            try:
                await client.start_workflow(
                    timer_workflow.TimerWorkflow.run,
                    args=[s, int(due), pad],
                    id=f"{run}-{s}",
                    task_queue=task_queue,
                )
            except Exception as e:  # counted by kind, like the other adapters
                kind = re.sub(r"\d+", "#", f"{type(e).__name__}: {e}")[:160]
                with lock:
                    state["failed"] += 1
                    failures[kind] = failures.get(kind, 0) + 1
                continue
            at = time.time() * 1000.0
            call_ms.append((time.perf_counter() - t0) * 1000.0)
            with lock:
                fire_at[s] = due
                state["acked"] += 1
                state["first_ack"] = state["first_ack"] or at
                state["last_ack"] = max(state["last_ack"], at)
                state["max_due"] = max(state["max_due"], due)
                if hits[s]:
                    state["matched"] += 1

    await asyncio.gather(*(sender() for _ in range(args.inflight)))
    sent_end = time.time() * 1000.0
    while time.time() * 1000.0 < max(state["max_due"], sent_end) + args.drain * 1000:
        with lock:
            if state["matched"] >= state["acked"] and time.time() * 1000.0 >= state["max_due"]:
                break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the worker's last report
    worker.kill()

    lateness, lost, early, duplicates = [], 0, 0, 0
    with lock:
        for s in range(total):
            if hits[s] > 1:
                duplicates += hits[s] - 1
            if not fire_at[s]:
                continue
            if not hits[s]:
                lost += 1
                continue
            if recv_at[s] < fire_at[s]:
                early += 1
            lateness.append(max(0.0, recv_at[s] - fire_at[s]))
    first, last, acked = state["first_ack"], state["last_ack"], state["acked"]
    return dict(
        system="temporal",
        rate=args.rate, total=total, acked=acked, failed=state["failed"], lost=lost, early=early,
        duplicates=duplicates,
        acked_rate=acked * 1000.0 / (last - first) if last > first else acked,
        lateness_ms=percentiles(lateness),
        call_ms=percentiles(call_ms),
        failures=failures,
    )


if __name__ == "__main__":
    out = asyncio.run(produce(parse_args()))
    print(json.dumps(out), flush=True)
    os._exit(0)
