//! Progress of long work: a bar with rate and ETA on a terminal, and where
//! stderr is not one (a log file, a batch job), a log line every
//! `PIPELINE_PROGRESS_SECS` seconds (default 30) with the same figures.
//!
//! A host that draws progress itself (the Python module, with tqdm) calls
//! [`draw_elsewhere`]: bars then draw nothing and log nothing here, and the
//! host polls their state with [`live_bars`]. This is process-wide, as the
//! terminal the bars would draw on is.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, WeakProgressBar};

/// Set by [`draw_elsewhere`].
static HOSTED: AtomicBool = AtomicBool::new(false);
/// The bars made since [`draw_elsewhere`], while they live.
static LIVE: Mutex<Vec<(u64, &'static str, WeakProgressBar)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// From now on the host draws progress: bars are hidden and registered for
/// [`live_bars`].
pub fn draw_elsewhere() {
    HOSTED.store(true, Ordering::Relaxed);
}

/// What a host needs to draw one bar.
#[derive(Debug, Clone, PartialEq)]
pub struct BarState {
    /// Unique in the process, so a host can tell bars apart.
    pub id: u64,
    /// What is being done ("collect", a model's name and loss).
    pub message: String,
    pub position: u64,
    pub length: Option<u64>,
    /// "tok", "docs", "chunks", or "B" for bytes.
    pub unit: &'static str,
    pub finished: bool,
}

/// The bars alive now, oldest first (dropped ones are forgotten).
pub fn live_bars() -> Vec<BarState> {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let mut states = Vec::with_capacity(live.len());
    live.retain(|(id, unit, weak)| {
        let Some(pb) = weak.upgrade() else {
            return false;
        };
        states.push(BarState {
            id: *id,
            message: pb.message(),
            position: pb.position(),
            length: pb.length(),
            unit,
            finished: pb.is_finished(),
        });
        true
    });
    states
}

fn hosted() -> bool {
    HOSTED.load(Ordering::Relaxed)
}

/// Register `pb` for the host when it draws progress.
fn register(pb: &ProgressBar, unit: &'static str) {
    if hosted() {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(_, _, weak)| weak.upgrade().is_some());
        live.push((id, unit, pb.downgrade()));
    }
}

fn on_terminal() -> bool {
    !hosted() && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn log_every() -> Duration {
    let secs = std::env::var("PIPELINE_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// A count with k/M/G suffixes ("12.3k").
fn human(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.1}G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Off a terminal, log the bar's state every interval until it is finished
/// or dropped.
fn log_while_running(pb: &ProgressBar, unit: &'static str) {
    if on_terminal() || hosted() {
        return;
    }
    let weak = pb.downgrade();
    let every = log_every();
    std::thread::spawn(move || {
        let step = Duration::from_millis(200).min(every);
        let mut waited = Duration::ZERO;
        loop {
            std::thread::sleep(step);
            waited += step;
            let Some(pb) = weak.upgrade() else { return };
            if pb.is_finished() {
                return;
            }
            if waited < every {
                continue;
            }
            waited = Duration::ZERO;
            let (pos, len) = (pb.position(), pb.length().unwrap_or(0));
            let pct = if len > 0 {
                100.0 * pos as f64 / len as f64
            } else {
                0.0
            };
            let eta = pb.eta().as_secs();
            tracing::info!(
                "{}: {}/{} {unit} ({pct:.0}%, {} {unit}/s, ETA {}m{:02}s)",
                pb.message(),
                human(pos as f64),
                human(len as f64),
                human(pb.per_sec()),
                eta / 60,
                eta % 60
            );
        }
    });
}

fn draw_target() -> ProgressDrawTarget {
    if on_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar over `len` units (`unit` names them: "tok", "chunks", "docs").
pub fn bar(len: u64, what: &str, unit: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), draw_target());
    let template =
        format!("{{msg:>10}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, ETA {{eta}})");
    pb.set_style(
        ProgressStyle::with_template(&template)
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    log_while_running(&pb, unit);
    register(&pb, unit);
    pb
}

/// A bar over bytes.
pub fn bytes_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), draw_target());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    log_while_running(&pb, "B");
    register(&pb, "B");
    pb
}
