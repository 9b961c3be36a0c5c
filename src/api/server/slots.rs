//! The connection limit (`--max-connections`). Where requests need a credential, a
//! connection on which no request has proven one holds its slot only until a new
//! connection needs it: at the limit, the one of them that has waited longest without a
//! request in flight is closed for the newcomer. Idle probes and silent sockets can then
//! never keep an authenticated caller out. Without authentication every connection is
//! alike, and those beyond the limit are refused as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::activity::Activity;

pub struct Slots {
    max: usize,
    guarded: bool,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Arc<Activity>>,
}

/// A connection's slot, given back when dropped (an evicted connection's was already).
pub struct Slot {
    id: u64,
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().conns.remove(&self.id);
    }
}

/// What admitting a connection did.
pub enum Admitted {
    Yes(Slot, Arc<Activity>),
    /// In by closing another connection that never proved a credential.
    Evicting(Slot, Arc<Activity>),
    No,
}

impl Slots {
    pub fn new(max: usize, guarded: bool) -> Arc<Self> {
        Arc::new(Slots {
            max,
            guarded,
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection, if one is free or can be freed.
    pub fn admit(self: &Arc<Self>) -> Admitted {
        let mut open = self.lock();
        let mut evicting = false;
        if open.conns.len() >= self.max {
            let victim = self
                .guarded
                .then(|| {
                    open.conns
                        .iter()
                        .filter(|(_, a)| a.evictable())
                        .min_by_key(|(_, a)| a.phase_since())
                        .map(|(id, _)| *id)
                })
                .flatten();
            let Some(victim) = victim else {
                return Admitted::No;
            };
            if let Some(a) = open.conns.remove(&victim) {
                a.evict();
            }
            evicting = true;
        }
        let id = open.next;
        open.next += 1;
        let activity = Arc::new(Activity::new(self.guarded));
        open.conns.insert(id, activity.clone());
        let slot = Slot {
            id,
            slots: self.clone(),
        };
        if evicting {
            Admitted::Evicting(slot, activity)
        } else {
            Admitted::Yes(slot, activity)
        }
    }
}
