//! The router: every request passes the credential check ([`super::auth::caller`]),
//! then `dispatch`, which matches the
//! one parse of its path ([`Route`]) by hand: so every known path answers a wrong method
//! with 405 + `Allow`, HEAD as GET, and every miss with a JSON 404. A rejection (a refused
//! caller, a malformed header) becomes its JSON answer in `api::error::recover`. Each
//! answer is logged and counted by the connection that serves it (`api::access_log`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter};

use super::auth::Caller;
use super::error::ApiError;
use super::handlers::{self, AppState};
use super::route::Route;
use super::server::ClientGone;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    super::auth::caller(state.auth.clone())
        .and(warp::method())
        .and(super::route::filter())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        // A header that fails to parse (e.g. a bogus Content-Length) rejects: 400.
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ClientGone>())
        .and(warp::body::stream())
        .and_then(
            move |caller: Caller,
                  method,
                  route,
                  query: String,
                  len,
                  headers: HeaderMap,
                  gone: Option<ClientGone>,
                  body| {
                let state = state.clone();
                async move {
                    let request = Request {
                        method,
                        route,
                        query: &query,
                        len,
                        headers: &headers,
                        gone: gone.map(|g| g.0).unwrap_or_default(),
                    };
                    let mut resp = dispatch(state, request, body)
                        .await
                        .unwrap_or_else(ApiError::into_response);
                    // For the access log's line; only a name is worth the extensions'
                    // allocation.
                    if let Caller::User(_) = caller {
                        resp.extensions_mut().insert(caller);
                    }
                    Ok::<_, warp::Rejection>(resp)
                }
            },
        )
        .recover(super::error::recover)
        .unify()
}

/// What `dispatch` needs of a request besides its body.
struct Request<'a> {
    method: Method,
    route: Route,
    query: &'a str,
    len: Option<u64>,
    headers: &'a HeaderMap,
    /// Cancelled once the client has closed its side (see `ClientGone`); never without a
    /// connection that reports it.
    gone: CancellationToken,
}

async fn dispatch<S, B>(
    state: Arc<AppState>,
    req: Request<'_>,
    body: S,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: Buf,
{
    let Request {
        method,
        route,
        query,
        len,
        headers,
        gone,
    } = req;
    let get = method == Method::GET || method == Method::HEAD;
    match (&route, &method) {
        (Route::Health, _) if get => Ok(handlers::health()),
        (Route::Readyz, _) if get => Ok(handlers::readyz(&state).await),
        (Route::Metrics, _) if get => Ok(super::scrape::metrics(&state, headers)),
        (Route::OpenApi, _) if get => Ok(super::openapi::serve()),
        (Route::GetTasks, _) if get => Ok(handlers::list(&state)),
        (Route::SetTasks, &Method::POST) => {
            handlers::sync(&state, read_body(body, len, &state).await?, query).await
        }
        (Route::Tasks, &Method::POST) => {
            handlers::create(&state, read_body(body, len, &state).await?, query).await
        }
        (Route::Task(name), _) if get => match wait_param(query)? {
            Some(wait) => handlers::get_when_settled(&state, name, wait, &gone).await,
            None => handlers::get(&state, name),
        },
        (Route::Task(name), &Method::DELETE) => handlers::delete(&state, name).await,
        (Route::TaskLogs(name), _) if get => super::logs::logs(&state, name, query, gone).await,
        (Route::Unmatched(path), _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for {path}"),
        )),
        _ => Err(ApiError::method_not_allowed(
            route.allow().unwrap_or("GET, HEAD"),
        )),
    }
}

/// `?wait=30s`: long-poll until the task has terminated (at most 5 minutes).
fn wait_param(query: &str) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(raw) = query.split('&').find_map(|kv| kv.strip_prefix("wait=")) else {
        return Ok(None);
    };
    let text = percent_decode_str(raw).decode_utf8_lossy();
    let d = humantime::parse_duration(&text)
        .map_err(|e| ApiError::bad_request(format!("wait={text}: {e} (e.g. wait=30s)")))?;
    Ok(Some(d.min(std::time::Duration::from_secs(300))))
}

/// Reads the body within the request timeout (408 after it) and up to the size limit
/// (413 beyond, whether announced or streamed).
async fn read_body<S, B>(body: S, len: Option<u64>, state: &AppState) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: Buf,
{
    tokio::time::timeout(state.body_timeout, read_limited(body, len, state.max_body))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            ))
        })
}

async fn read_limited<S, B>(mut body: S, len: Option<u64>, max: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {max} bytes"),
        )
    };
    if len.is_some_and(|l| l > max as u64) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(len.unwrap_or(0).min(max as u64) as usize);
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        if buf.len() + chunk.remaining() > max {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(buf))
}
