//! The tensor pool: one memfd holding, per model, a fixed number of slots of
//! one sample each, preceded by a small header. No locks live in shared
//! memory: the gateway's ledger decides who may touch a slot, and the header's
//! generations let a worker or the executor detect a handle that went stale.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::ShmError;
use crate::segment::Segment;

/// Bytes reserved in front of each sample; keeps samples 64-byte aligned.
pub const SLOT_HEADER_BYTES: usize = 64;

/// Where each model's slots live in the tensor segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLayout {
    pub regions: Vec<Region>,
    pub total_bytes: usize,
}

/// One model's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub offset: usize,
    pub slots: u32,
    /// Header plus sample, rounded up to 64 bytes.
    pub stride: usize,
    pub sample_bytes: usize,
}

impl PoolLayout {
    /// Lays out `(slots, sample_bytes)` per model, in order.
    pub fn new(models: &[(u32, usize)]) -> Self {
        let mut offset = 0;
        let regions = models
            .iter()
            .map(|&(slots, sample_bytes)| {
                let stride = (SLOT_HEADER_BYTES + sample_bytes).div_ceil(64) * 64;
                let r = Region {
                    offset,
                    slots,
                    stride,
                    sample_bytes,
                };
                offset += stride * slots as usize;
                r
            })
            .collect();
        Self {
            regions,
            total_bytes: offset.max(4096),
        }
    }
}

/// A handle to one leased slot: valid while the slot's generation matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRef {
    pub model: u16,
    pub slot: u32,
    pub generation: u64,
}

/// The header in front of each sample. Only atomics, so concurrent access
/// from several processes is defined.
#[repr(C)]
struct SlotHeader {
    /// Set by the gateway when it leases the slot.
    generation: AtomicU64,
    /// Set by the worker after the sample is fully written.
    filled: AtomicU64,
    /// Valid bytes of the sample.
    len: AtomicU64,
}

/// The tensor pool, mapped in this process.
#[derive(Debug)]
pub struct SharedTensors {
    seg: Segment,
    layout: PoolLayout,
}

impl SharedTensors {
    /// Gateway side: creates, seals and pre-faults the pool.
    pub fn create(layout: PoolLayout) -> Result<Self, ShmError> {
        let seg = Segment::create("mmgate-tensors", layout.total_bytes)?;
        seg.prefault();
        Ok(Self { seg, layout })
    }

