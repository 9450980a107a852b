//! The memory budget of request bodies (`max_buffered_bytes`): before its body is read, a
//! request reserves what that body will hold in memory at its peak, and gives it back once its
//! images are preprocessed and its jobs queued (or it failed). When the budget is spent, a new
//! request waits up to `max_buffered_wait_ms` for room, then gets 503 with Retry-After: a flood
//! of large bodies is slowed or refused, never an out-of-memory kill. Bodies not yet read stay
//! in the kernel's socket buffers, where TCP holds their senders back.
//!
//! HTTP only: no tensors, no engine.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// Bytes held at the peak per body byte: the body itself, the parsed JSON's copy of its
/// strings, the decoded base64 (3/4) and the slack of a buffer that grew while collecting.
const PEAK_PER_BODY_BYTE: u64 = 4;
/// Permits count KiB (a semaphore takes at most u32 permits at once).
const UNIT: u64 = 1024;

pub struct ByteBudget {
    permits: Arc<Semaphore>,
    total_units: u32,
    wait: Duration,
    max_body_bytes: usize,
}

/// A request's share of the budget, returned when dropped.
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
}

impl ByteBudget {
    pub fn new(bytes: usize, wait: Duration, max_body_bytes: usize) -> Self {
        let total_units = (bytes as u64 / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Self {
            permits: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            wait,
            max_body_bytes,
        }
    }

    /// What a request's body may hold in memory at its peak: from its declared length, or the
    /// largest body accepted when it declares none (chunked), capped at the whole budget so
    /// that any one request can always run.
    fn units_for(&self, headers: &HeaderMap) -> u32 {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = declared
            .unwrap_or(self.max_body_bytes as u64)
            .min(self.max_body_bytes as u64);
        let units = (body.saturating_mul(PEAK_PER_BODY_BYTE))
            .div_ceil(UNIT)
            .max(1);
        units.min(u64::from(self.total_units)) as u32
    }

    /// Reserves the request's share, waiting for room at most the configured time.
    pub async fn reserve(&self, headers: &HeaderMap) -> Result<Reservation, ApiError> {
        let units = self.units_for(headers);
        let acquire = self.permits.clone().acquire_many_owned(units);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(Reservation { _permit: permit }),
            Ok(Err(_)) => Err(ApiError::unavailable("the server is shutting down")),
            Err(_) => Err(ApiError::unavailable(
                "request bodies being read already fill this server's memory budget \
                 (max_buffered_bytes); retry shortly",
            )),
        }
    }

    /// Bytes reserved now.
    pub fn in_use_bytes(&self) -> u64 {
        u64::from(self.total_units).saturating_sub(self.permits.available_permits() as u64) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(length: Option<u64>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(n) = length {
            headers.insert(header::CONTENT_LENGTH, n.into());
        }
        headers
    }

    #[tokio::test]
    async fn reservations_wait_for_room_then_refuse_and_are_returned_when_dropped() {
        let budget = ByteBudget::new(10 << 20, Duration::from_millis(50), 32 << 20);
        // 2 MiB declared: 8 MiB reserved of 10.
        let first = budget.reserve(&request(Some(2 << 20))).await.unwrap();
        assert_eq!(budget.in_use_bytes(), 8 << 20);
        let refused = budget.reserve(&request(Some(2 << 20))).await.err().unwrap();
        assert_eq!(refused.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        // An undeclared length is charged as the largest body, capped at the whole budget: it
        // waits for the first to finish, then runs alone.
        let waiting = tokio::spawn({
            let budget = Arc::new(budget);
            let b = budget.clone();
            async move {
                let r = b.reserve(&request(None)).await;
                (r.is_ok(), b.in_use_bytes())
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), (true, 10 << 20));
    }
}
