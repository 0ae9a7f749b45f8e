// Readiness probe for the local Kafka.  deploy/local/lib.sh compiles it once with
// javac against the Kafka jars it already fetched (no other dependency) and runs
//   java -cp PROBE_DIR:'lib/*' KafkaReady BOOTSTRAP TOPIC TIMEOUT_SECONDS
//
// "Ready" means what the TimerDB tests need, not just "port open": the topic can be
// created (or exists), a record can be produced with acks=all, and that very record
// can be fetched back.  Everything is retried until the deadline because during
// start-up the broker accepts connections before it has leadership/metadata.
//
// Exit 0 when ready, 1 on timeout.  Progress goes to stderr.

import java.time.Duration;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class KafkaReady {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[2]));
        String lastError = "";
        int attempt = 0;
        // do-while: a timeout of 0 still makes one attempt (used by `ctl kafka status`).
        do {
            attempt++;
            try {
                probe(bootstrap, topic);
                System.err.println("kafka-ready: produce+fetch on " + topic + " ok (attempt " + attempt + ")");
                System.exit(0);
            } catch (Exception e) {
                Throwable cause = e instanceof ExecutionException && e.getCause() != null ? e.getCause() : e;
                lastError = cause.getClass().getSimpleName() + ": " + cause.getMessage();
            }
            if (System.nanoTime() < deadline) Thread.sleep(1000);
        } while (System.nanoTime() < deadline);
        System.err.println("kafka-ready: timed out after " + attempt + " attempts; last error: " + lastError);
        System.exit(1);
    }

    static void probe(String bootstrap, String topic) throws Exception {
        Properties common = new Properties();
        common.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        // Keep each attempt short (a few seconds): an attempt that started while the
        // broker was still registering should give up quickly and let the outer
        // loop try again, rather than sit out a long client timeout.
        common.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        common.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");

        try (Admin admin = Admin.create(common)) {
            try {
                admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1))).all().get(5, TimeUnit.SECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
        }

        String value = "ready-" + UUID.randomUUID();
        RecordMetadata md;
        Properties p = new Properties();
        p.putAll(common);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "5000");
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "5000");
        p.put(ProducerConfig.LINGER_MS_CONFIG, "0");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
            md = producer.send(new ProducerRecord<>(topic, "probe", value)).get(6, TimeUnit.SECONDS);
        }

        // assign()+seek() instead of a consumer group: no group coordinator round-trips,
        // and we read exactly the offset we just wrote.
        Properties c = new Properties();
        c.putAll(common);
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        TopicPartition tp = new TopicPartition(topic, md.partition());
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(c)) {
            consumer.assign(Collections.singletonList(tp));
            consumer.seek(tp, md.offset());
            long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (System.nanoTime() < until) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                    if (r.offset() == md.offset() && value.equals(r.value())) return;
                }
            }
        }
        throw new IllegalStateException("produced " + value + " at offset " + md.offset() + " but could not fetch it back");
    }
}
