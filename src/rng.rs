//! The randomness the daemon draws (rotation id suffixes, retry jitter), from one place so a
//! deterministic simulation can seed it for its thread. Outside a simulation it is the
//! thread's system-seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Draw with `f` from this thread's seeded generator if one is set, else the system one.
pub fn with<T>(f: impl FnOnce(&mut dyn rand::RngCore) -> T) -> T {
    SEEDED.with(|cell| match cell.borrow_mut().as_mut() {
        Some(r) => f(r),
        None => f(&mut rand::rng()),
    })
}

/// Uniform in `range`, from [`with`]'s generator.
pub fn range_u64(range: std::ops::RangeInclusive<u64>) -> u64 {
    with(|r| r.random_range(range))
}

/// Seed this thread's generator (`None`: back to the system one). For simulations and
/// tests that replay a history.
pub fn seed_thread(seed: Option<u64>) {
    SEEDED.with(|cell| *cell.borrow_mut() = seed.map(StdRng::seed_from_u64));
}
