//! A shared-memory region: an anonymous memfd mapped `MAP_SHARED`.
//!
//! memfd has no name in /dev/shm, so nothing can leak there: the memory lives while a mapping
//! or a descriptor does, and the kernel frees it when the last one goes (also when a process is
//! killed). A child process receives the descriptor (e.g. Python's `pass_fds`) and maps it with
//! [`Region::from_fd`].
//!
//! The size is sealed once set (`F_SEAL_SHRINK | F_SEAL_GROW`, then `F_SEAL_SEAL`): a process
//! that shares the memfd cannot `ftruncate` it, so no access through another process's mapping
//! can land past the end of the file, which would kill that process with SIGBUS. `from_fd`
//! refuses a memfd whose size is not sealed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// The seals that fix a region's size.
const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A mapping of a whole memfd, read-write, shared between the processes that map it.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    /// The memfd's identity (device, inode): the same for every mapping of it, in any process.
    id: (u64, u64),
}

// SAFETY: the region is plain memory shared with other processes anyway; this type hands out
// only a raw pointer, and every access through it is synchronized by the protocol of its user
// (the ring's atomics), never by thread affinity.
unsafe impl Send for Region {}
// SAFETY: as for Send: `&Region` exposes no unsynchronized access by itself.
unsafe impl Sync for Region {}

impl Region {
    /// A new zero-filled region of `len` bytes (`len` > 0), named `name` in /proc/PID/fd only.
    pub fn create(name: &str, len: usize) -> io::Result<Region> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty region"));
        }
        let cname =
            CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor memfd_create just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: ftruncate on a descriptor we own; no memory is touched.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on a descriptor we own, with an int argument; no memory is touched.
        if unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                SIZE_SEALS | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// Maps a region created by another process, whose descriptor this process received.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Region> {
        // The seals first, then the size: once sealed, the size is final. (The other way round,
        // a peer could shrink the memfd and seal it between the two calls, and the mapping
        // would reach past the end of the file.)
        // SAFETY: fcntl on a descriptor we own, without an argument; no memory is touched.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SIZE_SEALS != SIZE_SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the memfd's size is not sealed (not a pipeflow region)",
            ));
        }
        // SAFETY: `stat` is a plain C struct for which all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which lives for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = usize::try_from(st.st_size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty or bad region"))?;
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Region> {
        // SAFETY: `stat` is a plain C struct for which all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which lives for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let id = (st.st_dev, st.st_ino);
        // SAFETY: a fresh shared mapping of a descriptor we own; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region { ptr, len, fd, id })
    }

    /// The memfd's identity, (device, inode): two regions with the same id map the same memory.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, to hand to a child process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The start of the mapping (page-aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing derived from it outlives
        // `self` (users borrow the region).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_sealed_so_no_peer_can_truncate_it() {
        let region = Region::create("pipeflow-test", 8192).unwrap();
        let peer = Region::from_fd(region.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(peer.len(), 8192);
        for size in [0, 4096, 16384] {
            // SAFETY: ftruncate on a descriptor the test owns; it must fail, touching nothing.
            let rc = unsafe { libc::ftruncate(peer.fd().as_raw_fd(), size) };
            assert_eq!(rc, -1, "ftruncate to {size} succeeded");
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
        // SAFETY: as above: adding a seal after F_SEAL_SEAL fails.
        let rc =
            unsafe { libc::fcntl(peer.fd().as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(rc, -1);
        // The memory stays usable through both mappings.
        // SAFETY: both mappings are 8192 bytes of the same live memfd; one thread.
        unsafe {
            region.as_ptr().add(8191).write(7);
            assert_eq!(peer.as_ptr().add(8191).read(), 7);
        }
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let name = CString::new("not-sealed").unwrap();
        // SAFETY: a plain memfd_create; the descriptor is wrapped at once.
        let fd =
            unsafe { OwnedFd::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC)) };
        // SAFETY: ftruncate on the test's own descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        let err = Region::from_fd(fd)
            .err()
            .expect("an unsealed memfd was accepted");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
