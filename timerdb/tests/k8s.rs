//! `deploy/k8s` checked against the node's real interface, with no Kubernetes and no schema
//! download: every manifest parses and the kustomization lists it; the StatefulSet's
//! entrypoint, run the way the kubelet runs it (its `$(NAME)` expansion, the downward-API
//! variables, the real `/bin/sh`), gives each pod only flags that `timerdb serve` has and a
//! configuration that the node's own loader accepts together with the ConfigMap's TOML
//! file; the addresses in it are the pods' names on the headless Service; ports, probes,
//! selectors and volumes agree; and the probes pass on a running `timerdb serve` started
//! with that same TOML file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use timerdb::config::{Config, Overrides};

/// The namespace the pods are rendered in: not `default`, so that a namespace written into
/// a manifest instead of taken from the downward API shows.
const NAMESPACE: &str = "timers-prod";

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every document of every manifest named by the kustomization, with its file name.
struct Manifests {
    docs: Vec<(String, Value)>,
    kustomization: Value,
}

fn parse_yaml(file: &str, text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("deploy/k8s/{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn read(file: &str) -> String {
    std::fs::read_to_string(k8s_dir().join(file))
        .unwrap_or_else(|e| panic!("deploy/k8s/{file}: {e}"))
}

fn manifests() -> Manifests {
    let kustomization = parse_yaml("kustomization.yaml", &read("kustomization.yaml"))
        .pop()
        .expect("kustomization.yaml has a document");
    let mut docs = Vec::new();
    for file in kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
    {
        let file = file.as_str().expect("a resource is a file name");
        for doc in parse_yaml(file, &read(file)) {
            docs.push((file.to_owned(), doc));
        }
    }
    Manifests {
        docs,
        kustomization,
    }
}

impl Manifests {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == kind)
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, found {}", all.len());
        all[0]
    }

    fn statefulset(&self) -> &Value {
        self.one("StatefulSet")
    }

    /// The Service the StatefulSet names as its `serviceName`.
    fn headless(&self) -> &Value {
        let name = text(self.statefulset(), "/spec/serviceName");
        self.of_kind("Service")
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name:?}, the StatefulSet's serviceName"))
    }

    /// The other Service: the one clients use.
    fn client_service(&self) -> &Value {
        let headless = text(self.headless(), "/metadata/name").to_owned();
        let others: Vec<&Value> = self
            .of_kind("Service")
            .into_iter()
            .filter(|s| s["metadata"]["name"] != headless.as_str())
            .collect();
        assert_eq!(others.len(), 1, "expected one client Service: {others:?}");
        others[0]
    }

    fn pod_spec(&self) -> &Value {
        &self.statefulset()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod_spec()["containers"]
            .as_array()
            .expect("the pod has containers");
        assert_eq!(containers.len(), 1, "one container per pod");
        &containers[0]
    }

    /// The number a container port name (or number) stands for.
    fn container_port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            let n = u16::try_from(n).expect("a port number");
            assert!(
                self.container_ports().values().any(|p| *p == n),
                "port {n} is not a containerPort: {:?}",
                self.container_ports()
            );
            return n;
        }
        let name = port.as_str().expect("a port is a number or a name");
        *self
            .container_ports()
            .get(name)
            .unwrap_or_else(|| panic!("no containerPort named {name:?}"))
    }

    fn container_ports(&self) -> BTreeMap<String, u16> {
        self.container()["ports"]
            .as_array()
            .expect("the container declares its ports")
            .iter()
            .map(|p| {
                (
                    text(p, "/name").to_owned(),
                    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).unwrap(),
                )
            })
            .collect()
    }

    fn grpc_port(&self) -> u16 {
        self.container_port(&Value::from("grpc"))
    }

    fn metrics_port(&self) -> u16 {
        self.container_port(&Value::from("metrics"))
    }

    fn replicas(&self) -> u32 {
        self.statefulset()["spec"]["replicas"]
            .as_u64()
            .expect("replicas") as u32
    }

    fn template_labels(&self) -> &Value {
        &self.statefulset()["spec"]["template"]["metadata"]["labels"]
    }

    /// Where the container mounts the volume `volume`.
    fn mount_path(&self, volume: &str) -> PathBuf {
        self.container()["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| PathBuf::from(text(m, "/mountPath")))
            .unwrap_or_else(|| panic!("volume {volume:?} is not mounted"))
    }
}

