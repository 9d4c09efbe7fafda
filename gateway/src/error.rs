//! The HTTP edge's one error type: a table of stable codes (`code`, `type`,
//! HTTP status) and one `IntoResponse`. Every failure a client can see is a
//! row here, with a message that names the field, the limit and the value.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shm::{JobError, JobErrorKind};

/// Longest client-supplied text (a model name, a file name) that an answer
/// echoes; longer text is cut there and marked with `…`.
pub const ECHO_MAX_CHARS: usize = 128;

/// `s` as an answer may echo it: at most [`ECHO_MAX_CHARS`] characters.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(ECHO_MAX_CHARS) {
        None => std::borrow::Cow::Borrowed(s),
        Some((i, _)) => std::borrow::Cow::Owned(format!("{}…", &s[..i])),
    }
}

/// A client-visible failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Seconds for `Retry-After` in place of the code's (a rate limit
    /// knows when its bucket will hold enough).
    pub retry_after: Option<u32>,
}

/// Stable error codes. Renaming one is a breaking API change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    MissingApiKey,
    InvalidApiKey,
    ModelNotAllowed,
    NotFound,
    MethodNotAllowed,
    ModelNotFound,
    BadRequest,
    HeadersTooLarge,
    UriTooLong,
    NoImages,
    TooManyImages,
    PayloadTooLarge,
    ImageTooLarge,
    UnsupportedMediaType,
    UndecodableImage,
    VideoTooLarge,
    UndecodableVideo,
    DecodeDeadlineExceeded,
    TenantConcurrencyLimit,
    RateLimited,
    BodyTimeout,
    UploadBudgetExhausted,
    TenantUploadBudgetExhausted,
    TooManyConnections,
    QueueFull,
    QueueTimeout,
    LoadShed,
    DeadlineExceeded,
    NotReady,
    ShuttingDown,
    WorkerCrashed,
    ExecutorCrashed,
    AdminKeyRequired,
    AdminDisabled,
    ChangeFailed,
    ModelNotLoaded,
    ConfigInvalid,
    SharedMemoryNotLocal,
    Internal,
}

impl Code {
    /// `(code, type, status, retry-after seconds)`: the whole table.
    pub fn row(self) -> (&'static str, &'static str, StatusCode, Option<u32>) {
        use Code::*;
        use StatusCode as S;
        match self {
            MissingApiKey => ("missing_api_key", "authentication", S::UNAUTHORIZED, None),
            InvalidApiKey => ("invalid_api_key", "authentication", S::UNAUTHORIZED, None),
            ModelNotAllowed => ("model_not_allowed", "permission", S::FORBIDDEN, None),
            NotFound => ("not_found", "invalid_request", S::NOT_FOUND, None),
            MethodNotAllowed => (
                "method_not_allowed",
                "invalid_request",
                S::METHOD_NOT_ALLOWED,
                None,
            ),
            ModelNotFound => ("model_not_found", "invalid_request", S::NOT_FOUND, None),
            BadRequest => ("bad_request", "invalid_request", S::BAD_REQUEST, None),
            HeadersTooLarge => (
                "headers_too_large",
                "invalid_request",
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
            ),
            UriTooLong => ("uri_too_long", "invalid_request", S::URI_TOO_LONG, None),
            NoImages => ("no_images", "invalid_request", S::BAD_REQUEST, None),
            TooManyImages => (
                "too_many_images",
                "invalid_request",
                S::PAYLOAD_TOO_LARGE,
                None,
            ),
            PayloadTooLarge => (
                "payload_too_large",
                "invalid_request",
                S::PAYLOAD_TOO_LARGE,
                None,
            ),
            ImageTooLarge => (
                "image_too_large",
                "invalid_request",
                S::PAYLOAD_TOO_LARGE,
                None,
            ),
            UnsupportedMediaType => (
                "unsupported_media_type",
                "invalid_request",
                S::UNSUPPORTED_MEDIA_TYPE,
                None,
            ),
            UndecodableImage => (
                "undecodable_image",
                "invalid_request",
                S::UNPROCESSABLE_ENTITY,
                None,
            ),
            VideoTooLarge => (
                "video_too_large",
                "invalid_request",
                S::PAYLOAD_TOO_LARGE,
                None,
            ),
            UndecodableVideo => (
                "undecodable_video",
                "invalid_request",
                S::UNPROCESSABLE_ENTITY,
                None,
            ),
            DecodeDeadlineExceeded => (
                "decode_deadline_exceeded",
                "invalid_request",
                S::UNPROCESSABLE_ENTITY,
                None,
            ),
            TenantConcurrencyLimit => (
                "tenant_concurrency_limit",
                "quota",
                S::TOO_MANY_REQUESTS,
                Some(1),
            ),
            RateLimited => ("rate_limited", "quota", S::TOO_MANY_REQUESTS, Some(1)),
            BodyTimeout => ("body_timeout", "invalid_request", S::REQUEST_TIMEOUT, None),
            UploadBudgetExhausted => (
                "upload_budget_exhausted",
                "overloaded",
                S::SERVICE_UNAVAILABLE,
                Some(1),
            ),
            TenantUploadBudgetExhausted => (
                "tenant_upload_budget_exhausted",
                "quota",
                S::TOO_MANY_REQUESTS,
                Some(1),
            ),
            TooManyConnections => (
                "too_many_connections",
                "overloaded",
                S::SERVICE_UNAVAILABLE,
                Some(1),
            ),
            QueueFull => ("queue_full", "overloaded", S::SERVICE_UNAVAILABLE, Some(1)),
            QueueTimeout => (
                "queue_timeout",
                "overloaded",
                S::SERVICE_UNAVAILABLE,
                Some(1),
            ),
            LoadShed => ("load_shed", "overloaded", S::SERVICE_UNAVAILABLE, Some(1)),
            DeadlineExceeded => ("deadline_exceeded", "deadline", S::GATEWAY_TIMEOUT, None),
            NotReady => ("not_ready", "unavailable", S::SERVICE_UNAVAILABLE, Some(1)),
            ShuttingDown => (
                "shutting_down",
                "unavailable",
                S::SERVICE_UNAVAILABLE,
                Some(5),
            ),
            WorkerCrashed => ("worker_crashed", "worker_failure", S::BAD_GATEWAY, None),
            ExecutorCrashed => ("executor_crashed", "worker_failure", S::BAD_GATEWAY, None),
            AdminKeyRequired => (
                "admin_key_required",
                "authentication",
                S::UNAUTHORIZED,
                None,
            ),
            AdminDisabled => ("admin_disabled", "permission", S::FORBIDDEN, None),
            ChangeFailed => (
                "change_failed",
                "unavailable",
                S::SERVICE_UNAVAILABLE,
                Some(5),
            ),
            ModelNotLoaded => (
                "model_not_loaded",
                "unavailable",
                S::SERVICE_UNAVAILABLE,
                Some(5),
            ),
            ConfigInvalid => (
                "config_invalid",
                "invalid_config",
                S::UNPROCESSABLE_ENTITY,
                None,
            ),
            SharedMemoryNotLocal => ("shared_memory_not_local", "permission", S::FORBIDDEN, None),
            Internal => ("internal", "internal", S::INTERNAL_SERVER_ERROR, None),
        }
    }

