//! containerd's rootfs mounts turned into a cached root image.
//!
//! containerd hands a shim the container's root as mounts of the snapshot, not as a populated
//! directory: with the overlay snapshotter an `overlay` mount whose `lowerdir` lists the image's
//! committed layers (topmost first) plus the container's own `upperdir`/`workdir`, or a `bind`
//! mount of a single directory. squib only needs the immutable lower layers: the guest keeps the
//! writable layer in memory. [`RootSource::from_mounts`] extracts them, and
//! [`build_root_image`] builds (or finds in the cache) the block image of their merged view:
//! one layer is used as it is, several are merged by a read-only overlay mounted on a scratch
//! directory for the duration of the build, so whiteouts and opaque directories are resolved
//! by the host kernel exactly as runc's containers see them.
//!
//! # Limitations
//!
//! Files already present in the snapshot's `upperdir` when the container is created are not
//! part of the image (containerd leaves it empty for `ctr run` and nerdctl). The lowerdir list
//! must fit in one page of mount options (about 40 layers with containerd's paths).

use std::path::{Path, PathBuf};

use crate::rootfs::{CacheKey, CachedImage, ImageCache, ImageFormat, RootfsError};

/// A rootfs mount squib cannot use, or a failure to mount or unmount the merged view.
#[derive(Debug, thiserror::Error)]
pub enum MountsError {
    /// More than one rootfs mount, or a type other than overlay and bind.
    #[error("rootfs mount {index}: type {kind:?} is not supported (expected overlay or bind)")]
    UnsupportedType {
        /// Position in the request's list.
        index: usize,
        /// The mount type given.
        kind: String,
    },
    /// More than one mount was given.
    #[error("expected one rootfs mount, got {count}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// An overlay mount without a `lowerdir` option.
    #[error("overlay rootfs mount has no lowerdir option: {options:?}")]
    NoLowerdir {
        /// The options given.
        options: Vec<String>,
    },
    /// Creating the scratch directory failed.
    #[error("creating {path}")]
    Scratch {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the merged read-only view of the layers failed.
    #[error("mounting the read-only overlay of {layers} layers on {target}")]
    Mount {
        /// How many layers.
        layers: usize,
        /// The mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Building the image failed.
    #[error("building the root image")]
    Build(#[from] RootfsError),
}

/// One rootfs mount as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RootMount {
    /// `overlay`, `bind`, ...
    pub kind: String,
    /// The mount source.
    pub source: String,
    /// The mount options.
    pub options: Vec<String>,
}

/// Where the container's root content lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// Immutable snapshot layers, topmost first.
    Layers(Vec<PathBuf>),
    /// A plain directory (a bind mount's source, or the bundle's populated `rootfs`).
    Directory(PathBuf),
}

impl RootSource {
    /// Interprets the rootfs mounts of a create request; with no mounts, the root is
    /// `bundle_rootfs` (a bundle whose `rootfs` directory is already populated).
    ///
    /// # Errors
    ///
    /// [`MountsError::TooMany`], [`MountsError::UnsupportedType`] or
    /// [`MountsError::NoLowerdir`].
    pub fn from_mounts(mounts: &[RootMount], bundle_rootfs: &Path) -> Result<Self, MountsError> {
        let m = match mounts {
            [] => return Ok(Self::Directory(bundle_rootfs.to_path_buf())),
            [m] => m,
            _ => {
                return Err(MountsError::TooMany {
                    count: mounts.len(),
                });
            }
        };
        match m.kind.as_str() {
            "overlay" => {
                let lower = m
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("lowerdir="))
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| MountsError::NoLowerdir {
                        options: m.options.clone(),
                    })?;
                Ok(Self::Layers(lower.split(':').map(PathBuf::from).collect()))
            }
            "bind" | "rbind" => Ok(Self::Directory(PathBuf::from(&m.source))),
            other => Err(MountsError::UnsupportedType {
                index: 0,
                kind: other.to_string(),
            }),
        }
    }
}

/// Returns the cached root image of `source`, building it on a miss. `scratch` is an empty
/// directory path (created and removed here) where several layers are merged for the build.
///
/// # Errors
///
/// Any [`MountsError`]; the scratch mount is gone whatever happens.
pub fn build_root_image(
    source: &RootSource,
    cache: &ImageCache,
    format: ImageFormat,
    scratch: &Path,
) -> Result<CachedImage, MountsError> {
    match source {
        RootSource::Directory(dir) => {
            let key = CacheKey::for_directory(format, dir)?;
            Ok(cache.get_or_build(&key, dir, format)?)
        }
        RootSource::Layers(layers) => {
            let key = CacheKey::for_layers(format, layers);
            match layers.as_slice() {
                [single] => Ok(cache.get_or_build(&key, single, format)?),
                _ => {
                    let merged = ReadOnlyOverlay::mount(layers, scratch)?;
                    let image = cache.get_or_build(&key, merged.path(), format);
                    drop(merged);
                    Ok(image?)
                }
            }
        }
    }
}

