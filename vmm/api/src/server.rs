//! The HTTP/1.1 server on a Unix socket: hyper connections (keep-alive), bodies capped at
//! [`MAX_BODY_BYTES`], each request answered by [`crate::http::handle`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tracing::{Instrument, debug, info_span, warn};

use crate::controller::RuntimeApiController;
use crate::error::{ApiError, ApiResponse, RequestError};
use crate::http::{MAX_BODY_BYTES, handle};

/// Serves the API on `listener` until `shutdown` completes. Connections already open are
/// abandoned when it returns (the process is about to exit).
pub async fn serve(
    listener: UnixListener,
    controller: Arc<RuntimeApiController>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning on the listener.
                    warn!(%error, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let controller = Arc::clone(&controller);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let controller = Arc::clone(&controller);
                async move { Ok::<_, Infallible>(respond(&controller, request).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "API connection ended with an error");
            }
        });
    }
}

async fn respond(
    controller: &RuntimeApiController,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = info_span!("api_request", %method, %path);
    async move {
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let err = if error.is::<http_body_util::LengthLimitError>() {
                    RequestError::BodyTooLarge {
                        limit: MAX_BODY_BYTES,
                    }
                } else {
                    RequestError::ReadBody {
                        detail: error.to_string(),
                    }
                };
                return to_hyper(ApiResponse::from(ApiError::from(err)));
            }
        };
        let response = handle(controller, &method, &path, &body).await;
        debug!(status = response.status.as_u16(), "API request answered");
        to_hyper(response)
    }
    .instrument(span)
    .await
}

fn to_hyper(response: ApiResponse) -> Response<Full<Bytes>> {
    let has_body = response.body.is_some();
    let mut out = Response::new(Full::new(Bytes::from(response.body.unwrap_or_default())));
    *out.status_mut() = response.status;
    if has_body {
        out.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(allow) = response.allow {
        out.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    out
}
