//! Progress of a long replay, on one stderr line rewritten in place, shown only when
//! stderr is a terminal: logs, pipes and CI output stay free of carriage returns.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

/// Redraws at most this often (a replay finishes thousands of batches a second).
const EVERY: Duration = Duration::from_millis(100);

/// One progress line: `label: done/total unit (elapsed)`.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    label: String,
    unit: &'static str,
    total: usize,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// A progress line for `total` items of `unit`, shown only if stderr is a terminal.
    pub fn new(label: impl Into<String>, total: usize, unit: &'static str) -> Self {
        Self::with_terminal(label, total, unit, std::io::stderr().is_terminal())
    }

    /// [`Progress::new`] with the terminal test decided by the caller.
    pub fn with_terminal(
        label: impl Into<String>,
        total: usize,
        unit: &'static str,
        enabled: bool,
    ) -> Self {
        Self {
            enabled,
            label: label.into(),
            unit,
            total,
            started: Instant::now(),
            drawn: None,
        }
    }

    /// The line for `done` items, as drawn.
    pub fn line(&self, done: usize) -> String {
        format!(
            "{}: {done}/{} {} ({:.1} s)",
            self.label,
            self.total,
            self.unit,
            self.started.elapsed().as_secs_f64()
        )
    }

    /// Reports `done` items finished; redraws when enough time passed or at the end.
    pub fn update(&mut self, done: usize) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if done < self.total && self.drawn.is_some_and(|t| now - t < EVERY) {
            return;
        }
        self.drawn = Some(now);
        let mut err = std::io::stderr().lock();
        // `\r` and erase-line: the line is replaced, never scrolled.
        let _ = write!(err, "\r\x1b[2K{}", self.line(done));
        let _ = err.flush();
    }

    /// Erases the line (the caller prints its result instead).
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.take().is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_the_terminal_nothing_is_drawn() {
        let mut p = Progress::with_terminal("nab", 35, "series", false);
        p.update(35);
        assert!(p.drawn.is_none());
        assert!(p.line(7).starts_with("nab: 7/35 series ("), "{}", p.line(7));
    }
}