/// The string at `pointer`, or a panic naming it.
fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

/// Whether every `key: value` of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector is a map");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The kubelet's expansion of `$(NAME)` in command, args and env values: a defined NAME is
/// replaced, `$$` is one `$`, anything else is left as written (as in Kubernetes'
/// `third_party/forked/golang/expansion`).
fn kubelet_expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let b = input.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' || i + 1 == b.len() {
            let ch = input[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        match b[i + 1] {
            b'$' => {
                out.push('$');
                i += 2;
            }
            b'(' => match input[i + 2..].find(')') {
                Some(len) => {
                    let name = &input[i + 2..i + 2 + len];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => out.push_str(&input[i..i + 3 + len]),
                    }
                    i += 3 + len;
                }
                None => {
                    out.push_str("$(");
                    i += 2;
                }
            },
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// One pod as the StatefulSet makes it.
#[derive(Debug)]
struct Pod {
    ordinal: u32,
    /// `serve`'s arguments, as the entrypoint passes them (after `timerdb serve`).
    argv: Vec<String>,
    /// The environment the kubelet gives the container.
    env: BTreeMap<String, String>,
}

/// Runs the container's command for pod `ordinal` as the kubelet would (expanded, with the
/// container's environment and nothing else), with a `timerdb` on PATH that prints its
/// arguments instead of serving.
fn render(m: &Manifests, ordinal: u32) -> Pod {
    let c = m.container();
    let pod_name = format!("{}-{ordinal}", text(m.statefulset(), "/metadata/name"));
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().expect("env") {
        let name = text(e, "/name").to_owned();
        let value = if let Some(v) = e.get("value") {
            kubelet_expand(v.as_str().expect("env values are strings"), &env)
        } else {
            match e
                .pointer("/valueFrom/fieldRef/fieldPath")
                .and_then(Value::as_str)
            {
                Some("metadata.name") => pod_name.clone(),
                Some("metadata.namespace") => NAMESPACE.to_owned(),
                other => panic!("env {name}: no rendering for {other:?}"),
            }
        };
        env.insert(name, value);
    }
    let strings = |key: &str| -> Vec<String> {
        c[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| kubelet_expand(s.as_str().expect("a string"), &env))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut command = strings("command");
    command.extend(strings("args"));
    assert!(
        !command.is_empty(),
        "the container must set its command: the image's default command runs a lone node"
    );

    let shim = tempfile::tempdir().unwrap();
    let bin = shim.path().join("timerdb");
    // The count first, so that an argument holding a newline cannot pass unnoticed.
    std::fs::write(&bin, "#!/bin/sh\necho \"$#\"\nprintf '%s\\n' \"$@\"\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new(&command[0])
        .args(&command[1..])
        .env_clear()
        .envs(&env)
        .env("PATH", format!("{}:/usr/bin:/bin", shim.path().display()))
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", command[0]));
    assert!(
        out.status.success(),
        "the entrypoint of {pod_name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let count: usize = lines
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the entrypoint of {pod_name} never ran timerdb: {stdout:?}"));
    let argv: Vec<String> = lines.map(str::to_owned).collect();
    assert_eq!(argv.len(), count, "{pod_name}: arguments {argv:?}");
    assert_eq!(
        argv.first().map(String::as_str),
        Some("serve"),
        "{pod_name} must run `timerdb serve`: {argv:?}"
    );
    Pod {
        ordinal,
        argv: argv[1..].to_vec(),
        env,
    }
}

/// `--flag value` (or `--flag=value`) pairs; every argument of `serve` is a flag with a value.
fn flag_values(argv: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        assert!(a.starts_with("--"), "not a flag: {a:?} in {argv:?}");
        match a.split_once('=') {
            Some((f, v)) => out.push((f.to_owned(), v.to_owned())),
            None => {
                let v = it.next().unwrap_or_else(|| panic!("{a} has no value"));
                out.push((a.clone(), v.clone()));
            }
        }
    }
    out
}

/// The ConfigMap key (written to a file in `dir`) that the container reads as `path`.
fn config_file_for(m: &Manifests, path: &Path, dir: &Path) -> PathBuf {
    let cm = m.one("ConfigMap");
    let cm_name = text(cm, "/metadata/name");
    let volume = m.pod_spec()["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v.pointer("/configMap/name") == Some(&Value::from(cm_name)))
        .unwrap_or_else(|| panic!("no volume holds the ConfigMap {cm_name:?}"));
    assert!(
        volume["configMap"].get("items").is_none(),
        "items would rename the keys; this test maps keys to file names one to one"
    );
    let mount = m.mount_path(text(volume, "/name"));
    let key = path
        .strip_prefix(&mount)
        .unwrap_or_else(|_| {
            panic!(
                "--config {} is not on the ConfigMap's mount {}",
                path.display(),
                mount.display()
            )
        })
        .to_str()
        .unwrap();
    let toml = cm["data"][key].as_str().unwrap_or_else(|| {
        panic!(
            "--config {} names key {key:?}, which ConfigMap {cm_name} does not have",
            path.display()
        )
    });
    let file = dir.join(key);
    std::fs::write(&file, toml).unwrap();
    file
}

/// The overrides the binary builds from these flags (serve.rs: `ServeArgs::config`).
fn overrides(m: &Manifests, flags: &[(String, String)], dir: &Path) -> Overrides {
    let mut o = Overrides::default();
    for (flag, v) in flags {
        let v = v.clone();
        match flag.as_str() {
            "--config" => o.config_file = Some(config_file_for(m, Path::new(&v), dir)),
            "--listen" => o.listen = Some(v),
            "--metrics-listen" => o.metrics_listen = Some(v),
            "--store" => o.store = Some(v),
            "--sink" => o.sink = Some(v),
            "--node-id" => o.node_id = Some(v.parse().expect("--node-id is a number")),
            "--advertise" => o.advertise = Some(v),
            "--raft-dir" => o.raft_dir = Some(v.into()),
            "--initial-members" => o.initial_members = Some(v),
            "--join" => o.join = Some(v),
            other => panic!("{other}: map it to timerdb::config::Overrides here"),
        }
    }
    o
}

/// Pods 0..replicas, then one more as a scale-up adds it, each with the configuration the
/// node's loader (`Config::load`, which also validates) makes of its flags and the
/// ConfigMap's file.
fn members(m: &Manifests) -> Vec<(Pod, Config)> {
    let dir = tempfile::tempdir().unwrap();
    (0..=m.replicas())
        .map(|ordinal| {
            let pod = render(m, ordinal);
            let o = overrides(m, &flag_values(&pod.argv), dir.path());
            let config = Config::load(o).unwrap_or_else(|e| {
                panic!(
                    "pod {ordinal}: the node refuses its configuration: {e}\nargs: {:?}",
                    pod.argv
                )
            });
            (pod, config)
        })
        .collect()
}

fn host_port(addr: &str) -> (&str, u16) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("a port"))
}

/// `--help` of a `timerdb` command: its long flags and the environment variables it reads.
fn help(args: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_timerdb"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "timerdb {args:?} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('-') {
            for word in line.split(|c: char| c.is_whitespace() || c == ',') {
                if let Some(name) = word.strip_prefix("--") {
                    let name: String = name
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    flags.insert(format!("--{name}"));
                }
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            rest = &rest[at + 6..];
            envs.insert(rest.split('=').next().unwrap().to_owned());
        }
    }
    assert!(
        flags.len() > 1,
        "no flags in timerdb {args:?} --help:\n{text}"
    );
    (flags, envs)
}

/// Kubernetes quantity (`512Mi`, `2Gi`, `1G`, `1000`) in bytes.
fn quantity(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().expect("a whole quantity") * factor;
        }
    }
    q.parse().expect("a quantity")
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_it() {
    let m = manifests();
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(k8s_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && name != "kustomization.yaml" {
            on_disk.insert(name);
        }
    }
    let listed: BTreeSet<String> = m.docs.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources vs the files");
    for (file, doc) in &m.docs {
        for key in ["/apiVersion", "/kind", "/metadata/name"] {
            text(doc, key);
        }
        assert!(
            doc["metadata"].get("namespace").is_none(),
            "{file}: the namespace comes from `kubectl -n` or the kustomization"
        );
    }
    let mut kinds: Vec<&str> = m.docs.iter().map(|(_, d)| text(d, "/kind")).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "StatefulSet"
        ]
    );
    // `kustomize edit set image timerdb=...` must reach the container.
    let image = text(m.container(), "/image");
    let images = m.kustomization["images"].as_array().expect("images");
    assert!(
        images.iter().any(|i| i["name"] == image),
        "kustomization images {images:?} do not name the container's image {image:?}"
    );
}

