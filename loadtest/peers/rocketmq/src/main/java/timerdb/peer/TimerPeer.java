// RocketMQ 5 peer of `timerdb-loadtest steady` (and of ../bullmq/bench.mjs): sends the same
// timers as RocketMQ timer messages (Message.setDeliverTimeMs, the broker's timer wheel) at a
// target rate and records when a push consumer receives each, so the systems are compared on
// the same figures (acknowledged rate, fire lateness, lost, early, duplicates).
//
//   java -cp 'target/classes:target/lib/*' timerdb.peer.TimerPeer --namesrv 127.0.0.1:19876 \
//     --rate 10000 --duration 20 --fire-min-ms 1000 --fire-max-ms 5000 --payload-bytes 64
//
// Prints one JSON object on stdout (progress on stderr). It creates the topic (--queues
// queues) on the broker, waits until the consumer owns every queue, then sends. Timer
// messages cannot be batched (the client refuses a batch with a delivery time), so each is
// one asynchronous send, paced one by one at the target rate (message s is due s/rate
// seconds after the start; a late sender goes at once); --inflight times --batch sends may
// be unanswered at once. A send counts as acknowledged on SEND_OK; no retries, so a send
// the broker refuses (e.g. "broker busy" flow control) counts as failed, by kind in
// "failures".
package timerdb.peer;

import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.UUID;
import java.util.concurrent.Semaphore;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendCallback;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.MQVersion;
import org.apache.rocketmq.common.TopicConfig;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.apache.rocketmq.remoting.protocol.body.ClusterInfo;
import org.apache.rocketmq.remoting.protocol.route.BrokerData;
import org.apache.rocketmq.tools.admin.DefaultMQAdminExt;

public final class TimerPeer {
    private static final String[] BROKER_SETTINGS = {
        "timerWheelEnable", "timerPrecisionMs", "timerRocksDBEnable", "timerEnableDisruptor",
        "timerFlushIntervalMs", "timerGetMessageThreadNum", "timerPutMessageThreadNum",
        "timerCongestNumEachSlot", "timerMaxDelaySec", "flushDiskType", "brokerRole",
        "sendMessageThreadPoolNums", "pullMessageThreadPoolNums", "longPollingEnable",
        "transientStorePoolEnable", "waitTimeMillsInSendQueue", "storePathRootDir",
    };

    private final Map<String, String> args = new LinkedHashMap<>();

    private TimerPeer(String[] argv) {
        args.put("namesrv", "127.0.0.1:9876");
        args.put("rate", "10000");
        args.put("duration", "20");
        args.put("fire-min-ms", "1000");
        args.put("fire-max-ms", "5000");
        args.put("payload-bytes", "64");
        args.put("batch", "1000");
        args.put("inflight", "8");
        args.put("drain", "10");
        args.put("queues", "8");
        args.put("consume-threads", "20");
        args.put("topic", "");
        for (int i = 0; i < argv.length; i += 2) {
            String k = argv[i].replaceFirst("^--", "");
            if (!args.containsKey(k) || i + 1 >= argv.length) {
                throw new IllegalArgumentException("unknown flag or missing value: " + argv[i]);
            }
            args.put(k, argv[i + 1]);
        }
    }

    private long num(String k) {
        return Long.parseLong(args.get(k));
    }

    private static void log(String fmt, Object... a) {
        System.err.printf(Locale.ROOT, "[rocketmq-peer] " + fmt + "%n", a);
    }

    private static void sleepUntil(long atMs) throws InterruptedException {
        long d = atMs - System.currentTimeMillis();
        if (d > 0) {
            Thread.sleep(d);
        }
    }

    public static void main(String[] argv) throws Exception {
        String json = new TimerPeer(argv).run();
        System.out.println(json);
        System.out.flush();
        // Client threads (netty, rebalance, scheduled tasks) need not hold the JVM.
        Runtime.getRuntime().halt(0);
    }

