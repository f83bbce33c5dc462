//! Items a trainer reads by index, wherever they live: in memory, on disk
//! (a [`TokenisedItems`](crate::tokenised::TokenisedItems) of a streamed
//! dataset), or packed as they are read ([`PackedItems`](crate::packing::PackedItems)).

use std::borrow::Cow;

/// A run's items by index.
pub trait Items<T: Clone>: Sync {
    /// How many there are.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `index` (below [`len`](Items::len)); an error says what could
    /// not be read.
    fn get(&self, index: usize) -> Result<Cow<'_, T>, String>;
}

impl<T: Clone + Sync> Items<T> for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }

    fn get(&self, index: usize) -> Result<Cow<'_, T>, String> {
        Ok(Cow::Borrowed(&self[index]))
    }
}

impl<T: Clone + Sync> Items<T> for Vec<T> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn get(&self, index: usize) -> Result<Cow<'_, T>, String> {
        Ok(Cow::Borrowed(&self[index]))
    }
}
