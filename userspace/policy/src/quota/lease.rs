//! This proxy's lease of one quota: tokens granted by Redis for one window, taken by
//! requests with a compare-and-swap, no lock.
//!
//! A slot packs the window index (upper 40 bits) and the tokens left (lower 24 bits) into
//! one `AtomicU64`, so "is this lease for the current window, and is a token left" is one
//! atomic read-modify-write. Two slots: the current window and the next one, which the
//! leasing task fills shortly before the window turns, so the first requests of a window
//! find tokens waiting.
use std::sync::atomic::{AtomicU64, Ordering};

const TOKEN_BITS: u32 = 24;
pub const MAX_LEASE: u64 = (1 << TOKEN_BITS) - 1;

fn pack(window: u64, tokens: u64) -> u64 {
    (window << TOKEN_BITS) | tokens.min(MAX_LEASE)
}

fn unpack(v: u64) -> (u64, u64) {
    (v >> TOKEN_BITS, v & MAX_LEASE)
}

/// One window's tokens.
#[derive(Debug, Default)]
pub struct Slot(AtomicU64);

impl Slot {
    pub fn get(&self) -> (u64, u64) {
        unpack(self.0.load(Ordering::Acquire))
    }

    /// Takes a token of `window`; returns the tokens left, or `None`.
    pub fn take(&self, window: u64) -> Option<u64> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (w, t) = unpack(v);
                (w == window && t > 0).then(|| pack(w, t - 1))
            })
            .ok()
            .map(|v| unpack(v).1 - 1)
    }

    /// Adds granted tokens of `window` (a lease of another window replaces the slot).
    pub fn add(&self, window: u64, tokens: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (w, t) = unpack(v);
                Some(if w == window {
                    pack(w, t.saturating_add(tokens))
                } else {
                    pack(window, tokens)
                })
            });
    }

    /// Moves `next` into this slot if it holds `window` and this one does not.
    pub fn promote(&self, next: &Slot, window: u64) {
        let (w, _) = self.get();
        if w == window {
            return;
        }
        let n = next.0.load(Ordering::Acquire);
        if unpack(n).0 == window
            && next
                .0
                .compare_exchange(n, pack(0, 0), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let (_, tokens) = unpack(n);
            self.add(window, tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_belong_to_their_window() {
        let s = Slot::default();
        s.add(7, 2);
        assert_eq!(s.take(8), None, "a lease is valid only in its window");
        assert_eq!(s.take(7), Some(1));
        assert_eq!(s.take(7), Some(0));
        assert_eq!(s.take(7), None);
        s.add(7, 1);
        assert_eq!(s.get(), (7, 1));
        s.add(8, 5);
        assert_eq!(s.get(), (8, 5), "a new window replaces the old tokens");
        let next = Slot::default();
        next.add(9, 3);
        s.promote(&next, 9);
        assert_eq!((s.get(), next.get()), ((9, 3), (0, 0)));
    }
}
