//! The gRPC `TimerService`: validates, stores durably, hands near-term timers to the
//! scheduler, and answers reads and cancels.

pub mod convert;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use timerdb_proto::v1;
use timerdb_proto::v1::timer_service_server::TimerService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::{ADOPT, ADOPT_BY_WRITER, ADOPT_TIMER, FORWARDED, Member};
use crate::config::Limits;
use crate::metrics as m;
use crate::scheduler::{Adoption as SchedAdoption, CancelProbe, MemState, Scheduler};
use crate::sink::Sink;
use crate::store::{Abandoned, CancelOutcome, StoredTimer, TimerStore};
use crate::timer::{StoredState, Timer, TimerId, TimerSpec, now_ms};
use crate::{Error, Result};

/// Implementation of `timerdb.v1.TimerService`.
pub struct TimerApi {
    store: Arc<dyn TimerStore>,
    sink: Arc<dyn Sink>,
    scheduler: Arc<Scheduler>,
    limits: Limits,
    /// This node's part in a cluster, if it is a member.
    member: Option<Arc<Member>>,
}

impl TimerApi {
    /// The service over these components.
    pub fn new(
        store: Arc<dyn TimerStore>,
        sink: Arc<dyn Sink>,
        scheduler: Arc<Scheduler>,
        limits: Limits,
    ) -> TimerApi {
        TimerApi {
            store,
            sink,
            scheduler,
            limits,
            member: None,
        }
    }

    /// As a cluster member: hand-offs, cancels and reads reach the owner of each slot.
    pub fn with_member(mut self, member: Option<Arc<Member>>) -> TimerApi {
        self.member = member;
        self
    }

    /// For a call about `id` on a cluster member that does not own its slot: the owner's
    /// client, to forward the call to. `Ok(None)`: answer here. A call that was forwarded
    /// already is answered here or refused, never forwarded again.
    async fn owner_client(
        &self,
        id: TimerId,
        forwarded: bool,
        budget: Option<Duration>,
    ) -> Result<Option<(u64, String)>> {
        let Some(member) = &self.member else {
            return Ok(None);
        };
        match member.remote_owner_soon(id, budget).await? {
            None => Ok(None),
            Some((owner, addr)) if forwarded => Err(Error::Unavailable(format!(
                "timer {id} belongs to node {owner} ({addr}) by this node's map, but the \
                     call was forwarded here; the members' maps differ for a moment, retry"
            ))),
            Some(owner) => Ok(Some(owner)),
        }
    }

    /// Stores `specs` (all valid) and hands the near-term ones to the scheduler; one result
    /// per spec.
    ///
    /// The write and its hand-off run in a task of their own: a caller that goes away
    /// (deadline, disconnect) drops only its wait, never the hand-off of a timer whose
    /// write may already be durable.
    async fn store_timers(&self, specs: Vec<TimerSpec>) -> Result<Vec<Result<TimerId>>> {
        let store = self.store.clone();
        let scheduler = self.scheduler.clone();
        let member = self.member.clone();
        tokio::spawn(store_and_hand_off(store, scheduler, member, specs))
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))?
    }

    /// Checks a timer carried by value for adoption as a new one is checked, and that it
    /// is what a member's slow write produces: a timer due within its bucket. Its row can
    /// be gone unfired only once its bucket was deleted: one whose bucket is not over yet
    /// is not needed (`None`), its row is the one to adopt.
    async fn check_carried(&self, timer: Timer) -> Result<Option<Timer>> {
        let width = self.store.layout().bucket_ms;
        if timer.spec.fire_at_ms >= timer.id.bucket_ms + width {
            return Err(Error::InvalidArgument(format!(
                "{ADOPT_TIMER}: timer {} is due at {} ms, after the end of its bucket",
                timer.id, timer.spec.fire_at_ms
            )));
        }
        if timer.id.bucket_ms + width > now_ms() {
            return Ok(None);
        }
        self.fits_sink(&timer.spec, None)?;
        if let Some((_, why)) = self
            .check_targets(std::slice::from_ref(&timer.spec))
            .await
            .remove(0)
        {
            return Err(Error::InvalidArgument(format!("{ADOPT_TIMER}: {why}")));
        }
        Ok(Some(timer))
    }

    /// Refuses a timer whose message the sink could never write (it would be retried
    /// forever, or dead-lettered, instead of refused now).
    fn fits_sink(&self, spec: &TimerSpec, item: Option<usize>) -> Result<()> {
        let Some(max) = self.sink.max_message_bytes() else {
            return Ok(());
        };
        let size = crate::sink::message_bytes(spec);
        if size <= max {
            return Ok(());
        }
        let at = item.map_or(String::new(), |i| format!("timers[{i}]: "));
        Err(Error::InvalidArgument(format!(
            "{at}the message would be {size} bytes (payload, key and headers), over the sink's \
             largest message of {max} bytes (sink URL option max_message_bytes); make the \
             payload smaller"
        )))
    }

    /// Checks each distinct (topic, partition) once against the sink; returns, per spec,
    /// the refusal if its target was refused.
    async fn check_targets(&self, specs: &[TimerSpec]) -> Vec<Option<(tonic::Code, String)>> {
        let mut seen: HashMap<(&str, i32), Option<(tonic::Code, String)>> = HashMap::new();
        for s in specs {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                seen.entry((s.topic.as_str(), s.partition))
            {
                let verdict = self.sink.check_target(&s.topic, s.partition).await.err();
                slot.insert(verdict.map(|e| (e.code(), e.to_string())));
            }
        }
        specs
            .iter()
            .map(|s| seen[&(s.topic.as_str(), s.partition)].clone())
            .collect()
    }
}

