//! Which offsets may be stored for commit.
//!
//! A Kafka offset may be committed only when every earlier message of its partition is done:
//! stored in Postgres, or acknowledged by the dead-letter producer. Messages complete out of
//! order (a dead letter can be acknowledged after a later batch commits), so the tracker keeps,
//! per assigned partition, the set of offsets handed to the pipeline and not yet done; the
//! committable position is the lowest of them, or one past the highest seen when none is pending.
//!
//! Assignments have an epoch. When a partition is revoked and later assigned again, completions
//! that belong to the old assignment are ignored: the new owner re-reads those messages from the
//! committed offset, and deduplication in Postgres absorbs the repeat.

use std::collections::{HashMap, VecDeque};

/// A partition of the consumed topic.
pub type Partition = i32;

/// Identifies one assignment of a partition to this consumer.
pub type Epoch = u64;

/// A message handed to the pipeline: where it came from and under which assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Source partition.
    pub partition: Partition,
    /// Source offset.
    pub offset: i64,
    /// The assignment the message was read under.
    pub epoch: Epoch,
}

#[derive(Debug, Default)]
struct PartitionState {
    epoch: Epoch,
    pending: Pending,
    /// One past the highest offset seen under this assignment.
    next_seen: Option<i64>,
    /// The position last handed out by [`OffsetTracker::take_committable`].
    last_taken: Option<i64>,
}

/// The offsets of one partition handed to the pipeline and not yet done, in ascending order.
///
/// A set, like a `BTreeSet`, but shaped for how offsets come and go: they begin in ascending
/// order (an insert is a push at the back) and are mostly done in that order too (a remove is a
/// pop at the front), with no allocation per offset. Anything out of order is still kept sorted.
#[derive(Debug, Default)]
struct Pending(VecDeque<i64>);

impl Pending {
    fn insert(&mut self, offset: i64) {
        match self.0.back() {
            Some(&last) if last >= offset => {
                if let Err(at) = self.0.binary_search(&offset) {
                    self.0.insert(at, offset);
                }
            }
            _ => self.0.push_back(offset),
        }
    }

    fn remove(&mut self, offset: i64) {
        if self.0.front() == Some(&offset) {
            self.0.pop_front();
        } else if let Ok(at) = self.0.binary_search(&offset) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<i64> {
        self.0.front().copied()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Per-partition bookkeeping of in-flight offsets.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
    next_epoch: Epoch,
}

impl OffsetTracker {
    /// Creates an empty tracker (nothing assigned).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a newly assigned partition, forgetting anything from an older assignment.
    pub fn assign(&mut self, partition: Partition) {
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            PartitionState {
                epoch: self.next_epoch,
                ..PartitionState::default()
            },
        );
    }

    /// Stops tracking a revoked partition; later completions for it are ignored.
    pub fn revoke(&mut self, partition: Partition) {
        self.partitions.remove(&partition);
    }

    /// True while the partition is assigned to this consumer.
    pub fn is_assigned(&self, partition: Partition) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// True while `delivery`'s assignment is the partition's current one.
    pub fn is_current(&self, delivery: &Delivery) -> bool {
        self.partitions
            .get(&delivery.partition)
            .is_some_and(|state| state.epoch == delivery.epoch)
    }

    /// Records that a message entered the pipeline. Returns its delivery handle, or `None` when
    /// the partition is not assigned (a message fetched before a revoke was processed).
    pub fn begin(&mut self, partition: Partition, offset: i64) -> Option<Delivery> {
        let state = self.partitions.get_mut(&partition)?;
        state.pending.insert(offset);
        state.next_seen = Some(
            state
                .next_seen
                .map_or(offset + 1, |next| next.max(offset + 1)),
        );
        Some(Delivery {
            partition,
            offset,
            epoch: state.epoch,
        })
    }

    /// Marks a message done. Completions from an older assignment are ignored.
    pub fn complete(&mut self, delivery: Delivery) {
        if let Some(state) = self.partitions.get_mut(&delivery.partition) {
            if state.epoch == delivery.epoch {
                state.pending.remove(delivery.offset);
            }
        }
    }

    /// The offset to commit for the partition (the next message to read), if everything before
    /// it is done and it moved since the last call.
    pub fn take_committable(&mut self, partition: Partition) -> Option<i64> {
        let state = self.partitions.get_mut(&partition)?;
        let position = match state.pending.first() {
            Some(lowest) => lowest,
            None => state.next_seen?,
        };
        if state.last_taken.is_some_and(|taken| taken >= position) {
            return None;
        }
        state.last_taken = Some(position);
        Some(position)
    }

    /// Number of messages in flight across all partitions.
    pub fn num_pending(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.pending.len())
            .sum()
    }