#[test]
fn the_pods_run_as_the_user_of_the_image_the_readme_builds() {
    let m = manifests();
    let readme = read("README.md");
    let dockerfile = "deploy/compose/Dockerfile";
    assert!(
        readme.contains(dockerfile),
        "README.md must say how to build the image"
    );
    let text = std::fs::read_to_string(k8s_dir().join("../..").join(dockerfile)).unwrap();
    let uid = m.pod_spec()["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser");
    assert!(
        text.contains(&format!("--uid {uid} ")),
        "{dockerfile} does not create uid {uid}, the pods' runAsUser"
    );
    // The data volume must be writable by that user.
    assert_eq!(
        m.pod_spec()["securityContext"]["fsGroup"].as_u64(),
        Some(uid)
    );
}

#[test]
fn the_entrypoint_passes_only_flags_and_variables_that_timerdb_serve_has() {
    let m = manifests();
    let (flags, envs) = help(&["serve"]);
    for ordinal in 0..=m.replicas() {
        let pod = render(&m, ordinal);
        for (flag, _) in flag_values(&pod.argv) {
            assert!(
                flags.contains(&flag),
                "pod {ordinal}: timerdb serve has no {flag}; it has {flags:?}"
            );
        }
        for name in pod.env.keys().filter(|n| n.starts_with("TIMERDB_")) {
            // TIMERDB_LOG is read by main (the log filter), not by a flag.
            assert!(
                name == "TIMERDB_LOG" || envs.contains(name),
                "timerdb serve reads no {name}; it reads {envs:?}"
            );
        }
    }
}

