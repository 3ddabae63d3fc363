//! The packed directory's files (docs/FORMAT.md): names, element types, row widths and the
//! format version; what the writer, the verifier and the Python reader agree on.

/// Version of the on-disk format written in `meta.json`.
pub const FORMAT_VERSION: u64 = 1;
/// Token ids, `<u4`, pack order.
pub const INPUT_IDS: &str = "input_ids.bin";
/// Loss mask, `u1`, pack order.
pub const LOSS_MASK: &str = "loss_mask.bin";
/// Per-sample table, `<i8` (N, 5).
pub const SAMPLES: &str = "samples.bin";
/// Pack boundaries, `<i8` (P+1, 2).
pub const PACKS: &str = "packs.bin";
/// Sample ids in pack order, `<i8` (N,).
pub const PACK_SAMPLES: &str = "pack_samples.bin";
/// Metadata, fingerprint, statistics and output hashes.
pub const META: &str = "meta.json";
/// LLaVA side table (only when some sample has an image): `{"image_token_id", "samples":
/// [[sample, image path], ...]}`.
pub const IMAGES: &str = "images.json";
/// Preference pairs only (absent otherwise): per sample in sample order, `<i8` (N, 2) rows
/// (pair id, role: 0 chosen, 1 rejected); listed in meta.json `outputs` when written.
pub const PAIRS: &str = "pairs.bin";
/// Preference pairs with a `margin` only: per sample in sample order, `<f4`, its pair's margin
/// (0 for a pair without one); listed in meta.json `outputs` when written.
pub const MARGINS: &str = "margins.bin";
/// The binary files every packed directory has, in the order they are written.
pub const BINARY_FILES: &[&str] = &[INPUT_IDS, LOSS_MASK, SAMPLES, PACKS, PACK_SAMPLES];
/// Each binary file's element type (NumPy notation) and row width (1 = a flat array).
pub const BINARY_LAYOUT: &[(&str, &str, usize)] = &[
    (INPUT_IDS, "<u4", 1),
    (LOSS_MASK, "u1", 1),
    (SAMPLES, "<i8", 5),
    (PACKS, "<i8", 2),
    (PACK_SAMPLES, "<i8", 1),
];
/// Files only some directories have (listed in meta.json `outputs` when written): element
/// type and row width, as in [`BINARY_LAYOUT`].
pub const OPTIONAL_LAYOUT: &[(&str, &str, usize)] = &[(PAIRS, "<i8", 2), (MARGINS, "<f4", 1)];
