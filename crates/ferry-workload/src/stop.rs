//! Stop conditions shared by the clients: duration, a stop file, SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

extern "C" fn exit_now(_sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

/// Lets a test end a background client with `kill -TERM` and still get its summary.
pub fn install_term_flag() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
}

/// As PID 1 of a container the server would otherwise ignore SIGTERM and make every
/// `docker stop` wait out its 10 s grace period.
pub fn install_exit_on_term() {
    // SAFETY: the handler only calls _exit, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, exit_now as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, exit_now as *const () as libc::sighandler_t);
    }
}

pub struct Stop {
    deadline: Option<Instant>,
    stop_file: Option<PathBuf>,
}

/// Longest sleep between stop checks, so a stop request is honoured promptly even with long intervals.
const SLICE: Duration = Duration::from_millis(20);

impl Stop {
    pub fn new(duration: Option<Duration>, stop_file: Option<PathBuf>) -> Stop {
        Stop {
            deadline: duration.map(|d| Instant::now() + d),
            stop_file,
        }
    }

    /// Why the run should end now, if it should.
    pub fn reason(&self) -> Option<&'static str> {
        if TERMINATED.load(Ordering::SeqCst) {
            return Some("signal");
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some("duration");
        }
        if self.stop_file.as_ref().is_some_and(|p| p.exists()) {
            return Some("stop-file");
        }
        None
    }

    /// Sleeps until `until`, returning early with the reason if a stop condition appears.
    pub fn sleep_until(&self, until: Instant) -> Option<&'static str> {
        loop {
            if let Some(r) = self.reason() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            thread::sleep((until - now).min(SLICE));
        }
    }
}
