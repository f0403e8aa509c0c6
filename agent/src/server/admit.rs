//! Who gets served when the agent is busy. Requests are authenticated from their headers
//! before they take a slot or their body is read; then each identity may hold at most a
//! share of the slots, and a reserve is kept for the controller's identity: any pod that can
//! reach the agent (or one tenant with many tokens' worth of slow requests) cannot lock out
//! the heals of everyone else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Agent, BODY_LIMIT, Failure};
use crate::error::{Code, Error};

/// The slots of `/v1`: `shared` for everyone, `reserved` only for the reserved identities,
/// and no identity above `per_identity` at once.
pub struct Slots {
    shared: usize,
    reserved: usize,
    per_identity: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    shared: usize,
    reserved: usize,
    by: HashMap<String, usize>,
}

/// A slot taken; given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    who: String,
    reserved: bool,
}

/// Why no slot was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// This identity holds its share already.
    Identity(usize),
    /// Every slot it may use is taken.
    All(usize),
}

impl Slots {
    /// `total` slots, a quarter of them (at least one, when there are two or more) reserved;
    /// each identity may hold a quarter of the total (at least one) at once.
    pub fn new(total: u32) -> Arc<Self> {
        let total = total.max(1) as usize;
        let reserved = if total >= 2 { (total / 4).max(1) } else { 0 };
        Arc::new(Slots { shared: total - reserved, reserved, per_identity: (total / 4).max(1), held: Mutex::default() })
    }

    /// A slot for `who`; `priority` identities (the controller) are not bounded per identity
    /// and may use the reserve once the shared slots are taken.
    pub fn take(self: &Arc<Self>, who: &str, priority: bool) -> Result<Slot, Busy> {
        let mut h = self.held.lock().unwrap();
        let mine = h.by.get(who).copied().unwrap_or(0);
        if !priority && mine >= self.per_identity {
            return Err(Busy::Identity(self.per_identity));
        }
        let reserved = if h.shared < self.shared {
            h.shared += 1;
            false
        } else if priority && h.reserved < self.reserved {
            h.reserved += 1;
            true
        } else {
            return Err(Busy::All(if priority { self.shared + self.reserved } else { self.shared }));
        };
        *h.by.entry(who.to_string()).or_default() += 1;
        Ok(Slot { slots: self.clone(), who: who.to_string(), reserved })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if self.reserved {
            h.reserved -= 1;
        } else {
            h.shared -= 1;
        }
        if let Some(n) = h.by.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                h.by.remove(&self.who);
            }
        }
    }
}

/// How long a request's body may take to arrive once its headers did.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Admission to `/v1`, cheapest first, each refusal answered before the body is read: the
/// client's rate (429); who is calling, from the headers alone (401, or 503 while not
/// ready); a slot, within the caller's share or the controller's reserve (429); a declared
/// length over the limit (413). Only then is the body read, whole, within [`BODY_TIMEOUT`]
/// (a slower one is answered 400 and its connection closed), and the handler runs with the
/// caller's identity.
pub(super) async fn limits(State(a): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    if !a.limiter.allow(client, Instant::now()) {
        return linger(req, too_many(format!("{client} sends more than {} requests per second", a.cfg.rate_limit))).await;
    }
    let user = match a.ready() {
        Ok(ready) => ready.auth.authenticate(req.headers()).await,
        Err(e) => Err(e),
    };
    let user = match user {
        Ok(u) => u,
        Err(e) => return linger(req, Failure::from(e).into_response()).await,
    };
    let priority = a.cfg.reserved_for.contains(&user.name);
    let _slot = match a.slots.take(&user.name, priority) {
        Ok(slot) => slot,
        Err(Busy::Identity(n)) => return linger(req, too_many(format!("{} has {n} requests in flight already", user.name))).await,
        Err(Busy::All(n)) => return linger(req, too_many(format!("the agent is serving {n} requests already"))).await,
    };
    // A declared length over the limit is refused before the body is handled: a client that
    // sent `Expect: 100-continue` never sends it, and one that did not is heard out (see
    // `linger`), so that the answer is not lost to a reset.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return linger(req, too_large()).await;
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, read_body(body)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(resp)) => return resp,
        Err(_) => {
            let mut resp =
                Failure::from(Error::invalid(format!("the request body did not arrive within {BODY_TIMEOUT:?}"))).into_response();
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let mut req = Request::from_parts(parts, axum::body::Body::from(body));
    req.extensions_mut().insert(user);
    next.run(req).await
}

/// The whole body, at most [`BODY_LIMIT`] bytes (413 beyond, the connection closed).
async fn read_body(body: axum::body::Body) -> std::result::Result<Bytes, Response> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Failure::from(Error::invalid(format!("the body could not be read: {e}"))).into_response())?;
        if buf.len() + chunk.len() > BODY_LIMIT {
            let mut resp = too_large();
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(resp);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn too_large() -> Response {
    Failure::from(Error::new(Code::PayloadTooLarge, format!("the body is larger than {BODY_LIMIT} bytes"))).into_response()
}

/// How much of an unread body an early answer waits for, and how long.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Answers early with `resp`, the way nginx's lingering close does: what the client still
/// sends of its body is read and dropped first (at most [`LINGER_BYTES`], [`LINGER_TIME`]),
/// and the connection is closed after the answer. A client that writes its whole body
/// without waiting (Python's `urllib`, most scripts) is then reading when the answer comes,
/// instead of meeting a reset that discards it. A client that asked `Expect: 100-continue`
/// is answered at once: it sends nothing until told to.
async fn linger(req: Request, mut resp: Response) -> Response {
    let waits = req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !waits {
        let _ = tokio::time::timeout(LINGER_TIME, axum::body::to_bytes(req.into_body(), LINGER_BYTES)).await;
    }
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn too_many(why: String) -> Response {
    let mut resp = Failure::from(Error::new(Code::TooManyRequests, format!("{why}; retry shortly"))).into_response();
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_takes_its_share_and_the_controller_keeps_its_reserve() {
        let s = Slots::new(32);
        // One tenant: 8 at once, no more.
        let tenant: Vec<Slot> = (0..8).map(|_| s.take("tenant-a", false).unwrap()).collect();
        assert_eq!(s.take("tenant-a", false).err(), Some(Busy::Identity(8)));
        // Many identities fill the shared slots (24)...
        let others: Vec<Slot> = (0..16).map(|i| s.take(&format!("t{}", i % 4), false).unwrap()).collect();
        assert_eq!(s.take("t9", false).err(), Some(Busy::All(24)));
        // ...and the controller still gets in, up to the reserve.
        let ctl: Vec<Slot> = (0..8).map(|_| s.take("controller", true).unwrap()).collect();
        assert_eq!(s.take("controller", true).err(), Some(Busy::All(32)));
        drop(tenant);
        assert!(s.take("t9", false).is_ok(), "slots come back when dropped");
        drop((others, ctl));
        let h = s.held.lock().unwrap();
        assert_eq!((h.shared, h.reserved, h.by.len()), (0, 0, 0));
    }

    #[test]
    fn a_single_slot_is_shared() {
        let s = Slots::new(1);
        let a = s.take("a", false).unwrap();
        assert!(s.take("controller", true).is_err());
        drop(a);
        assert!(s.take("controller", true).is_ok());
    }
}
