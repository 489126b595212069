//! Parses the folder-level responses that `sanitize` takes out of async-imap's stream: `LIST`
//! (with LIST-EXTENDED data such as `("OLDNAME" (...))`), `STATUS` (with `HIGHESTMODSEQ` and
//! RFC 8474's `MAILBOXID`), and `NAMESPACE`, as they come from a command or from NOTIFY.
//! Names are decoded from modified UTF-7 to UTF-8 here; a name that is not valid modified
//! UTF-7 is kept as the server sent it.

use super::utf7;

/// One node of an IMAP response: an atom, quoted string or literal; NIL; or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Str(Vec<u8>),
    Nil,
    List(Vec<Value>),
}

impl Value {
    fn text(&self) -> Option<String> {
        match self {
            Value::Str(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
    fn list(&self) -> &[Value] {
        match self {
            Value::List(l) => l,
            _ => &[],
        }
    }
}

/// Deeper nesting is refused (the response is ignored).
const MAX_DEPTH: usize = 16;

/// Reads values from `input` until the end of the response (or a `)` at depth 0).
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn skip_spaces(&mut self) {
        while self.pos < self.input.len() && self.input[self.pos] == b' ' {
            self.pos += 1;
        }
    }

    fn at_end(&self) -> bool {
        matches!(self.input.get(self.pos), None | Some(b'\r') | Some(b'\n'))
    }

    fn values(&mut self, depth: usize) -> Option<Vec<Value>> {
        // LIST, STATUS and NAMESPACE nest three levels deep; a server that sends a million
        // parentheses must not overflow the stack
        if depth > MAX_DEPTH {
            return None;
        }
        let mut out = Vec::new();
        loop {
            self.skip_spaces();
            if self.at_end() {
                return (depth == 0).then_some(out);
            }
            match self.input[self.pos] {
                b'(' => {
                    self.pos += 1;
                    out.push(Value::List(self.values(depth + 1)?));
                }
                b')' => {
                    self.pos += 1;
                    return (depth > 0).then_some(out);
                }
                b'"' => out.push(Value::Str(self.quoted()?)),
                b'{' => out.push(Value::Str(self.literal()?)),
                _ => {
                    let start = self.pos;
                    while self.pos < self.input.len()
                        && !matches!(self.input[self.pos], b' ' | b'(' | b')' | b'\r' | b'\n')
                    {
                        self.pos += 1;
                    }
                    let atom = &self.input[start..self.pos];
                    out.push(if atom.eq_ignore_ascii_case(b"NIL") {
                        Value::Nil
                    } else {
                        Value::Str(atom.to_vec())
                    });
                }
            }
        }
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match *self.input.get(self.pos)? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    out.push(*self.input.get(self.pos + 1)?);
                    self.pos += 2;
                }
                b => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    fn literal(&mut self) -> Option<Vec<u8>> {
        let close = self.pos + self.input[self.pos..].iter().position(|b| *b == b'}')?;
        let digits = std::str::from_utf8(&self.input[self.pos + 1..close]).ok()?;
        let n: usize = digits.trim_end_matches('+').parse().ok()?;
        let mut start = close + 1;
        if self.input.get(start) == Some(&b'\r') {
            start += 1;
        }
        if self.input.get(start) != Some(&b'\n') {
            return None;
        }
        start += 1;
        let bytes = self.input.get(start..start + n)?.to_vec();
        self.pos = start + n;
        Some(bytes)
    }
}

/// A name from the wire, decoded.
fn decode(wire: &str) -> String {
    utf7::decode_mailbox(wire).unwrap_or_else(|| wire.to_string())
}

/// One `* LIST` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// UTF-8.
    pub name: String,
    pub delimiter: Option<char>,
    /// Name attributes as sent, lowercased (`\noselect`, `\sent`, `\nonexistent`, ...).
    pub attributes: Vec<String>,
    /// LIST-EXTENDED's OLDNAME (a rename announced by NOTIFY), UTF-8.
    pub old_name: Option<String>,
}

impl ListEntry {
    pub fn has(&self, attribute: &str) -> bool {
        self.attributes
            .iter()
            .any(|a| a.eq_ignore_ascii_case(attribute))
    }
}

/// One `* STATUS` line: the values present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusEntry {
    /// UTF-8.
    pub name: String,
    pub messages: Option<u32>,
    pub uidnext: Option<u32>,
    pub uidvalidity: Option<u32>,
    pub unseen: Option<u32>,
    pub highestmodseq: Option<u64>,
    /// RFC 8474.
    pub mailbox_id: Option<String>,
}