    /// The assigned partitions.
    pub fn assigned(&self) -> Vec<Partition> {
        let mut partitions: Vec<_> = self.partitions.keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }
}

/// Where committable positions go: the consumer's offset store, which the consumer commits on
/// its own schedule, on revoke and at shutdown. A trait so storing is tested without a broker.
pub trait OffsetStore {
    /// Stores `next` (the next offset to read) as the partition's position.
    fn store(&self, partition: Partition, next: i64) -> Result<(), StoreOffsetError>;
}

/// Why a position was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreOffsetError {
    /// The partition is no longer assigned to this consumer (revoked while the batch was in
    /// flight): its new owner re-reads the messages and deduplication absorbs them.
    #[error("partition no longer assigned")]
    Unassigned,
    /// Anything else the client reported.
    #[error("{0}")]
    Other(String),
}

/// Marks `deliveries` done and stores, per partition they touch, every position that became
/// committable. A partition found unassigned is forgotten. Returns the positions stored.
pub fn complete_and_store(
    tracker: &mut OffsetTracker,
    deliveries: &[Delivery],
    store: &impl OffsetStore,
) -> Vec<(Partition, i64)> {
    let mut partitions: Vec<Partition> = Vec::new();
    for delivery in deliveries {
        tracker.complete(*delivery);
        if !partitions.contains(&delivery.partition) {
            partitions.push(delivery.partition);
        }
    }
    let mut stored = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let Some(next) = tracker.take_committable(partition) else {
            continue;
        };
        match store.store(partition, next) {
            Ok(()) => stored.push((partition, next)),
            Err(StoreOffsetError::Unassigned) => {
                tracing::info!(
                    partition,
                    offset = next,
                    "partition no longer assigned; offset not stored"
                );
                metrics::counter!("auditflow_offsets_unassigned_total").increment(1);
                tracker.revoke(partition);
            }
            Err(err) => {
                tracing::error!(error = %err, partition, offset = next, "storing offset failed");
            }
        }
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_past_a_contiguous_done_prefix() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        let deliveries: Vec<_> = (10..15).map(|o| tracker.begin(0, o).unwrap()).collect();
        assert_eq!(tracker.take_committable(0), Some(10), "nothing done yet");
        tracker.complete(deliveries[1]);
        tracker.complete(deliveries[2]);
        assert_eq!(tracker.take_committable(0), None, "10 still pending");
        tracker.complete(deliveries[0]);
        assert_eq!(tracker.take_committable(0), Some(13));
        tracker.complete(deliveries[4]);
        assert_eq!(tracker.take_committable(0), None, "13 still pending");
        tracker.complete(deliveries[3]);
        assert_eq!(tracker.take_committable(0), Some(15));
        assert_eq!(
            tracker.take_committable(0),
            None,
            "unchanged position is not handed out twice"
        );
        assert_eq!(tracker.num_pending(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        tracker.assign(1);
        let a = tracker.begin(0, 5).unwrap();
        let _b = tracker.begin(1, 7).unwrap();
        tracker.complete(a);
        assert_eq!(tracker.take_committable(0), Some(6));
        assert_eq!(tracker.take_committable(1), Some(7));
        assert_eq!(tracker.assigned(), vec![0, 1]);
    }

    #[test]
    fn messages_of_unassigned_partitions_are_not_tracked() {
        let mut tracker = OffsetTracker::new();
        assert!(tracker.begin(3, 1).is_none());
        assert_eq!(tracker.take_committable(3), None);
    }

    #[test]
    fn completions_from_an_old_assignment_are_ignored() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        let old = tracker.begin(0, 100).unwrap();
        tracker.revoke(0);
        assert!(!tracker.is_assigned(0));
        tracker.complete(old);
        tracker.assign(0);
        // The new owner re-reads from the committed offset, 90 here.
        let fresh = tracker.begin(0, 90).unwrap();
        assert_ne!(old.epoch, fresh.epoch);
        tracker.complete(old);
        assert_eq!(
            tracker.take_committable(0),
            Some(90),
            "old completion must not advance"
        );
        tracker.complete(fresh);
        assert_eq!(tracker.take_committable(0), Some(91));
    }

    #[test]
    fn redelivered_offsets_below_the_committed_position_do_not_move_it_back() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        let d = tracker.begin(0, 50).unwrap();
        tracker.complete(d);
        assert_eq!(tracker.take_committable(0), Some(51));
        let again = tracker.begin(0, 50).unwrap();
        assert_eq!(tracker.take_committable(0), None);
        tracker.complete(again);
        assert_eq!(tracker.take_committable(0), None);
    }

    /// Records what was stored; answers `Unassigned` for the partitions in `unassigned`.
    #[derive(Default)]
    struct RecordingStore {
        stored: std::cell::RefCell<Vec<(Partition, i64)>>,
        unassigned: Vec<Partition>,
    }

    impl OffsetStore for RecordingStore {
        fn store(&self, partition: Partition, next: i64) -> Result<(), StoreOffsetError> {
            if self.unassigned.contains(&partition) {
                return Err(StoreOffsetError::Unassigned);
            }
            self.stored.borrow_mut().push((partition, next));
            Ok(())
        }
    }

    #[test]
    fn a_completed_batch_stores_one_position_per_partition_it_touched() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        tracker.assign(1);
        tracker.assign(2);
        let batch: Vec<Delivery> = [(0, 10), (1, 20), (0, 11), (1, 21), (0, 12)]
            .iter()
            .map(|&(p, o)| tracker.begin(p, o).unwrap())
            .collect();
        let _untouched = tracker.begin(2, 5).unwrap();
        let store = RecordingStore::default();
        let stored = complete_and_store(&mut tracker, &batch, &store);
        assert_eq!(stored, vec![(0, 13), (1, 22)]);
        assert_eq!(*store.stored.borrow(), vec![(0, 13), (1, 22)]);
        assert_eq!(
            tracker.num_pending(),
            1,
            "partition 2's message is still in flight"
        );
    }

    #[test]
    fn a_batch_finishing_before_an_earlier_one_stores_nothing_past_the_gap() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        let first: Vec<Delivery> = (0..5).map(|o| tracker.begin(0, o).unwrap()).collect();
        let second: Vec<Delivery> = (5..10).map(|o| tracker.begin(0, o).unwrap()).collect();
        let store = RecordingStore::default();
        // The second batch completes first (its dead letters were acknowledged sooner): the
        // position stays at the first batch's first offset, which is already where it is.
        let stored = complete_and_store(&mut tracker, &second, &store);
        assert_eq!(stored, vec![(0, 0)], "nothing past the pending offset 0");
        let stored = complete_and_store(&mut tracker, &first, &store);
        assert_eq!(stored, vec![(0, 10)]);
    }

    #[test]
    fn a_partition_revoked_in_flight_is_forgotten_not_stored() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(0);
        tracker.assign(1);
        let batch: Vec<Delivery> = [(0, 1), (1, 1)]
            .iter()
            .map(|&(p, o)| tracker.begin(p, o).unwrap())
            .collect();
        let store = RecordingStore {
            unassigned: vec![1],
            ..RecordingStore::default()
        };
        let stored = complete_and_store(&mut tracker, &batch, &store);
        assert_eq!(stored, vec![(0, 2)]);
        assert!(
            !tracker.is_assigned(1),
            "the unassigned partition is dropped"
        );
        assert!(tracker.is_assigned(0));
    }

    #[test]
    fn pending_offsets_behave_as_a_sorted_set_whatever_the_order() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut pending = Pending::default();
        let mut expected = std::collections::BTreeSet::new();
        let mut next = 0;
        for _ in 0..20_000 {
            let offset = match rng.random_range(0..10) {
                // Mostly ascending begins, sometimes one from the past or a repeat.
                0..=4 => {
                    next += rng.random_range(1..3);
                    next
                }
                5 => rng.random_range(0..next.max(1)),
                // Removes: mostly the lowest, sometimes any, sometimes one not there.
                6 | 7 => {
                    let lowest = expected.first().copied().unwrap_or(0);
                    pending.remove(lowest);
                    expected.remove(&lowest);
                    continue;
                }
                _ => {
                    let any = rng.random_range(0..next.max(1) + 2);
                    pending.remove(any);
                    expected.remove(&any);
                    continue;
                }
            };
            pending.insert(offset);
            expected.insert(offset);
            assert_eq!(pending.first(), expected.first().copied());
            assert_eq!(pending.len(), expected.len());
        }
        assert_eq!(
            pending.0.iter().copied().collect::<Vec<_>>(),
            expected.into_iter().collect::<Vec<_>>()
        );
    }
}
