//! The one place that turns fencegate's own answers into HTTP: every refusal
//! is a [`Reason`], rendered as `application/problem+json` (RFC 9457) with a
//! `Fencegate-Reason` header so a writer can tell it from the store's own
//! answers. No other module knows a status code.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

/// Every answer fencegate makes itself, by what the writer should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// 428: a write without a token.
    MissingToken,
    /// 400: a token that is not a positive int64, or given twice.
    MalformedToken,
    /// 400: a path fencegate will not forward.
    BadPath,
    /// 400: a request that breaks the HTTP rules fencegate relies on.
    BadRequest,
    /// 403: a write outside every domain.
    NoDomain,
    /// 403: COPY or MOVE into another domain.
    CrossDomain,
    /// 405: CONNECT; fencegate never tunnels.
    MethodNotAllowed,
    /// 431: the request head is larger than `server.max_header_bytes`.
    HeaderTooLarge,
    /// 501: a transfer coding other than `chunked`, which fencegate would
    /// have to undo to frame the request.
    NotImplemented,
    /// 412: the token is below the domain's refusal mark.
    StaleEpoch,
    /// 412: the token belongs to a leader that has been replaced.
    SupersededLeader,
    /// 412: the token is not the current leader's.
    NotLeader,
    /// 412: the election has no leader.
    NoLeader,
    /// 503: etcd cannot be reached, so the leader is unknown.
    CoordinatorUnavailable,
    /// 503: etcd's revision is below a stored epoch (restored from an old backup).
    CoordinatorRegressed,
    /// 503: the epoch could not be made durable.
    StateUnavailable,
    /// 502: the store could not be reached or broke the exchange.
    UpstreamUnreachable,
    /// 502: the store answered with something fencegate will not pass on.
    UpstreamBadResponse,
    /// 504: the store did not answer within `upstream.request_timeout`.
    UpstreamTimeout,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 19] = [
        Reason::MissingToken,
        Reason::MalformedToken,
        Reason::BadPath,
        Reason::BadRequest,
        Reason::NoDomain,
        Reason::CrossDomain,
        Reason::MethodNotAllowed,
        Reason::HeaderTooLarge,
        Reason::NotImplemented,
        Reason::StaleEpoch,
        Reason::SupersededLeader,
        Reason::NotLeader,
        Reason::NoLeader,
        Reason::CoordinatorUnavailable,
        Reason::CoordinatorRegressed,
        Reason::StateUnavailable,
        Reason::UpstreamUnreachable,
        Reason::UpstreamBadResponse,
        Reason::UpstreamTimeout,
    ];

    /// The machine-readable name: `Fencegate-Reason`, problem `reason`, metric outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingToken => "missing_token",
            Reason::MalformedToken => "malformed_token",
            Reason::BadPath => "bad_path",
            Reason::BadRequest => "bad_request",
            Reason::NoDomain => "no_domain",
            Reason::CrossDomain => "cross_domain",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::NotImplemented => "not_implemented",
            Reason::StaleEpoch => "stale_epoch",
            Reason::SupersededLeader => "superseded_leader",
            Reason::NotLeader => "not_leader",
            Reason::NoLeader => "no_leader",
            Reason::CoordinatorUnavailable => "coordinator_unavailable",
            Reason::CoordinatorRegressed => "coordinator_regressed",
            Reason::StateUnavailable => "state_unavailable",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamBadResponse => "upstream_bad_response",
            Reason::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The status code of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::MissingToken => StatusCode::PRECONDITION_REQUIRED,
            Reason::MalformedToken | Reason::BadPath | Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::NoDomain | Reason::CrossDomain => StatusCode::FORBIDDEN,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            Reason::StaleEpoch | Reason::SupersededLeader | Reason::NotLeader | Reason::NoLeader => {
                StatusCode::PRECONDITION_FAILED
            }
            Reason::CoordinatorUnavailable | Reason::CoordinatorRegressed | Reason::StateUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::UpstreamUnreachable | Reason::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Reason::MissingToken => "Fencing token required",
            Reason::MalformedToken => "Malformed fencing token",
            Reason::BadPath => "Path refused",
            Reason::BadRequest => "Request refused",
            Reason::NoDomain => "Path outside every fenced domain",
            Reason::CrossDomain => "Destination in another domain",
            Reason::MethodNotAllowed => "Method not allowed",
            Reason::HeaderTooLarge => "Request header fields too large",
            Reason::NotImplemented => "Transfer coding not supported",
            Reason::StaleEpoch => "Fenced: stale epoch",
            Reason::SupersededLeader => "Fenced: superseded leader",
            Reason::NotLeader => "Fenced: not the leader",
            Reason::NoLeader => "Fenced: no leader",
            Reason::CoordinatorUnavailable => "Coordinator unavailable",
            Reason::CoordinatorRegressed => "Coordinator regressed",
            Reason::StateUnavailable => "Epoch state unavailable",
            Reason::UpstreamUnreachable => "Store unreachable",
            Reason::UpstreamBadResponse => "Bad response from the store",
            Reason::UpstreamTimeout => "Store timed out",
        }
    }

    /// What the writer should do, appended to every detail.
    fn advice(self) -> &'static str {
        match self.status() {
            StatusCode::PRECONDITION_FAILED => "you are fenced: stop writing and campaign again",
            StatusCode::SERVICE_UNAVAILABLE => "retry later",
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => {
                "unless nothing was sent, the store's outcome is unknown"
            }
            _ => "fix the request",
        }
    }
}