async fn store_and_hand_off(
    store: Arc<dyn TimerStore>,
    scheduler: Arc<Scheduler>,
    member: Option<Arc<Member>>,
    specs: Vec<TimerSpec>,
) -> Result<Vec<Result<TimerId>>> {
    // Registered before the write: until the hand-off is applied, no bucket this write may
    // use is deleted and the recorded progress stays before `created_ms`.
    let guard = scheduler.begin_write()?;
    let created_ms = guard.started_ms;
    // A cluster member stores near-term timers only in slots it runs (taken after the
    // guard, so a range stopping from here on keeps its records before this write).
    let homing = member.as_ref().map(|m| m.homing()).unwrap_or_default();
    let mut results: Vec<Option<Result<TimerId>>> = Vec::with_capacity(specs.len());
    let mut to_store = Vec::with_capacity(specs.len());
    let mut at = Vec::with_capacity(specs.len());
    for (n, spec) in specs.into_iter().enumerate() {
        if let Some(member) = &member
            && let Some(refusal) = member.refuse_near(&spec, &homing)
        {
            results.push(Some(Err(refusal)));
            continue;
        }
        results.push(None);
        at.push(n);
        to_store.push(spec);
    }
    crate::failpoint::hit_async("api.before_store").await?;
    let inserted = store.insert(&to_store, &homing).await?;
    crate::failpoint::hit_async("api.after_store").await?;
    let mut fresh = Vec::with_capacity(inserted.len());
    let mut repeated = Vec::new();
    // Items a cluster member settles after the hand-off (each may ask another member).
    let mut moved: Vec<(usize, TimerId, TimerSpec)> = Vec::new();
    let mut repeats: Vec<(usize, TimerId, String)> = Vec::new();
    // Read once for the whole batch, after the write.
    let acting = member.as_ref().map(|m| m.acting_ranges());
    for ((n, i), spec) in at.into_iter().zip(inserted).zip(to_store) {
        match i {
            Ok(i)
                if i.created
                    && let (Some(m), Some(acting)) = (&member, &acting)
                    && !m.still_acting(i.id, acting) =>
            {
                moved.push((n, i.id, spec));
                continue;
            }
            Ok(i) if i.created => fresh.push(Timer {
                id: i.id,
                created_ms,
                spec,
            }),
            // A cluster member answers a repeated key with its first id only once that
            // timer's owner holds it and no withdraw of it can follow.
            Ok(i) if member.is_some() => {
                let key = spec.idempotency_key.unwrap_or_default();
                repeats.push((n, i.id, key));
                continue;
            }
            Ok(i) if scheduler.is_loaded(i.id) => repeated.push((n, i.id)),
            _ => {}
        }
        results[n] = Some(i.map(|i| i.id));
    }
    m::scheduled(fresh.len());
    scheduler.hand_off(fresh, Some(guard.clone()));
    if let Some(m) = &member {
        let (store, scheduler) = (&store, &scheduler);
        let settled = futures::future::join_all(
            moved
                .iter()
                .map(|(n, id, spec)| async move {
                    (
                        *n,
                        settle_moved(store, scheduler, m, *id, created_ms, spec).await,
                    )
                })
                .map(futures::future::Either::Left)
                .chain(repeats.iter().map(|(n, id, key)| {
                    futures::future::Either::Right(async move {
                        (*n, settle_repeat(store, scheduler, m, *id, key).await)
                    })
                })),
        )
        .await;
        for (n, r) in settled {
            results[n] = Some(r);
        }
    }
    // A repeated idempotency key whose timer is due inside the loaded window: hand it off
    // again (the range admits each id once), in case the first call's hand-off never came.
    // A read that fails fails only its item (the others are handed off already).
    for (n, id) in repeated {
        match store.get(id).await {
            Ok(Some(stored)) if stored.state == StoredState::Pending => {
                scheduler.hand_off_repeat(vec![stored.timer], Some(guard.clone()));
            }
            Ok(_) => {}
            Err(e) => results[n] = Some(Err(e)),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every item has its result"))
        .collect())
}

/// What became of a stored timer its slot's owner was asked to adopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adoption {
    /// The owner holds it, or will read it with its bucket; an overdue one has fired.
    Adopted,
    /// The row is gone: its bucket was deleted (after the owner fired what it had read of
    /// it), or the timer never existed.
    Gone,
}

