//! Routing. One filter takes method, path and body and dispatches by hand, so every
//! path answers a wrong method with 405 + `Allow`, and every miss with a JSON 404.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use tokio_util::sync::CancellationToken;
use warp::http::{Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter};

use super::error::ApiError;
use super::handlers::{self, AppState};
use super::route::Route;
use super::server::ClientGone;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    // Every request passes the credential check first; a refusal is the answer.
    super::auth::guard(state.auth.clone())
        .or(api_routes(state))
        .unify()
}

fn api_routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ClientGone>())
        .and(warp::body::stream())
        .and_then(
            move |method,
                  path: warp::path::FullPath,
                  query: String,
                  len,
                  headers,
                  gone: Option<ClientGone>,
                  body| {
                let state = state.clone();
                async move {
                    let access =
                        super::access::Access::start(&method, &Route::parse(path.as_str()));
                    let request = Request {
                        method,
                        path: path.as_str(),
                        query: &query,
                        len,
                        headers: &headers,
                        gone: gone.map(|g| g.0).unwrap_or_default(),
                    };
                    let resp = dispatch(state, request, body)
                        .await
                        .unwrap_or_else(ApiError::into_response);
                    access.finish(&resp);
                    Ok::<_, Infallible>(resp)
                }
            },
        )
        // A header that fails to parse (e.g. a bogus Content-Length) lands here.
        .recover(|_| async {
            Ok::<_, Infallible>(ApiError::bad_request("malformed request headers").into_response())
        })
        .unify()
}

/// What `dispatch` needs of a request besides its body.
struct Request<'a> {
    method: Method,
    path: &'a str,
    query: &'a str,
    len: Option<u64>,
    headers: &'a warp::http::HeaderMap,
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
        path,
        query,
        len,
        headers,
        gone,
    } = req;
    let route = Route::parse(path);
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
        (Route::Unmatched(_), _) => Err(ApiError::new(
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
