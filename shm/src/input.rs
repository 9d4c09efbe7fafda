//! A worker's input region: one memfd per worker process with one slot per
//! worker thread. The gateway copies an encoded upload (JPEG, PNG, MP4…) into
//! the slot of the thread that will decode it, so large inputs reach the
//! worker with a single copy and no socket traffic.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::ShmError;
use crate::segment::Segment;

/// Inputs larger than this have their pages handed back after the job, so an
/// idle worker region costs no memory.
const RELEASE_ABOVE: usize = 1 << 20;

#[derive(Debug)]
pub struct InputRegion {
    seg: Segment,
    slots: u32,
    slot_bytes: usize,
}

impl InputRegion {
    /// Gateway side. Pages are allocated only as inputs are written.
    pub fn create(slots: u32, slot_bytes: usize) -> Result<Self, ShmError> {
        let slot_bytes = slot_bytes.div_ceil(4096) * 4096;
        let seg = Segment::create("mmgate-input", slots as usize * slot_bytes)?;
        Ok(Self {
            seg,
            slots,
            slot_bytes,
        })
    }

    /// Worker side.
    pub fn open(fd: OwnedFd, slots: u32, slot_bytes: usize) -> Result<Self, ShmError> {
        let slot_bytes = slot_bytes.div_ceil(4096) * 4096;
        let seg = Segment::open(fd, slots as usize * slot_bytes)?;
        Ok(Self {
            seg,
            slots,
            slot_bytes,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.seg.fd()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn span(&self, index: u32, len: usize) -> Result<usize, ShmError> {
        if index >= self.slots {
            return Err(ShmError::NoSuchSlot {
                model: u16::MAX,
                slot: index,
            });
        }
        if len > self.slot_bytes {
            return Err(ShmError::InputTooLarge {
                len,
                cap: self.slot_bytes,
            });
        }
        Ok(index as usize * self.slot_bytes)
    }

    /// Gateway: copies `data` into slot `index`. The caller owns that slot
    /// (one dispatcher per worker thread) and the worker is not reading it.
    pub fn write(&self, index: u32, data: &[u8]) -> Result<(), ShmError> {
        let off = self.span(index, data.len())?;
        // SAFETY: `[off, off+len)` is inside the mapping (`span`). Slot `index`
        // belongs to one dispatcher task, which writes only while the worker
        // thread that reads this slot has no job, so nothing reads concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.seg.ptr().add(off), data.len());
        }
        Ok(())
    }

    /// Worker: the `len` input bytes in slot `index`, valid until the job's
    /// answer is sent.
    pub fn read(&self, index: u32, len: usize) -> Result<&[u8], ShmError> {
        let off = self.span(index, len)?;
        // SAFETY: in bounds (`span`); the gateway wrote the bytes before
        // sending the job (the socket send/receive orders the accesses) and
        // does not touch the slot again until this job is answered.
        Ok(unsafe { std::slice::from_raw_parts(self.seg.ptr().add(off), len) })
    }

    /// Gateway: after a job, frees the pages of a large input.
    pub fn recycle(&self, index: u32, len: usize) -> Result<(), ShmError> {
        if len > RELEASE_ABOVE {
            let off = self.span(index, len)?;
            self.seg.release(off, len.div_ceil(4096) * 4096)?;
        }
        Ok(())
    }
}

// SAFETY: access to the mapping follows the one-owner-per-slot protocol above.
unsafe impl Sync for InputRegion {}
// SAFETY: the mapping is process-wide; moving the owner between threads is fine.
unsafe impl Send for InputRegion {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_to_a_second_mapping_and_pages_can_be_released() {
        let g = InputRegion::create(2, 3 << 20).unwrap();
        let w = InputRegion::open(g.fd().try_clone_to_owned().unwrap(), 2, 3 << 20).unwrap();
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
        g.write(1, &data).unwrap();
        assert_eq!(w.read(1, data.len()).unwrap(), &data[..]);
        g.recycle(1, data.len()).unwrap();
        assert!(w.read(1, 16).unwrap().iter().all(|&b| b == 0));
        assert!(matches!(
            g.write(0, &vec![0; 4 << 20]),
            Err(ShmError::InputTooLarge { .. })
        ));
        assert!(g.write(2, b"x").is_err());
    }
}