/// Asks the owner of `id`'s slot (this member or another) to adopt the stored timer `id`:
/// see [`adopt_here`].
/// `carried`, the timer itself, lets the owner adopt it even if its row is gone (sent
/// along when it fits in a header, [`CARRY_MAX`]).
///
/// `writer`: this member wrote the row (it is settling that write), so an earlier owner's
/// delivered-through mark does not stop the owner from firing it.
async fn adopt(
    store: &Arc<dyn TimerStore>,
    scheduler: &Arc<Scheduler>,
    member: &Member,
    id: TimerId,
    carried: Option<&Timer>,
    writer: bool,
) -> Result<Adoption> {
    crate::failpoint::hit_async("api.adopt").await?;
    let answer = match member.remote_owner_soon(id, None).await? {
        Some((owner, addr)) => forward(
            member,
            owner,
            &addr,
            v1::GetTimerRequest {
                timer_id: id.to_string(),
            },
            Forwarding::Adopt(carried.and_then(encode_carried), writer),
            |mut c, r| async move { c.get_timer(r).await },
        )
        .await
        .map(|_| ()),
        None => match adopt_here(store, scheduler, id, None, carried.cloned(), writer).await? {
            Some(_) => Ok(()),
            None => Err(not_found(id)),
        },
    };
    match answer {
        Ok(()) => Ok(Adoption::Adopted),
        Err(Error::NotFound(_)) => Ok(Adoption::Gone),
        Err(Error::Forwarded(s)) if s.code() == tonic::Code::NotFound => Ok(Adoption::Gone),
        Err(e) => Err(e),
    }
}

