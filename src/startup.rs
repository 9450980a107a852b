//! Start-up progress: the phase the process is in before it serves (finding or downloading the
//! checkpoint, reading the weights) and each download's bytes, rate and ETA. The loader writes
//! it; the HTTP layer reports it on `/info` while `/ready` answers 503 (so a failing startup
//! probe can be read), and every phase goes to the log. A download shows as a progress bar when
//! stderr is a terminal and the logs are text, else as a log line every few seconds.
//!
//! A leaf: it uses nothing else in the crate.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often a running download is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Startup {
    started: Instant,
    state: Mutex<State>,
    /// Draw progress bars (stderr is a terminal showing text logs) instead of log lines.
    bars: bool,
}

#[derive(Debug)]
struct State {
    phase: String,
    phase_started: Instant,
    done: Vec<PhaseTime>,
    download: Option<Download>,
    files_downloaded: usize,
    bytes_downloaded: u64,
}

#[derive(Debug)]
struct Download {
    file: String,
    total: u64,
    bytes: u64,
    started: Instant,
    logged: Instant,
    bar: Option<indicatif::ProgressBar>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhaseTime {
    pub phase: String,
    pub seconds: f64,
}

/// What `/info` shows under `startup`.
#[derive(Debug, Clone, Serialize)]
pub struct StartupInfo {
    /// The current phase ("ready" once serving).
    pub phase: String,
    /// Since the process started loading.
    pub seconds: f64,
    /// Phases finished so far, with their times.
    pub phases: Vec<PhaseTime>,
    /// The file being downloaded, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadInfo>,
    pub files_downloaded: usize,
    pub bytes_downloaded: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadInfo {
    pub file: String,
    pub bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
}

impl Download {
    fn info(&self) -> DownloadInfo {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            self.bytes as f64 / elapsed
        } else {
            0.0
        };
        DownloadInfo {
            file: self.file.clone(),
            bytes: self.bytes,
            total_bytes: self.total,
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| self.total.saturating_sub(self.bytes) as f64 / rate),
        }
    }
}

impl Startup {
    /// Starts in phase `phase`; `bars`: draw downloads as progress bars on stderr (only
    /// where stderr is a terminal).
    pub fn new(phase: &str, bars: bool) -> Arc<Self> {
        tracing::info!(phase, "start-up phase");
        let now = Instant::now();
        Arc::new(Self {
            started: now,
            state: Mutex::new(State {
                phase: phase.to_string(),
                phase_started: now,
                done: Vec::new(),
                download: None,
                files_downloaded: 0,
                bytes_downloaded: 0,
            }),
            bars: bars && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is plain data, valid after any panic of a writer.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the current phase (logged with its time) and starts `next`; "ready" ends start-up.
    pub fn phase(&self, next: &str) {
        let mut s = self.state();
        let seconds = s.phase_started.elapsed().as_secs_f64();
        tracing::info!(phase = %s.phase, seconds, "start-up phase done");
        let finished = PhaseTime {
            phase: std::mem::replace(&mut s.phase, next.to_string()),
            seconds,
        };
        s.done.push(finished);
        s.phase_started = Instant::now();
        if next == "ready" {
            tracing::info!(
                seconds = self.started.elapsed().as_secs_f64(),
                "start-up done"
            );
        } else {
            tracing::info!(phase = next, "start-up phase");
        }
    }

    pub fn download_started(&self, file: &str, total_bytes: u64) {
        tracing::info!(file, total_bytes, "downloading");
        let now = Instant::now();
        let bar = self.bars.then(|| {
            let bar = indicatif::ProgressBar::new(total_bytes);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(file.to_string());
            bar
        });
        self.state().download = Some(Download {
            file: file.to_string(),
            total: total_bytes,
            bytes: 0,
            started: now,
            logged: now,
            bar,
        });
    }

    pub fn download_progress(&self, bytes: u64) {
        let mut s = self.state();
        let Some(d) = s.download.as_mut() else {
            return;
        };
        d.bytes += bytes;
        if let Some(bar) = &d.bar {
            bar.set_position(d.bytes);
        } else if d.logged.elapsed() >= LOG_EVERY {
            d.logged = Instant::now();
            let i = d.info();
            tracing::info!(
                file = %i.file,
                bytes = i.bytes,
                total_bytes = i.total_bytes,
                percent = format!("{:.1}", 100.0 * i.bytes as f64 / i.total_bytes.max(1) as f64),
                mb_per_second = format!("{:.1}", i.bytes_per_second / 1e6),
                eta_seconds = i.eta_seconds.map(|e| e.round() as u64),
                "downloading"
            );
        }
    }

    pub fn download_finished(&self) {
        let mut s = self.state();
        if let Some(d) = s.download.take() {
            if let Some(bar) = &d.bar {
                bar.finish_and_clear();
            }
            let seconds = d.started.elapsed().as_secs_f64();
            tracing::info!(file = %d.file, bytes = d.bytes, seconds, "downloaded");
            s.files_downloaded += 1;
            s.bytes_downloaded += d.bytes;
        }
    }

    pub fn info(&self) -> StartupInfo {
        let s = self.state();
        StartupInfo {
            phase: s.phase.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
            phases: s.done.clone(),
            download: s.download.as_ref().map(Download::info),
            files_downloaded: s.files_downloaded,
            bytes_downloaded: s.bytes_downloaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_recorded_in_order_and_downloads_counted() {
        let s = Startup::new("resolving", false);
        s.download_started("model.safetensors", 100);
        s.download_progress(40);
        let during = s.info();
        let d = during.download.expect("a download runs");
        assert_eq!((d.bytes, d.total_bytes), (40, 100));
        s.download_progress(60);
        s.download_finished();
        s.phase("loading");
        s.phase("ready");
        let info = s.info();
        assert_eq!(info.phase, "ready");
        let names: Vec<&str> = info.phases.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(names, ["resolving", "loading"]);
        assert_eq!((info.files_downloaded, info.bytes_downloaded), (1, 100));
        assert!(info.download.is_none());
    }
}
