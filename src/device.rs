//! Which device the model runs on: `--device cpu | cuda[:N]` parsed, opened and described.
//!
//! A leaf: it knows candle's `Device` and nothing of models, kernels or HTTP. CUDA exists only
//! in builds with the `cuda` cargo feature; anywhere else asking for it is a one-line error at
//! start, as is a CUDA build on a machine without a usable GPU (candle's driver error, named).

use std::fmt;

use candle_core::Device;

/// A device as the settings name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA device by ordinal (`cuda` alone is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu`, `cuda` or `cuda:N`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "cpu" => return Ok(Self::Cpu),
            "cuda" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        text.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Self::Cuda)
            .ok_or_else(|| format!("{text:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""))
    }

    /// True when this build can open the device at all (the GPU may still be missing).
    pub fn compiled_in(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// Opens the device, or says in one line why it cannot be.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace to CUDA errors (when RUST_BACKTRACE asks): the first line
        // is the error.
        let text = e.to_string();
        let detail = text.lines().next().unwrap_or_default().trim();
        format!("cannot open cuda:{ordinal}: {detail} (is a GPU present, and its driver loaded?)")
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    Err(format!(
        "cuda:{ordinal} was asked for, but this binary was built without CUDA; build it with \
         `cargo build --release --features cuda` (see README, \"GPU\") or use --device cpu"
    ))
}

/// Where a tensor lives as `/info` reports it: "cpu", "cuda:0", "metal:0".
pub fn location(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The hardware's own name: the GPU's as its driver reports it, the CPU's model name from
/// /proc/cpuinfo; empty where neither can be read.
pub fn hardware_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda.cuda_stream().context().name().unwrap_or_default(),
        _ => cpu_model_name(),
    }
}

fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms_and_refuses_the_rest() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "cuda:0:1"] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn the_cpu_opens_and_cuda_says_why_not_without_the_feature() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err();
            assert!(e.contains("built without CUDA") && !e.contains('\n'), "{e}");
            assert!(!DeviceSpec::Cuda(0).compiled_in());
        }
    }
}