#[test]
fn each_pod_is_a_member_the_node_accepts_with_its_ordinal_plus_one_as_id() {
    let m = manifests();
    let members = members(&m);
    assert_eq!(members.len() as u32, m.replicas() + 1);
    for (pod, config) in &members {
        let cluster = config
            .cluster
            .as_ref()
            .unwrap_or_else(|| panic!("pod {} would run alone, not as a member", pod.ordinal));
        assert_eq!(cluster.node_id, u64::from(pod.ordinal) + 1);
        assert!(config.store.starts_with("scylla://"), "{}", config.store);
        assert!(config.sink.starts_with("kafka://"), "{}", config.sink);
    }
}

#[test]
fn the_first_members_list_each_other_at_their_names_on_the_headless_service() {
    let m = manifests();
    let replicas = m.replicas();
    assert_eq!(replicas, 3, "a three-node cluster");
    let service = text(m.headless(), "/metadata/name");
    let statefulset = text(m.statefulset(), "/metadata/name");
    let members = members(&m);
    let initial: Vec<(u64, String)> = members[..replicas as usize]
        .iter()
        .map(|(pod, c)| {
            let cluster = c.cluster.as_ref().unwrap();
            let (host, port) = host_port(&cluster.advertise);
            let peer_dns = format!("{statefulset}-{}.{service}.{NAMESPACE}.svc.", pod.ordinal);
            assert!(
                host.starts_with(&peer_dns),
                "pod {} advertises {host}, not its name on the headless Service ({peer_dns}...)",
                pod.ordinal
            );
            assert_eq!(port, m.grpc_port(), "advertised port vs containerPort grpc");
            (cluster.node_id, cluster.advertise.clone())
        })
        .collect();
    for (pod, c) in &members[..replicas as usize] {
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(
            cluster.initial_members, initial,
            "pod {}: --initial-members must list every first member at the address it \
             advertises",
            pod.ordinal
        );
        assert_eq!(cluster.join, None);
    }
    assert_eq!(
        initial.len() as u32,
        replicas,
        "initial members vs replicas"
    );
}

