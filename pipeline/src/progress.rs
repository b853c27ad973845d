//! Progress of long work: a bar with rate and ETA on a terminal, and where
//! stderr is not one (a log file, a batch job), a log line every
//! `PIPELINE_PROGRESS_SECS` seconds (default 30) with the same figures.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn on_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
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
    if on_terminal() {
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
    pb
}
