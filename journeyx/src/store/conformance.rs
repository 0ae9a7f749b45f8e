//! Checks every [`StateStore`] must pass; [`state_store_suite!`](crate::state_store_suite)
//! makes one test of each for an implementation.

use std::sync::Arc;

use super::{Saved, StateStore};
use crate::Error;
use crate::engine::User;
use crate::model::{Journey, Segment};

fn journey(version: u32, template: &str) -> Journey {
    Journey::parse(
        "j.yaml",
        &format!(
            "{{id: j, version: {version}, app_id: demo, entry: {{event: go}}, start: a, \
             nodes: [{{id: a, actions: [{{send: {{channel: push, template: {template}}}}}, exit]}}]}}"
        ),
    )
    .unwrap()
}

fn user(plan: &str) -> User {
    let mut u = User::default();
    u.properties.insert("plan".into(), plan.into());
    u
}

/// A user never saved reads as version 0; a save at the version read wins once, a second
/// save at the same version is refused and changes nothing.
pub async fn a_save_wins_only_at_the_version_read(store: Arc<dyn StateStore>) {
    let none = store.load_user("demo", "u1").await.unwrap();
    assert_eq!((none.version, none.user), (0, User::default()));
    assert_eq!(
        store.save_user("demo", "u1", 0, &user("a")).await.unwrap(),
        Saved::Written(1)
    );
    assert_eq!(
        store.save_user("demo", "u1", 0, &user("b")).await.unwrap(),
        Saved::Conflict
    );
    let read = store.load_user("demo", "u1").await.unwrap();
    assert_eq!((read.version, read.user), (1, user("a")));
    assert_eq!(
        store.save_user("demo", "u1", 1, &user("c")).await.unwrap(),
        Saved::Written(2)
    );
    // Another app's user of the same id is another record.
    assert_eq!(store.load_user("other", "u1").await.unwrap().version, 0);
}

/// Of two writers that read the same version, exactly one saves.
pub async fn concurrent_saves_at_one_version_let_one_through(store: Arc<dyn StateStore>) {
    store.save_user("demo", "u2", 0, &user("a")).await.unwrap();
    let saves = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .save_user("demo", "u2", 1, &user(&format!("w{i}")))
                .await
                .unwrap()
        })
    });
    let mut written = 0;
    for s in saves {
        written += usize::from(matches!(s.await.unwrap(), Saved::Written(2)));
    }
    assert_eq!(written, 1);
}

