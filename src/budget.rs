//! The process-wide budget of mail bytes in flight (`[limits] max_inflight_bytes`): every
//! fetch, IMAP or POP3, in every mailbox, reserves the bytes of its batch before asking the
//! server for them, and the reservation travels with the batch through parse and store until
//! the batch is acknowledged. Fifty mailboxes backfilling at once then hold at most the budget,
//! not fifty times a few batches.
//!
//! A batch reserves [`PARSED_FACTOR`] times its raw size: the raw bytes, what parsing makes of
//! them (decoded bodies and attachments, bodies moved to blobs), the GridFS chunk documents and
//! the driver's encoded command all live together until the store acknowledged them (measured:
//! about 4-5x the raw size at the peak of a write). A batch larger than the whole budget reserves the whole budget: it goes
//! alone, but it goes.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count units of this many bytes (a semaphore counts in u32).
const UNIT: u64 = 1024;
/// Raw bytes plus their parsed and encoded forms.
pub const PARSED_FACTOR: u64 = 4;

#[derive(Clone, Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    units: u32,
}

/// Bytes reserved from the [`Budget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        let units = (bytes / UNIT).clamp(1, u32::MAX as u64 / 2) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Reserves room for a batch of `raw_bytes`, waiting until that much is free (first come,
    /// first served, so a large batch is not starved by small ones).
    pub async fn reserve(&self, raw_bytes: u64) -> Reservation {
        let units = raw_bytes
            .saturating_mul(PARSED_FACTOR)
            .div_ceil(UNIT)
            .clamp(1, self.units as u64) as u32;
        // The semaphore is never closed; were it, the batch would simply go unreserved.
        Reservation {
            _permit: self.permits.clone().acquire_many_owned(units).await.ok(),
        }
    }

    /// Bytes currently reserved.
    pub fn in_use(&self) -> u64 {
        (self.units as u64 - self.permits.available_permits() as u64) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn reservations_wait_for_room_and_give_it_back() {
        let budget = Budget::new(10 * 1024 * 1024);
        let a = budget.reserve(2 * 1024 * 1024).await; // 8 MiB of 10
        assert_eq!(budget.in_use(), 8 * 1024 * 1024);
        let b2 = budget.clone();
        let waiting = tokio::spawn(async move { b2.reserve(1024 * 1024).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !waiting.is_finished(),
            "4 MiB more do not fit in the 2 MiB left"
        );
        drop(a);
        let b = waiting.await.unwrap();
        assert_eq!(budget.in_use(), 4 * 1024 * 1024);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_budget_takes_all_of_it_and_goes() {
        let budget = Budget::new(1024 * 1024);
        let r = budget.reserve(50 * 1024 * 1024).await;
        assert_eq!(budget.in_use(), 1024 * 1024);
        drop(r);
        assert_eq!(budget.in_use(), 0);
    }
}
