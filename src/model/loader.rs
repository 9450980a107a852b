//! Finds a checkpoint's files (a local directory or a Hub id through hf-hub) and reads its
//! safetensors weights, single-file or sharded (`model.safetensors.index.json`).
//!
//! Two ways to hold the weights. Mapped (an f32 load on the CPU, the default): each file is
//! mapped read-only. Unquantised, the mapping is populated at open and the linear layers'
//! weights, nearly all the bytes, are borrowed from it ([`MappedSource`]): the page cache's
//! pages are the weights, so a replica starting on a host whose page cache holds the files
//! reads nothing and copies nothing. Quantised, each linear weight is quantised straight from
//! the mapping and its pages released ([`Mapping::OnDemand`]). Everything else (norms,
//! embeddings, biases, the unquantised layers of a quantised load, every weight of a non-f32
//! load) is read with positioned reads straight into candle tensors, which own their storage:
//! mapping those too would hold a second copy of every page until the load ends.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{ModelError, Result};
use crate::nn::linear::MappedF32;
use crate::nn::MappedSource;
use crate::startup::Startup;

/// Where a model comes from: a directory on disk, or a Hub repository at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo_id: String, revision: String },
}

impl ModelSource {
    /// A path that exists is a local directory; anything else is taken as a Hub id.
    pub fn parse(model: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        if path.exists() {
            return Err(ModelError::Files(format!(
                "--model {model:?} is a file; pass the checkpoint's directory or a Hub id"
            )));
        }
        let looks_like_hub_id = !model.is_empty()
            && !model.starts_with('/')
            && !model.starts_with('.')
            && model.split('/').count() <= 2
            && model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !looks_like_hub_id {
            return Err(ModelError::Files(format!(
                "--model {model:?}: no such directory, and not a Hub id like \"Salesforce/blip2-opt-2.7b\""
            )));
        }
        Ok(ModelSource::Hub {
            repo_id: model.to_string(),
            revision: revision.unwrap_or("main").to_string(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub { repo_id, revision } => format!("{repo_id}@{revision}"),
        }
    }
}

/// The files of one checkpoint, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub preprocessor_config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
}

const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Resolves one repository file to a local path, or says why it cannot.
type FetchFile = Box<dyn Fn(&str) -> std::result::Result<PathBuf, String>>;

/// hf-hub's download callbacks, passed on to the start-up report.
struct HubProgress(Arc<Startup>);

impl hf_hub::api::Progress for HubProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.download_started(filename, size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.download_progress(size as u64);
    }
    fn finish(&mut self) {
        self.0.download_finished();
    }
}

#[derive(Deserialize)]
struct WeightsIndex {
    weight_map: HashMap<String, String>,
}

/// The distinct shard file names of an index, in first-seen order of sorted tensor names.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path)
        .map_err(|e| ModelError::Files(format!("{}: {e}", index_path.display())))?;
    let index: WeightsIndex = serde_json::from_str(&text)
        .map_err(|e| ModelError::Files(format!("{}: {e}", index_path.display())))?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    // A shard is a file of the checkpoint: a name that climbs out of it (`..`, an absolute
    // path) would open, or ask the Hub for, a file that is not the model's.
    if let Some(bad) = names.iter().find(|n| !is_repo_relative(n)) {
        return Err(ModelError::Files(format!(
            "{}: weight_map names the shard {bad:?}, which is not a file inside the checkpoint",
            index_path.display()
        )));
    }
    if names.is_empty() {
        return Err(ModelError::Files(format!(
            "{}: weight_map is empty",
            index_path.display()
        )));
    }
    Ok(names)
}

