//! Connections accepted but not yet admitted or refused: bounded in total
//! and per source address. A new connection over a bound sheds the oldest
//! pending one (of its source first), so a flood of idle connections
//! cannot hold the agent, and a fresh legitimate client still gets in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Which bound shed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `[auth.limits] pending_per_source`.
    PerSource,
    /// `[auth.limits] pending_connections`.
    Global,
}

impl Bound {
    /// The config field, also the metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerSource => "pending_per_source",
            Self::Global => "pending_connections",
        }
    }
}

struct Waiting {
    source: IpAddr,
    shed: Arc<ShedCell>,
}

#[derive(Default)]
struct ShedCell {
    bound: Mutex<Option<Bound>>,
    notify: Notify,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// By arrival: the first entry is the oldest.
    order: BTreeMap<u64, Waiting>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
}

impl Table {
    fn remove(&mut self, seq: u64) -> Option<Waiting> {
        let waiting = self.order.remove(&seq)?;
        if let Some(set) = self.by_source.get_mut(&waiting.source) {
            set.remove(&seq);
            if set.is_empty() {
                self.by_source.remove(&waiting.source);
            }
        }
        Some(waiting)
    }
}

/// The pending table.
pub struct Pending {
    table: Mutex<Table>,
    global: usize,
    per_source: usize,
}

/// One pending connection; leaves the table when dropped.
pub struct Slot {
    pending: Arc<Pending>,
    seq: u64,
    shed: Arc<ShedCell>,
}

impl Pending {
    #[must_use]
    pub fn new(global: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::default(),
            global: global.max(1),
            per_source: per_source.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a new connection from `source`, shedding the oldest pending
    /// ones over the bounds; returns its slot and the bounds that were hit.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> (Slot, Vec<Bound>) {
        let source = source.to_canonical();
        let mut hit = Vec::new();
        let mut table = self.lock();
        let oldest_of_source = table
            .by_source
            .get(&source)
            .filter(|set| set.len() >= self.per_source)
            .and_then(|set| set.first().copied());
        if let Some(seq) = oldest_of_source {
            shed(table.remove(seq), Bound::PerSource);
            hit.push(Bound::PerSource);
        }
        if table.order.len() >= self.global
            && let Some((&seq, _)) = table.order.first_key_value()
        {
            shed(table.remove(seq), Bound::Global);
            hit.push(Bound::Global);
        }
        let seq = table.next;
        table.next += 1;
        let cell = Arc::new(ShedCell::default());
        table.order.insert(
            seq,
            Waiting {
                source,
                shed: Arc::clone(&cell),
            },
        );
        table.by_source.entry(source).or_default().insert(seq);
        drop(table);
        let slot = Slot {
            pending: Arc::clone(self),
            seq,
            shed: cell,
        };
        (slot, hit)
    }

    /// Connections pending now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn shed(waiting: Option<Waiting>, bound: Bound) {
    if let Some(w) = waiting {
        *w.shed.bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(bound);
        // notify_one keeps a permit if the connection is not waiting yet.
        w.shed.notify.notify_one();
    }
}

impl Slot {
    /// Resolves when a newer connection shed this one; says which bound.
    pub async fn shed(&self) -> Bound {
        loop {
            if let Some(bound) = *self
                .shed
                .bound
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                return bound;
            }
            self.shed.notify.notified().await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pending.lock().remove(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    async fn is_shed(slot: &Slot) -> Option<Bound> {
        tokio::time::timeout(Duration::from_millis(10), slot.shed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn one_source_over_its_bound_sheds_its_own_oldest() {
        let pending = Pending::new(10, 2);
        let (a1, _) = pending.enter(ip("198.51.100.1"));
        let (a2, _) = pending.enter(ip("198.51.100.1"));
        let (b1, _) = pending.enter(ip("198.51.100.2"));
        let (a3, hit) = pending.enter(ip("::ffff:198.51.100.1"));
        assert_eq!(hit, [Bound::PerSource]);
        assert_eq!(is_shed(&a1).await, Some(Bound::PerSource));
        for survivor in [&a2, &b1, &a3] {
            assert_eq!(is_shed(survivor).await, None);
        }
        assert_eq!(pending.len(), 3);
        drop(a1);
        assert_eq!(pending.len(), 3, "a shed slot left the table already");
        drop((a2, a3, b1));
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn many_sources_over_the_total_shed_the_oldest_of_all() {
        let pending = Pending::new(3, 3);
        let slots: Vec<Slot> = (1..=3)
            .map(|i| pending.enter(ip(&format!("198.51.100.{i}"))).0)
            .collect();
        let (newest, hit) = pending.enter(ip("203.0.113.9"));
        assert_eq!(hit, [Bound::Global]);
        assert_eq!(is_shed(&slots[0]).await, Some(Bound::Global));
        assert_eq!(is_shed(&slots[1]).await, None);
        assert_eq!(is_shed(&newest).await, None);
        assert_eq!(pending.len(), 3);
    }
}