    /// Child side: maps the pool received from the gateway.
    pub fn open(fd: OwnedFd, layout: PoolLayout) -> Result<Self, ShmError> {
        let seg = Segment::open(fd, layout.total_bytes)?;
        Ok(Self { seg, layout })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.seg.fd()
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    fn locate(&self, model: u16, slot: u32) -> Result<(usize, Region), ShmError> {
        let r = *self
            .layout
            .regions
            .get(model as usize)
            .filter(|r| slot < r.slots)
            .ok_or(ShmError::NoSuchSlot { model, slot })?;
        Ok((r.offset + r.stride * slot as usize, r))
    }

    fn header(&self, model: u16, slot: u32) -> Result<&SlotHeader, ShmError> {
        let (off, _) = self.locate(model, slot)?;
        // SAFETY: `off` is inside the mapping (checked by `locate` against a
        // layout whose total is the mapping's length), 64-byte aligned, and the
        // header is made only of atomics, valid for any bit pattern and for
        // concurrent access from other processes.
        Ok(unsafe { &*(self.seg.ptr().add(off) as *const SlotHeader) })
    }

    /// Gateway: marks `slot` as leased under `generation`.
    pub fn stamp(&self, s: SlotRef) -> Result<(), ShmError> {
        let h = self.header(s.model, s.slot)?;
        h.filled.store(0, Ordering::Relaxed);
        h.len.store(0, Ordering::Relaxed);
        h.generation.store(s.generation, Ordering::Release);
        Ok(())
    }

    fn check(&self, s: SlotRef, filled: bool) -> Result<&SlotHeader, ShmError> {
        let h = self.header(s.model, s.slot)?;
        let actual = if filled {
            let f = h.filled.load(Ordering::Acquire);
            if f == s.generation {
                h.generation.load(Ordering::Acquire)
            } else {
                f
            }
        } else {
            h.generation.load(Ordering::Acquire)
        };
        if actual != s.generation {
            return Err(ShmError::StaleSlot {
                model: s.model,
                slot: s.slot,
                expected: s.generation,
                actual,
            });
        }
        Ok(h)
    }

    /// Worker: fills the sample of a slot it was handed, as `f32`s, then
    /// marks it filled. Fails without writing if the handle is stale.
    pub fn write_f32<R>(
        &self,
        s: SlotRef,
        fill: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R, ShmError> {
        self.write(s, fill)
    }

    /// Worker: [`SharedTensors::write_f32`] for a model whose slots hold
    /// uint8 pixels.
    pub fn write_u8<R>(
        &self,
        s: SlotRef,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, ShmError> {
        self.write(s, fill)
    }

    fn write<T: Element, R>(
        &self,
        s: SlotRef,
        fill: impl FnOnce(&mut [T]) -> R,
    ) -> Result<R, ShmError> {
        let h = self.check(s, false)?;
        let (off, r) = self.locate(s.model, s.slot)?;
        // SAFETY: the sample lies inside the mapping (`locate`) and is 64-byte
        // aligned, so valid for `T` (f32 or u8: any bit pattern is a value).
        // The gateway's ledger hands a slot generation to exactly one worker
        // job at a time and does not re-lease it until that job is answered
        // or its process is dead, so no other live `&mut` or `&` to these
        // bytes exists in any process.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                self.seg.ptr().add(off + SLOT_HEADER_BYTES) as *mut T,
                r.sample_bytes / std::mem::size_of::<T>(),
            )
        };
        let out = fill(buf);
        h.len.store(r.sample_bytes as u64, Ordering::Relaxed);
        h.filled.store(s.generation, Ordering::Release);
        Ok(out)
    }

    /// Executor: reads a filled sample. Fails if the handle is stale or the
    /// worker never finished writing it.
    pub fn read_f32<R>(&self, s: SlotRef, read: impl FnOnce(&[f32]) -> R) -> Result<R, ShmError> {
        self.read(s, read)
    }

    /// Executor: [`SharedTensors::read_f32`] for uint8-pixel slots.
    pub fn read_u8<R>(&self, s: SlotRef, read: impl FnOnce(&[u8]) -> R) -> Result<R, ShmError> {
        self.read(s, read)
    }

    fn read<T: Element, R>(&self, s: SlotRef, read: impl FnOnce(&[T]) -> R) -> Result<R, ShmError> {
        Ok(read(self.view(s)?))
    }

    /// Executor: reads several filled samples at once (a batch a GPU engine
    /// copies to the device itself), each as `f32`s or its error; the
    /// borrows end with `read`.
    pub fn read_many_f32<R>(
        &self,
        slots: &[SlotRef],
        read: impl FnOnce(Vec<Result<&[f32], ShmError>>) -> R,
    ) -> R {
        read(slots.iter().map(|&s| self.view(s)).collect())
    }

    /// Executor: [`SharedTensors::read_many_f32`] for uint8-pixel slots.
    pub fn read_many_u8<R>(
        &self,
        slots: &[SlotRef],
        read: impl FnOnce(Vec<Result<&[u8], ShmError>>) -> R,
    ) -> R {
        read(slots.iter().map(|&s| self.view(s)).collect())
    }

    /// A filled sample, borrowed for as long as `self` — private, so every
    /// public borrow is scoped by a closure that ends before the job can be
    /// answered (and the slot re-leased).
    fn view<T: Element>(&self, s: SlotRef) -> Result<&[T], ShmError> {
        self.check(s, true)?;
        let (off, r) = self.locate(s.model, s.slot)?;
        // SAFETY: in bounds and aligned (`locate`); the `filled` generation
        // check (Acquire) proves the worker finished writing this generation,
        // and the ledger keeps the slot leased, so nobody writes it while
        // the caller's closure holds the borrow.
        Ok(unsafe {
            std::slice::from_raw_parts(
                self.seg.ptr().add(off + SLOT_HEADER_BYTES) as *const T,
                r.sample_bytes / std::mem::size_of::<T>(),
            )
        })
    }

    /// The pool's whole mapping, to register it with a GPU driver for DMA.
    /// The range stays mapped, at this address and length, for as long as
    /// `self` lives; using the pointer is the caller's `unsafe`.
    pub fn mapped_range(&self) -> (*const u8, usize) {
        (self.seg.ptr() as *const u8, self.seg.len())
    }
}

/// What a slot may be read or written as: plain numbers, valid for any bit
/// pattern, with an alignment that 64-byte slots satisfy.
trait Element: Copy {}
impl Element for f32 {}
impl Element for u8 {}

// SAFETY: all shared state behind the raw mapping is accessed through atomics
// or through the ledger's exclusive-lease protocol documented above.
unsafe impl Sync for SharedTensors {}
// SAFETY: the mapping is process-wide; moving the owner between threads is fine.
unsafe impl Send for SharedTensors {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> SharedTensors {
        SharedTensors::create(PoolLayout::new(&[(2, 12), (1, 8)])).unwrap()
    }

