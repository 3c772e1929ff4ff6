//! Firecracker-style configuration files (`--config-file`): the sections of `GET /vm/config`
//! in one JSON document, turned into the actions that apply them, in dependency order.

use squib_core::action::ApiAction;
use squib_core::config::{
    BalloonConfig, BootSource, DriveConfig, EntropyConfig, LoggerConfig, MachineConfig,
    MetricsConfig, MmdsConfig, NetworkInterfaceConfig, PmemConfig, VsockConfig,
};

use crate::error::RequestError;
use crate::http::parse_body;
use crate::schema::RawConfigFile;

/// Parses a configuration file and returns the actions that apply it (without
/// `InstanceStart`).
///
/// # Errors
/// A [`RequestError`] naming the invalid section field, or
/// [`RequestError::Unsupported`] for a non-null `cpu-config` or `memory-hotplug` section.
pub fn actions_from_config_file(contents: &[u8]) -> Result<Vec<ApiAction>, RequestError> {
    let file: RawConfigFile = parse_body("the configuration file", contents)?;
    if file.cpu_config.is_some() {
        return Err(RequestError::Unsupported {
            what: "custom CPU templates (cpu-config)",
        });
    }
    if file.memory_hotplug.is_some() {
        return Err(RequestError::Unsupported {
            what: "memory hotplug (memory-hotplug)",
        });
    }
    let mut actions = Vec::new();
    if let Some(logger) = file.logger {
        actions.push(ApiAction::PutLogger(LoggerConfig::try_from(logger)?));
    }
    if let Some(metrics) = file.metrics {
        actions.push(ApiAction::PutMetrics(MetricsConfig::try_from(metrics)?));
    }
    if let Some(machine) = file.machine_config {
        actions.push(ApiAction::PutMachineConfig(MachineConfig::try_from(
            machine,
        )?));
    }
    if let Some(boot) = file.boot_source {
        actions.push(ApiAction::PutBootSource(BootSource::try_from(boot)?));
    }
    for drive in file.drives {
        actions.push(ApiAction::PutDrive(DriveConfig::try_from(drive)?));
    }
    for iface in file.network_interfaces {
        actions.push(ApiAction::PutNetworkInterface(
            NetworkInterfaceConfig::try_from(iface)?,
        ));
    }
    for pmem in file.pmem {
        actions.push(ApiAction::PutPmem(PmemConfig::try_from(pmem)?));
    }
    if let Some(vsock) = file.vsock {
        actions.push(ApiAction::PutVsock(VsockConfig::try_from(vsock)?));
    }
    if let Some(entropy) = file.entropy {
        actions.push(ApiAction::PutEntropy(EntropyConfig::from(entropy)));
    }
    if let Some(balloon) = file.balloon {
        actions.push(ApiAction::PutBalloon(BalloonConfig::try_from(balloon)?));
    }
    // The metadata service refers to network interfaces, so it comes after them.
    if let Some(mmds) = file.mmds_config {
        actions.push(ApiAction::PutMmdsConfig(MmdsConfig::try_from(mmds)?));
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_file_orders_actions_and_validates() {
        let text = br#"{
            "mmds-config": {"network_interfaces": ["eth0"]},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
            "boot-source": {"kernel_image_path": "/k"}
        }"#;
        let names: Vec<_> = actions_from_config_file(text)
            .unwrap()
            .iter()
            .map(ApiAction::name)
            .collect();
        assert_eq!(
            names,
            [
                "PutMachineConfig",
                "PutBootSource",
                "PutNetworkInterface",
                "PutMmdsConfig"
            ]
        );
        let bad = br#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 256}}"#;
        assert!(
            actions_from_config_file(bad)
                .unwrap_err()
                .to_string()
                .contains("vcpu_count")
        );
        assert!(actions_from_config_file(br#"{"cpu-config": {}}"#).is_err());
        assert!(actions_from_config_file(br#"{"extra": 1}"#).is_err());
    }
}