/// On the running owner of `id`'s slot: makes sure the stored timer `id` fires, if it is
/// pending (see [`Scheduler::adopt`]). A timer whose bucket the range has not read yet is
/// left to the load. One whose bucket it read already is taken into memory; if it is
/// overdue, the answer waits until it has fired, because the range's recorded progress
/// may already claim its due time (the row landed after the load), and a member taking
/// over after a crash would skip it. One the progress of an earlier owner claims
/// delivered is fired too if its `writer` asks (that owner may never have read its row),
/// else refused. `None`: no such row. `budget` caps the
/// wait for a fire (the asking member's deadline).
///
/// `carried` is the timer as its writer holds it. If its row is gone, the bucket was
/// deleted: after the timer fired (or was cancelled), or with the row in it unfired, if
/// the row landed after the bucket was read. The range tells them apart by what it fired
/// and cancelled lately, and takes an unfired one into memory from `carried`.
async fn adopt_here(
    store: &Arc<dyn TimerStore>,
    scheduler: &Arc<Scheduler>,
    id: TimerId,
    budget: Option<Duration>,
    carried: Option<Timer>,
    writer: bool,
) -> Result<Option<StoredTimer>> {
    let started = tokio::time::Instant::now();
    let not_running = || {
        Error::Unavailable(format!(
            "timer {id}: no range here runs its slot any more (it is moving); retry"
        ))
    };
    let by_value = |timer: Timer| async {
        let verdict = scheduler
            .adopt(timer.clone(), true, writer)
            .await
            .ok_or_else(not_running)?;
        if verdict == SchedAdoption::Admitted {
            m::adopted_by_value();
            tracing::info!(timer_id = %id, "api: adopted a timer by value: its row is gone (deleted unfired with its bucket)");
        }
        let stored = StoredTimer {
            timer,
            state: StoredState::Pending,
        };
        Ok::<_, Error>((stored, verdict))
    };
    let (mut stored, mut verdict) = match store.get(id).await? {
        Some(stored) if stored.state != StoredState::Pending => return Ok(Some(stored)),
        Some(stored) => {
            let verdict = scheduler
                .adopt(stored.timer.clone(), false, writer)
                .await
                .ok_or_else(not_running)?;
            (stored, verdict)
        }
        None => match carried.clone() {
            Some(timer) => by_value(timer).await?,
            None => return Ok(None),
        },
    };
    if verdict == SchedAdoption::BucketDeleted {
        // The range fired and deleted this bucket: a row still there now was written
        // after that delete, and was never read. Gone now: it was read and fired, or it
        // landed after the read and the delete took it unfired (`carried` tells).
        match (store.get(id).await?, carried) {
            (Some(again), _) if again.state == StoredState::Pending => {
                tracing::info!(timer_id = %id, "api: adopting a timer whose bucket was deleted without it (its row landed after the bucket was read)");
                stored = again;
                verdict = scheduler
                    .adopt(stored.timer.clone(), true, writer)
                    .await
                    .ok_or_else(not_running)?;
            }
            (None, Some(timer)) => (stored, verdict) = by_value(timer).await?,
            (other, _) => return Ok(other),
        }
    }
    match verdict {
        SchedAdoption::Covered => {
            return Err(Error::Unavailable(format!(
                "timer {id} is stored in a bucket whose recorded progress, written by an \
                 earlier owner of its slot, claims it delivered; only its writer can have it \
                 fired again"
            )));
        }
        // Fired or cancelled already (perhaps its bucket deleted since): nothing to wait for.
        SchedAdoption::Known(MemState::Fired | MemState::Cancelled) => return Ok(Some(stored)),
        SchedAdoption::Unloaded | SchedAdoption::Known(_) | SchedAdoption::Admitted => {}
        SchedAdoption::BucketDeleted => return Err(not_running()),
    }
    let due_ms = stored.timer.spec.fire_at_ms;
    let deadline = started + budget.map_or(ADOPT_FIRE_WAIT, |b| b.min(ADOPT_FIRE_WAIT));
    loop {
        if matches!(verdict, SchedAdoption::Unloaded) || due_ms > now_ms() {
            return Ok(Some(stored));
        }
        match scheduler.status(id).await {
            None => return Err(not_running()),
            Some(MemState::Fired | MemState::Cancelled) => return Ok(Some(stored)),
            Some(_) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::Unavailable(format!(
                    "timer {id} was handed to its range here but has not fired within {:?} \
                     (is the sink reachable?); retry",
                    ADOPT_FIRE_WAIT
                )));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// How long a cancel on a member waits for the range of its slot to hold a lease again.
const NOT_ACTING_WAIT: Duration = Duration::from_secs(1);
/// How long an adoption waits for an overdue timer to fire.
const ADOPT_FIRE_WAIT: Duration = Duration::from_secs(3);
/// The largest timer (encoded) an adoption carries by value, in a header: a server takes
/// 16 KiB of headers, and binary metadata grows by a third in base64.
const CARRY_MAX: usize = 8 * 1024;

/// `timer`, encoded for [`ADOPT_TIMER`]; `None` if it is too large for a header.
fn encode_carried(timer: &Timer) -> Option<tonic::metadata::BinaryMetadataValue> {
    postcard::to_allocvec(timer)
        .ok()
        .filter(|b| b.len() <= CARRY_MAX)
        .map(|b| tonic::metadata::BinaryMetadataValue::from_bytes(&b))
}

/// The timer an adoption carries, checked against the id asked about.
fn decode_carried(value: &tonic::metadata::BinaryMetadataValue, id: TimerId) -> Result<Timer> {
    let bytes = value
        .to_bytes()
        .map_err(|e| Error::InvalidArgument(format!("{ADOPT_TIMER}: not base64: {e}")))?;
    let timer: Timer = postcard::from_bytes(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("{ADOPT_TIMER}: not a timer: {e}")))?;
    if timer.id != id {
        return Err(Error::InvalidArgument(format!(
            "{ADOPT_TIMER} carries timer {}, but the call asks about timer {id}",
            timer.id
        )));
    }
    Ok(timer)
}

/// The answer for a new timer whose slot range stopped being this member's to fire while
/// its row was written (its owner may have read the bucket before the row landed).
///
/// First the owner is asked to adopt it: then the caller hears its id. If that fails
/// (the owner cannot be reached, or the row is gone because the owner deleted its bucket
/// unaware of it), the timer is withdrawn: its key released, its row cancelled, so a
/// retry, even with the same idempotency key, stores it anew, and the caller is told the
/// outcome is unknown. Unless a repeated call of the same key confirmed it meanwhile
/// ([`settle_repeat`]): that call answered with its id, so this one does too, once the
/// owner adopted it (by value: its row may be gone unfired).
async fn settle_moved(
    store: &Arc<dyn TimerStore>,
    scheduler: &Arc<Scheduler>,
    member: &Arc<Member>,
    id: TimerId,
    created_ms: u64,
    spec: &TimerSpec,
) -> Result<TimerId> {
    let why = format!(
        "timer {id} was stored while its slot range moved away from this node (or came due \
         during a slow write), so its owner may not have read it"
    );
    let timer = Timer {
        id,
        created_ms,
        spec: spec.clone(),
    };
    match adopt(store, scheduler, member, id, Some(&timer), true).await {
        Ok(Adoption::Adopted) => {
            m::moved_write("adopted");
            return Ok(id);
        }
        Ok(Adoption::Gone) => {
            tracing::info!(timer_id = %id, "api: a timer stored while its range moved was not in the store any more; withdrawing it");
        }
        Err(e) => {
            tracing::info!(timer_id = %id, error = %e, "api: the owner did not adopt a timer stored while its range moved; withdrawing it");
        }
    }
    match store.abandon(id, spec.idempotency_key.as_deref()).await {
        Ok(Abandoned::Withdrawn) => {
            m::moved_write("withdrawn");
            unload_withdrawn(store, scheduler, member, id).await;
            Err(Error::Unavailable(format!(
                "{why}; it was withdrawn (cancelled, its idempotency key released): retry the \
                 call to store it anew (it fires twice only if its owner fired it already)"
            )))
        }
        Ok(Abandoned::Kept) => {
            // A repeated call is answering with the id: see to it that it fires, without
            // holding up this call (and the write's guard) meanwhile.
            tokio::spawn(keep_adopting(
                store.clone(),
                scheduler.clone(),
                member.clone(),
                timer,
            ));
            Ok(id)
        }
        Err(e) => {
            m::moved_write("unknown");
            tracing::warn!(timer_id = %id, error = %e, "api: could not withdraw a timer whose range moved away");
            Err(Error::Unavailable(format!(
                "{why}, and withdrawing it failed ({e}): it may or may not fire; retry the call \
                 with a new idempotency key to be sure it fires"
            )))
        }
    }
}

/// A timer whose key a repeated call confirmed (its caller was told the id) after this
/// member failed to have it adopted: no withdraw is possible any more, so the owner is
/// asked again, by value, until it adopts it (for ~10 s; then the loss is logged).
async fn keep_adopting(
    store: Arc<dyn TimerStore>,
    scheduler: Arc<Scheduler>,
    member: Arc<Member>,
    timer: Timer,
) {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match adopt(&store, &scheduler, &member, timer.id, Some(&timer), true).await {
            Ok(Adoption::Adopted) => {
                m::moved_write("confirmed");
                return;
            }
            outcome if started.elapsed() >= KEEP_ADOPTING => {
                m::moved_write("confirmed_unadopted");
                tracing::error!(timer_id = %timer.id, outcome = ?outcome,
                    "api: a repeated call was told this timer's id, but its owner did not adopt it; it may never fire");
                return;
            }
            _ => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// How long [`keep_adopting`] keeps asking.
const KEEP_ADOPTING: Duration = Duration::from_secs(10);

/// The answer for a call whose idempotency key `key` names an earlier timer `id`, on a
/// cluster member: the earlier call may still be under way on another member, and may yet
/// withdraw its timer ([`settle_moved`]). So the owner adopts `id` first, then the key's
/// claim is confirmed, which no withdraw can follow; only then is `id` the answer. A key
/// whose confirmation fails was released by a withdraw: the caller retries and stores the
/// timer anew. A row that is gone is confirmed too: it fired and was cleaned up, or its
/// bucket's delete took it unfired while its first call is still under way, and that call,
/// finding the claim confirmed, has the owner adopt it by value.
async fn settle_repeat(
    store: &Arc<dyn TimerStore>,
    scheduler: &Arc<Scheduler>,
    member: &Member,
    id: TimerId,
    key: &str,
) -> Result<TimerId> {
    // No owner has read a bucket this far out yet: only the confirmation is needed.
    let adopted = if member.surely_unread(id) {
        Ok(Adoption::Adopted)
    } else {
        adopt(store, scheduler, member, id, None, false).await
    };
    match adopted {
        Ok(adoption) => {
            if adoption == Adoption::Gone {
                tracing::info!(timer_id = %id, key, "api: a repeated idempotency key names a timer whose row is gone; confirming the claim");
            }
            match store.confirm_key(key, id).await? {
                true => Ok(id),
                false => Err(Error::Unavailable(format!(
                    "idempotency key {key:?} named timer {id}, which its first call withdrew \
                 meanwhile (its slot range moved while it was stored); retry to store it anew"
                ))),
            }
        }
        Err(e) => Err(Error::Unavailable(format!(
            "idempotency key {key:?} names timer {id}, whose owner could not confirm it holds \
             it ({e}); retry the call"
        ))),
    }
}

/// A withdrawn row may be in its owner's memory already (the owner read its bucket while
/// the row was being written): the owner drops it, as for a cancel (the row is cancelled
/// in the store, so the cancel finds it so and only unloads it). Best effort, before the
/// caller hears the outcome and retries: an owner that cannot be reached, or that fired
/// the timer already, leaves a duplicate of the retry, never a loss.
async fn unload_withdrawn(
    store: &Arc<dyn TimerStore>,
    scheduler: &Arc<Scheduler>,
    member: &Member,
    id: TimerId,
) {
    let unloaded = match member.remote_owner(id) {
        Ok(Some((owner, addr))) => forward(
            member,
            owner,
            &addr,
            v1::CancelTimeoutRequest {
                timer_id: id.to_string(),
            },
            Forwarding::Plain,
            |mut c, r| async move { c.cancel_timeout(r).await },
        )
        .await
        .map(|_| ()),
        // The row is cancelled already: this only keeps the range here from firing it,
        // lease or not.
        Ok(None) => cancel_in_task(store.clone(), scheduler.clone(), id, false)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = unloaded {
        tracing::info!(timer_id = %id, error = %e, "api: a withdrawn timer was not unloaded at its owner; it fires if the owner holds it");
    }
}

/// Both phases of a cancel, in a task of their own so that a caller going away between
/// them cannot leave the timer blocked from firing.
///
/// `clustered`: a caller's cancel on a cluster member. It holds only where the range of the
/// timer's slot runs here and may act (its lease valid; waited for up to
/// [`NOT_ACTING_WAIT`]) both before and after the store write, and the range that
/// blocked the timer is the one that ends the cancel; otherwise the answer is
/// `UNAVAILABLE`, and before the write nothing changed.
async fn cancel_in_task(
    store: Arc<dyn TimerStore>,
    scheduler: Arc<Scheduler>,
    id: TimerId,
    clustered: bool,
) -> Result<v1::CancelTimeoutResponse> {
    let not_acting = |what: &str| {
        Error::Unavailable(format!(
            "timer {id}: this member {what} (its slot may be moving to another member); \
             retry the cancel"
        ))
    };
    // A lease not renewed yet (a range just started, a leader being elected) is worth a
    // short wait: the alternative is refusing the caller at once.
    let waiting_since = tokio::time::Instant::now();
    let probe = loop {
        match scheduler.begin_cancel(id, clustered).await? {
            Some(CancelProbe::NotActing) if waiting_since.elapsed() < NOT_ACTING_WAIT => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            probe => break probe,
        }
    };
    match probe {
        Some(CancelProbe::AlreadyFired) => {
            return Err(Error::FailedPrecondition(format!(
                "timer {id} has already fired; it can no longer be cancelled"
            )));
        }
        Some(CancelProbe::AlreadyCancelled) => {
            return Ok(v1::CancelTimeoutResponse { cancelled: false });
        }
        Some(CancelProbe::InProgress) => {
            return Err(Error::FailedPrecondition(format!(
                "timer {id} is being cancelled by another call"
            )));
        }
        Some(CancelProbe::NotActing) => {
            return Err(not_acting(
                "holds no lease on its slot now; nothing was changed",
            ));
        }
        // No range here runs the slot. On a member, another may hold the timer loaded,
        // which a cancel written to the store only would not stop.
        None if clustered => {
            return Err(not_acting(
                "runs no range of its slot now; nothing was changed",
            ));
        }
        Some(CancelProbe::Proceed) | None => {}
    }
    let outcome = match crate::failpoint::hit_async("api.cancel_between_phases").await {
        Ok(()) => store.cancel(id).await,
        Err(e) => Err(e),
    };
    let done = outcome.as_ref().ok().copied();
    // A member's cancel holds only if its lease outlived the write: a successor starts
    // after that lease, and reads the row as cancelled.
    if clustered && !scheduler.end_cancel_acting(id, done).await && outcome.is_ok() {
        return Err(not_acting(
            "lost its lease on the slot while the cancel was written: the timer may fire yet",
        ));
    }
    if !clustered {
        scheduler.end_cancel(id, done);
    }
    match outcome? {
        CancelOutcome::Cancelled => {
            m::cancelled();
            Ok(v1::CancelTimeoutResponse { cancelled: true })
        }
        CancelOutcome::AlreadyCancelled => Ok(v1::CancelTimeoutResponse { cancelled: false }),
        CancelOutcome::NotFound => Err(not_found(id)),
    }
}

fn parse_id(s: &str) -> Result<TimerId> {
    s.parse()
}

fn finish<T>(method: &'static str, r: Result<T>) -> std::result::Result<Response<T>, Status> {
    match r {
        Ok(v) => {
            m::request(method, tonic::Code::Ok);
            Ok(Response::new(v))
        }
        Err(e) => {
            m::request(method, e.code());
            Err(e.into())
        }
    }
}

#[tonic::async_trait]
impl TimerService for TimerApi {
    async fn set_timeout(
        &self,
        request: Request<v1::SetTimeoutRequest>,
    ) -> std::result::Result<Response<v1::SetTimeoutResponse>, Status> {
        let req = request.into_inner();
        let span =
            tracing::debug_span!("api.set_timeout", topic = %req.topic, partition = req.partition);
        let r = async {
            let spec = convert::timer_spec(req, &self.limits, now_ms(), None)?;
            self.fits_sink(&spec, None)?;
            self.sink.check_target(&spec.topic, spec.partition).await?;
            let id = self
                .store_timers(vec![spec])
                .await?
                .pop()
                .expect("one result per timer")?;
            Ok(v1::SetTimeoutResponse {
                timer_id: id.to_string(),
            })
        }
        .instrument(span)
        .await;
        finish("SetTimeout", r)
    }

    async fn set_timeouts(
        &self,
        request: Request<v1::SetTimeoutsRequest>,
    ) -> std::result::Result<Response<v1::SetTimeoutsResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("api.set_timeouts", count = req.timers.len());
        let r = async {
            if req.timers.len() > self.limits.max_batch {
                return Err(Error::InvalidArgument(format!(
                    "batch of {} timers is over the limit of {} (limits.max_batch); split it",
                    req.timers.len(),
                    self.limits.max_batch
                )));
            }
            let now = now_ms();
            let mut results: Vec<Option<v1::set_timeout_result::Result>> = Vec::new();
            let mut valid = Vec::with_capacity(req.timers.len());
            let mut positions = Vec::with_capacity(req.timers.len());
            for (i, t) in req.timers.into_iter().enumerate() {
                match convert::timer_spec(t, &self.limits, now, Some(i))
                    .and_then(|spec| self.fits_sink(&spec, Some(i)).map(|()| spec))
                {
                    Ok(spec) => {
                        valid.push(spec);
                        positions.push(i);
                        results.push(None);
                    }
                    Err(e) => results.push(Some(item_error(e))),
                }
            }
            let verdicts = self.check_targets(&valid).await;
            let mut ok_specs = Vec::with_capacity(valid.len());
            let mut ok_positions = Vec::with_capacity(valid.len());
            for ((spec, pos), verdict) in valid.into_iter().zip(positions).zip(verdicts) {
                match verdict {
                    Some((code, message)) => {
                        results[pos] = Some(v1::set_timeout_result::Result::Error(v1::ItemError {
                            code: code as i32,
                            message: format!("timers[{pos}]: {message}"),
                        }))
                    }
                    None => {
                        ok_specs.push(spec);
                        ok_positions.push(pos);
                    }
                }
            }
            let ids = self.store_timers(ok_specs).await?;
            for (id, pos) in ids.into_iter().zip(ok_positions) {
                results[pos] = Some(match id {
                    Ok(id) => v1::set_timeout_result::Result::TimerId(id.to_string()),
                    Err(e) => v1::set_timeout_result::Result::Error(v1::ItemError {
                        code: e.code() as i32,
                        message: format!("timers[{pos}]: {e}"),
                    }),
                });
            }
            Ok(v1::SetTimeoutsResponse {
                results: results
                    .into_iter()
                    .map(|result| v1::SetTimeoutResult { result })
                    .collect(),
            })
        }
        .instrument(span)
        .await;
        finish("SetTimeouts", r)
    }

    async fn get_timer(
        &self,
        request: Request<v1::GetTimerRequest>,
    ) -> std::result::Result<Response<v1::GetTimerResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        // A member asking this one, as the owner, to adopt a timer stored while its range
        // moved (see `adopt_here`); only ever sent as a forwarded call.
        let adopt = forwarded && request.metadata().contains_key(ADOPT);
        let by_writer = request
            .metadata()
            .get(ADOPT)
            .is_some_and(|v| v.as_bytes() == ADOPT_BY_WRITER.as_bytes());
        let carried = request
            .metadata()
            .get_bin(ADOPT_TIMER)
            .filter(|_| adopt)
            .cloned();
        let started = tokio::time::Instant::now();
        let budget = wait_budget(&request);
        let req = request.into_inner();
        let r = async {
            let id = parse_id(&req.timer_id)?;
            let owner = self.owner_client(id, forwarded, budget).await;
            if let Some((owner, addr)) = owner? {
                return forward(
                    self.member
                        .as_deref()
                        .expect("only a member has an owner to forward to"),
                    owner,
                    &addr,
                    v1::GetTimerRequest {
                        timer_id: req.timer_id.clone(),
                    },
                    match adopt {
                        true => Forwarding::Adopt(carried, by_writer),
                        false => Forwarding::Plain,
                    },
                    |mut c, r| async move { c.get_timer(r).await },
                )
                .await;
            }
            let stored = if adopt {
                let left = budget.map(|b| b.saturating_sub(started.elapsed()));
                let carried = match carried {
                    Some(v) => self.check_carried(decode_carried(&v, id)?).await?,
                    None => None,
                };
                adopt_here(&self.store, &self.scheduler, id, left, carried, by_writer).await?
            } else {
                self.store.get(id).await?
            };
            let Some(stored) = stored else {
                return Err(not_found(id));
            };
            let state = match stored.state {
                StoredState::Cancelled => v1::TimerState::Cancelled,
                StoredState::Pending => match self.scheduler.status(id).await {
                    Some(MemState::Fired) => v1::TimerState::Fired,
                    Some(MemState::Cancelled) => v1::TimerState::Cancelled,
                    _ => v1::TimerState::Pending,
                },
            };
            let spec = &stored.timer.spec;
            Ok(v1::GetTimerResponse {
                timer_id: id.to_string(),
                state: state as i32,
                fire_at: Some(convert::timestamp(spec.fire_at_ms)),
                topic: spec.topic.clone(),
                partition: spec.partition,
                payload_size: spec.payload.len() as u64,
                has_idempotency_key: spec.idempotency_key.is_some(),
            })
        }
        .instrument(tracing::debug_span!("api.get_timer", timer_id = %req.timer_id))
        .await;
        finish("GetTimer", r)
    }

    async fn get_cluster_map(
        &self,
        _request: Request<v1::GetClusterMapRequest>,
    ) -> std::result::Result<Response<v1::GetClusterMapResponse>, Status> {
        let slots = self.scheduler.layout().slots;
        let Some(member) = &self.member else {
            return Ok(Response::new(v1::GetClusterMapResponse {
                slots,
                members: vec![v1::ClusterMember {
                    id: 0,
                    address: String::new(),
                    state: "active".into(),
                }],
                ranges: vec![v1::SlotOwnership {
                    start: 0,
                    end: slots - 1,
                    owner: Some(0),
                }],
                version: 0,
            }));
        };
        let applied = member.node().map().borrow().clone();
        Ok(Response::new(v1::GetClusterMapResponse {
            slots,
            members: applied
                .map
                .members
                .iter()
                .map(|(id, m)| v1::ClusterMember {
                    id: *id,
                    address: m.addr.clone(),
                    state: m.state.as_str().into(),
                })
                .collect(),
            ranges: applied
                .map
                .ranges()
                .into_iter()
                .map(|r| v1::SlotOwnership {
                    start: r.start,
                    end: r.end,
                    owner: r.owner,
                })
                .collect(),
            version: applied.index,
        }))
    }

    async fn cancel_timeout(
        &self,
        request: Request<v1::CancelTimeoutRequest>,
    ) -> std::result::Result<Response<v1::CancelTimeoutResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let budget = wait_budget(&request);
        let req = request.into_inner();
        let r = async {
            let id = parse_id(&req.timer_id)?;
            let owner = self.owner_client(id, forwarded, budget).await;
            // Only the owner can keep a loaded timer from firing: a cancel goes there, and
            // changes nothing when the owner cannot be reached.
            if let Some((owner, addr)) = owner? {
                return forward(
                    self.member
                        .as_deref()
                        .expect("only a member has an owner to forward to"),
                    owner,
                    &addr,
                    v1::CancelTimeoutRequest {
                        timer_id: req.timer_id.clone(),
                    },
                    Forwarding::Plain,
                    |mut c, r| async move { c.cancel_timeout(r).await },
                )
                .await;
            }
            tokio::spawn(cancel_in_task(
                self.store.clone(),
                self.scheduler.clone(),
                id,
                self.member.is_some(),
            ))
            .await
            .map_err(|e| Error::Internal(format!("cancel task: {e}")))?
        }
        .instrument(tracing::debug_span!("api.cancel_timeout", timer_id = %req.timer_id))
        .await;
        finish("CancelTimeout", r)
    }
}

/// What a forwarded call asks of the owner beyond the call itself.
enum Forwarding {
    /// Nothing.
    Plain,
    /// To adopt the timer first ([`ADOPT`]), carrying it by value if it fits
    /// ([`ADOPT_TIMER`]); asked by the timer's writer ([`ADOPT_BY_WRITER`]) or not.
    Adopt(Option<tonic::metadata::BinaryMetadataValue>, bool),
}

/// Sends a call to the member that owns its timer, marked as forwarded; the owner's answer
/// (or error) is this call's.
async fn forward<Req, Resp, F, Fut>(
    member: &Member,
    owner: u64,
    addr: &str,
    request: Req,
    asking: Forwarding,
    call: F,
) -> Result<Resp>
where
    F: FnOnce(
        v1::timer_service_client::TimerServiceClient<tonic::transport::Channel>,
        Request<Req>,
    ) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
{
    let client = member.client_of(addr)?.raw();
    let mut request = Request::new(request);
    request.set_timeout(std::time::Duration::from_secs(5));
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Forwarding::Adopt(carried, writer) = asking {
        request.metadata_mut().insert(
            ADOPT,
            tonic::metadata::MetadataValue::from_static(if writer { ADOPT_BY_WRITER } else { "1" }),
        );
        if let Some(timer) = carried {
            request.metadata_mut().insert_bin(ADOPT_TIMER, timer);
        }
    }
    match call(client, request).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ) =>
        {
            // Nothing changed here; whether the owner applied a call whose answer was lost
            // is unknown (a cancel or read repeated is harmless).
            Err(Error::Unavailable(format!(
                "the timer's owner, node {owner} at {addr}, did not answer ({}); retry",
                s.message()
            )))
        }
        Err(s) => Err(Error::Forwarded(s)),
    }
}

