//! The packed directory (docs/FORMAT.md): its file layout, atomic writing, verification, and
//! the hash of a file written in pieces.

pub(crate) mod atomic;
pub(crate) mod direct;
pub(crate) mod layout;
pub(crate) mod pairs;
pub(crate) mod treehash;
pub(crate) mod verify;
