// BullMQ peer of `timerdb-loadtest steady`: schedules the same timers as BullMQ delayed
// jobs at a target rate and records when a worker receives each, so the two systems are
// compared on the same figures (acknowledged rate, fire lateness, lost, early).
//
//   node bench.mjs --rate 10000 --duration 20 --fire-min-ms 1000 --fire-max-ms 5000
//
// Prints one JSON object on stdout. The worker runs in a child process (as a consumer
// would), so the producer's pacing and the worker's receive times do not share a thread.
import { fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

function parseArgs(argv) {
  const a = {
    rate: 10000, duration: 20, 'fire-min-ms': 1000, 'fire-max-ms': 5000, 'payload-bytes': 64,
    batch: 1000, inflight: 8, redis: '127.0.0.1:6379', drain: 10, concurrency: 200,
    role: 'producer', queue: '',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '');
    if (!(k in a)) throw new Error(`unknown flag --${k}`);
    a[k] = typeof a[k] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  return a;
}

const args = parseArgs(process.argv.slice(2));
const [host, port] = args.redis.split(':');
// BullMQ under ESM wants constructed clients; each user gets its own (the worker blocks).
const connect = () => new IORedis({ host, port: Number(port), maxRetriesPerRequest: null });
const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

if (args.role === 'worker') {
  runWorker();
} else {
  runProducer().then(
    (out) => { console.log(JSON.stringify(out)); process.exit(0); },
    (e) => { console.error(e); process.exit(2); },
  );
}

// Receives jobs and reports [seq, receive time] pairs to the producer in batches.
function runWorker() {
  let pending = [];
  const worker = new Worker(args.queue, async (job) => {
    pending.push(job.data.s, Date.now());
  }, { connection: connect(), concurrency: args.concurrency, removeOnComplete: { count: 0 }, removeOnFail: { count: 0 } });
  worker.on('ready', () => process.send({ ready: true }));
  // Bounded by the parent: it kills this process when the run ends.
  setInterval(() => {
    if (pending.length) {
      process.send({ got: pending });
      pending = [];
    }
  }, 100);
}

function percentiles(values) {
  if (!values.length) return { count: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0 };
  const v = Float64Array.from(values).sort();
  const q = (p) => v[Math.min(v.length - 1, Math.ceil(p * v.length) - 1)];
  return { count: v.length, p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999), max: v[v.length - 1] };
}

async function runProducer() {
  const name = `timerdb-peer-${randomBytes(6).toString('hex')}`;
  const total = Math.round(args.rate * args.duration);
  const fireAt = new Float64Array(total); // 0 = not acknowledged
  const hits = new Uint8Array(total);
  const recvAt = new Float64Array(total);
  const queue = new Queue(name, { connection: connect() });
  await queue.waitUntilReady();

  const worker = fork(fileURLToPath(import.meta.url), [...process.argv.slice(2), '--role', 'worker', '--queue', name]);
  await new Promise((resolve) => worker.on('message', function first(m) {
    if (m.ready) { worker.off('message', first); resolve(); }
  }));
  let matched = 0;
  worker.on('message', (m) => {
    if (!m.got) return;
    for (let i = 0; i < m.got.length; i += 2) {
      const s = m.got[i];
      if (hits[s]++ === 0) {
        recvAt[s] = m.got[i + 1];
        if (fireAt[s]) matched++;
      }
    }
  });

  const pad = 'x'.repeat(Math.max(0, args['payload-bytes'] - 40));
  const span = args['fire-max-ms'] - args['fire-min-ms'];
  const batches = Math.ceil(total / args.batch);
  const callMs = [];
  let acked = 0, failed = 0, next = 0, maxDue = 0, firstAck = 0, lastAck = 0;
  const start = Date.now();
  // Like the Rust driver: batch k is due when k batches were sent at the target rate; a
  // late sender goes at once. Stops sending after twice the planned time plus 30 s.
  const maxTime = 2 * args.duration * 1000 + 30000;
  async function sender() {
    for (;;) {
      const k = next++;
      if (k >= batches || Date.now() - start > maxTime) return;
      await sleep(start + (k * args.batch * 1000) / args.rate - Date.now());
      const first = k * args.batch;
      const last = Math.min(first + args.batch, total);
      const now = Date.now();
      const jobs = [];
      const fires = [];
      for (let s = first; s < last; s++) {
        const delay = args['fire-min-ms'] + Math.floor(Math.random() * (span + 1));
        fires.push(now + delay);
        jobs.push({ name: 't', data: { s, f: now + delay, p: pad }, opts: { delay, removeOnComplete: true, removeOnFail: true } });
      }
      const t = performance.now();
      try {
        await queue.addBulk(jobs);
        callMs.push(performance.now() - t);
        const at = Date.now();
        firstAck = firstAck || at;
        lastAck = at;
        for (let s = first; s < last; s++) {
          fireAt[s] = fires[s - first];
          maxDue = Math.max(maxDue, fireAt[s]);
          if (hits[s]) matched++;
        }
        acked += last - first;
      } catch (e) {
        failed += last - first;
        console.error(`addBulk failed: ${e.message}`);
      }
    }
  }
  await Promise.all(Array.from({ length: args.inflight }, sender));
  const sentEnd = Date.now();
  while (Date.now() < Math.max(maxDue, sentEnd) + args.drain * 1000) {
    if (matched >= acked && Date.now() >= maxDue) break;
    await sleep(50);
  }
  await sleep(300); // let the last reports of the worker arrive
  worker.kill();

  const lateness = [];
  let lost = 0, early = 0, duplicates = 0;
  for (let s = 0; s < total; s++) {
    if (hits[s] > 1) duplicates += hits[s] - 1;
    if (!fireAt[s]) continue;
    if (!hits[s]) { lost++; continue; }
    if (recvAt[s] < fireAt[s]) early++;
    lateness.push(Math.max(0, recvAt[s] - fireAt[s]));
  }
  await queue.obliterate({ force: true }).catch(() => {});
  await queue.close();
  return {
    system: 'bullmq',
    rate: args.rate, total, acked, failed, lost, early, duplicates,
    acked_rate: lastAck > firstAck ? (acked * 1000) / (lastAck - firstAck) : acked,
    lateness_ms: percentiles(lateness),
    call_ms: percentiles(callMs),
  };
}
