//! The KServe v2 system shared-memory extension, off unless
//! `--allow-client-shm` (`[server] allow_client_shm`): a client on the same
//! host registers a POSIX shared-memory region (`/dev/shm/<key>`) under a
//! name, then passes tensors by region, offset and size instead of in the
//! request, and gets outputs written there.
//!
//! The gateway reads and writes a region with `pread`/`pwrite` on its file,
//! never through a mapping, so a client that shrinks or removes its region
//! costs only its own request (an error), not a SIGBUS. Every access is
//! checked against the registered window.
//!
//! Trust: a region is any file in `/dev/shm` the gateway's user may open,
//! so only clients on this host (loopback peers) may register or use one
//! (every use goes through a [`Scope`]), and each tenant sees, uses and
//! unregisters only the regions it named; two tenants may still name the
//! same file. Enable the
//! extension only where every local client is trusted with the gateway
//! user's `/dev/shm`.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{ApiError, Code};

/// Regions one tenant may have registered at once (each holds an open file).
pub const MAX_REGIONS: usize = 64;

/// One registered region: a window of a file in `/dev/shm`.
#[derive(Debug)]
pub struct Region {
    file: std::fs::File,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// A region as status calls show it.
#[derive(Debug, Clone, Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::BadRequest, msg)
}

impl Region {
    /// Opens `/dev/shm/<key>` (a leading `/` is dropped) for the window
    /// `[offset, offset + byte_size)`, which must lie inside the file.
    pub fn open(key: &str, offset: u64, byte_size: u64) -> Result<Self, ApiError> {
        let name = key.strip_prefix('/').unwrap_or(key);
        if name.is_empty() || name.len() > 255 || name.contains('/') || name.starts_with('.') {
            return Err(bad(format!(
                "shared-memory key {:?} is not a POSIX shared-memory name",
                crate::error::clip(key)
            )));
        }
        // Non-blocking: a file lease or a FIFO must not hold a runtime thread.
        let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags.bits())
            .open(format!("/dev/shm/{name}"))
            .map_err(|_| {
                bad(format!(
                    "shared-memory key {:?} cannot be opened (missing, or not permitted)",
                    crate::error::clip(name)
                ))
            })?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| bad("offset + byte_size overflows"))?;
        if !meta.is_file() || meta.len() < end {
            return Err(bad(format!(
                "shared-memory key {name:?} holds {} bytes; the region needs {end}",
                meta.len()
            )));
        }
        Ok(Self {
            file,
            key: key.to_string(),
            offset,
            byte_size,
        })
    }

    /// Checks that `[offset, offset + len)` lies within the region.
    pub fn window(&self, offset: u64, len: u64) -> Result<u64, ApiError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.byte_size => Ok(self.offset + offset),
            _ => Err(bad(format!(
                "offset {offset} + size {len} is past the region's {} bytes",
                self.byte_size
            ))),
        }
    }

    /// `len` bytes at `offset` within the region.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ApiError> {
        let at = self.window(offset, len)?;
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| bad(format!("cannot read the shared-memory region: {e}")))?;
        Ok(buf)
    }

    /// Writes `data` at `offset` within the region.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let at = self.window(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, at)
            .map_err(|e| bad(format!("cannot write the shared-memory region: {e}")))
    }
}

/// The registered regions, by name.
#[derive(Debug, Default)]
pub struct Regions {
    enabled: bool,
    /// By tenant, then name: a tenant sees only its own.
    regions: Mutex<HashMap<(String, String), Arc<Region>>>,
}