#[test]
fn a_pod_added_by_scaling_up_joins_through_the_client_service() {
    let m = manifests();
    let members = members(&m);
    let (pod, config) = members.last().unwrap();
    assert_eq!(pod.ordinal, m.replicas());
    let cluster = config.cluster.as_ref().unwrap();
    assert!(
        cluster.initial_members.is_empty(),
        "a new pod must not claim to be a first member"
    );
    let join = cluster.join.as_deref().expect("--join");
    let (host, port) = host_port(join);
    let client = m.client_service();
    let name = text(client, "/metadata/name");
    assert!(
        host.starts_with(&format!("{name}.{NAMESPACE}.svc.")),
        "--join {join} is not the client Service {name}"
    );
    let target = client["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("Service {name} has no port {port}"));
    assert_eq!(m.container_port(&target["targetPort"]), m.grpc_port());
}

#[test]
fn the_node_listens_on_the_container_ports_and_keeps_its_raft_log_on_the_volume() {
    let m = manifests();
    let claims: Vec<&str> = m.statefulset()["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .iter()
        .map(|c| text(c, "/metadata/name"))
        .collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    let data = m.mount_path(claims[0]);
    for (pod, config) in members(&m) {
        // The kubelet's probes and the other pods come in on the pod's IP.
        assert!(config.listen.ip().is_unspecified(), "{}", config.listen);
        assert_eq!(
            config.listen.port(),
            m.grpc_port(),
            "listen vs containerPort"
        );
        let metrics = config.metrics_listen.expect("metrics on");
        assert!(metrics.ip().is_unspecified(), "{metrics}");
        assert_eq!(metrics.port(), m.metrics_port(), "metrics vs containerPort");
        let raft_dir = &config.cluster.as_ref().unwrap().raft_dir;
        assert!(
            raft_dir.is_absolute() && raft_dir.starts_with(&data),
            "pod {}: raft_dir {} is not on the volume at {}",
            pod.ordinal,
            raft_dir.display(),
            data.display()
        );
    }
}

#[test]
fn memory_limit_and_grace_period_cover_what_the_node_is_configured_to_use() {
    let m = manifests();
    let (_, config) = members(&m).remove(0);
    let limit = quantity(text(m.container(), "/resources/limits/memory"));
    assert!(
        limit as usize > config.scheduler.max_in_memory_bytes,
        "memory limit {limit} must exceed scheduler.max_in_memory_bytes {}",
        config.scheduler.max_in_memory_bytes
    );
    let grace = m.pod_spec()["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > config.scheduler.shutdown_timeout,
        "the pod is killed after {grace}s, before the node's shutdown_timeout {:?}",
        config.scheduler.shutdown_timeout
    );
}

#[test]
fn services_budget_and_statefulset_select_the_pods() {
    let m = manifests();
    let labels = m.template_labels();
    let sts = m.statefulset();
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], labels));

    let headless = m.headless();
    assert_eq!(headless["spec"]["clusterIP"], "None", "headless");
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"], true,
        "members must resolve each other before they are ready"
    );
    let client = m.client_service();
    assert_ne!(client["spec"]["clusterIP"], "None");
    for service in [headless, client] {
        let name = text(service, "/metadata/name");
        assert!(
            selects(&service["spec"]["selector"], labels),
            "Service {name} selects no pod"
        );
        let targets: Vec<u16> = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| m.container_port(&p["targetPort"]))
            .collect();
        assert!(
            targets.contains(&m.grpc_port()),
            "Service {name} does not reach the gRPC port: {targets:?}"
        );
    }

    let pdb = m.one("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));

    let volumes: BTreeSet<&str> = m.pod_spec()["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .map(|v| v.pointer("/name").or(v.pointer("/metadata/name")))
        .map(|n| n.and_then(Value::as_str).expect("a volume name"))
        .collect();
    for mount in m.container()["volumeMounts"].as_array().expect("mounts") {
        let name = text(mount, "/name");
        assert!(volumes.contains(name), "mount of unknown volume {name}");
    }
}

/// A probe: its kind (`readinessProbe`, ...) and the gRPC service or HTTP path it checks.
type Probe = (String, String);

/// The gRPC probes the container declares, then the HTTP ones.
fn probes(m: &Manifests) -> (Vec<Probe>, Vec<Probe>) {
    let mut grpc = Vec::new();
    let mut http = Vec::new();
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let Some(probe) = m.container().get(kind) else {
            assert_ne!(kind, "readinessProbe", "a readiness probe is needed");
            assert_ne!(kind, "livenessProbe", "a liveness probe is needed");
            continue;
        };
        if let Some(g) = probe.get("grpc") {
            let port = g["port"].as_u64().expect("a grpc probe's port is a number");
            assert_eq!(port, u64::from(m.grpc_port()), "{kind} port");
            let service = g.get("service").and_then(Value::as_str).unwrap_or("");
            grpc.push((kind.to_owned(), service.to_owned()));
        } else if let Some(h) = probe.get("httpGet") {
            assert_eq!(
                m.container_port(&h["port"]),
                m.metrics_port(),
                "{kind}: only the metrics listener speaks HTTP"
            );
            http.push((kind.to_owned(), text(h, "/path").to_owned()));
        } else {
            panic!("{kind}: use the gRPC health service or the metrics listener: {probe}");
        }
    }
    (grpc, http)
}

