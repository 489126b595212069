//! Fault tests run fast in the suite and long under deploy/reliability.sh, which sets
//! MAILPUMP_RELIABILITY=full and collects the rows each test reports into RELIABILITY.md.

use serde_json::json;

/// `fast` in the test suite, `full` under deploy/reliability.sh.
pub fn scale(fast: u64, full: u64) -> u64 {
    if std::env::var("MAILPUMP_RELIABILITY").as_deref() == Ok("full") {
        full
    } else {
        fast
    }
}

/// One row of the reliability table.
pub struct Row<'a> {
    pub fault: &'a str,
    pub tries: u64,
    pub expected: u64,
    pub stored: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub hangs: u64,
}

/// Appends the row to $MAILPUMP_RELIABILITY_OUT (JSON lines) when set.
pub fn record(row: Row<'_>) {
    let Ok(path) = std::env::var("MAILPUMP_RELIABILITY_OUT") else {
        return;
    };
    let line = json!({
        "fault": row.fault, "tries": row.tries, "expected": row.expected, "stored": row.stored,
        "duplicated": row.duplicated, "crashes": row.crashes, "hangs": row.hangs,
    });
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}
