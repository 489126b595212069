//! What the server said about the selected mailbox's existing messages, inside any response:
//! flag changes (`* n FETCH (FLAGS ...)`, with `UID` and `MODSEQ` under QRESYNC), expunges
//! (`* n EXPUNGE`, or `* VANISHED [(EARLIER)] uids` under QRESYNC). (HIGHESTMODSEQ is read
//! from the SELECT itself: `MailboxInfo::highest_modseq`.)
//! Pure: `Session` feeds it every untagged response, the catch-up pass takes it
//! (`Session::take_changes`) and writes it to the store.
//!
//! Without QRESYNC a flag change names only a sequence number. Those are kept as numbers,
//! renumbered on every EXPUNGE exactly as the server renumbers its messages, and turned into
//! UIDs with one `FETCH n,m,... (UID FLAGS)` before the mailbox is opened again
//! (`Session::resolve_changes`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use async_imap::imap_proto::{AttributeValue, Response};

/// More flag changes than this held at once (a hostile server, or a mailbox whose every flag
/// changed) are dropped, and a full flag read is asked for instead.
const MAX_HELD: usize = 200_000;

/// The changes announced for the selected mailbox since it was opened (or since the last take).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// UID -> the latest flags (and MODSEQ) announced for it.
    pub flags: BTreeMap<u32, (Vec<String>, Option<u64>)>,
    /// Sequence numbers whose flags changed, in the current numbering (no UID was sent).
    pub seqs: BTreeSet<u32>,
    /// UIDs the server reported gone (VANISHED, also EARLIER).
    pub vanished: Vec<RangeInclusive<u32>>,
    /// An EXPUNGE (by sequence number) was seen: which UID it was must be found out by
    /// comparing UIDs.
    pub expunged: bool,
    /// More was announced than is held: read every flag and compare every UID.
    pub overflow: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
            && self.seqs.is_empty()
            && self.vanished.is_empty()
            && !self.expunged
            && !self.overflow
    }

    /// Takes note of one untagged response. A FETCH that carries a body is the answer to a
    /// fetch of new messages (their flags are stored with them) and is not a change.
    pub fn observe(&mut self, r: &Response<'_>) {
        match r {
            Response::Fetch(seq, attrs) => {
                let mut flags = None;
                let (mut uid, mut modseq, mut body) = (None, None, false);
                for a in attrs {
                    match a {
                        AttributeValue::Flags(f) => flags = Some(super::message_flags(f.iter())),
                        AttributeValue::Uid(u) => uid = Some(*u),
                        AttributeValue::ModSeq(m) => modseq = Some(*m),
                        AttributeValue::BodySection { .. } | AttributeValue::Rfc822(_) => {
                            body = true
                        }
                        _ => {}
                    }
                }
                let Some(flags) = flags.filter(|_| !body) else {
                    return;
                };
                if self.flags.len() + self.seqs.len() >= MAX_HELD {
                    self.overflow = true;
                    return;
                }
                match uid {
                    Some(uid) => {
                        self.flags.insert(uid, (flags, modseq));
                    }
                    None => {
                        self.seqs.insert(*seq);
                    }
                }
            }
            Response::Expunge(seq) => {
                self.expunged = true;
                // the server renumbers: n goes, everything above moves down by one
                let above: Vec<u32> = self.seqs.range(seq..).copied().collect();
                for s in above {
                    self.seqs.remove(&s);
                    if s > *seq {
                        self.seqs.insert(s - 1);
                    }
                }
            }
            Response::Vanished { uids, .. } => {
                if self.vanished.len() >= MAX_HELD {
                    self.overflow = true;
                    return;
                }
                self.vanished.extend(uids.iter().cloned());
                for range in uids {
                    // a flag change announced before the message went is moot
                    let gone: Vec<u32> = self.flags.range(range.clone()).map(|(u, _)| *u).collect();
                    for u in gone {
                        self.flags.remove(&u);
                    }
                }
            }
            _ => {}
        }
    }

    /// The vanished UIDs, expanded, when they are few (at most `limit`); None when a range is
    /// too wide to expand (`VANISHED (EARLIER) 1:4000000000`): compare with the stored UIDs.
    pub fn vanished_uids(&self, limit: usize) -> Option<Vec<u32>> {
        let total: u64 = self
            .vanished
            .iter()
            .map(|r| (*r.end() as u64).saturating_sub(*r.start() as u64) + 1)
            .sum();
        if total > limit as u64 {
            return None;
        }
        let mut out: Vec<u32> = self.vanished.iter().flat_map(|r| r.clone()).collect();
        out.sort_unstable();
        out.dedup();
        Some(out)
    }

    /// The vanished ranges sorted and merged, for [`in_ranges`].
    pub fn vanished_ranges(&self) -> Vec<RangeInclusive<u32>> {
        let mut ranges: Vec<(u32, u32)> = self
            .vanished
            .iter()
            .map(|r| ((*r.start()).min(*r.end()), (*r.start()).max(*r.end())))
            .collect();
        ranges.sort_unstable();
        let mut out: Vec<RangeInclusive<u32>> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match out.last_mut() {
                Some(last) if a <= last.end().saturating_add(1) => {
                    if b > *last.end() {
                        *last = *last.start()..=b;
                    }
                }
                _ => out.push(a..=b),
            }
        }
        out
    }
}