/// A relative path with only normal components (no `..`, root, prefix or empty name).
fn is_repo_relative(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

impl ModelFiles {
    pub fn resolve(source: &ModelSource) -> Result<Self> {
        Self::resolve_reporting(source, None)
    }

    /// As [`resolve`](Self::resolve), reporting each download's progress to `startup`.
    pub fn resolve_reporting(source: &ModelSource, startup: Option<Arc<Startup>>) -> Result<Self> {
        match source {
            ModelSource::Local(dir) => Self::from_dir(dir),
            ModelSource::Hub { repo_id, revision } => Self::from_hub(repo_id, revision, startup),
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let required = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::Files(format!(
                    "{} is missing from the model directory {}",
                    name,
                    dir.display()
                )))
            }
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let weights = if let Some(index) = optional(WEIGHTS_INDEX) {
            let mut paths = Vec::new();
            for shard in shard_names(&index)? {
                let p = dir.join(&shard);
                if !p.is_file() {
                    return Err(ModelError::Files(format!(
                        "weights shard {shard} (listed in {WEIGHTS_INDEX}) is missing from {}",
                        dir.display()
                    )));
                }
                paths.push(p);
            }
            paths
        } else {
            vec![required(SINGLE_WEIGHTS).map_err(|_| {
                ModelError::Files(format!(
                    "no weights in {}: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} with its shards",
                    dir.display()
                ))
            })?]
        };
        Ok(ModelFiles {
            config: required("config.json")?,
            preprocessor_config: required("preprocessor_config.json")?,
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            weights,
        })
    }

    /// Downloads (or finds in the HF cache) the files of a Hub repository. Honours `HF_HOME`,
    /// `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE=1` (cache only).
    pub fn from_hub(repo_id: &str, revision: &str, startup: Option<Arc<Startup>>) -> Result<Self> {
        use hf_hub::{Cache, Repo, RepoType};
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
            .unwrap_or(false);
        let cache = Cache::from_env();
        let hint = "pass a local directory with --model /path/to/checkpoint instead";
        let fetch: FetchFile = if offline {
            let cache_repo = cache.repo(repo.clone());
            let cache_dir = cache.path().clone();
            Box::new(move |name: &str| {
                cache_repo.get(name).ok_or_else(|| {
                    format!(
                        "{name} is not in the HF cache ({}) and HF_HUB_OFFLINE is set",
                        cache_dir.display()
                    )
                })
            })
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| ModelError::Files(format!("hf-hub: {e}")))?;
            let api_repo = api.repo(repo.clone());
            let cache_repo = cache.repo(repo.clone());
            Box::new(move |name: &str| {
                if let Some(p) = cache_repo.get(name) {
                    return Ok(p);
                }
                let fetched = match &startup {
                    Some(s) => api_repo.download_with_progress(name, HubProgress(s.clone())),
                    None => api_repo.download(name),
                };
                fetched.map_err(|e| format!("could not fetch {name}: {e}"))
            })
        };
        let err =
            |msg: String| ModelError::Files(format!("model {repo_id}@{revision}: {msg}; {hint}"));
        let optional = |name: &str| fetch(name).ok();
        let weights = match fetch(WEIGHTS_INDEX) {
            Ok(index) => shard_names(&index)?
                .iter()
                .map(|s| fetch(s).map_err(err))
                .collect::<Result<Vec<_>>>()?,
            Err(index_err) => match fetch(SINGLE_WEIGHTS) {
                Ok(p) => vec![p],
                Err(single_err) => return Err(err(format!("{index_err}; {single_err}"))),
            },
        };
        Ok(ModelFiles {
            config: fetch("config.json").map_err(err)?,
            preprocessor_config: fetch("preprocessor_config.json").map_err(err)?,
            tokenizer: fetch("tokenizer.json").map_err(err)?,
            tokenizer_config: optional("tokenizer_config.json"),
            weights,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
struct TensorHeader {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Every tensor of a (possibly sharded) safetensors checkpoint, read on demand.
/// `n` little-endian values of a plain numeric type, read by `read` into a fresh buffer (advised
/// onto 2 MiB pages: fewer page faults while gigabytes arrive, fewer TLB misses when decode
/// streams them).
fn read_typed<T: Copy + Default>(
    n: usize,
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let mut values = vec![T::default(); n];
    let bytes = n * std::mem::size_of::<T>();
    crate::kernels::cpu::memory::advise_huge_pages(values.as_ptr() as *const u8, bytes);
    // SAFETY: T is a plain numeric type (f32, f16, bf16): every byte pattern is a value, and
    // the slice covers exactly the vector's initialised elements.
    let raw = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, bytes) };
    read(raw)?;
    if cfg!(target_endian = "big") {
        return Err(candle_core::Error::Msg(
            "safetensors are little-endian; big-endian hosts are not supported".into(),
        ));
    }
    Ok(values)
}

/// Whether [`SafetensorsWeights`] maps its files besides reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Tensors are only read (positioned reads).
    Read,
    /// Mapped, and every page populated at open (read from the disk if the page cache lacks
    /// it), so that no request pays for it later: the mapping is the weights.
    Populated,
    /// Mapped, pages faulted in as they are first read: a weight quantised from the mapping.
    OnDemand,
}

pub struct SafetensorsWeights {
    files: Vec<(PathBuf, File)>,
    /// Each file's mapping, when opened with `map`.
    maps: Vec<Option<Arc<memmap2::Mmap>>>,
    entries: HashMap<String, TensorEntry>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        _ => return None,
    })
}

