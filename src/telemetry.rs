//! Logging: structured `tracing` to stderr, text or JSON; RUST_LOG overrides --log-level.
//!
//! A plain `--log-level debug|trace` is the agent's own detail: its libraries (hyper, h2,
//! tonic, kube) stay at `info`, or their frame-by-frame logs drown the agent's. A full
//! filter directive (`info,kube=debug`) is taken as it is.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(directive(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal: in a file or a container log they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// warp logs every client that goes away mid-answer (each stopped log follower) as an
/// ERROR "server connection error": nothing to act on, so a plain level silences it.
const QUIET: &str = "warp::server=off";

fn directive(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        l @ ("debug" | "trace") => format!("info,task_executor={l},{QUIET}"),
        l if !l.contains(['=', ',']) => format!("{l},{QUIET}"),
        _ => level.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::directive;

    #[test]
    fn agent_detail_does_not_turn_on_library_detail() {
        assert_eq!(
            directive("debug"),
            "info,task_executor=debug,warp::server=off"
        );
        assert_eq!(
            directive("TRACE"),
            "info,task_executor=trace,warp::server=off"
        );
        assert_eq!(directive("warn"), "warn,warp::server=off");
        assert_eq!(directive("info,kube=debug"), "info,kube=debug");
    }
}