    #[test]
    fn write_then_read_through_a_second_mapping() {
        let p = pool();
        let fd = p.fd().try_clone_to_owned().unwrap();
        let other = SharedTensors::open(fd, p.layout().clone()).unwrap();
        let s = SlotRef {
            model: 0,
            slot: 1,
            generation: 7,
        };
        p.stamp(s).unwrap();
        other
            .write_f32(s, |b| b.copy_from_slice(&[1.0, 2.0, 3.0]))
            .unwrap();
        let got = p.read_f32(s, |b| b.to_vec()).unwrap();
        assert_eq!(got, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn stale_handles_are_rejected() {
        let p = pool();
        let old = SlotRef {
            model: 0,
            slot: 0,
            generation: 1,
        };
        let new = SlotRef {
            generation: 2,
            ..old
        };
        p.stamp(old).unwrap();
        p.stamp(new).unwrap();
        assert!(matches!(
            p.write_f32(old, |_| ()),
            Err(ShmError::StaleSlot { .. })
        ));
        // Not yet filled: the executor must not read it.
        assert!(p.read_f32(new, |_| ()).is_err());
        p.write_f32(new, |b| b.fill(5.0)).unwrap();
        assert!(p.read_f32(old, |_| ()).is_err());
        assert_eq!(p.read_f32(new, |b| b[2]).unwrap(), 5.0);
    }

    #[test]
    fn uint8_slots_are_written_and_read_as_bytes() {
        let p = SharedTensors::create(PoolLayout::new(&[(1, 5)])).unwrap();
        let s = SlotRef {
            model: 0,
            slot: 0,
            generation: 3,
        };
        p.stamp(s).unwrap();
        assert!(p.read_u8(s, |_| ()).is_err(), "not filled yet");
        p.write_u8(s, |b| b.copy_from_slice(&[1, 2, 3, 4, 255]))
            .unwrap();
        assert_eq!(p.read_u8(s, |b| b.to_vec()).unwrap(), vec![1, 2, 3, 4, 255]);
    }

    #[test]
    fn out_of_range_slots_are_rejected() {
        let p = pool();
        let s = SlotRef {
            model: 1,
            slot: 1,
            generation: 1,
        };
        assert!(matches!(p.stamp(s), Err(ShmError::NoSuchSlot { .. })));
        let s = SlotRef {
            model: 2,
            slot: 0,
            generation: 1,
        };
        assert!(p.stamp(s).is_err());
    }
}
