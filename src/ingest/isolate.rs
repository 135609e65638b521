//! Poison-row isolation: when the database refuses a range of a batch for its content, the range
//! is split in halves until the refused rows are found; every other row is stored.
//!
//! One refused row among `n` costs at most `1 + 2·⌈log2 n⌉` writes. The writer is a closure, so
//! the search is tested here without a database; the sink passes one that writes a range of the
//! batch through the store with retries ([`crate::ingest::sink`]).

use std::future::Future;
use std::ops::{AddAssign, Range};

/// What isolation found.
#[derive(Debug)]
pub struct Isolated<O, E> {
    /// The sum of every successful write.
    pub outcome: O,
    /// Each refused row's index with the error it was refused with, in row order.
    pub refused: Vec<(usize, E)>,
    /// Writes attempted (the search's cost).
    pub num_writes: usize,
}

/// Writes rows `0..num_rows` through `write`, isolating refused rows by bisection.
///
/// `write` returns `Ok(Ok(outcome))` when the range is stored, `Ok(Err(refusal))` when the
/// database refused it for its content (a permanent error: the same rows fail again), and
/// `Err(interrupt)` when it gave up (shutdown), which ends the search with that error.
pub async fn isolate<O, E, I, F, Fut>(num_rows: usize, mut write: F) -> Result<Isolated<O, E>, I>
where
    O: Default + AddAssign,
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<Result<O, E>, I>>,
{
    let mut isolated = Isolated {
        outcome: O::default(),
        refused: Vec::new(),
        num_writes: 0,
    };
    let mut ranges: Vec<Range<usize>> = Vec::new();
    ranges.push(0..num_rows);
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        isolated.num_writes += 1;
        match write(range.clone()).await? {
            Ok(outcome) => isolated.outcome += outcome,
            Err(refusal) if range.len() == 1 => isolated.refused.push((range.start, refusal)),
            Err(_) => {
                let middle = range.start + range.len() / 2;
                // Pop order: left half first, so refused rows come out in row order.
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
        }
    }
    Ok(isolated)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;

    /// A writer that refuses any range containing one of `poison`, counting rows stored.
    fn run(num_rows: usize, poison: &[usize]) -> (Isolated<usize, &'static str>, BTreeSet<usize>) {
        let poison: BTreeSet<usize> = poison.iter().copied().collect();
        let stored = RefCell::new(BTreeSet::new());
        let isolated = futures::executor::block_on(isolate(num_rows, |range: Range<usize>| {
            let refused = range.clone().any(|row| poison.contains(&row));
            if !refused {
                stored.borrow_mut().extend(range.clone());
            }
            let len = range.len();
            async move { Ok::<_, ()>(if refused { Err("refused") } else { Ok(len) }) }
        }))
        .expect("never interrupted");
        (isolated, stored.into_inner())
    }

    #[test]
    fn a_clean_batch_is_one_write() {
        let (isolated, stored) = run(5_000, &[]);
        assert_eq!(isolated.num_writes, 1);
        assert_eq!(isolated.outcome, 5_000);
        assert!(isolated.refused.is_empty());
        assert_eq!(stored.len(), 5_000);
    }

    #[test]
    fn one_refused_row_costs_a_logarithmic_number_of_writes() {
        for poison in [0, 1, 2_499, 2_500, 4_999] {
            let (isolated, stored) = run(5_000, &[poison]);
            let bound = 1 + 2 * (5_000f64).log2().ceil() as usize;
            assert!(
                isolated.num_writes <= bound,
                "row {poison}: {} writes, bound {bound}",
                isolated.num_writes
            );
            let refused: Vec<usize> = isolated.refused.iter().map(|(row, _)| *row).collect();
            assert_eq!(refused, vec![poison]);
            assert_eq!(isolated.outcome, 4_999);
            assert_eq!(stored.len(), 4_999);
            assert!(!stored.contains(&poison));
        }
    }

    #[test]
    fn every_refused_row_is_found_in_row_order_and_the_rest_is_stored() {
        let poison = [3, 4, 97, 500, 501, 502, 999];
        let (isolated, stored) = run(1_000, &poison);
        let refused: Vec<usize> = isolated.refused.iter().map(|(row, _)| *row).collect();
        assert_eq!(refused, poison.to_vec());
        assert_eq!(isolated.outcome, 1_000 - poison.len());
        assert_eq!(stored.len() + poison.len(), 1_000);
    }

    #[test]
    fn a_batch_refused_whole_dead_letters_every_row() {
        let all: Vec<usize> = (0..16).collect();
        let (isolated, stored) = run(16, &all);
        assert_eq!(isolated.refused.len(), 16);
        assert!(stored.is_empty());
        assert_eq!(isolated.num_writes, 31, "a full binary tree over 16 rows");
    }

    #[test]
    fn an_empty_batch_writes_nothing() {
        let (isolated, _) = run(0, &[]);
        assert_eq!(isolated.num_writes, 0);
    }

    #[test]
    fn an_interruption_ends_the_search_with_its_error() {
        let mut calls = 0;
        let result = futures::executor::block_on(isolate(100, |range: Range<usize>| {
            calls += 1;
            let first = calls == 1;
            async move {
                if first {
                    Ok(Err::<usize, _>("refused"))
                } else {
                    let _ = range;
                    Err("shutdown")
                }
            }
        }));
        assert!(matches!(result, Err("shutdown")));
        assert_eq!(calls, 2, "no write after the interruption");
    }
}
