//! What the server holds of the open mailbox, without a body: `UID FETCH 1:* (UID FLAGS
//! RFC822.SIZE)`, one line per message, for `verify`. Read-only (FLAGS and RFC822.SIZE set no
//! flag), and one command however large the mailbox: each response is one short line, handed
//! to the callback as it arrives, so memory is the listing itself (a few MB per 100,000
//! messages).

use async_imap::imap_proto::{AttributeValue, Response};

use super::{ImapError, Session};

/// One message as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMeta {
    pub uid: u32,
    pub size: u64,
    pub flags: Vec<String>,
}

impl Session {
    /// UID, FLAGS and RFC822.SIZE of every message of the open mailbox, sorted by UID. A FETCH
    /// the server sends on its own meanwhile (another client changed flags) updates the flags
    /// of its UID; a UID listed without a size is left out. `exists` is EXAMINE's count: an
    /// empty mailbox is not asked (some servers refuse `1:*` there).
    pub async fn inventory(&mut self, exists: u32) -> Result<Vec<ServerMeta>, ImapError> {
        if exists == 0 {
            return Ok(Vec::new());
        }
        let mut seen: Vec<(u32, Option<u64>, Option<Vec<String>>)> =
            Vec::with_capacity(exists.min(1_000_000) as usize);
        self.command("UID FETCH 1:* (UID FLAGS RFC822.SIZE)", |r| {
            if let Response::Fetch(_, attrs) = r {
                let (mut uid, mut size, mut flags) = (None, None, None);
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => uid = Some(*u),
                        AttributeValue::Rfc822Size(s) => size = Some(*s as u64),
                        AttributeValue::Flags(f) => {
                            flags = Some(f.iter().map(|s| s.to_string()).collect())
                        }
                        _ => {}
                    }
                }
                if let Some(uid) = uid {
                    seen.push((uid, size, flags));
                }
            }
            Ok(())
        })
        .await?;
        Ok(merge(seen))
    }
}

/// Sorts by UID and merges repeated UIDs, a later response's fields winning.
fn merge(mut seen: Vec<(u32, Option<u64>, Option<Vec<String>>)>) -> Vec<ServerMeta> {
    seen.sort_by_key(|(uid, _, _)| *uid); // stable: arrival order kept within a UID
    let mut out: Vec<(u32, Option<u64>, Vec<String>)> = Vec::with_capacity(seen.len());
    for (uid, size, flags) in seen {
        match out.last_mut() {
            Some(last) if last.0 == uid => {
                if size.is_some() {
                    last.1 = size;
                }
                if let Some(f) = flags {
                    last.2 = f;
                }
            }
            _ => out.push((uid, size, flags.unwrap_or_default())),
        }
    }
    out.into_iter()
        .filter_map(|(uid, size, flags)| {
            Some(ServerMeta {
                uid,
                size: size?,
                flags,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_uids_merge_and_a_uid_without_a_size_is_left_out() {
        let got = merge(vec![
            (3, Some(30), Some(vec!["\\Seen".into()])),
            (1, Some(10), Some(vec![])),
            (3, None, Some(vec!["\\Seen".into(), "\\Flagged".into()])),
            (9, None, Some(vec![])),
        ]);
        assert_eq!(
            got,
            vec![
                ServerMeta {
                    uid: 1,
                    size: 10,
                    flags: vec![]
                },
                ServerMeta {
                    uid: 3,
                    size: 30,
                    flags: vec!["\\Seen".into(), "\\Flagged".into()]
                },
            ]
        );
    }
}