impl SafetensorsWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        Self::open_with(paths, Mapping::Read)
    }

    /// Opens the files, and maps them as `mapping` says.
    pub fn open_with(paths: &[PathBuf], mapping: Mapping) -> Result<Self> {
        let mut files = Vec::new();
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bad = |msg: String| ModelError::Weights(format!("{}: {msg}", path.display()));
            let file = File::open(path).map_err(|e| bad(e.to_string()))?;
            let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
            let mut len_bytes = [0u8; 8];
            file.read_exact_at(&mut len_bytes, 0)
                .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
            let header_len = u64::from_le_bytes(len_bytes);
            if header_len > 100_000_000 || 8 + header_len > file_len {
                return Err(bad("not a safetensors file (bad header length)".into()));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| bad(e.to_string()))?;
            let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| bad(format!("bad safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, value) in header {
                if name == "__metadata__" {
                    continue;
                }
                let h: TensorHeader = serde_json::from_value(value)
                    .map_err(|e| bad(format!("tensor {name}: {e}")))?;
                let dtype = parse_dtype(&h.dtype)
                    .ok_or_else(|| bad(format!("tensor {name}: unsupported dtype {}", h.dtype)))?;
                // Checked: a header may claim anything (offsets near u64::MAX, dimensions whose
                // product overflows), and it must be refused, never wrap or panic.
                let range = data_start
                    .checked_add(h.data_offsets.0)
                    .zip(data_start.checked_add(h.data_offsets.1));
                let expected = h
                    .shape
                    .iter()
                    .try_fold(dtype.size_in_bytes() as u64, |n, &d| {
                        n.checked_mul(d as u64)
                    });
                let (Some((start, end)), Some(expected)) = (range, expected) else {
                    return Err(bad(format!(
                        "tensor {name}: offsets {:?} or shape {:?} out of range",
                        h.data_offsets, h.shape
                    )));
                };
                if end > file_len {
                    return Err(bad(format!(
                        "tensor {name}: its bytes end at {end}, past the end of the file \
                         ({file_len} bytes): truncated or corrupt"
                    )));
                }
                if end < start || end - start != expected {
                    return Err(bad(format!(
                        "tensor {name}: {} bytes, but dtype {} and shape {:?} need {expected}",
                        end.saturating_sub(start),
                        h.dtype,
                        h.shape
                    )));
                }
                entries.insert(
                    name,
                    TensorEntry {
                        file: i,
                        dtype,
                        shape: h.shape,
                        start,
                        end,
                    },
                );
            }
            if mapping == Mapping::Read {
                maps.push(None);
            } else {
                let mut options = memmap2::MmapOptions::new();
                if mapping == Mapping::Populated {
                    options.populate();
                }
                // SAFETY: the mapping is read-only. If the file is changed or truncated on disk
                // while the server runs, what the weights read changes with it (or the process
                // gets SIGBUS), as with any mapped checkpoint; `--mmap false` reads instead.
                let map = unsafe { options.map(&file) }
                    .map_err(|e| bad(format!("mapping the file: {e}")))?;
                maps.push(Some(Arc::new(map)));
            }
            files.push((path.clone(), file));
        }
        Ok(SafetensorsWeights {
            files,
            maps,
            entries,
        })
    }

    /// A `VarBuilder` over weights that are also lent out as a [`MappedSource`].
    pub fn shared_var_builder(
        weights: Arc<Self>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Shared(weights)), dtype, device.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor's name and shape, as the headers state them (in no particular order).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .map(|(name, e)| (name.as_str(), e.shape.as_slice()))
    }

    fn read(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor {name} is missing from the checkpoint"))
        })?;
        let (path, file) = &self.files[entry.file];
        let len = (entry.end - entry.start) as usize;
        let read_into = |buf: &mut [u8]| {
            file.read_exact_at(buf, entry.start).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "reading tensor {name} from {}: {e}",
                    path.display()
                ))
            })
        };
        let elems: usize = entry.shape.iter().product();
        let tensor = match entry.dtype {
            // Read straight into the tensor's own buffer: one copy of the weights, not two.
            DType::F32 if elems * 4 == len => Tensor::from_vec(
                read_typed::<f32>(elems, read_into)?,
                entry.shape.as_slice(),
                &Device::Cpu,
            )?,
            DType::F16 if elems * 2 == len => Tensor::from_vec(
                read_typed::<half::f16>(elems, read_into)?,
                entry.shape.as_slice(),
                &Device::Cpu,
            )?,
            DType::BF16 if elems * 2 == len => Tensor::from_vec(
                read_typed::<half::bf16>(elems, read_into)?,
                entry.shape.as_slice(),
                &Device::Cpu,
            )?,
            _ => {
                let mut bytes = vec![0u8; len];
                read_into(&mut bytes)?;
                Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?
            }
        };
        tensor.to_dtype(dtype)?.to_device(device)
    }

    /// A `VarBuilder` over these weights that converts to `dtype` on `device` as it reads.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl MappedSource for SafetensorsWeights {
    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Option<MappedF32> {
        let entry = self.entries.get(name)?;
        if entry.dtype != DType::F32 || entry.shape.as_slice() != shape {
            return None;
        }
        let map = self.maps[entry.file].clone()?;
        MappedF32::new(
            map,
            usize::try_from(entry.start).ok()?,
            shape.iter().product(),
        )
    }
}

/// The backend of [`SafetensorsWeights::shared_var_builder`].
struct Shared(Arc<SafetensorsWeights>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor {name} is missing from the checkpoint"))
        })?;
        if entry.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor {name} has shape {:?} in the checkpoint, the config implies {:?}",
                self.files[entry.file].0.display(),
                entry.shape,
                s.dims()
            )));
        }
        self.read(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert_eq!(
            ModelSource::parse("Salesforce/blip2-opt-2.7b", None).unwrap(),
            ModelSource::Hub {
                repo_id: "Salesforce/blip2-opt-2.7b".into(),
                revision: "main".into()
            }
        );
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(dir.to_str().unwrap(), None).unwrap(),
            ModelSource::Local(dir.clone())
        );
        assert!(ModelSource::parse("/no/such/dir", None).is_err());
        assert!(ModelSource::parse("a/b/c", None).is_err());
    }

    #[test]
    fn truncated_safetensors_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("blip2-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 10]);
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsWeights::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
