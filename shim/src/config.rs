//! The shim's runtime options: guest kernel and initramfs, default VM size, rootfs image cache.
//!
//! Options come from a TOML file. containerd names it in the task's runtime options
//! (`runtimeoptions.v1.Options.config_path`, which `ctr run --runtime-config-path FILE` and the
//! CRI plugin's `options = { ConfigPath = "FILE" }` both produce); without one the shim reads
//! `/etc/squib/shim.toml` if it exists, else uses the defaults. Every key is optional:
//!
//! ```toml
//! kernel = "/var/lib/squib/vmlinux"        # default: $SQUIB_CACHE/guest/vmlinux
//! initramfs = "/var/lib/squib/initramfs"   # default: $SQUIB_CACHE/guest/initramfs
//! vcpus = 1                                # when the spec sets no CPU limit
//! memory_mib = 256                         # when the spec sets no memory limit
//! rootfs_cache = "/var/lib/squib/rootfs"   # built root images, keyed by layers
//! rootfs_cache_max_mib = 8192
//! image_format = "erofs"                   # or "ext4"
//! boot_args = ""                           # appended to the guest kernel command line
//! agent_timeout_secs = 120                 # boot-to-agent deadline
//! ```
//!
//! `$SQUIB_CACHE` defaults to `$HOME/.cache/squib`, where `make guest-image` links its output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::protobuf::CodedInputStream;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use serde::Deserialize;
use squib_runtime::plan::{GuestAssets, SizingDefaults};
use squib_runtime::rootfs::ImageFormat;

/// The file read when containerd passes no options.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/squib/shim.toml";

/// A bad options file or options message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading runtime options file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("runtime options file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// A value out of range.
    #[error("runtime options: {field} = {value}: {reason}")]
    Invalid {
        /// The key.
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The runtime options message could not be decoded.
    #[error("decoding runtime options of type {type_url:?}")]
    Decode {
        /// The message's type.
        type_url: String,
        /// The protobuf error.
        #[source]
        source: containerd_shim_protos::protobuf::Error,
    },
    /// Options of a type the shim does not know.
    #[error(
        "runtime options of type {type_url:?} are not supported (use runtimeoptions.v1.Options)"
    )]
    UnknownType {
        /// The message's type.
        type_url: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    rootfs_cache: Option<PathBuf>,
    rootfs_cache_max_mib: Option<u64>,
    image_format: Option<String>,
    boot_args: Option<String>,
    agent_timeout_secs: Option<u64>,
}

/// Validated runtime options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
    /// VM size when the spec does not say.
    pub sizing: SizingDefaults,
    /// Directory of cached root images.
    pub rootfs_cache: PathBuf,
    /// Bound of that cache.
    pub rootfs_cache_max_bytes: u64,
    /// Root image file system.
    pub image_format: ImageFormat,
    /// Extra guest kernel arguments.
    pub boot_args: String,
    /// How long the agent may take to answer after the VM starts.
    pub agent_timeout: Duration,
}

fn squib_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("SQUIB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/squib")
}

impl ShimConfig {
    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let guest = squib_cache().join("guest");
        let sizing = SizingDefaults {
            vcpus: raw.vcpus.unwrap_or(1),
            mem_mib: raw.memory_mib.unwrap_or(256),
        };
        if !(1..=squib_runtime::plan::MAX_VCPUS).contains(&sizing.vcpus) {
            return Err(ConfigError::Invalid {
                field: "vcpus",
                value: sizing.vcpus.to_string(),
                reason: "must be between 1 and 32",
            });
        }
        if sizing.mem_mib < squib_runtime::plan::MIN_GUEST_MEM_MIB {
            return Err(ConfigError::Invalid {
                field: "memory_mib",
                value: sizing.mem_mib.to_string(),
                reason: "below the smallest guest squib boots (128)",
            });
        }
        let image_format = match raw.image_format.as_deref() {
            None | Some("erofs") => ImageFormat::Erofs,
            Some("ext4") => ImageFormat::Ext4,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    field: "image_format",
                    value: other.to_string(),
                    reason: "expected erofs or ext4",
                });
            }
        };
        Ok(Self {
            assets: GuestAssets {
                kernel: raw.kernel.unwrap_or_else(|| guest.join("vmlinux")),
                initramfs: raw.initramfs.unwrap_or_else(|| guest.join("initramfs")),
            },
            sizing,
            rootfs_cache: raw
                .rootfs_cache
                .unwrap_or_else(|| PathBuf::from("/var/lib/squib/rootfs")),
            rootfs_cache_max_bytes: raw
                .rootfs_cache_max_mib
                .unwrap_or(8192)
                .saturating_mul(1 << 20),
            image_format,
            boot_args: raw.boot_args.unwrap_or_default(),
            agent_timeout: Duration::from_secs(raw.agent_timeout_secs.unwrap_or(120)),
        })
    }

    /// Parses options from TOML text; `path` names the source in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`].
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_raw(raw)
    }

    /// Reads options from a TOML file.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] and the errors of [`ShimConfig::from_toml`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The options for a task: from the file its runtime options name, else from
    /// [`DEFAULT_CONFIG_PATH`] when it exists, else the defaults.
    ///
    /// # Errors
    ///
    /// Any [`ConfigError`].
    pub fn for_task(options: Option<&Any>) -> Result<Self, ConfigError> {
        if let Some(path) = options.map(config_path).transpose()?.flatten() {
            return Self::load(&path);
        }
        let default = Path::new(DEFAULT_CONFIG_PATH);
        if default.is_file() {
            return Self::load(default);
        }
        Self::from_raw(RawConfig::default())
    }
}