#[test]
fn probes_and_scrape_annotations_name_the_right_ports() {
    let m = manifests();
    let (grpc, http) = probes(&m);
    assert!(!grpc.is_empty() || !http.is_empty());
    let annotations = &m.statefulset()["spec"]["template"]["metadata"]["annotations"];
    let port: u16 = text(annotations, "/prometheus.io~1port").parse().unwrap();
    assert_eq!(port, m.metrics_port(), "prometheus.io/port");
}

/// GET `path` over HTTP/1.0: status code and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_and_the_scrape_path_answer_on_a_node_run_with_the_configmap() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let m = manifests();
    let dir = tempfile::tempdir().unwrap();
    let flags = flag_values(&render(&m, 0).argv);
    let (_, path) = flags
        .iter()
        .find(|(f, _)| f == "--config")
        .expect("the pods read the ConfigMap with --config");
    let config = config_file_for(&m, Path::new(path), dir.path());
    // The real binary on the ConfigMap's file; loopback ports, the embedded store and a
    // file sink instead of the pod's addresses, Scylla and Kafka (flags win over the file).
    let node = common::Node::start_with(
        dir.path(),
        None,
        None,
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = |service: String| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status)
        }
    };

    let (grpc, http) = probes(&m);
    for (kind, service) in &grpc {
        let status = check(service.clone())
            .await
            .unwrap_or_else(|e| panic!("{kind}: health check of {service:?}: {e}"));
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "{kind} ({service:?})"
        );
    }
    // The health service tells services apart: a misspelt name in a probe would fail.
    let unknown = health
        .check(HealthCheckRequest {
            service: "timerdb.v1.NoSuchService".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    for (kind, path) in &http {
        let (code, _) = http_get(node.metrics, path).await;
        assert_eq!(code, 200, "{kind}: GET {path}");
    }
    // The scrape path serves the node's metrics (its gauges appear within a second or so).
    let annotations = &m.statefulset()["spec"]["template"]["metadata"]["annotations"];
    let path = text(annotations, "/prometheus.io~1path");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = http_get(node.metrics, path).await;
        assert_eq!(code, 200, "GET {path}");
        if body.lines().any(|l| l.starts_with("timerdb_")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} shows no timerdb_ metric:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_admin_commands_in_the_readme_exist() {
    let readme = read("README.md");
    let (admin_flags, _) = help(&["admin"]);
    let mut seen = 0;
    for line in readme.lines() {
        let Some(at) = line.find("timerdb admin ") else {
            continue;
        };
        let words: Vec<&str> = line[at + "timerdb admin ".len()..]
            .split(|c: char| c.is_whitespace() || c == '`')
            .filter(|w| !w.is_empty())
            .collect();
        let mut i = 0;
        while i < words.len() && words[i].starts_with("--") {
            assert!(admin_flags.contains(words[i]), "{line}: no {}", words[i]);
            i += if words[i] == "--server" { 2 } else { 1 };
        }
        let Some(command) = words.get(i) else {
            panic!("{line}: no admin command");
        };
        let (flags, _) = help(&["admin", command]);
        for flag in words[i + 1..].iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                flags.contains(flag),
                "{line}: timerdb admin {command} has no {flag}"
            );
        }
        seen += 1;
    }
    assert!(
        seen >= 3,
        "README.md shows the admin commands for draining and scaling"
    );
}
