//! Request routing: one HTTP request (method, path, body) in, one [`ApiResponse`] out.
//!
//! This layer only parses bodies into `Raw*` schemas, converts them into actions and calls
//! the controller; `GET`s are answered from the controller's snapshot. It knows nothing of
//! sockets or of the HTTP library, so it is tested directly.

use hyper::Method;
use serde::de::DeserializeOwned;
use squib_core::action::{ApiAction, VmState};
use squib_core::config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSource, DriveConfig, DriveUpdate,
    EntropyConfig, LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig, MmdsConfig,
    NetworkInterfaceConfig, NetworkInterfaceUpdate, PmemConfig, SerialConfig, VsockConfig,
};
use squib_core::snapshot::{SnapshotCreateParams, SnapshotLoadParams};

use crate::controller::RuntimeApiController;
use crate::error::{ApiError, ApiResponse, RequestError};
use crate::schema::{
    FullVmConfigView, InstanceInfo, RawAction, RawActionType, RawBalloon, RawBalloonStats,
    RawBalloonStatsUpdate, RawBalloonUpdate, RawBootSource, RawDrive, RawDriveUpdate, RawEntropy,
    RawLogger, RawMachineConfig, RawMachineConfigUpdate, RawMetrics, RawMmdsConfig,
    RawNetworkInterface, RawNetworkInterfaceUpdate, RawPmem, RawSerial, RawSnapshotCreate,
    RawSnapshotLoad, RawVmState, RawVsock, VersionInfo,
};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Parses `body` as the JSON schema `T` of `endpoint`.
///
/// # Errors
/// [`RequestError::EmptyBody`] for an empty body, [`RequestError::InvalidJson`] naming the
/// unknown, missing or mistyped field (or the syntax error's position) otherwise.
pub fn parse_body<T: DeserializeOwned>(
    endpoint: &'static str,
    body: &[u8],
) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody { endpoint });
    }
    serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson {
        endpoint,
        detail: e.to_string(),
    })
}

fn check_id(field: &'static str, path_id: &str, body_id: &str) -> Result<(), RequestError> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(RequestError::IdMismatch {
            field,
            path_id: path_id.to_owned(),
            body_id: body_id.to_owned(),
        })
    }
}

/// The routes, by path shape; `{id}` segments are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Root,
    Version,
    MachineConfig,
    BootSource,
    Drive(&'a str),
    NetworkInterface(&'a str),
    Pmem(&'a str),
    Vsock,
    Entropy,
    Balloon,
    BalloonStatistics,
    BalloonHinting,
    Logger,
    Metrics,
    Actions,
    Vm,
    VmConfig,
    SnapshotCreate,
    SnapshotLoad,
    Mmds,
    MmdsConfig,
    Serial,
    CpuConfig,
    MemoryHotplug,
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        let trimmed = path.strip_prefix('/')?;
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let mut parts = trimmed.split('/');
        let first = parts.next().unwrap_or("");
        let second = parts.next();
        let third = parts.next();
        if parts.next().is_some() {
            return None;
        }
        let route = match (first, second, third) {
            ("", None, None) => Route::Root,
            ("version", None, None) => Route::Version,
            ("machine-config", None, None) => Route::MachineConfig,
            ("boot-source", None, None) => Route::BootSource,
            ("drives", Some(id), None) if !id.is_empty() => Route::Drive(id),
            ("network-interfaces", Some(id), None) if !id.is_empty() => Route::NetworkInterface(id),
            ("pmem", Some(id), None) if !id.is_empty() => Route::Pmem(id),
            ("vsock", None, None) => Route::Vsock,
            ("entropy", None, None) => Route::Entropy,
            ("balloon", None, None) => Route::Balloon,
            ("balloon", Some("statistics"), None) => Route::BalloonStatistics,
            ("balloon", Some("hinting"), Some("start" | "stop" | "status")) => {
                Route::BalloonHinting
            }
            ("logger", None, None) => Route::Logger,
            ("metrics", None, None) => Route::Metrics,
            ("actions", None, None) => Route::Actions,
            ("vm", None, None) => Route::Vm,
            ("vm", Some("config"), None) => Route::VmConfig,
            ("snapshot", Some("create"), None) => Route::SnapshotCreate,
            ("snapshot", Some("load"), None) => Route::SnapshotLoad,
            ("mmds", None, None) => Route::Mmds,
            ("mmds", Some("config"), None) => Route::MmdsConfig,
            ("serial", None, None) => Route::Serial,
            ("cpu-config", None, None) => Route::CpuConfig,
            ("hotplug", Some("memory"), None) => Route::MemoryHotplug,
            _ => return None,
        };
        Some(route)
    }

    /// Methods the route accepts, for 405 answers.
    fn allow(self) -> &'static str {
        match self {
            Route::Root | Route::Version | Route::VmConfig => "GET",
            Route::MachineConfig | Route::Balloon | Route::Mmds | Route::MemoryHotplug => {
                "GET, PUT, PATCH"
            }
            Route::Drive(_) | Route::NetworkInterface(_) | Route::Pmem(_) => "PUT, PATCH",
            Route::BalloonStatistics => "GET, PATCH",
            Route::BalloonHinting => "GET, PATCH",
            Route::Vm => "PATCH",
            Route::BootSource
            | Route::Vsock
            | Route::Entropy
            | Route::Logger
            | Route::Metrics
            | Route::Actions
            | Route::SnapshotCreate
            | Route::SnapshotLoad
            | Route::MmdsConfig
            | Route::Serial
            | Route::CpuConfig => "PUT",
        }
    }
}