/// Whether `uid` is in `ranges` (sorted and merged, [`Changes::vanished_ranges`]): a binary
/// search.
pub fn in_ranges(ranges: &[RangeInclusive<u32>], uid: u32) -> bool {
    let i = ranges.partition_point(|r| *r.end() < uid);
    ranges.get(i).is_some_and(|r| r.contains(&uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn fetch(seq: u32, uid: Option<u32>, flags: &[&'static str]) -> Response<'static> {
        let mut attrs = vec![AttributeValue::Flags(
            flags.iter().map(|f| Cow::Borrowed(*f)).collect(),
        )];
        if let Some(u) = uid {
            attrs.push(AttributeValue::Uid(u));
        }
        Response::Fetch(seq, attrs)
    }

    #[test]
    fn sequence_numbers_are_renumbered_by_every_expunge() {
        let mut c = Changes::default();
        c.observe(&fetch(3, None, &["\\Seen"]));
        c.observe(&fetch(7, None, &["\\Seen"]));
        c.observe(&fetch(9, None, &["\\Seen"]));
        c.observe(&Response::Expunge(7));
        c.observe(&Response::Expunge(2));
        // 3 -> 2 (below 7, above 2); 7 gone; 9 -> 8 -> 7
        assert_eq!(c.seqs.iter().copied().collect::<Vec<_>>(), vec![2, 7]);
        assert!(c.expunged);
    }

    #[test]
    fn the_latest_flags_win_and_a_vanished_message_drops_its_change() {
        let mut c = Changes::default();
        c.observe(&fetch(1, Some(10), &["\\Seen"]));
        c.observe(&fetch(1, Some(10), &["\\Seen", "\\Flagged"]));
        c.observe(&fetch(2, Some(11), &[]));
        assert_eq!(c.flags[&10].0, vec!["\\Seen", "\\Flagged"]);
        c.observe(&Response::Vanished {
            earlier: false,
            uids: vec![11..=11],
        });
        assert!(!c.flags.contains_key(&11));
        assert_eq!(c.vanished_uids(10), Some(vec![11]));
        c.observe(&Response::Vanished {
            earlier: true,
            uids: vec![1..=4_000_000_000],
        });
        assert_eq!(c.vanished_uids(1_000_000), None);
        let ranges = c.vanished_ranges();
        assert!(in_ranges(&ranges, 3_999_999_999));
        assert_eq!(ranges, vec![1..=4_000_000_000]);
        assert!(in_ranges(&ranges, 11) && !in_ranges(&ranges, 4_000_000_001));
        let d = Changes {
            vanished: vec![20..=30, 1..=5, 6..=8, 25..=40, 100..=100],
            ..Default::default()
        };
        let r = d.vanished_ranges();
        assert_eq!(r, vec![1..=8, 20..=40, 100..=100]);
        assert!(in_ranges(&r, 8) && !in_ranges(&r, 9) && in_ranges(&r, 100) && !in_ranges(&r, 101));
    }

    #[test]
    fn a_fetch_with_a_body_is_not_a_change() {
        let mut c = Changes::default();
        c.observe(&Response::Fetch(
            1,
            vec![
                AttributeValue::Uid(5),
                AttributeValue::Flags(vec![Cow::Borrowed("\\Seen")]),
                AttributeValue::BodySection {
                    section: None,
                    index: None,
                    data: None,
                },
            ],
        ));
        assert!(c.is_empty());
    }
}