fn not_found(id: TimerId) -> Error {
    Error::NotFound(format!(
        "timer {id} not found: it never existed, or it fired or was cancelled and has since been cleaned up"
    ))
}

fn item_error(e: Error) -> v1::set_timeout_result::Result {
    v1::set_timeout_result::Result::Error(v1::ItemError {
        code: e.code() as i32,
        message: e.to_string(),
    })
}

/// How long a call may wait for its slot's owner: the caller's `grpc-timeout` less
/// 200 ms for the answer to travel (`None`: the caller set no deadline).
fn wait_budget<T>(request: &Request<T>) -> Option<Duration> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let total = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(total.saturating_sub(Duration::from_millis(200)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_deadline_bounds_the_wait_for_an_owner() {
        let with = |t: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("grpc-timeout", t.parse().unwrap());
            wait_budget(&r)
        };
        assert_eq!(with("5S"), Some(Duration::from_millis(4_800)));
        assert_eq!(with("1000m"), Some(Duration::from_millis(800)));
        assert_eq!(with("100m"), Some(Duration::ZERO));
        assert_eq!(
            with("2M"),
            Some(Duration::from_secs(119) + Duration::from_millis(800))
        );
        assert_eq!(with("bogus"), None);
        assert_eq!(wait_budget(&Request::new(())), None);
    }
}
