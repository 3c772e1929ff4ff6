//! Errors of the API front door and their one mapping to HTTP.
//!
//! [`RequestError`] covers what is wrong with a request before it becomes an action;
//! [`crate::controller::ControllerError`] what the controller or the event loop refused.
//! [`ApiError`] joins them, and `From<ApiError> for ApiResponse` is the only place that picks
//! an HTTP status.

use hyper::StatusCode;
use serde::Serialize;
use squib_core::action::{BackendError, VmmActionError};
use squib_core::config::ConfigError;

use crate::controller::ControllerError;

/// What is wrong with a request itself.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No route for this path.
    #[error("no API endpoint at {path}")]
    NotFound {
        /// The requested path.
        path: String,
    },
    /// The path exists but not with this method.
    #[error("{method} is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        /// The requested method.
        method: String,
        /// The requested path.
        path: String,
        /// The methods the path accepts, comma separated.
        allow: &'static str,
    },
    /// A request that needs a body came without one.
    #[error("the request body is empty; {endpoint} needs a JSON body")]
    EmptyBody {
        /// The endpoint.
        endpoint: &'static str,
    },
    /// The body is larger than the API accepts.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read from the connection.
    #[error("reading the request body failed: {detail}")]
    ReadBody {
        /// The transport's error.
        detail: String,
    },
    /// The body is not valid JSON for this endpoint; `detail` names the field or position.
    #[error("invalid JSON body for {endpoint}: {detail}")]
    InvalidJson {
        /// The endpoint.
        endpoint: &'static str,
        /// What the parser found wrong (unknown or missing field, wrong type, syntax).
        detail: String,
    },
    /// The id in the path and the id in the body differ.
    #[error("the id in the path ({path_id:?}) and {field} in the body ({body_id:?}) differ")]
    IdMismatch {
        /// The body's id field.
        field: &'static str,
        /// Id in the path.
        path_id: String,
        /// Id in the body.
        body_id: String,
    },
    /// A required field is missing.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// An unknown logger level.
    #[error(
        "level {value:?} is not a log level; expected one of Error, Warning, Info, Debug, \
         Trace, Off"
    )]
    InvalidLogLevel {
        /// The refused text.
        value: String,
    },
    /// Balloon statistics cannot be read now.
    #[error("balloon statistics are unavailable: {reason}")]
    BalloonStatsUnavailable {
        /// Why.
        reason: &'static str,
    },
    /// A feature squib does not implement.
    #[error("{what} is not supported by squib-vmm")]
    Unsupported {
        /// The feature.
        what: &'static str,
    },
    /// A field failed validation.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Any failure of an API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The controller or the event loop refused or failed the action.
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

impl From<ConfigError> for ApiError {
    fn from(err: ConfigError) -> Self {
        Self::Request(RequestError::Config(err))
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultMessage {
    /// Human-readable cause.
    pub fault_message: String,
}

/// An HTTP answer, independent of the server library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// Status code.
    pub status: StatusCode,
    /// JSON body, if any.
    pub body: Option<Vec<u8>>,
    /// Value of the `Allow` header (405 answers).
    pub allow: Option<&'static str>,
}

impl ApiResponse {
    /// 204 with no body.
    pub fn no_content() -> Self {
        Self {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: None,
        }
    }

    /// 200 with `value` as JSON.
    pub fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status: StatusCode::OK,
                body: Some(body),
                allow: None,
            },
            Err(err) => Self::fault(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("serializing the answer failed: {err}"),
            ),
        }
    }

    fn fault(status: StatusCode, fault_message: String) -> Self {
        let body = serde_json::to_vec(&FaultMessage { fault_message }).unwrap_or_default();
        Self {
            status,
            body: Some(body),
            allow: None,
        }
    }
}

/// The single mapping from errors to HTTP statuses: 404 and 405 for routing, 413 for an
/// oversized body, 504 when the event loop did not answer in time, 503 when it is gone, 500
/// when this build or host cannot serve the request at all (no hypervisor backend built in,
/// unreadable host memory size), and 400 for everything else, including a failed boot (a
/// missing kernel file is the usual cause), as Firecracker does.
impl From<ApiError> for ApiResponse {
    fn from(err: ApiError) -> Self {
        let mut allow = None;
        let status = match &err {
            ApiError::Request(RequestError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ApiError::Request(RequestError::MethodNotAllowed { allow: a, .. }) => {
                allow = Some(*a);
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::Request(RequestError::BodyTooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Request(_) => StatusCode::BAD_REQUEST,
            ApiError::Controller(ControllerError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Controller(ControllerError::EventLoopGone { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Controller(ControllerError::HostMemory(_))
            | ApiError::Controller(ControllerError::Vmm(VmmActionError::Backend(
                BackendError::NoHypervisor { .. },
            ))) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Controller(_) => StatusCode::BAD_REQUEST,
        };
        let mut response = Self::fault(status, error_chain(&err));
        response.allow = allow;
        response
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn status(err: impl Into<ApiError>) -> StatusCode {
        ApiResponse::from(err.into()).status
    }

    #[test]
    fn test_error_status_mapping() {
        assert_eq!(
            status(RequestError::NotFound { path: "/x".into() }),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(ConfigError::MemSizeZero { value: 0 }),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(ControllerError::Timeout {
                action: "InstanceStart",
                after: Duration::ZERO
            }),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(ControllerError::Vmm(VmmActionError::Backend(
                BackendError::NoHypervisor { operation: "start" }
            ))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(ControllerError::Vmm(VmmActionError::Backend(
                BackendError::Failed {
                    operation: "start the microVM",
                    detail: "cannot read kernel image /k".into(),
                }
            ))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(ControllerError::Vmm(VmmActionError::SnapshotNotSupported {
                operation: "create"
            })),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn test_method_not_allowed_carries_allow_header_and_fault_body() {
        let response = ApiResponse::from(ApiError::from(RequestError::MethodNotAllowed {
            method: "DELETE".into(),
            path: "/vm".into(),
            allow: "PATCH",
        }));
        assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.allow, Some("PATCH"));
        let body: serde_json::Value = serde_json::from_slice(&response.body.unwrap()).unwrap();
        assert!(body["fault_message"].as_str().unwrap().contains("DELETE"));
    }
}
