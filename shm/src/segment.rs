//! A memfd-backed shared mapping: anonymous (nothing in /dev/shm, nothing left
//! after a kill -9), sealed against resizing, handed to children as an fd.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};

use crate::ShmError;

/// A shared, writable mapping of a whole memfd.
pub(crate) struct Segment {
    map: MmapRaw,
    fd: OwnedFd,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("len", &self.len()).finish()
    }
}

impl Segment {
    /// Creates a memfd of `len` bytes, seals its size and maps it.
    pub(crate) fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        let opts = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true);
        let mfd = opts.create(name).map_err(memfd_err)?;
        mfd.as_file().set_len(len as u64)?;
        mfd.add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(memfd_err)?;
        let fd: OwnedFd = mfd.into_file().into();
        Self::open(fd, len)
    }

    /// Maps a segment received from the gateway.
    pub(crate) fn open(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        let actual = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if actual < len as u64 {
            return Err(ShmError::Io(std::io::Error::other(format!(
                "segment is {actual} bytes, expected {len}"
            ))));
        }
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        Ok(Self { map, fd })
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Touches every page so the first requests do not pay for page faults.
    pub(crate) fn prefault(&self) {
        let page = 4096;
        for off in (0..self.len()).step_by(page) {
            // SAFETY: `off < len`, the mapping is live for `self`'s lifetime and
            // a volatile byte write of 0 to a fresh, unshared page races with
            // nobody (called before any child gets the fd).
            unsafe { self.ptr().add(off).write_volatile(0) };
        }
    }

    /// Gives the pages of `[off, off+len)` back to the kernel (contents become 0).
    pub(crate) fn release(&self, off: usize, len: usize) -> Result<(), ShmError> {
        nix::fcntl::fallocate(
            self.fd.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )?;
        Ok(())
    }
}

fn memfd_err(e: memfd::Error) -> ShmError {
    ShmError::Io(std::io::Error::other(e.to_string()))
}
