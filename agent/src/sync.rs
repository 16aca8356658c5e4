//! Locking the agent's plain mutexes.
//!
//! Every `std::sync::Mutex` in the agent guards state that is replaced whole or updated in
//! single statements (maps, counters, small structs), so a thread that panicked while holding
//! one cannot have left it torn: [`lock`] takes the guard of a poisoned mutex instead of
//! spreading the panic to every later request.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the guard if a panic elsewhere poisoned it (see the module note).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
