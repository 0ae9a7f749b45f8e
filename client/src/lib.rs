//! A small typed client for TimerDB's public gRPC API (`timerdb.v1`), and the timestamp
//! helpers its callers share. The `timerdb` CLI, the loadtest and journeyx use it; none of
//! them links the server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), timerdb_client::Error> {
//! use timerdb_client::{Client, NewTimer, time::now_ms};
//! let mut client = Client::connect("127.0.0.1:7420").await?;
//! let id = client
//!     .set_timeout(NewTimer::new(now_ms() + 5_000, "reminders", 0).payload("hello"))
//!     .await?;
//! println!("{id}: {:?}", client.get(&id).await?.state);
//! # Ok(()) }
//! ```

pub mod time;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use timerdb_proto::v1;
use timerdb_proto::v1::timer_service_client::TimerServiceClient;
use tonic::transport::{Channel, Endpoint};

pub use timerdb_proto::v1::TimerState;

/// Where a client connects when it is told nothing else.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7420";

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server address is neither `host:port` nor a URL.
    #[error("server address {0:?} is not host:port or a URL like http://127.0.0.1:7420")]
    BadAddress(String),
    /// Nothing answered at the address.
    #[error("cannot reach TimerDB at {server} ({reason}); is a node running there?")]
    Unreachable {
        /// The address tried.
        server: String,
        /// Why the connection failed (the innermost cause, e.g. "Connection refused").
        reason: String,
    },
    /// The server answered with an error.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// Not `#[from]`: that would make the status the error's source too, and a report of the
/// whole chain (`{:#}`) would say the same thing twice.
impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

/// Result of a client call.
pub type Result<T> = std::result::Result<T, Error>;

/// The gRPC endpoint for `server`: `host:port` (plain-text gRPC) or a URL
/// (`http://host:port`, `https://...`).
pub fn endpoint(server: &str) -> Result<Endpoint> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    Endpoint::from_shared(url)
        .map(|e| e.connect_timeout(Duration::from_secs(5)))
        .map_err(|_| Error::BadAddress(server.to_owned()))
}

/// The innermost cause of an error: tonic's transport errors wrap the same words several
/// times over.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string()
}

/// A timer to schedule.
#[derive(Debug, Clone, Default)]
pub struct NewTimer {
    /// When it fires, in milliseconds since the Unix epoch (a past time fires at once).
    pub fire_at_ms: u64,
    /// Kafka topic it fires to.
    pub topic: String,
    /// Kafka partition it fires to.
    pub partition: i32,
    /// Message value.
    pub payload: Bytes,
    /// Message key (empty: the timer id).
    pub key: Bytes,
    /// Message headers.
    pub headers: HashMap<String, Bytes>,
    /// Repeating a call with the same key returns the first timer's id.
    pub idempotency_key: String,
}

impl NewTimer {
    /// A timer firing at `fire_at_ms` to `topic`/`partition`, with an empty payload.
    pub fn new(fire_at_ms: u64, topic: impl Into<String>, partition: i32) -> Self {
        Self {
            fire_at_ms,
            topic: topic.into(),
            partition,
            ..Self::default()
        }
    }

    /// With this payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// With this Kafka key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = key.into();
        self
    }

    /// With one more header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// With this idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    /// The protobuf request.
    pub fn into_request(self) -> v1::SetTimeoutRequest {
        v1::SetTimeoutRequest {
            fire_at: Some(time::timestamp(self.fire_at_ms)),
            payload: self.payload,
            topic: self.topic,
            partition: self.partition,
            key: self.key,
            headers: self.headers,
            idempotency_key: self.idempotency_key,
        }
    }
}

/// What `GetTimer` tells about a timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerInfo {
    /// Its id.
    pub id: String,
    /// Pending, fired or cancelled.
    pub state: TimerState,
    /// When it fires (or fired), in milliseconds since the Unix epoch.
    pub fire_at_ms: u64,
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Payload length in bytes.
    pub payload_size: u64,
    /// Whether it was set with an idempotency key.
    pub has_idempotency_key: bool,
}

/// The lower-case name of a timer state: `pending`, `fired`, `cancelled`.
pub fn state_name(state: TimerState) -> &'static str {
    match state {
        TimerState::Unspecified => "unspecified",
        TimerState::Pending => "pending",
        TimerState::Fired => "fired",
        TimerState::Cancelled => "cancelled",
    }
}

/// Who owns which slots, as [`Client::cluster_map`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMap {
    /// Slot count of the store.
    pub slots: u32,
    /// Members: id, address (empty for a single node: the one called), state.
    pub members: Vec<(u64, String, String)>,
    /// `(start, end, owner)`, both ends inclusive.
    pub ranges: Vec<(u32, u32, Option<u64>)>,
    /// Grows with every change.
    pub version: u64,
}

impl ClusterMap {
    /// The address of the member that owns timer `id` (`None`: unknown id format, no
    /// owner, or a single node).
    pub fn owner_address(&self, id: &str) -> Option<&str> {
        let slot = slot_of(id, self.slots)?;
        let (_, _, owner) = self
            .ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))?;
        let owner = (*owner)?;
        self.members
            .iter()
            .find(|(mid, addr, _)| *mid == owner && !addr.is_empty())
            .map(|(_, addr, _)| addr.as_str())
    }
}

