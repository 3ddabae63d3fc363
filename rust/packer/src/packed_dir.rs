//! The packed directory (docs/FORMAT.md): its file layout, atomic writing, and verification.

pub(crate) mod atomic;
pub(crate) mod layout;
pub(crate) mod pairs;
pub(crate) mod verify;