impl Regions {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            regions: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Region>>> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses every call while the extension is off.
    pub fn check_enabled(&self) -> Result<(), ApiError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ApiError::new(
                Code::BadRequest,
                "the system shared-memory extension is off; start mmgate with --allow-client-shm",
            ))
        }
    }

    pub fn register(
        &self,
        tenant: &str,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), ApiError> {
        self.check_enabled()?;
        if name.is_empty() || name.len() > 255 {
            return Err(bad("a region's name is 1 to 255 bytes"));
        }
        let region = Region::open(key, offset, byte_size)?;
        let mut all = self.lock();
        let id = (tenant.to_string(), name.to_string());
        if all.contains_key(&id) {
            return Err(bad(format!(
                "a region named {:?} is already registered",
                crate::error::clip(name)
            )));
        }
        if all.keys().filter(|(t, _)| t == tenant).count() >= MAX_REGIONS {
            return Err(ApiError::new(
                Code::BadRequest,
                format!("{MAX_REGIONS} regions are registered; unregister one first"),
            ));
        }
        all.insert(id, Arc::new(region));
        Ok(())
    }

    /// Unregisters the tenant's region `name`, or all its regions for
    /// `None`.
    pub fn unregister(&self, tenant: &str, name: Option<&str>) -> Result<(), ApiError> {
        self.check_enabled()?;
        self.lock()
            .retain(|(t, n), _| t != tenant || name.is_some_and(|want| want != n));
        Ok(())
    }

    pub fn status(&self, tenant: &str, name: Option<&str>) -> Result<Vec<RegionStatus>, ApiError> {
        self.check_enabled()?;
        let all = self.lock();
        let mut out: Vec<_> = all
            .iter()
            .filter(|((t, n), _)| t == tenant && name.is_none_or(|want| want == n.as_str()))
            .map(|((_, n), r)| RegionStatus {
                name: n.clone(),
                key: r.key.clone(),
                offset: r.offset,
                byte_size: r.byte_size,
            })
            .collect();
        if let Some(n) = name
            && out.is_empty()
        {
            return Err(ApiError::new(
                Code::NotFound,
                format!("no region named {:?}", crate::error::clip(n)),
            ));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Triton's CUDA shared-memory extension, served as Triton serves it
    /// without a GPU: no region can be registered, so a status lists none
    /// and an unregister has nothing to do. perf_analyzer unregisters CUDA
    /// regions along with system ones when it finishes.
    pub fn cuda_register(&self) -> Result<(), ApiError> {
        self.check_enabled()?;
        Err(bad(
            "CUDA shared memory needs a GPU executor; use system shared memory",
        ))
    }

    /// The tenant's CUDA regions (always none); a named one is not found.
    pub fn cuda_status(&self, name: Option<&str>) -> Result<(), ApiError> {
        self.check_enabled()?;
        match name {
            Some(n) => Err(ApiError::new(
                Code::NotFound,
                format!("no CUDA region named {:?}", crate::error::clip(n)),
            )),
            None => Ok(()),
        }
    }

    pub fn cuda_unregister(&self) -> Result<(), ApiError> {
        self.check_enabled()
    }

    /// What a request from `peer`, as `tenant`, may reach: its tenant's
    /// regions, and only from this host.
    pub fn scope<'a>(&'a self, tenant: &'a str, peer: Option<std::net::SocketAddr>) -> Scope<'a> {
        Scope {
            regions: self,
            tenant,
            peer,
        }
    }

    /// The tenant's region `name`, to read or write a tensor.
    fn get(&self, tenant: &str, name: &str) -> Result<Arc<Region>, ApiError> {
        self.check_enabled()?;
        let id = (tenant.to_string(), name.to_string());
        self.lock().get(&id).cloned().ok_or_else(|| {
            bad(format!(
                "no shared-memory region named {:?} is registered",
                crate::error::clip(name)
            ))
        })
    }
}

/// The regions one request may use: every use of a region by an infer goes
/// through [`Scope::get`], which checks, as registration does, that the
/// client is on this host (a region names a file of this host, which a
/// remote client must not read or write through the gateway).
pub struct Scope<'a> {
    regions: &'a Regions,
    tenant: &'a str,
    peer: Option<std::net::SocketAddr>,
}

impl Scope<'_> {
    pub fn get(&self, name: &str) -> Result<Arc<Region>, ApiError> {
        self.regions.check_enabled()?;
        check_local(self.peer)?;
        self.regions.get(self.tenant, name)
    }
}

/// Refuses a peer that is not on this host (a loopback address).
pub fn check_local(peer: Option<std::net::SocketAddr>) -> Result<(), ApiError> {
    if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::SharedMemoryNotLocal,
            "shared-memory regions are for clients on this host (a loopback address)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_checked_windows_of_dev_shm_files() {
        let key = format!("mmgate-test-{}", std::process::id());
        let path = format!("/dev/shm/{key}");
        std::fs::write(&path, [0u8; 64]).unwrap();
        let off = Regions::new(false);
        assert!(
            off.register("t", "r", &key, 0, 8).is_err(),
            "off by default"
        );
        let on = Regions::new(true);
        for bad_key in ["", "/", "../etc/passwd", "a/b", ".hidden"] {
            assert!(on.register("t", "r", bad_key, 0, 8).is_err(), "{bad_key:?}");
        }
        // Past the file's end, or overflowing.
        assert!(on.register("t", "r", &key, 60, 8).is_err());
        assert!(on.register("t", "r", &key, u64::MAX, 2).is_err());
        on.register("t", "r", &format!("/{key}"), 16, 32).unwrap();
        assert!(
            on.register("t", "r", &key, 0, 8).is_err(),
            "a name is taken once"
        );
        // Another tenant neither sees nor uses nor removes it.
        assert!(on.get("u", "r").is_err());
        assert!(on.status("u", None).unwrap().is_empty());
        on.unregister("u", None).unwrap();
        let r = on.get("t", "r").unwrap();
        r.write(4, b"abcd").unwrap();
        assert_eq!(r.read(4, 4).unwrap(), b"abcd");
        assert_eq!(&std::fs::read(&path).unwrap()[20..24], b"abcd");
        // Outside the window: refused, before any access.
        assert!(r.read(30, 4).is_err());
        assert!(r.write(31, b"xy").is_err());
        // A client that shrinks its file costs only the access.
        std::fs::write(&path, [0u8; 8]).unwrap();
        assert!(r.read(0, 8).is_err());
        assert_eq!(on.status("t", None).unwrap().len(), 1);
        on.unregister("t", None).unwrap();
        assert!(on.get("t", "r").is_err());
        let _ = std::fs::remove_file(&path);
    }
}
