//! The few process-level system calls mailpump makes (file descriptor limit, peak memory),
//! each wrapped once here so no other module needs `unsafe`.

/// One connection per mailbox: 1,000 mailboxes need more descriptors than the usual soft limit
/// of 1,024. Raises the soft limit to the hard one (what systemd's LimitNOFILE or ulimit -Hn
/// allows); returns the soft limit in force afterwards.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return Some(wanted.rlim_cur);
            }
        }
    }
    Some(limit.rlim_cur)
}

/// The process's peak resident set size so far, in KiB (Linux `ru_maxrss`).
pub fn peak_rss_kb() -> u64 {
    // SAFETY: getrusage only writes the struct we pass.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0 {
            usage.ru_maxrss.max(0) as u64
        } else {
            0
        }
    }
}
