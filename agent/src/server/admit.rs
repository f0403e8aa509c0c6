//! Who gets served when the agent is busy. Requests are authenticated from their headers
//! before they take a slot or their body is read; then each identity may hold at most a
//! share of the slots, and a reserve is kept for the controller's identity: any pod that can
//! reach the agent (or one tenant with many tokens' worth of slow requests) cannot lock out
//! the heals of everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
