//! Pseudo-terminals: a serial port the test writes into.

use std::path::PathBuf;

/// A pseudo-terminal pair: the gateway opens `path` (the slave) as a serial
/// port, the test writes to `master`. Dropping it closes the master: to the
/// gateway, the device is unplugged.
pub struct Pty {
    pub master: std::fs::File,
    pub path: PathBuf,
    _slave: std::os::fd::OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: openpty fills two fds and a NUL-terminated name (128 bytes
        // is above glibc's limit for pty names).
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both fds are ours, the name is NUL-terminated.
        let (master, slave) = unsafe {
            (
                std::fs::File::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        };
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // Raw from the start, like a serial line: no echo, no line editing.
        {
            use std::os::fd::AsRawFd;
            // SAFETY: termios is plain data, filled by tcgetattr.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            unsafe {
                assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
                libc::cfmakeraw(&mut t);
                assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
            }
        }
        Pty {
            master,
            path: PathBuf::from(path),
            _slave: slave,
        }
    }

    /// Writes raw bytes as the device would.
    pub fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).expect("write to the pty");
    }
}
