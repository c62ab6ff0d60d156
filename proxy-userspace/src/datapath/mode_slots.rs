//! Slots of the `DIRECTION_MODES` array: each live kernel-path session owns
//! one slot, that is two consecutive elements (one per direction), from
//! setup until its map entries are gone.

/// The free slots. A slot is handed out again only after it was returned,
/// so two live sessions never share a direction's mode.
#[derive(Debug)]
pub(super) struct ModeSlots {
    free: Vec<u32>,
}

impl ModeSlots {
    /// Slots for an array of `elements` elements (two per slot).
    pub fn new(elements: u32) -> Self {
        // Lowest slots first: popped from the end.
        Self {
            free: (0..elements / 2).rev().collect(),
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    pub fn give_back(&mut self, slot: u32) {
        debug_assert!(!self.free.contains(&slot), "slot {slot} returned twice");
        self.free.push(slot);
    }
}

/// The array index of one direction of `slot`.
#[must_use]
pub(super) const fn mode_index(slot: u32, direction: u32) -> u32 {
    slot * 2 + direction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_until_given_back() {
        let mut slots = ModeSlots::new(6);
        let taken: Vec<u32> = std::iter::from_fn(|| slots.take()).collect();
        assert_eq!(taken, [0, 1, 2]);
        slots.give_back(1);
        assert_eq!(slots.take(), Some(1));
        assert_eq!(slots.take(), None);
    }

    #[test]
    fn directions_of_a_slot_are_adjacent_and_distinct() {
        assert_eq!(mode_index(0, 0), 0);
        assert_eq!(mode_index(0, 1), 1);
        assert_eq!(mode_index(5, 0), 10);
        assert_eq!(mode_index(5, 1), 11);
    }
}