/// One personal namespace of `* NAMESPACE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub prefix: String,
    pub delimiter: Option<char>,
}

/// A captured response, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    List(ListEntry),
    Status(StatusEntry),
    Namespace(Vec<Namespace>),
}

/// Parses one captured response; None when it is malformed (it is then ignored, as RFC 3501
/// asks of responses a client does not understand).
pub fn parse(raw: &[u8]) -> Option<Listing> {
    let rest = raw.strip_prefix(b"* ")?;
    let space = rest.iter().position(|b| *b == b' ')?;
    let (word, rest) = rest.split_at(space);
    let values = Reader {
        input: rest,
        pos: 0,
    }
    .values(0)?;
    match word.to_ascii_uppercase().as_slice() {
        b"LIST" | b"LSUB" => {
            let attributes = values
                .first()?
                .list()
                .iter()
                .filter_map(|v| v.text())
                .map(|a| a.to_ascii_lowercase())
                .collect();
            let delimiter = match values.get(1)? {
                Value::Str(d) => d.first().map(|b| *b as char),
                _ => None,
            };
            let name = decode(&values.get(2)?.text()?);
            let mut old_name = None;
            if let Some(Value::List(ext)) = values.get(3) {
                for pair in ext.chunks(2) {
                    if pair[0]
                        .text()
                        .is_some_and(|k| k.eq_ignore_ascii_case("OLDNAME"))
                    {
                        old_name = pair
                            .get(1)
                            .and_then(|v| v.list().first())
                            .and_then(|v| v.text())
                            .map(|n| decode(&n));
                    }
                }
            }
            Some(Listing::List(ListEntry {
                name,
                delimiter,
                attributes,
                old_name,
            }))
        }
        b"STATUS" => {
            let mut entry = StatusEntry {
                name: decode(&values.first()?.text()?),
                ..Default::default()
            };
            for pair in values.get(1)?.list().chunks(2) {
                let (Some(key), Some(value)) = (pair[0].text(), pair.get(1)) else {
                    continue;
                };
                let number = value.text().and_then(|t| t.parse::<u64>().ok());
                let small = number.and_then(|n| u32::try_from(n).ok());
                match key.to_ascii_uppercase().as_str() {
                    "MESSAGES" => entry.messages = small,
                    "UIDNEXT" => entry.uidnext = small,
                    "UIDVALIDITY" => entry.uidvalidity = small,
                    "UNSEEN" => entry.unseen = small,
                    "HIGHESTMODSEQ" => entry.highestmodseq = number,
                    // RFC 8474 objectid: 1*255 of ALPHA / DIGIT / "_" / "-"
                    "MAILBOXID" => {
                        entry.mailbox_id =
                            value.list().first().and_then(|v| v.text()).filter(|id| {
                                (1..=255).contains(&id.len())
                                    && id.bytes().all(|b| {
                                        b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
                                    })
                            })
                    }
                    _ => {}
                }
            }
            Some(Listing::Status(entry))
        }
        b"NAMESPACE" => Some(Listing::Namespace(
            values
                .first()?
                .list()
                .iter()
                .filter_map(|ns| {
                    let ns = ns.list();
                    Some(Namespace {
                        prefix: decode(&ns.first()?.text()?),
                        delimiter: match ns.get(1)? {
                            Value::Str(d) => d.first().map(|b| *b as char),
                            _ => None,
                        },
                    })
                })
                .collect(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(raw: &str) -> ListEntry {
        match parse(raw.as_bytes()) {
            Some(Listing::List(l)) => l,
            other => panic!("{raw}: {other:?}"),
        }
    }

    #[test]
    fn list_lines_as_dovecot_cyrus_and_courier_send_them() {
        let l = list("* LIST (\\HasNoChildren \\Junk) \".\" Junk\r\n");
        assert_eq!(l.name, "Junk");
        assert_eq!(l.delimiter, Some('.'));
        assert!(l.has("\\Junk") && l.has("\\hasnochildren"));
        let l = list("* LIST () \".\" Entw&APw-rfe\r\n");
        assert_eq!(l.name, "Entwürfe");
        let l = list("* LIST (\\Noselect) \"/\" \"Projects/&XfJT0ZAB-\"\r\n");
        assert_eq!(l.name, "Projects/已发送");
        assert!(l.has("\\NoSelect"));
        let l = list("* LIST () NIL INBOX\r\n");
        assert_eq!(l.delimiter, None);
        let l = list("* LIST () \"\\\\\" \"a\\\\b\"\r\n");
        assert_eq!((l.delimiter, l.name.as_str()), (Some('\\'), "a\\b"));
        let l = list("* LIST () \".\" {11}\r\nwith \"quote\r\n");
        assert_eq!(l.name, "with \"quote");
    }

    #[test]
    fn a_rename_by_notify_carries_the_old_name() {
        let l = list("* LIST () \".\" Newbox2 (\"OLDNAME\" (\"Newbox\"))\r\n");
        assert_eq!(l.name, "Newbox2");
        assert_eq!(l.old_name.as_deref(), Some("Newbox"));
        let l = list("* LIST (\\NonExistent) \".\" Newbox2\r\n");
        assert!(l.has("\\nonexistent"));
        let l = list("* LIST (\\Subscribed) \"/\" Foo (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n");
        assert_eq!(l.old_name, None);
    }

    #[test]
    fn status_lines_with_and_without_the_extensions() {
        let Some(Listing::Status(s)) = parse(
            b"* STATUS Junk (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 1796001734 HIGHESTMODSEQ 2)\r\n",
        ) else {
            panic!()
        };
        assert_eq!(
            (s.messages, s.uidnext, s.uidvalidity, s.highestmodseq),
            (Some(1), Some(2), Some(1796001734), Some(2))
        );
        let Some(Listing::Status(s)) =
            parse(b"* STATUS \"&XfJT0ZAB-\" (MAILBOXID (F2212ea87-6097-4256) UIDNEXT 7)\r\n")
        else {
            panic!()
        };
        assert_eq!(s.name, "已发送");
        assert_eq!(s.mailbox_id.as_deref(), Some("F2212ea87-6097-4256"));
        assert_eq!(s.uidnext, Some(7));
        // Cyrus 3.6 inside LIST-STATUS: bytes that are no objectid
        let Some(Listing::Status(s)) =
            parse(b"* STATUS INBOX (MESSAGES 0 MAILBOXID (0\x07\x08WrU) HIGHESTMODSEQ 1)\r\n")
        else {
            panic!()
        };
        assert_eq!((s.mailbox_id, s.messages), (None, Some(0)));
        // Courier answers HIGHESTMODSEQ with an empty list
        let Some(Listing::Status(s)) = parse(b"* STATUS INBOX.x ()\r\n") else {
            panic!()
        };
        assert_eq!((s.name.as_str(), s.uidnext), ("INBOX.x", None));
    }

    #[test]
    fn namespaces_personal_only() {
        let Some(Listing::Namespace(ns)) =
            parse(b"* NAMESPACE ((\"INBOX.\" \".\")) NIL ((\"#shared.\" \".\"))\r\n")
        else {
            panic!()
        };
        assert_eq!(
            ns,
            vec![Namespace {
                prefix: "INBOX.".into(),
                delimiter: Some('.')
            }]
        );
        let Some(Listing::Namespace(ns)) = parse(b"* NAMESPACE ((\"\" \".\")) NIL NIL\r\n") else {
            panic!()
        };
        assert_eq!(ns[0].prefix, "");
        assert_eq!(
            parse(b"* NAMESPACE NIL NIL NIL\r\n"),
            Some(Listing::Namespace(vec![]))
        );
    }

    #[test]
    fn malformed_responses_are_none_not_panics() {
        for raw in [
            &b"* LIST\r\n"[..],
            b"* LIST (\\Noselect\r\n",
            b"* LIST () \".\"\r\n",
            b"* STATUS\r\n",
            b"* STATUS x (MESSAGES\r\n",
            b"* LIST () \".\" {99}\r\nshort\r\n",
            b"* LIST () \".\" \"unterminated\r\n",
            b"* NAMESPACE ((\r\n",
        ] {
            let _ = parse(raw);
        }
        assert_eq!(parse(b"* LIST () \".\" {99}\r\nshort\r\n"), None);
        let mut deep = b"* STATUS x ".to_vec();
        deep.extend(std::iter::repeat_n(b'(', 1_000_000));
        deep.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&deep),
            None,
            "a million parentheses, no stack overflow"
        );
    }
}