/// A version is published once; the same content again is a no-op, other content under
/// the same version is refused with a message naming the next free version.
pub async fn journey_versions_are_immutable(store: Arc<dyn StateStore>) {
    assert!(store.publish_journey(&journey(1, "t1")).await.unwrap());
    assert!(!store.publish_journey(&journey(1, "t1")).await.unwrap());
    match store.publish_journey(&journey(1, "changed")).await {
        Err(Error::Invalid(m)) => assert!(m.contains("publish it as version 2"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(store.publish_journey(&journey(2, "t2")).await.unwrap());
    let c = store.catalog().await.unwrap();
    assert_eq!(c.latest("demo", "j").unwrap().version, 2);
    assert_eq!(c.version("demo", "j", 1).unwrap(), &journey(1, "t1"));
    match store.publish_journey(&journey(1, "late")).await {
        Err(Error::Invalid(_)) => {}
        other => panic!("an older version after a newer one: {other:?}"),
    }
}

/// A journey that names a segment needs it published first; a segment can change.
pub async fn segments_come_before_the_journeys_that_name_them(store: Arc<dyn StateStore>) {
    let j = Journey::parse(
        "j.yaml",
        "{id: s, version: 1, app_id: demo, entry: {segment: vips}, start: a, nodes: [{id: a}]}",
    )
    .unwrap();
    match store.publish_journey(&j).await {
        Err(Error::Invalid(m)) => assert!(m.contains("segment `vips`"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let vips = Segment::parse("s.yaml", "{id: vips, app_id: demo, where: {tier: gold}}").unwrap();
    assert!(store.publish_segment(&vips).await.unwrap());
    assert!(!store.publish_segment(&vips).await.unwrap());
    assert!(store.publish_journey(&j).await.unwrap());
    let changed = Segment::parse(
        "s.yaml",
        "{id: vips, app_id: demo, where: {tier: platinum}}",
    )
    .unwrap();
    assert!(store.publish_segment(&changed).await.unwrap());
    assert_eq!(
        store.catalog().await.unwrap().segment("demo", "vips"),
        Some(&changed)
    );
}

/// Users of one app come in id order, a page at a time, and the loader's place is kept.
pub async fn users_page_in_order_and_the_loader_keeps_its_place(store: Arc<dyn StateStore>) {
    for u in ["c", "a", "b", "d"] {
        store.save_user("demo", u, 0, &user(u)).await.unwrap();
    }
    store.save_user("zzz", "a", 0, &user("x")).await.unwrap();
    let first = store.users("demo", None, 3).await.unwrap();
    let ids: Vec<&str> = first.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(first[1].1, user("b"));
    let rest = store.users("demo", Some("c"), 3).await.unwrap();
    assert_eq!(
        rest.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["d"]
    );
    assert_eq!(store.count_users("demo", None).await.unwrap(), 4);
    assert_eq!(store.count_users("demo", Some("b")).await.unwrap(), 2);
    assert_eq!(store.count_users("demo", Some("bb")).await.unwrap(), 2);
    assert_eq!(store.count_users("demo", Some("d")).await.unwrap(), 0);
    assert_eq!(store.count_users("nobody", None).await.unwrap(), 0);
    assert_eq!(store.loader_position("j").await.unwrap(), None);
    store.set_loader_position("j", "c").await.unwrap();
    assert_eq!(
        store.loader_position("j").await.unwrap().as_deref(),
        Some("c")
    );
}

/// Counters add up over calls (as over processes), per (journey, version, node, what),
/// and a journey's read names none of another journey's.
pub async fn counters_add_up_per_journey(store: Arc<dyn StateStore>) {
    use crate::engine::Count;
    let k = |j: &str, v: u32, n: &str, c: Count| (j.to_owned(), v, n.to_owned(), c);
    assert!(store.counts("j").await.unwrap().is_empty());
    store
        .add_counts(&[
            (k("j", 1, "a", Count::Entered), 3),
            (k("j", 2, "a", Count::Entered), 1),
            (k("j2", 1, "a", Count::Entered), 7),
        ])
        .await
        .unwrap();
    store
        .add_counts(&[
            (k("j", 1, "a", Count::Entered), 2),
            (k("j", 1, "b", Count::Converted), 1),
        ])
        .await
        .unwrap();
    let mut got = store.counts("j").await.unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            (k("j", 1, "a", Count::Entered), 5),
            (k("j", 1, "b", Count::Converted), 1),
            (k("j", 2, "a", Count::Entered), 1),
        ]
    );
    assert_eq!(
        store.counts("j2").await.unwrap(),
        vec![(k("j2", 1, "a", Count::Entered), 7)]
    );
}

/// One `#[tokio::test]` per check for the store `$make` (an async expression giving an
/// `Arc<dyn StateStore>`, fresh for each test).
#[macro_export]
macro_rules! state_store_suite {
    ($make:expr) => {
        $crate::state_store_suite!(@each $make;
            a_save_wins_only_at_the_version_read,
            concurrent_saves_at_one_version_let_one_through,
            journey_versions_are_immutable,
            segments_come_before_the_journeys_that_name_them,
            users_page_in_order_and_the_loader_keeps_its_place,
            counters_add_up_per_journey
        );
    };
    (@each $make:expr; $($check:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            $crate::store::conformance::$check($make).await;
        }
    )*};
}
