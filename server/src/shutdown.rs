//! Shutdown: the OS signals that start it, and the token every long task selects on.
//!
//! The sequence lives in [`crate::server::Server::serve`] (`docs/architecture.md`,
//! "Shutdown and drain"): health NOT_SERVING and `/readyz` 503, stop accepting, let
//! open streams answer what they received and end with `UNAVAILABLE`, flush snapshots,
//! all inside `SHUTDOWN_TIMEOUT`.

/// Listens for SIGTERM and SIGINT (Ctrl-C) from this call on; the future resolves on
/// the first of them. Call it before binding: until a handler is installed, SIGTERM
/// kills the process at once, without the drain, so a signal sent right after the
/// server says it listens must already find the handler. Needs a runtime context.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => tracing::info!("received SIGTERM, shutting down"),
                    _ = interrupt.recv() => tracing::info!("received SIGINT, shutting down"),
                },
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("received Ctrl-C, shutting down");
        }
    }
}