/// A read-only overlay of several layers, unmounted and removed on drop.
#[derive(Debug)]
struct ReadOnlyOverlay {
    target: PathBuf,
}

impl ReadOnlyOverlay {
    fn mount(layers: &[PathBuf], target: &Path) -> Result<Self, MountsError> {
        std::fs::create_dir_all(target).map_err(|source| MountsError::Scratch {
            path: target.to_path_buf(),
            source,
        })?;
        let lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
        // Without an upperdir, overlayfs mounts read-only and needs at least two lower layers.
        let data = format!("lowerdir={}", lower.join(":"));
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .map_err(|source| {
            let _ = std::fs::remove_dir(target);
            MountsError::Mount {
                layers: layers.len(),
                target: target.to_path_buf(),
                source,
            }
        })?;
        Ok(Self {
            target: target.to_path_buf(),
        })
    }

    fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for ReadOnlyOverlay {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.target.display(), error = %e, "unmounting the layer view");
        }
        let _ = std::fs::remove_dir(&self.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> RootMount {
        RootMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn test_root_source_takes_lowerdirs_topmost_first() {
        let m = overlay(&[
            "index=off",
            "workdir=/s/3/work",
            "upperdir=/s/3/fs",
            "lowerdir=/s/2/fs:/s/1/fs",
        ]);
        let src = RootSource::from_mounts(&[m], Path::new("/b/rootfs")).unwrap();
        assert_eq!(
            src,
            RootSource::Layers(vec!["/s/2/fs".into(), "/s/1/fs".into()])
        );
    }

    #[test]
    fn test_root_source_uses_bundle_rootfs_without_mounts() {
        let src = RootSource::from_mounts(&[], Path::new("/b/rootfs")).unwrap();
        assert_eq!(src, RootSource::Directory("/b/rootfs".into()));
    }

    #[test]
    fn test_root_source_rejects_unknown_type_and_missing_lowerdir() {
        let m = RootMount {
            kind: "nfs".into(),
            ..Default::default()
        };
        let err = RootSource::from_mounts(&[m], Path::new("/r")).unwrap_err();
        assert!(err.to_string().contains("\"nfs\""), "{err}");
        let err =
            RootSource::from_mounts(&[overlay(&["upperdir=/u"])], Path::new("/r")).unwrap_err();
        assert!(matches!(err, MountsError::NoLowerdir { .. }), "{err}");
        let two = [overlay(&["lowerdir=/a"]), overlay(&["lowerdir=/b"])];
        assert!(matches!(
            RootSource::from_mounts(&two, Path::new("/r")),
            Err(MountsError::TooMany { count: 2 })
        ));
    }

    #[test]
    fn test_build_root_image_merges_layers_with_whiteouts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting an overlay needs root");
            return;
        }
        let base = std::env::temp_dir().join(format!("squib-mounts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (upper, lower) = (base.join("l2"), base.join("l1"));
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::write(lower.join("gone"), b"x").unwrap();
        std::fs::write(lower.join("kept"), b"k").unwrap();
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        std::fs::write(upper.join("new"), b"n").unwrap();
        let cache = ImageCache::open(base.join("cache"), 1 << 30).unwrap();
        let scratch = base.join("merge");
        let image = build_root_image(
            &RootSource::Layers(vec![upper.clone(), lower.clone()]),
            &cache,
            ImageFormat::Ext4,
            &scratch,
        );
        let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounted.contains(scratch.to_str().unwrap()));
        assert!(!scratch.exists());
        match image {
            Ok(image) => {
                assert!(image.path.is_file());
                let listing = std::process::Command::new("debugfs")
                    .args(["-R", "ls -l /"])
                    .arg(&image.path)
                    .output()
                    .unwrap();
                let listing = String::from_utf8_lossy(&listing.stdout);
                assert!(
                    listing.contains("kept") && listing.contains("new"),
                    "{listing}"
                );
                assert!(!listing.contains("gone"), "{listing}");
            }
            Err(MountsError::Mount {
                source: nix::Error::EINVAL,
                ..
            }) => {
                eprintln!("skipped: this kernel refuses overlayfs here");
            }
            Err(e) => panic!("{e}"),
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