/// Answers one request.
pub async fn handle(
    controller: &RuntimeApiController,
    method: &Method,
    path: &str,
    body: &[u8],
) -> ApiResponse {
    match route(controller, method, path, body).await {
        Ok(response) => response,
        Err(err) => ApiResponse::from(err),
    }
}

async fn route(
    controller: &RuntimeApiController,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<ApiResponse, ApiError> {
    let route = Route::parse(path).ok_or_else(|| RequestError::NotFound {
        path: path.to_owned(),
    })?;
    let not_allowed = || RequestError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_owned(),
        allow: route.allow(),
    };
    let action = match (route, method.as_str()) {
        // Reads, served from the snapshot.
        (Route::Root, "GET") => {
            return Ok(ApiResponse::json(&InstanceInfo::from(
                &*controller.snapshot(),
            )));
        }
        (Route::Version, "GET") => {
            let version = controller.snapshot().vmm_version.clone();
            return Ok(ApiResponse::json(&VersionInfo {
                firecracker_version: version,
            }));
        }
        (Route::MachineConfig, "GET") => {
            let snap = controller.snapshot();
            return Ok(ApiResponse::json(&RawMachineConfig::from(
                &snap.vm_config.machine_config,
            )));
        }
        (Route::VmConfig, "GET") => {
            let snap = controller.snapshot();
            return Ok(ApiResponse::json(&FullVmConfigView::from(&snap.vm_config)));
        }
        (Route::Balloon, "GET") => {
            let snap = controller.snapshot();
            let balloon = snap.vm_config.balloon.as_ref().ok_or(ApiError::Controller(
                crate::controller::ControllerError::Vmm(
                    squib_core::action::VmmActionError::BalloonNotConfigured,
                ),
            ))?;
            return Ok(ApiResponse::json(&RawBalloon::from(balloon)));
        }
        (Route::BalloonStatistics, "GET") => {
            let snap = controller.snapshot();
            let balloon = snap.vm_config.balloon.as_ref().ok_or(ApiError::Controller(
                crate::controller::ControllerError::Vmm(
                    squib_core::action::VmmActionError::BalloonNotConfigured,
                ),
            ))?;
            if balloon.stats_polling_interval_s() == 0 {
                return Err(RequestError::BalloonStatsUnavailable {
                    reason: "they were not enabled (stats_polling_interval_s is 0)",
                }
                .into());
            }
            let stats =
                snap.balloon_stats
                    .as_ref()
                    .ok_or(RequestError::BalloonStatsUnavailable {
                        reason: "the guest has not reported any yet",
                    })?;
            return Ok(ApiResponse::json(&RawBalloonStats::from(stats)));
        }
        (Route::Mmds, "GET") => {
            let snap = controller.snapshot();
            let empty = serde_json::Value::Object(serde_json::Map::new());
            return Ok(ApiResponse::json(
                snap.vm_config.mmds_data.as_ref().unwrap_or(&empty),
            ));
        }

        // Writes, turned into actions.
        (Route::MachineConfig, "PUT") => {
            let raw: RawMachineConfig = parse_body("PUT /machine-config", body)?;
            ApiAction::PutMachineConfig(MachineConfig::try_from(raw)?)
        }
        (Route::MachineConfig, "PATCH") => {
            let raw: RawMachineConfigUpdate = parse_body("PATCH /machine-config", body)?;
            ApiAction::PatchMachineConfig(MachineConfigUpdate::from(raw))
        }
        (Route::BootSource, "PUT") => {
            let raw: RawBootSource = parse_body("PUT /boot-source", body)?;
            ApiAction::PutBootSource(BootSource::try_from(raw)?)
        }
        (Route::Drive(id), "PUT") => {
            let raw: RawDrive = parse_body("PUT /drives", body)?;
            check_id("drive_id", id, &raw.drive_id)?;
            ApiAction::PutDrive(DriveConfig::try_from(raw)?)
        }
        (Route::Drive(id), "PATCH") => {
            let raw: RawDriveUpdate = parse_body("PATCH /drives", body)?;
            check_id("drive_id", id, &raw.drive_id)?;
            ApiAction::PatchDrive(DriveUpdate::try_from(raw)?)
        }
        (Route::NetworkInterface(id), "PUT") => {
            let raw: RawNetworkInterface = parse_body("PUT /network-interfaces", body)?;
            check_id("iface_id", id, &raw.iface_id)?;
            ApiAction::PutNetworkInterface(NetworkInterfaceConfig::try_from(raw)?)
        }
        (Route::NetworkInterface(id), "PATCH") => {
            let raw: RawNetworkInterfaceUpdate = parse_body("PATCH /network-interfaces", body)?;
            check_id("iface_id", id, &raw.iface_id)?;
            ApiAction::PatchNetworkInterface(NetworkInterfaceUpdate::try_from(raw)?)
        }
        (Route::Pmem(id), "PUT") => {
            let raw: RawPmem = parse_body("PUT /pmem", body)?;
            check_id("id", id, &raw.id)?;
            ApiAction::PutPmem(PmemConfig::try_from(raw)?)
        }
        (Route::Vsock, "PUT") => {
            let raw: RawVsock = parse_body("PUT /vsock", body)?;
            ApiAction::PutVsock(VsockConfig::try_from(raw)?)
        }
        (Route::Entropy, "PUT") => {
            let raw: RawEntropy = parse_body("PUT /entropy", body)?;
            ApiAction::PutEntropy(EntropyConfig::from(raw))
        }
        (Route::Balloon, "PUT") => {
            let raw: RawBalloon = parse_body("PUT /balloon", body)?;
            ApiAction::PutBalloon(BalloonConfig::try_from(raw)?)
        }
        (Route::Balloon, "PATCH") => {
            let raw: RawBalloonUpdate = parse_body("PATCH /balloon", body)?;
            ApiAction::PatchBalloon(BalloonUpdate::try_from(raw)?)
        }
        (Route::BalloonStatistics, "PATCH") => {
            let raw: RawBalloonStatsUpdate = parse_body("PATCH /balloon/statistics", body)?;
            ApiAction::PatchBalloonStatistics(BalloonStatsUpdate::try_from(raw)?)
        }
        (Route::Logger, "PUT") => {
            let raw: RawLogger = parse_body("PUT /logger", body)?;
            ApiAction::PutLogger(LoggerConfig::try_from(raw)?)
        }
        (Route::Metrics, "PUT") => {
            let raw: RawMetrics = parse_body("PUT /metrics", body)?;
            ApiAction::PutMetrics(MetricsConfig::try_from(raw)?)
        }
        (Route::Actions, "PUT") => {
            let raw: RawAction = parse_body("PUT /actions", body)?;
            match raw.action_type {
                RawActionType::InstanceStart => ApiAction::InstanceStart,
                RawActionType::FlushMetrics => ApiAction::FlushMetrics,
                RawActionType::SendCtrlAltDel => ApiAction::SendCtrlAltDel,
            }
        }
        (Route::Vm, "PATCH") => {
            let raw: RawVmState = parse_body("PATCH /vm", body)?;
            ApiAction::SetVmState(VmState::from(raw))
        }
        (Route::SnapshotCreate, "PUT") => {
            let raw: RawSnapshotCreate = parse_body("PUT /snapshot/create", body)?;
            ApiAction::CreateSnapshot(SnapshotCreateParams::try_from(raw)?)
        }
        (Route::SnapshotLoad, "PUT") => {
            let raw: RawSnapshotLoad = parse_body("PUT /snapshot/load", body)?;
            ApiAction::LoadSnapshot(SnapshotLoadParams::try_from(raw)?)
        }
        (Route::Mmds, "PUT") => ApiAction::PutMmds(parse_body("PUT /mmds", body)?),
        (Route::Mmds, "PATCH") => ApiAction::PatchMmds(parse_body("PATCH /mmds", body)?),
        (Route::MmdsConfig, "PUT") => {
            let raw: RawMmdsConfig = parse_body("PUT /mmds/config", body)?;
            ApiAction::PutMmdsConfig(MmdsConfig::try_from(raw)?)
        }
        (Route::Serial, "PUT") => {
            let raw: RawSerial = parse_body("PUT /serial", body)?;
            ApiAction::PutSerial(SerialConfig::try_from(raw)?)
        }

        // Endpoints squib knows but does not implement.
        // Known limitation: custom CPU templates, memory hotplug (virtio-mem), free page
        // hinting and post-boot pmem changes are not implemented; they answer 400 with a
        // "not supported" fault message. Each needs its device or CPUID/MSR plumbing first.
        (Route::CpuConfig, "PUT") => {
            return Err(RequestError::Unsupported {
                what: "custom CPU templates (/cpu-config)",
            }
            .into());
        }
        (Route::MemoryHotplug, "GET" | "PUT" | "PATCH") => {
            return Err(RequestError::Unsupported {
                what: "memory hotplug (/hotplug/memory)",
            }
            .into());
        }
        (Route::BalloonHinting, "GET" | "PATCH") => {
            return Err(RequestError::Unsupported {
                what: "balloon free page hinting",
            }
            .into());
        }
        (Route::Pmem(_), "PATCH") => {
            return Err(RequestError::Unsupported {
                what: "pmem rate limiters (PATCH /pmem)",
            }
            .into());
        }
        _ => return Err(not_allowed().into()),
    };
    controller.dispatch(action).await?;
    Ok(ApiResponse::no_content())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use hyper::StatusCode;
    use serde_json::{Value, json};
    use squib_core::event_loop::NoHypervisorBackend;

    use super::*;
    use crate::controller::{ControllerOptions, TimeoutTable};
    use crate::host::{Arch, FixedHostMemory};

    fn controller() -> RuntimeApiController {
        let options = ControllerOptions {
            timeouts: TimeoutTable::uniform(Duration::from_secs(5)),
            host_memory: Arc::new(FixedHostMemory(8192)),
            arch: Arch::X86_64,
        };
        RuntimeApiController::start("test-vm", Box::new(NoHypervisorBackend), options)
            .unwrap()
            .0
    }

    async fn call(
        c: &RuntimeApiController,
        method: Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let response = handle(c, &method, path, &bytes).await;
        let value = response
            .body
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(Value::Null);
        (response.status, value)
    }

    fn fault(v: &Value) -> &str {
        v["fault_message"].as_str().unwrap()
    }

    #[tokio::test]
    async fn test_get_root_reports_instance_info() {
        let c = controller();
        let (status, body) = call(&c, Method::GET, "/", Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["id"], "test-vm");
        assert_eq!(body["state"], "Not started");
        assert_eq!(body["app_name"], "squib");
        assert!(body["vmm_version"].is_string());
    }

    #[tokio::test]
    async fn test_put_machine_config_then_get_vm_config() {
        let c = controller();
        let (status, _) = call(
            &c,
            Method::PUT,
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, config) = call(&c, Method::GET, "/vm/config", Value::Null).await;
        assert_eq!(config["machine-config"]["vcpu_count"], 2);
        assert_eq!(config["machine-config"]["mem_size_mib"], 256);
        let (status, _) = call(
            &c,
            Method::PATCH,
            "/machine-config",
            json!({"vcpu_count": 4}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, machine) = call(&c, Method::GET, "/machine-config", Value::Null).await;
        assert_eq!(
            (
                machine["vcpu_count"].as_u64(),
                machine["mem_size_mib"].as_u64()
            ),
            (Some(4), Some(256))
        );
    }

    #[tokio::test]
    async fn test_rejected_put_names_field_and_keeps_previous_config() {
        let c = controller();
        call(
            &c,
            Method::PUT,
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        )
        .await;
        for body in [
            json!({"vcpu_count": 0, "mem_size_mib": 256}),
            json!({"vcpu_count": 33, "mem_size_mib": 256}),
        ] {
            let (status, err) = call(&c, Method::PUT, "/machine-config", body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(fault(&err).contains("vcpu_count"), "{err}");
        }
        let (status, err) = call(
            &c,
            Method::PUT,
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 0}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("mem_size_mib"));
        let (_, machine) = call(&c, Method::GET, "/machine-config", Value::Null).await;
        assert_eq!(machine["vcpu_count"], 2);
    }

    #[tokio::test]
    async fn test_unknown_field_and_malformed_json_are_named() {
        let c = controller();
        let (status, err) = call(
            &c,
            Method::PUT,
            "/boot-source",
            json!({"kernel_image_path": "/k", "kernel": 1}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("unknown field `kernel`"), "{err}");
        let response = handle(
            &c,
            &Method::PUT,
            "/boot-source",
            b"{\"kernel_image_path\": ",
        )
        .await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_slice(&response.body.unwrap()).unwrap();
        assert!(
            fault(&body).contains("invalid JSON body for PUT /boot-source"),
            "{body}"
        );
        let response = handle(&c, &Method::PUT, "/boot-source", b"").await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn test_path_and_body_ids_must_agree() {
        let c = controller();
        let (status, err) = call(
            &c,
            Method::PUT,
            "/drives/a",
            json!({"drive_id": "b", "path_on_host": "/b", "is_root_device": false}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let text = fault(&err);
        assert!(
            text.contains("\"a\"") && text.contains("\"b\"") && text.contains("drive_id"),
            "{text}"
        );
        let (status, _) = call(
            &c,
            Method::PUT,
            "/network-interfaces/eth0",
            json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn test_unknown_path_is_404_and_wrong_method_is_405() {
        let c = controller();
        let (status, err) = call(&c, Method::GET, "/nope", Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(fault(&err).contains("/nope"));
        assert_eq!(
            call(&c, Method::GET, "/drives", Value::Null).await.0,
            StatusCode::NOT_FOUND
        );
        let response = handle(&c, &Method::DELETE, "/machine-config", b"").await;
        assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.allow, Some("GET, PUT, PATCH"));
        assert_eq!(
            call(&c, Method::GET, "/boot-source", Value::Null).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn test_every_pre_boot_endpoint_shows_in_vm_config() {
        let c = controller();
        let puts = [
            (
                "/boot-source",
                json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0"}),
            ),
            (
                "/drives/root",
                json!({"drive_id": "root", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}),
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}),
            ),
            ("/pmem/p0", json!({"id": "p0", "path_on_host": "/p"})),
            ("/vsock", json!({"guest_cid": 3, "uds_path": "/v.sock"})),
            ("/entropy", json!({})),
            (
                "/balloon",
                json!({"amount_mib": 16, "deflate_on_oom": true}),
            ),
            ("/logger", json!({"level": "Debug", "log_path": "/l"})),
            ("/metrics", json!({"metrics_path": "/m"})),
            (
                "/mmds/config",
                json!({"network_interfaces": ["eth0"], "version": "V2"}),
            ),
            ("/serial", json!({"serial_out_path": "/s"})),
            ("/mmds", json!({"latest": {"meta-data": {"id": 1}}})),
        ];
        for (path, body) in puts {
            let (status, err) = call(&c, Method::PUT, path, body).await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{path}: {err}");
        }
        let (status, _) = call(&c, Method::PATCH, "/balloon", json!({"amount_mib": 8})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = call(
            &c,
            Method::PATCH,
            "/balloon/statistics",
            json!({"stats_polling_interval_s": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = call(&c, Method::PATCH, "/mmds", json!({"latest": {"x": 2}})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);

        let (_, config) = call(&c, Method::GET, "/vm/config", Value::Null).await;
        assert_eq!(config["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(config["drives"][0]["is_read_only"], true);
        assert_eq!(
            config["network-interfaces"][0]["guest_mac"],
            "06:00:00:00:00:01"
        );
        assert_eq!(config["pmem"][0]["id"], "p0");
        assert_eq!(config["vsock"]["guest_cid"], 3);
        assert_eq!(config["entropy"], json!({"rate_limiter": null}));
        assert_eq!(config["balloon"]["amount_mib"], 8);
        assert_eq!(config["balloon"]["stats_polling_interval_s"], 2);
        assert_eq!(config["logger"]["level"], "Debug");
        assert_eq!(config["metrics"]["metrics_path"], "/m");
        assert_eq!(config["mmds-config"]["version"], "V2");
        assert_eq!(config["mmds-config"]["ipv4_address"], "169.254.169.254");
        let (_, balloon) = call(&c, Method::GET, "/balloon", Value::Null).await;
        assert_eq!(balloon["deflate_on_oom"], true);
        let (_, mmds) = call(&c, Method::GET, "/mmds", Value::Null).await;
        assert_eq!(mmds, json!({"latest": {"meta-data": {"id": 1}, "x": 2}}));
    }

    #[tokio::test]
    async fn test_actions_before_boot() {
        let c = controller();
        let (status, err) = call(
            &c,
            Method::PUT,
            "/actions",
            json!({"action_type": "FlushMetrics"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            fault(&err).contains("after the microVM is started"),
            "{err}"
        );
        let (status, _) = call(&c, Method::PATCH, "/vm", json!({"state": "Paused"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, err) = call(
            &c,
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("boot source"), "{err}");
        call(
            &c,
            Method::PUT,
            "/boot-source",
            json!({"kernel_image_path": "/k"}),
        )
        .await;
        let (status, err) = call(
            &c,
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(fault(&err).contains("no hypervisor backend"), "{err}");
        let (status, err) = call(
            &c,
            Method::PUT,
            "/actions",
            json!({"action_type": "Reboot"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("SendCtrlAltDel"));
    }

    #[tokio::test]
    async fn test_snapshot_and_unsupported_endpoints_say_not_supported() {
        let c = controller();
        let (status, err) = call(
            &c,
            Method::PUT,
            "/snapshot/load",
            json!({"snapshot_path": "/s", "mem_file_path": "/m"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("not supported"), "{err}");
        let (status, err) = call(
            &c,
            Method::PUT,
            "/snapshot/create",
            json!({"snapshot_path": "/s", "mem_file_path": "/m"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            fault(&err).contains("after the microVM is started"),
            "{err}"
        );
        for (method, path) in [
            (Method::PUT, "/cpu-config"),
            (Method::GET, "/hotplug/memory"),
            (Method::PATCH, "/balloon/hinting/start"),
        ] {
            let (status, err) = call(&c, method, path, json!({})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(fault(&err).contains("not supported"), "{path}: {err}");
        }
    }

    #[tokio::test]
    async fn test_handle_survives_mutated_bodies_on_every_route() {
        let c = controller();
        let seeds: [(&str, Value); 6] = [
            (
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false}),
            ),
            (
                "/drives/a",
                json!({"drive_id": "a", "path_on_host": "/a", "is_root_device": true,
                                "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}),
            ),
            (
                "/network-interfaces/e",
                json!({"iface_id": "e", "host_dev_name": "t", "mtu": 1500}),
            ),
            ("/balloon", json!({"amount_mib": 1, "deflate_on_oom": true})),
            ("/mmds", json!({"a": [1, {"b": null}]})),
            (
                "/snapshot/load",
                json!({"snapshot_path": "/s", "mem_backend":
                                      {"backend_type": "File", "backend_path": "/m"}}),
            ),
        ];
        // A fixed linear congruential generator keeps the run reproducible.
        let mut state: u64 = 0x5eed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            state >> 33
        };
        for (path, seed) in seeds {
            let base = serde_json::to_vec(&seed).unwrap();
            for _ in 0..200 {
                let mut body = base.clone();
                for _ in 0..=(next() % 4) {
                    let at = usize::try_from(next()).unwrap() % body.len();
                    body[at] = u8::try_from(next() % 256).unwrap();
                }
                for method in [Method::PUT, Method::PATCH] {
                    let response = handle(&c, &method, path, &body).await;
                    assert!(
                        response.status.is_success() || response.status.is_client_error(),
                        "{method} {path} {:?} -> {}",
                        String::from_utf8_lossy(&body),
                        response.status
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn test_balloon_reads_without_balloon_are_400() {
        let c = controller();
        assert_eq!(
            call(&c, Method::GET, "/balloon", Value::Null).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(&c, Method::GET, "/balloon/statistics", Value::Null)
                .await
                .0,
            StatusCode::BAD_REQUEST
        );
        call(
            &c,
            Method::PUT,
            "/balloon",
            json!({"amount_mib": 0, "deflate_on_oom": false}),
        )
        .await;
        let (status, err) = call(&c, Method::GET, "/balloon/statistics", Value::Null).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("not enabled"), "{err}");
        let body = json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1});
        call(&c, Method::PUT, "/balloon", body).await;
        let (status, err) = call(&c, Method::GET, "/balloon/statistics", Value::Null).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(fault(&err).contains("not reported"), "{err}");
        let (_, version) = call(&c, Method::GET, "/version", Value::Null).await;
        assert!(version["firecracker_version"].is_string());
    }
}