    private String run() throws Exception {
        final String namesrv = args.get("namesrv");
        final long rate = num("rate");
        final long duration = num("duration");
        final int total = (int) (rate * duration);
        final int batch = (int) num("batch");
        final int queues = (int) num("queues");
        final long fireMin = num("fire-min-ms");
        final long span = num("fire-max-ms") - fireMin;
        final int payloadBytes = (int) Math.max(16, num("payload-bytes"));
        final String id = UUID.randomUUID().toString().substring(0, 8);
        final String topic = args.get("topic").isEmpty() ? "timerdb-peer-" + id : args.get("topic");

        // Topic on the broker, and the broker's settings as it reports them.
        DefaultMQAdminExt admin = new DefaultMQAdminExt("timerdb-peer-admin-" + id);
        admin.setNamesrvAddr(namesrv);
        admin.start();
        String brokerAddr = null;
        long until = System.currentTimeMillis() + 60_000;
        while (brokerAddr == null) {
            try {
                ClusterInfo ci = admin.examineBrokerClusterInfo();
                for (BrokerData bd : ci.getBrokerAddrTable().values()) {
                    brokerAddr = bd.getBrokerAddrs().get(0L);
                }
            } catch (Exception e) {
                if (System.currentTimeMillis() > until) {
                    throw e;
                }
            }
            if (brokerAddr == null) {
                if (System.currentTimeMillis() > until) {
                    throw new IllegalStateException("no broker registered at " + namesrv);
                }
                Thread.sleep(200);
            }
        }
        Properties brokerProps = admin.getBrokerConfig(brokerAddr);
        Map<String, String> broker = new LinkedHashMap<>();
        for (String k : BROKER_SETTINGS) {
            broker.put(k, brokerProps.getProperty(k));
        }
        broker.put("brokerAddr", brokerAddr);
        broker.put("clientVersion", MQVersion.getVersionDesc(MQVersion.CURRENT_VERSION));
        final int precisionMs = Integer.parseInt(brokerProps.getProperty("timerPrecisionMs", "0"));
        admin.createAndUpdateTopicConfig(brokerAddr, new TopicConfig(topic, queues, queues));
        until = System.currentTimeMillis() + 30_000;
        for (;;) {
            try {
                if (admin.examineTopicRouteInfo(topic).getQueueDatas().get(0).getReadQueueNums() == queues) {
                    break;
                }
            } catch (Exception e) {
                if (System.currentTimeMillis() > until) {
                    throw e;
                }
            }
            Thread.sleep(100);
        }
        log("broker %s, topic %s (%d queues), timerPrecisionMs %d, flushDiskType %s",
            brokerAddr, topic, queues, precisionMs, broker.get("flushDiskType"));

        final long[] fireAt = new long[total]; // 0 = not acknowledged
        final long[] recvAt = new long[total];
        final long[] putAt = new long[total]; // when the broker put it back on the topic
        final byte[] hits = new byte[total];
        final Object lock = new Object();
        final long[] matched = {0};
        final int[] duplicatesOver = {0};

        DefaultMQPushConsumer consumer = new DefaultMQPushConsumer("timerdb-peer-c-" + id);
        consumer.setNamesrvAddr(namesrv);
        consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        consumer.setConsumeThreadMin((int) num("consume-threads"));
        consumer.setConsumeThreadMax((int) num("consume-threads"));
        consumer.subscribe(topic, "*");
        consumer.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            long now = System.currentTimeMillis();
            synchronized (lock) {
                for (MessageExt m : msgs) {
                    int s = (int) ByteBuffer.wrap(m.getBody()).getLong(0);
                    if (s < 0 || s >= total) {
                        continue;
                    }
                    if (hits[s] == Byte.MAX_VALUE) {
                        duplicatesOver[0]++;
                        continue;
                    }
                    if (hits[s]++ == 0) {
                        recvAt[s] = now;
                        putAt[s] = m.getStoreTimestamp();
                        if (fireAt[s] != 0) {
                            matched[0]++;
                        }
                    }
                }
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        consumer.start();
        until = System.currentTimeMillis() + 60_000;
        while (consumer.getDefaultMQPushConsumerImpl().getRebalanceImpl().getProcessQueueTable().size() < queues) {
            if (System.currentTimeMillis() > until) {
                throw new IllegalStateException("consumer was not given the topic's queues");
            }
            Thread.sleep(50);
        }

        DefaultMQProducer producer = new DefaultMQProducer("timerdb-peer-p-" + id);
        producer.setNamesrvAddr(namesrv);
        producer.setRetryTimesWhenSendAsyncFailed(0);
        producer.setRetryTimesWhenSendFailed(0);
        producer.setSendMsgTimeout(10_000);
        producer.start();
        producer.fetchPublishMessageQueues(topic);
        log("consumer owns %d queues; sending %d timers at %d/s", queues, total, rate);

        final Semaphore window = new Semaphore((int) Math.max(1, num("inflight") * batch));
        final AtomicLong acked = new AtomicLong();
        final AtomicLong failed = new AtomicLong();
        final AtomicLong firstAck = new AtomicLong();
        final AtomicLong lastAck = new AtomicLong();
        final AtomicLong maxDue = new AtomicLong();
        final Map<String, Long> failures = new TreeMap<>();
        final float[] callMs = new float[total];
        final byte[] pad = new byte[payloadBytes];
        Arrays.fill(pad, (byte) 'x');

        final long start = System.currentTimeMillis();
        final long maxTime = 2 * duration * 1000 + 30_000;
        int sent = 0;
        for (int s = 0; s < total && System.currentTimeMillis() - start <= maxTime; s++) {
            sleepUntil(start + s * 1000L / rate);
            window.acquire();
            long now = System.currentTimeMillis();
            final long due = now + fireMin + ThreadLocalRandom.current().nextLong(span + 1);
            ByteBuffer body = ByteBuffer.wrap(pad.clone());
            body.putLong(0, s).putLong(8, due);
            Message msg = new Message(topic, body.array());
            msg.setDeliverTimeMs(due);
            final int seq = s;
            final long t0 = System.nanoTime();
            SendCallback cb = new SendCallback() {
                @Override
                public void onSuccess(SendResult r) {
                    window.release();
                    if (r.getSendStatus() != SendStatus.SEND_OK) {
                        fail(r.getSendStatus().name());
                        return;
                    }
                    long at = System.currentTimeMillis();
                    callMs[seq] = (System.nanoTime() - t0) / 1e6f;
                    firstAck.compareAndSet(0, at);
                    lastAck.accumulateAndGet(at, Math::max);
                    maxDue.accumulateAndGet(due, Math::max);
                    synchronized (lock) {
                        fireAt[seq] = due;
                        if (hits[seq] != 0) {
                            matched[0]++;
                        }
                    }
                    acked.incrementAndGet();
                }

                @Override
                public void onException(Throwable e) {
                    window.release();
                    fail(e.getClass().getSimpleName() + ": " + String.valueOf(e.getMessage()).split("\n")[0]);
                }

                private void fail(String why) {
                    failed.incrementAndGet();
                    // One entry per kind of failure: numbers (queue sizes, waits) and the
                    // broker's address and hints dropped.
                    String kind = why.replaceAll("BROKER:.*|, see http.*|\\d+", "#").trim();
                    synchronized (failures) {
                        failures.merge(kind.length() > 160 ? kind.substring(0, 160) : kind, 1L, Long::sum);
                    }
                }
            };
            try {
                producer.send(msg, cb);
            } catch (Exception e) {
                cb.onException(e);
            }
            sent++;
        }
        // Every send answered (or timed out), then drain like the other drivers.
        window.acquire((int) Math.max(1, num("inflight") * batch));
        final long sentEnd = System.currentTimeMillis();
        final long drainUntil = Math.max(maxDue.get(), sentEnd) + num("drain") * 1000;
        while (System.currentTimeMillis() < drainUntil) {
            synchronized (lock) {
                if (matched[0] >= acked.get() && System.currentTimeMillis() >= maxDue.get()) {
                    break;
                }
            }
            Thread.sleep(50);
        }
        Thread.sleep(300); // let the consumer threads finish what they hold
        consumer.shutdown();
        producer.shutdown();
        admin.shutdown();

        List<Double> lateness = new ArrayList<>();
        List<Double> putLateness = new ArrayList<>();
        List<Double> calls = new ArrayList<>();
        long lost = 0, early = 0, duplicates = duplicatesOver[0], unexpected = 0;
        synchronized (lock) {
            for (int s = 0; s < total; s++) {
                if (hits[s] > 1) {
                    duplicates += hits[s] - 1;
                }
                if (fireAt[s] == 0) {
                    if (hits[s] != 0) {
                        unexpected++; // received, but its send was not acknowledged
                    }
                    continue;
                }
                calls.add((double) callMs[s]);
                if (hits[s] == 0) {
                    lost++;
                    continue;
                }
                if (recvAt[s] < fireAt[s]) {
                    early++;
                }
                lateness.add((double) Math.max(0, recvAt[s] - fireAt[s]));
                putLateness.add((double) (putAt[s] - fireAt[s]));
            }
        }
        long a = acked.get();
        double ackedRate = lastAck.get() > firstAck.get() ? a * 1000.0 / (lastAck.get() - firstAck.get()) : a;
        StringBuilder o = new StringBuilder();
        o.append("{\"system\":\"rocketmq\",\"precision_ms\":").append(precisionMs)
            .append(",\"rate\":").append(rate).append(",\"total\":").append(total)
            .append(",\"sent\":").append(sent).append(",\"acked\":").append(a)
            .append(",\"failed\":").append(failed.get()).append(",\"lost\":").append(lost)
            .append(",\"early\":").append(early).append(",\"duplicates\":").append(duplicates)
            .append(",\"unexpected\":").append(unexpected)
            .append(",\"acked_rate\":").append(String.format(Locale.ROOT, "%.3f", ackedRate))
            .append(",\"lateness_ms\":").append(percentiles(lateness))
            .append(",\"put_lateness_ms\":").append(percentiles(putLateness))
            .append(",\"call_ms\":").append(percentiles(calls))
            .append(",\"failures\":{");
        String sep = "";
        for (Map.Entry<String, Long> e : failures.entrySet()) {
            o.append(sep).append(quote(e.getKey())).append(':').append(e.getValue());
            sep = ",";
        }
        o.append("},\"broker\":{");
        sep = "";
        for (Map.Entry<String, String> e : broker.entrySet()) {
            o.append(sep).append(quote(e.getKey())).append(':').append(quote(String.valueOf(e.getValue())));
            sep = ",";
        }
        return o.append("}}").toString();
    }

    // Same definition as bench.mjs: the value at rank ceil(p * n).
    private static String percentiles(List<Double> values) {
        if (values.isEmpty()) {
            return "{\"count\":0,\"p50\":0,\"p90\":0,\"p99\":0,\"p999\":0,\"max\":0,\"min\":0}";
        }
        double[] v = values.stream().mapToDouble(Double::doubleValue).sorted().toArray();
        int n = v.length;
        java.util.function.DoubleFunction<Double> q = p -> v[Math.max(0, Math.min(n - 1, (int) Math.ceil(p * n) - 1))];
        return String.format(Locale.ROOT,
            "{\"count\":%d,\"p50\":%s,\"p90\":%s,\"p99\":%s,\"p999\":%s,\"max\":%s,\"min\":%s}",
            n, fmt(q.apply(0.5)), fmt(q.apply(0.9)), fmt(q.apply(0.99)), fmt(q.apply(0.999)),
            fmt(v[n - 1]), fmt(v[0]));
    }

    private static String fmt(double d) {
        return d == Math.rint(d) ? Long.toString((long) d) : String.format(Locale.ROOT, "%.3f", d);
    }

    private static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                b.append('\\').append(c);
            } else if (c < 0x20) {
                b.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
            } else {
                b.append(c);
            }
        }
        return b.append('"').toString();
    }
}
