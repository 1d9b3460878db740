//! The manager's clock: the wall clock in the server, a virtual one in the simulator.
//!
//! The virtual clock is tokio's: in a runtime started with its time paused, tokio moves time
//! on to the next timer whenever every task waits, so a week of a pool runs in seconds with
//! every sleep, timeout and interval of the real code.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where the manager reads the time.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's time.
    Wall,
    /// `base_ms` at tokio's `start`, moving with tokio's clock (paused in the simulator).
    Virtual {
        base_ms: u64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `base_ms` now and then moves with tokio's time.
    pub fn starting_at(base_ms: u64) -> Self {
        Clock::Virtual {
            base_ms,
            start: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::Wall => wall_ms(),
            Clock::Virtual { base_ms, start } => base_ms + start.elapsed().as_millis() as u64,
        }
    }
}

/// The system's time in milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
