//! Messages waiting for their writer schema from the schema registry.
//!
//! When a Confluent id is not in the registry cache, the consumer must neither block (it would
//! stop polling, and librdkafka would evict it from the group after `max.poll.interval.ms`) nor
//! decide anything about the message. So the message is held here, already begun in the
//! [`OffsetTracker`](super::offsets::OffsetTracker) (no offset can be committed past it), a
//! background task settles the id ([`SchemaRegistry::settle`]), and when it reports back the
//! consumer offers the held messages again, in order ([`Held::drain`]).
//!
//! Order within a partition is kept: once a partition has a held message, its later messages are
//! held behind it, even those whose schema is known. A partition's queue moves only from its
//! front. At most one fetch per id is started; every message with that id waits for it.
//!
//! Memory is bounded by [`Held::is_full`]: past the limit the sink pauses its partitions (it
//! keeps polling) until fetches resolve, so a flood of unknown ids cannot grow the queues without
//! bound; the fetches themselves are bounded by the registry client's slots.
//!
//! Owns the queues and the fetch tasks; decoding and batching stay the sink's.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decode::registry::SchemaRegistry;
use super::decode::RegistryCache;
use super::dlq::SourceRecord;
use super::offsets::{Delivery, Partition};

/// A held message.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) delivery: Delivery,
    /// Boxed: a refused message travels back through a `Result`, and stays small there.
    pub(crate) source: Box<SourceRecord>,
}

/// Why an offered message went back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its schema id is not settled yet: fetch it (if nobody is) and keep waiting.
    Unfetched(u32),
    /// The open batch is full: stop draining for now.
    Full,
}

/// The held messages and the fetches they wait for.
pub(crate) struct Held {
    queues: BTreeMap<Partition, VecDeque<Waiting>>,
    len: usize,
    limit: usize,
    registry: Option<(Arc<SchemaRegistry>, Arc<RegistryCache>)>,
    fetching: HashSet<u32>,
    settled_tx: mpsc::UnboundedSender<u32>,
    cancel: CancellationToken,
    /// A fetch settled since the queues were last drained through.
    dirty: bool,
}

impl Held {
    /// Holds at most `limit` messages before [`Held::is_full`]; settled ids are reported on the
    /// returned receiver (pass each to [`Held::settled`]).
    pub(crate) fn new(
        limit: usize,
        registry: Option<(Arc<SchemaRegistry>, Arc<RegistryCache>)>,
    ) -> (Self, mpsc::UnboundedReceiver<u32>) {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let held = Held {
            queues: BTreeMap::new(),
            len: 0,
            limit: limit.max(1),
            registry,
            fetching: HashSet::new(),
            settled_tx,
            cancel: CancellationToken::new(),
            dirty: false,
        };
        (held, settled_rx)
    }