    /// The gateway refused the work for its own load or state, not the
    /// client's: the client's quota is given back.
    pub fn is_overload(self) -> bool {
        matches!(
            self,
            Code::QueueFull
                | Code::QueueTimeout
                | Code::LoadShed
                | Code::NotReady
                | Code::ModelNotLoaded
                | Code::ShuttingDown
        )
    }

    pub fn as_str(self) -> &'static str {
        self.row().0
    }

    pub fn status(self) -> StatusCode {
        self.row().2
    }
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `secs` seconds.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// `Retry-After` seconds: this error's own, else its code's.
    fn retry_secs(&self) -> Option<u32> {
        self.retry_after.or(self.code.row().3)
    }

    /// The same failure worded for a video: image codes become video codes.
    pub fn for_video(mut self) -> Self {
        self.code = match self.code {
            Code::ImageTooLarge => Code::VideoTooLarge,
            Code::UndecodableImage => Code::UndecodableVideo,
            other => other,
        };
        self
    }

    /// The same error, its message prefixed with where it happened.
    pub fn context(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let code = match e.kind {
            JobErrorKind::Unsupported => Code::UnsupportedMediaType,
            JobErrorKind::TooLarge => Code::ImageTooLarge,
            JobErrorKind::Undecodable => Code::UndecodableImage,
            JobErrorKind::Deadline => Code::DecodeDeadlineExceeded,
            JobErrorKind::Stale | JobErrorKind::Internal => Code::Internal,
        };
        ApiError::new(code, e.message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl ApiError {
    /// The JSON body every error answer carries.
    fn body(&self) -> serde_json::Value {
        let (code, kind, _, _) = self.code.row();
        json!({"error": {"code": code, "type": kind, "message": self.message}})
    }

    /// The whole HTTP/1.1 answer as bytes, for the connection layer, which
    /// answers before or instead of hyper: the same JSON body and
    /// `Retry-After` as [`IntoResponse`], and `Connection: close`.
    pub fn to_http1_closing(&self) -> Vec<u8> {
        let (_, _, status, _) = self.code.row();
        let retry = self.retry_secs();
        let body = self.body().to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some(secs) = retry {
            head.push_str(&format!("retry-after: {secs}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

impl ApiError {
    /// The answer to a request refused before its body was read: the rest
    /// of the body is still on the wire, so the connection is not reused
    /// (`Connection: close`; the connection layer then lingers, http.rs).
    pub fn into_closing_response(self) -> Response {
        let mut r = self.into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (_, _, status, _) = self.code.row();
        let retry = self.retry_secs();
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_overload_says_when_to_retry() {
        use Code::*;
        let all = [
            MissingApiKey,
            InvalidApiKey,
            ModelNotAllowed,
            NotFound,
            MethodNotAllowed,
            ModelNotFound,
            BadRequest,
            HeadersTooLarge,
            UriTooLong,
            NoImages,
            TooManyImages,
            PayloadTooLarge,
            ImageTooLarge,
            UnsupportedMediaType,
            UndecodableImage,
            VideoTooLarge,
            UndecodableVideo,
            DecodeDeadlineExceeded,
            TenantConcurrencyLimit,
            RateLimited,
            BodyTimeout,
            UploadBudgetExhausted,
            TenantUploadBudgetExhausted,
            TooManyConnections,
            QueueFull,
            QueueTimeout,
            LoadShed,
            DeadlineExceeded,
            NotReady,
            ShuttingDown,
            WorkerCrashed,
            ExecutorCrashed,
            AdminKeyRequired,
            AdminDisabled,
            ChangeFailed,
            ModelNotLoaded,
            ConfigInvalid,
            SharedMemoryNotLocal,
            Internal,
        ];
        let mut names: Vec<_> = all.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for c in all {
            let (_, _, status, retry) = c.row();
            if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS
            {
                assert!(retry.is_some(), "{c:?} needs Retry-After");
            }
        }
        let r = ApiError::new(QueueFull, "full").into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::new(RateLimited, "slow down").retry_after(7);
        assert!(
            String::from_utf8(r.to_http1_closing())
                .unwrap()
                .contains("retry-after: 7\r\n")
        );
        assert_eq!(r.into_response().headers()[header::RETRY_AFTER], "7");
    }
}