/// One answer of fencegate's own, with what is known about the refusal.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Why.
    pub reason: Reason,
    /// A sentence for humans.
    pub detail: String,
    /// The domain the request fell in, if any.
    pub domain: Option<String>,
    /// The request's token, if it had a valid one.
    pub token: Option<u64>,
    /// The domain's epoch when the decision was made.
    pub epoch: Option<u64>,
    /// The leader revision the decision used.
    pub leader: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'static str,
    status: u16,
    detail: String,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<u64>,
}

/// The `Allow` of a 405: the methods of HTTP and WebDAV that fencegate
/// forwards (any other but CONNECT is forwarded too).
const FORWARDED_METHODS: &str =
    "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH, PROPFIND, PROPPATCH, MKCOL, COPY, MOVE, LOCK, UNLOCK";

/// Seconds a writer should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";

impl Problem {
    /// A problem with only a reason and a detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Problem {
        Problem {
            reason,
            detail: detail.into(),
            domain: None,
            token: None,
            epoch: None,
            leader: None,
        }
    }

    /// Renders the answer. `close` adds `Connection: close`, for refusals
    /// whose request body was never read.
    pub fn into_response(self, close: bool) -> Response<Full<Bytes>> {
        let status = self.reason.status();
        let body = Body {
            r#type: format!("https://fencegate.dev/problems/{}", self.reason.as_str()),
            title: self.reason.title(),
            status: status.as_u16(),
            detail: format!("{}; {}", self.detail, self.reason.advice()),
            reason: self.reason.as_str(),
            domain: self.domain.as_deref(),
            token: self.token,
            epoch: self.epoch,
            leader: self.leader,
        };
        let json = serde_json::to_vec(&body).expect("a problem always serializes");
        let mut response = Response::new(Full::new(Bytes::from(json)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert("fencegate-reason", HeaderValue::from_static(self.reason.as_str()));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // A 405 must say what is allowed (RFC 9110 §15.5.6): every
            // method but CONNECT goes to the store, which decides.
            headers.insert(ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
        }
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// An error with its causes, for logs and details: the top of a chain often
/// says little (tonic's "transport error", hyper's "client error
/// (Connect)"); the reason (a certificate, a refused connection) is further
/// down. A cause whose text is already there is not repeated.
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn problem_json_carries_reason_and_context() {
        let mut problem = Problem::new(Reason::StaleEpoch, "token 4 is below the refusal mark 7");
        problem.domain = Some("orders".into());
        problem.token = Some(4);
        problem.epoch = Some(7);
        let response = problem.into_response(true);
        assert_eq!(response.status(), 412);
        assert_eq!(response.headers()["fencegate-reason"], "stale_epoch");
        assert_eq!(response.headers()["connection"], "close");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["status"], 412);
        assert_eq!(json["reason"], "stale_epoch");
        assert_eq!(json["domain"], "orders");
        assert_eq!(json["token"], 4);
        assert_eq!(json["epoch"], 7);
        assert!(json.get("leader").is_none());
        assert!(json["detail"].as_str().unwrap().contains("campaign again"));
    }

    #[test]
    fn unavailable_answers_say_when_to_retry() {
        for reason in Reason::ALL {
            let response = Problem::new(reason, "x").into_response(false);
            let has_retry = response.headers().contains_key(RETRY_AFTER);
            assert_eq!(has_retry, reason.status() == 503, "{reason:?}");
        }
    }
}