    /// Messages held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True at the limit: the sink pauses until fetches resolve.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.limit
    }

    /// True when `partition` has held messages: its next message must wait behind them.
    pub(crate) fn holds(&self, partition: Partition) -> bool {
        self.len > 0 && self.queues.contains_key(&partition)
    }

    /// True when a settled fetch may have freed held messages.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Holds a message at the back of its partition's queue.
    pub(crate) fn hold(&mut self, delivery: Delivery, source: SourceRecord) {
        self.queues
            .entry(delivery.partition)
            .or_default()
            .push_back(Waiting {
                delivery,
                source: Box::new(source),
            });
        self.len += 1;
    }

    /// Starts settling `id` in the background unless that is under way.
    pub(crate) fn fetch(&mut self, id: u32) {
        let Some((registry, cache)) = &self.registry else {
            return;
        };
        if !self.fetching.insert(id) {
            return;
        }
        let (registry, cache) = (Arc::clone(registry), Arc::clone(cache));
        let (settled_tx, cancel) = (self.settled_tx.clone(), self.cancel.clone());
        tokio::spawn(async move {
            if registry.settle(id, &cache, &cancel).await.is_some() {
                // The receiver is gone only when the sink stopped.
                let _ = settled_tx.send(id);
            }
        });
    }

    /// Records that `id` settled; the next [`Held::drain`] offers its messages.
    pub(crate) fn settled(&mut self, id: u32) {
        self.fetching.remove(&id);
        self.dirty = true;
    }

    /// Offers the front message of every partition to `take`, and the next, while it takes
    /// them. A message `take` refuses goes back to the front of its queue; `Unfetched` moves on
    /// to the next partition (starting the fetch), `Full` stops the drain, to be resumed later.
    pub(crate) fn drain(
        &mut self,
        mut take: impl FnMut(Waiting) -> Result<(), (Waiting, Refused)>,
    ) {
        let partitions: Vec<Partition> = self.queues.keys().copied().collect();
        let mut stopped = false;
        'partitions: for partition in partitions {
            while let Some(waiting) = self
                .queues
                .get_mut(&partition)
                .and_then(VecDeque::pop_front)
            {
                self.len -= 1;
                if let Err((waiting, refused)) = take(waiting) {
                    self.len += 1;
                    if let Some(queue) = self.queues.get_mut(&partition) {
                        queue.push_front(waiting);
                    }
                    match refused {
                        Refused::Unfetched(id) => {
                            self.fetch(id);
                            continue 'partitions;
                        }
                        Refused::Full => {
                            stopped = true;
                            break 'partitions;
                        }
                    }
                }
            }
        }
        self.queues.retain(|_, queue| !queue.is_empty());
        self.dirty = stopped;
    }

    /// Drops held messages `keep` rejects (their partition was revoked: the new owner reads them
    /// again). Returns how many went.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Delivery) -> bool) -> usize {
        let before = self.len;
        for queue in self.queues.values_mut() {
            queue.retain(|waiting| keep(&waiting.delivery));
        }
        self.queues.retain(|_, queue| !queue.is_empty());
        self.len = self.queues.values().map(VecDeque::len).sum();
        before - self.len
    }

    /// Stops the fetches (shutdown); held messages stay uncommitted and are redelivered.
    pub(crate) fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: Partition, offset: i64) -> (Delivery, SourceRecord) {
        let delivery = Delivery {
            partition,
            offset,
            epoch: 1,
        };
        let source = SourceRecord {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            payload: Some(vec![0, 0, 0, 0, offset as u8]),
            headers: Vec::new(),
        };
        (delivery, source)
    }

    fn held(limit: usize) -> Held {
        Held::new(limit, None).0
    }

    #[test]
    fn a_partition_drains_in_order_up_to_the_first_unsettled_message() {
        let mut held = held(100);
        for (partition, offset) in [(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)] {
            let (delivery, source) = message(partition, offset);
            held.hold(delivery, source);
        }
        assert!(held.holds(0) && held.holds(1) && !held.holds(2));
        let mut taken = Vec::new();
        // Offset 11 is still waiting for its schema; 12 must wait behind it.
        held.drain(|waiting| {
            if waiting.delivery.offset == 11 {
                return Err((waiting, Refused::Unfetched(7)));
            }
            taken.push(waiting.delivery.offset);
            Ok(())
        });
        assert_eq!(taken, vec![10, 20, 21]);
        assert_eq!(held.len(), 2);
        assert!(held.holds(0) && !held.holds(1));
        assert!(!held.is_dirty());
        held.settled(7);
        assert!(held.is_dirty());
        held.drain(|waiting| {
            taken.push(waiting.delivery.offset);
            Ok(())
        });
        assert_eq!(taken, vec![10, 20, 21, 11, 12]);
        assert!(held.is_empty() && !held.holds(0));
    }

    #[test]
    fn a_full_batch_stops_the_drain_and_keeps_it_pending() {
        let mut held = held(3);
        for offset in 0..3 {
            let (delivery, source) = message(0, offset);
            held.hold(delivery, source);
        }
        assert!(held.is_full());
        let mut room = 2;
        held.drain(|waiting| {
            if room == 0 {
                return Err((waiting, Refused::Full));
            }
            room -= 1;
            Ok(())
        });
        assert_eq!(held.len(), 1);
        assert!(!held.is_full());
        assert!(held.is_dirty(), "the rest is offered again later");
    }

    #[test]
    fn messages_of_revoked_partitions_are_dropped() {
        let mut held = held(10);
        for (partition, offset) in [(0, 1), (1, 2), (1, 3)] {
            let (delivery, source) = message(partition, offset);
            held.hold(delivery, source);
        }
        assert_eq!(held.retain(|delivery| delivery.partition != 1), 2);
        assert_eq!(held.len(), 1);
        assert!(!held.holds(1));
    }
}
