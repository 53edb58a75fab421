//! The gateway's own OS threads (the SQLite writer and checkpointer, bounded file reads).
//!
//! Each carries the `tracing` dispatcher of the code that started it, so a gateway run
//! inside another program (a test runs several, each with its own log) logs from these
//! threads where it logs from its runtime; a process-wide subscriber is unaffected.
//!
//! Must not: start a thread without a name or an owner that ends it.

/// Starts a named thread that logs to the caller's current dispatcher.
pub fn spawn<T, F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || tracing::dispatcher::with_default(&dispatch, f))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// The lines a scoped subscriber wrote.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_thread_logs_where_the_code_that_started_it_logs() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            super::spawn("tether-test", || tracing::warn!("from the thread"))
                .unwrap()
                .join()
                .unwrap();
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("from the thread"), "{text:?}");
    }
}
