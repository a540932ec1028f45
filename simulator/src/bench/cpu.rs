//! CPU time of this process and of the broker, read from
//! `/proc/<pid>/stat`, and the share of one core it makes over a span.

/// `/proc/<pid>/stat` clock ticks are USER_HZ, 100 on every Linux port.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User + system CPU time of a process (this one if `None`), in clock ticks.
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after "pid (comm)": state is field 3, utime 14, stime 15.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU used between two `cpu_ticks` readings `seconds` apart, percent of
/// one core; `None` unless both readings were had.
pub fn percent(ticks: (Option<u64>, Option<u64>), seconds: f64) -> Option<f64> {
    match ticks {
        (Some(a), Some(b)) => Some((b - a) as f64 / CLOCK_TICKS_PER_S / seconds * 100.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time() {
        if cfg!(target_os = "linux") {
            assert!(cpu_ticks(None).is_some());
        }
    }

    #[test]
    fn percent_of_one_core() {
        assert_eq!(percent((Some(100), Some(150)), 2.0), Some(25.0));
        assert_eq!(percent((Some(100), None), 2.0), None);
    }
}
