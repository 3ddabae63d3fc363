//! Samples to packs: stage every input's encoded samples ([`stage`]), plan the packs
//! ([`binpack`] with the seeded [`rng`]), write and commit the packed directory ([`write`]),
//! or save and merge the parts of a sharded run ([`shard`]); [`fingerprint`] names what
//! determines the bytes and [`stats`] what a run reports; [`mix`] chooses the samples of
//! sources mixed by ratio; [`pair`] fits a preference pair into one pack.

pub(crate) mod binpack;
pub(crate) mod copy;
pub(crate) mod fingerprint;
pub(crate) mod image;
pub(crate) mod image_check;
pub(crate) mod mix;
pub(crate) mod numbering;
pub(crate) mod pair;
pub(crate) mod rng;
pub(crate) mod shard;
pub(crate) mod stage;
pub(crate) mod stats;
pub(crate) mod write;
