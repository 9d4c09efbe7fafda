//! What a child process needs at start: take the fds the gateway mapped into
//! it, and make sure it dies with the gateway.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::ShmError;

static TAKEN: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes ownership of an fd inherited from the gateway (passed by number on
/// the command line). Each number can be taken once.
pub fn take_inherited_fd(raw: RawFd) -> Result<OwnedFd, ShmError> {
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if raw < 3 || !taken.get_or_insert_with(HashSet::new).insert(raw) {
        return Err(ShmError::Io(std::io::Error::other(format!(
            "fd {raw} is not an inherited fd or was already taken"
        ))));
    }
    nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)?;
    // SAFETY: `raw` is open (F_GETFD succeeded), was placed in this process by
    // the gateway for us alone, and the TAKEN set guarantees a single owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

/// Asks the kernel to SIGKILL this process when its parent dies, and exits
/// now if the parent is already gone (the gateway's pid is `parent`).
pub fn die_with_parent(parent: u32) -> Result<(), ShmError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid().as_raw() as u32 != parent {
        std::process::exit(70);
    }
    Ok(())
}

/// Pins this thread, and every thread it starts later, to the CPUs of the
/// Linux CPU list `cpus` (`"0-3,8"`); `""` leaves it unpinned. Called by a
/// child first thing, before it starts any thread.
pub fn pin_to_cpus(cpus: &str) -> Result<(), ShmError> {
    let list = config::parse_cpu_list(cpus)
        .map_err(|e| ShmError::Io(std::io::Error::other(format!("--cpus {cpus:?}: {e}"))))?;
    if list.is_empty() {
        return Ok(());
    }
    let mut set = nix::sched::CpuSet::new();
    for cpu in list {
        set.set(cpu)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// The CPUs this process may run on now.
pub fn allowed_cpus() -> Result<Vec<usize>, ShmError> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}
