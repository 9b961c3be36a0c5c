//! CRI call latency for the metrics: a tower service around the gRPC channel that times
//! every call under its method's name (e.g. `ContainerStatus`). For a streaming call
//! (container events) it is the time to the stream's start.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::transport::Channel;
use tower_service::Service;

#[derive(Clone, Debug)]
pub struct Timed(pub Channel);

type Answer = Result<http::Response<Body>, tonic::transport::Error>;

impl Service<http::Request<Body>> for Timed {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // "/runtime.v1.RuntimeService/ContainerStatus" → "ContainerStatus"
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let start = Instant::now();
        let call = self.0.call(req);
        Box::pin(async move {
            let answer = call.await;
            crate::metrics::cri_call(&method, start.elapsed());
            answer
        })
    }
}
