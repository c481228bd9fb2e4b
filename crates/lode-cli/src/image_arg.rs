//! Turns the IMAGE argument of the read commands into an opened [`Image`].
//!
//! IMAGE is either a lode image directory (`bootstrap` plus `blobs/<tag>`) or a plain EROFS
//! image file whose extra devices are found next to it (`blobs/<tag>` or `<tag>`). Devices
//! can also be given explicitly with `--device`, in slot order, like the kernel's `device=`.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lode_format::reader::Image;

/// The IMAGE argument plus explicit device paths; flatten it into a command's `Args`.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// A lode image directory (bootstrap + blobs/) or an EROFS image file.
    pub image: PathBuf,
    /// Backing file of extra device slot 0, 1, … in slot order (overrides the lookup by tag).
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<PathBuf>,
}

impl ImageArgs {
    pub fn open(&self) -> Result<Image> {
        open_image_with_devices(&self.image, &self.devices)
    }
}

/// Opens IMAGE, finding its extra devices by tag.
#[allow(dead_code)] // the entry point for commands that take no --device
pub fn open_image(path: &Path) -> Result<Image> {
    open_image_with_devices(path, &[])
}

/// Opens IMAGE; `explicit_devices[i]` backs slot i, other slots are looked up by tag. A slot
/// that is found nowhere is read in flat mode if it has a `mapped_blkaddr`; otherwise reading
/// its data fails with a MissingDevice error naming the slot and tag.
pub fn open_image_with_devices(path: &Path, explicit_devices: &[PathBuf]) -> Result<Image> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot access {}", path.display()))?;
    let (primary_path, search_dirs) = if metadata.is_dir() {
        (path.join("bootstrap"), vec![path.join("blobs")])
    } else {
        let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (path.to_path_buf(), vec![parent.join("blobs"), parent])
    };
    let primary = File::open(&primary_path)
        .with_context(|| format!("cannot open {}", primary_path.display()))?;
    let mut image = Image::open(Box::new(primary))
        .with_context(|| format!("cannot read EROFS image {}", primary_path.display()))?;

    let lode_blobs = if metadata.is_dir() && path.join("image.json").exists() {
        lode_mount::local::read_manifest(path)?.blobs
    } else {
        Vec::new()
    };
    let slots = image.devices().to_vec();
    if explicit_devices.len() > slots.len() {
        bail!(
            "{} --device given but {} has {} extra devices",
            explicit_devices.len(),
            primary_path.display(),
            slots.len()
        );
    }
    for (index, slot) in slots.iter().enumerate() {
        let found = match explicit_devices.get(index) {
            Some(explicit) => Some(explicit.clone()),
            None => find_device(&search_dirs, &slot.tag),
        };
        if let Some(device_path) = found {
            let file = File::open(&device_path).with_context(|| {
                format!(
                    "cannot open device slot {index} ({})",
                    device_path.display()
                )
            })?;
            // A lode blob is read through its chunk table (decompressed and verified).
            let blob = lode_blobs.iter().find(|b| b.hex() == slot.tag);
            match blob {
                Some(blob) if explicit_devices.get(index).is_none() => {
                    let view = lode_storage::chunks::UncompressedView::open(file, blob.clone())?;
                    image.set_device(index, Box::new(view));
                }
                _ => image.set_device(index, Box::new(file)),
            }
        } else if metadata.is_dir() {
            // A lode image directory keeps its data in blobs/, never in the bootstrap: say
            // which blob is missing instead of reading the bootstrap in flat mode.
            image.set_device(
                index,
                Box::new(MissingBlob(format!(
                    "blob sha256:{} is not in {} (`lode pull --all` fetches every blob)",
                    slot.tag,
                    search_dirs[0].display()
                ))),
            );
        }
    }
    Ok(image)
}

/// A device whose every read fails with a message naming the missing blob.
struct MissingBlob(String);

impl lode_format::reader::ReadAt for MissingBlob {
    fn read_exact_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            self.0.clone(),
        ))
    }
}

/// The first regular file named `tag` in `dirs`; tags that are not plain file names
/// (empty, ".", "..", containing '/') are never looked up.
fn find_device(dirs: &[PathBuf], tag: &str) -> Option<PathBuf> {
    if tag.is_empty() || tag == "." || tag == ".." || tag.contains('/') {
        return None;
    }
    dirs.iter()
        .map(|dir| dir.join(tag))
        .find(|candidate| candidate.is_file())
}