/// The slot of timer `id` in a store of `slots` slots: crc32 of the id's random part (its
/// last 16 hex digits, as 8 big-endian bytes) modulo `slots`. `None` if `id` is not an id.
pub fn slot_of(id: &str, slots: u32) -> Option<u32> {
    if id.len() != 32 || slots == 0 {
        return None;
    }
    let rand = u64::from_str_radix(&id[16..], 16).ok()?;
    Some(crc32fast::hash(&rand.to_be_bytes()) % slots)
}

/// A connection to one TimerDB node. Cheap to clone: clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: TimerServiceClient<Channel>,
}

impl Client {
    /// Connects to `server` (`host:port` or a URL), failing if nothing answers within 5 s.
    pub async fn connect(server: &str) -> Result<Self> {
        let channel = endpoint(server)?
            .connect()
            .await
            .map_err(|e| Error::Unreachable {
                server: server.to_owned(),
                reason: root_cause(&e),
            })?;
        Ok(Self::from_channel(channel))
    }

    /// A client that connects on its first call (and reconnects after failures).
    pub fn connect_lazy(server: &str) -> Result<Self> {
        Ok(Self::from_channel(endpoint(server)?.connect_lazy()))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            // The server accepts batches up to 64 MiB; answers are small.
            inner: TimerServiceClient::new(channel).max_encoding_message_size(64 << 20),
        }
    }

    /// The generated gRPC client, for calls this wrapper does not cover.
    pub fn raw(&self) -> TimerServiceClient<Channel> {
        self.inner.clone()
    }

    /// Schedules one timer; returns its id.
    pub async fn set_timeout(&mut self, timer: NewTimer) -> Result<String> {
        let r = self.inner.set_timeout(timer.into_request()).await?;
        Ok(r.into_inner().timer_id)
    }

    /// Schedules a batch; one result per timer, in order: its id or why it was refused.
    /// A refused timer refuses only itself.
    pub async fn set_timeouts(
        &mut self,
        timers: Vec<NewTimer>,
    ) -> Result<Vec<std::result::Result<String, tonic::Status>>> {
        let request = v1::SetTimeoutsRequest {
            timers: timers.into_iter().map(NewTimer::into_request).collect(),
        };
        let response = self.inner.set_timeouts(request).await?.into_inner();
        Ok(response
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(v1::set_timeout_result::Result::TimerId(id)) => Ok(id),
                Some(v1::set_timeout_result::Result::Error(e)) => {
                    Err(tonic::Status::new(tonic::Code::from(e.code), e.message))
                }
                None => Err(tonic::Status::internal("the server sent an empty result")),
            })
            .collect())
    }

    /// What the server knows of a timer.
    pub async fn get(&mut self, id: &str) -> Result<TimerInfo> {
        let t = self
            .inner
            .get_timer(v1::GetTimerRequest {
                timer_id: id.to_owned(),
            })
            .await?
            .into_inner();
        Ok(TimerInfo {
            state: TimerState::try_from(t.state).unwrap_or(TimerState::Unspecified),
            fire_at_ms: t.fire_at.map(|ts| time::ms_of(&ts)).unwrap_or(0),
            id: t.timer_id,
            topic: t.topic,
            partition: t.partition,
            payload_size: t.payload_size,
            has_idempotency_key: t.has_idempotency_key,
        })
    }

    /// Who owns which slots (a single node owns them all).
    pub async fn cluster_map(&mut self) -> Result<ClusterMap> {
        let m = self
            .inner
            .get_cluster_map(v1::GetClusterMapRequest {})
            .await?
            .into_inner();
        Ok(ClusterMap {
            slots: m.slots,
            members: m
                .members
                .into_iter()
                .map(|x| (x.id, x.address, x.state))
                .collect(),
            ranges: m
                .ranges
                .into_iter()
                .map(|r| (r.start, r.end, r.owner))
                .collect(),
            version: m.version,
        })
    }

    /// Cancels a timer: `true` if this call cancelled it, `false` if it already was.
    pub async fn cancel(&mut self, id: &str) -> Result<bool> {
        let r = self
            .inner
            .cancel_timeout(v1::CancelTimeoutRequest {
                timer_id: id.to_owned(),
            })
            .await?;
        Ok(r.into_inner().cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_host_port_or_a_url() {
        assert_eq!(
            endpoint("127.0.0.1:7420").unwrap().uri().to_string(),
            "http://127.0.0.1:7420/"
        );
        assert_eq!(
            endpoint("https://timers.example:443")
                .unwrap()
                .uri()
                .to_string(),
            "https://timers.example:443/"
        );
        let e = endpoint("not an address").unwrap_err().to_string();
        assert!(e.contains("\"not an address\""), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        // Port 1 on loopback: nothing listens there.
        let e = Client::connect("127.0.0.1:1")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach TimerDB at 127.0.0.1:1"), "{e}");
    }

    #[test]
    fn a_new_timer_becomes_its_request() {
        let r = NewTimer::new(1_700_000_000_123, "t", 3)
            .payload("p")
            .key("k")
            .header("h", "v")
            .idempotency_key("i")
            .into_request();
        assert_eq!(r.fire_at.unwrap().nanos, 123_000_000);
        assert_eq!((r.topic.as_str(), r.partition), ("t", 3));
        assert_eq!((&r.payload[..], &r.key[..]), (&b"p"[..], &b"k"[..]));
        assert_eq!(&r.headers["h"][..], b"v");
        assert_eq!(r.idempotency_key, "i");
    }
}