/// The `config_path` of a `runtimeoptions.v1.Options` message (field 2; field 1 is its
/// `type_url`), `None` when it is empty.
///
/// # Errors
///
/// [`ConfigError::UnknownType`] for other message types, [`ConfigError::Decode`] for bad bytes.
pub fn config_path(any: &Any) -> Result<Option<PathBuf>, ConfigError> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != "runtimeoptions.v1.Options" {
        return Err(ConfigError::UnknownType {
            type_url: any.type_url.clone(),
        });
    }
    let decode = |source| ConfigError::Decode {
        type_url: any.type_url.clone(),
        source,
    };
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(decode)? {
        // Field 2, wire type 2 (length-delimited).
        if tag == (2 << 3) | 2 {
            path = input.read_string().map_err(decode)?;
        } else {
            let wire_type = containerd_shim_protos::protobuf::rt::WireType::new(tag & 7)
                .unwrap_or(containerd_shim_protos::protobuf::rt::WireType::LengthDelimited);
            input.skip_field(wire_type).map_err(decode)?;
        }
    }
    Ok((!path.is_empty()).then(|| PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_parses_every_key() {
        let c = ShimConfig::from_toml(
            r#"kernel = "/k"
initramfs = "/i"
vcpus = 2
memory_mib = 512
rootfs_cache = "/c"
rootfs_cache_max_mib = 10
image_format = "ext4"
boot_args = "squib.log=debug"
agent_timeout_secs = 30"#,
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.assets.kernel, PathBuf::from("/k"));
        assert_eq!(c.assets.initramfs, PathBuf::from("/i"));
        assert_eq!(
            c.sizing,
            SizingDefaults {
                vcpus: 2,
                mem_mib: 512
            }
        );
        assert_eq!(c.rootfs_cache_max_bytes, 10 << 20);
        assert_eq!(c.image_format, ImageFormat::Ext4);
        assert_eq!(c.boot_args, "squib.log=debug");
        assert_eq!(c.agent_timeout, Duration::from_secs(30));
    }

    #[test]
    fn test_config_rejects_unknown_keys_and_bad_values_naming_them() {
        let err = ShimConfig::from_toml("kernal = \"/k\"", Path::new("a.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let err = ShimConfig::from_toml("vcpus = 0", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("vcpus = 0"), "{err}");
        let err = ShimConfig::from_toml("image_format = \"xfs\"", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("xfs"), "{err}");
        let err = ShimConfig::from_toml("memory_mib = 64", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("memory_mib"), "{err}");
    }

    #[test]
    fn test_config_path_decodes_runtimeoptions() {
        // type_url = "x" (field 1), config_path = "/etc/s.toml" (field 2)
        let mut value = vec![0x0a, 1, b'x', 0x12, 11];
        value.extend_from_slice(b"/etc/s.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path(&any).unwrap(),
            Some(PathBuf::from("/etc/s.toml"))
        );
        let empty = Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            ..Default::default()
        };
        assert_eq!(config_path(&empty).unwrap(), None);
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert!(matches!(
            config_path(&other),
            Err(ConfigError::UnknownType { .. })
        ));
    }
}
